"""The test oracle of the e3kernels ops: random case generators and accuracy rules, shared by
the kernel tests (tests/kernels) and the device check (bench/gpu_check.py).

Fused KD. A case is fresh random inputs (never zeros) and random upstream gradients. Three
runs see the same (rounded) inputs: `ours` (a kernel), `truth` (`fused_linear_kd_ref` in
fp64) and `ref` (the same reference at the input dtype: fp32 compute for bf16/fp16 inputs,
gradients rounded to the input dtype). For every output x (per-token statistics [N], the
gradients of sum(g_kl kl) + sum(g_ce ce) wrt hs [N, Ds] and ws [Vs, Ds]):

    err(x) = max_i |x_i - truth_i|,    s = max_i |truth_i|
    pass  <=>  ours finite,  shape(ours) = shape(truth),  err(ours) <= 2 err(ref) + floor(s)

A kernel may be at most twice as far from the exact answer as plain PyTorch at the same
precision. The floor, by the dtype of the output, absorbs fp32 rounding where the reference
happens to be exact (a single token, a zero gradient):

    floor          fp32               bf16              fp16               for
    stats_floor    1e-6 (1 + s)       1e-6 (1 + s)      1e-6 (1 + s)       op outputs (fp32 stats)
    ulp_floor      2^-22 max(1, s)    2^-7 max(1, s)    2^-10 max(1, s)    raw _C outputs (2 ulp)

Gumbel-TopK. Soft values and the straight-through gradient, with t the fp64 reference and
r the fp32-compute reference on the same inputs:

    fp64       max|ours - t| <= atol
    fp32       max|ours - t| <= 2 max|r - t| + atol
    bf16/fp16  |ours_i - r_i| <= c eps |r_i| + atol for every i, c = 1 (soft), 2 (gradient)
    atol: fp64 1e-12, fp32 2e-5, fp16 2e-3, bf16 1.6e-2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from e3kernels.ops.fused_kd import FusedKDConfig, LaunchOptions, fused_kd_stats
from e3kernels.ops.fused_kd.logit_transform import logit_transforms
from e3kernels.reference import fused_linear_kd_ref

IGNORE_INDEX = -100
KD_OUTPUTS = ("kl", "teacher_entropy", "student_lse", "teacher_lse", "ce", "student_lse_t1",
              "grad_hs", "grad_ws")
STATS_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}  # x (1 + s)
ULP_FLOOR = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7,
             torch.float16: 2.0 ** -10}  # x max(1, s)
GUMBEL_ATOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3,
               torch.bfloat16: 1.6e-2}
GUMBEL_EPS_FACTOR = {"soft": 1.0, "grad": 2.0}

Floor = Callable[[torch.dtype, float], float]
Outputs = dict[str, torch.Tensor | None]


def stats_floor(dtype: torch.dtype, scale: float) -> float:
    return STATS_FLOOR[dtype] * (1.0 + scale)


def ulp_floor(dtype: torch.dtype, scale: float) -> float:
    return ULP_FLOOR[dtype] * max(1.0, scale)


# ======================================================================================
# Fused KD: cases
# ======================================================================================

@dataclasses.dataclass(frozen=True, eq=False)
class KDCase:
    """One fused KD call. hs [N, Ds], ws [Vs, Ds], ht [N, Dt], wt [Vt, Dt]; head rows >= V =
    vocab_size are padding. labels [N] int64 (IGNORE_INDEX: ignored) or None. grad_kl,
    grad_ce [N] fp32: upstream gradients, the loss differentiated is
    sum(grad_kl kl) + sum(grad_ce ce)."""

    hs: torch.Tensor
    ws: torch.Tensor
    ht: torch.Tensor
    wt: torch.Tensor
    labels: torch.Tensor | None
    grad_kl: torch.Tensor
    grad_ce: torch.Tensor
    vocab_size: int
    temperature: float = 1.0
    kl: str = "forward"
    compute_ce: bool = False
    name: str = ""
    logit_scale: float | tuple[float, float] = 1.0  # the logit transform (logit_transform.py)
    softcap: float | None | tuple[float | None, float | None] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.hs.dtype

    def replace(self, **changes) -> KDCase:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        (n, ds), (vs, _), (vt, dt) = self.hs.shape, self.ws.shape, self.wt.shape
        dtypes = str(self.hs.dtype).removeprefix("torch.")
        if self.ht.dtype != self.hs.dtype:
            dtypes += "/" + str(self.ht.dtype).removeprefix("torch.")
        xf = "" if self.logit_scale == 1.0 and self.softcap is None else \
            f" scale={self.logit_scale} softcap={self.softcap}"
        return (f"{self.name or 'case'} [N={n} V={self.vocab_size} Vs={vs} Vt={vt} Ds={ds} "
                f"Dt={dt} {dtypes} kl={self.kl} T={self.temperature} ce={self.compute_ce}{xf}]")


def kd_case(n: int, v: int, ds: int, dt: int, dtype: torch.dtype = torch.float32, *, seed: int,
            temperature: float = 1.0, kl: str = "forward", compute_ce: bool = False,
            vs: int | None = None, vt: int | None = None,
            teacher_dtype: torch.dtype | None = None, labels: bool = True,
            ignore_every: int = 0, all_ignored: bool = False,
            overflow_teacher_rows: torch.Tensor | None = None,
            device: torch.device | str = "cpu", name: str = "") -> KDCase:
    """Fresh random inputs from torch.Generator(seed): logits of std ~2 on both sides; head
    rows >= v (vs, vt > v) hold +-1e4, which would break any result that read them; every
    `ignore_every`-th label (or all) ignored; `overflow_teacher_rows` [R] vocab ids get teacher
    logits of -3e38 / T (-inf in fp32, finite in fp64). grad_kl in [0.1, 1.1), grad_ce ~ N(0, 1).
    The student side is cast to dtype, the teacher side to teacher_dtype (default dtype)."""
    if compute_ce and not labels:
        raise ValueError("compute_ce needs labels")
    g = torch.Generator().manual_seed(seed)
    vs, vt = vs or v, vt or v
    hs = torch.randn(n, ds, generator=g)
    ws = torch.randn(vs, ds, generator=g) * (2.0 / ds ** 0.5)
    ht = torch.randn(n, dt, generator=g)
    wt = torch.randn(vt, dt, generator=g) * (2.0 / dt ** 0.5)
    ws[v:] = 1e4
    wt[v:] = -1e4
    if overflow_teacher_rows is not None:
        ht[:, 0] = 1.0
        wt[overflow_teacher_rows] = 0.0
        wt[overflow_teacher_rows, 0] = -3e38
    lab = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        lab[::ignore_every] = IGNORE_INDEX
    if all_ignored:
        lab[:] = IGNORE_INDEX
    grad_kl = torch.rand(n, generator=g) + 0.1
    grad_ce = torch.randn(n, generator=g)
    student = dict(device=device, dtype=dtype)
    teacher = dict(device=device, dtype=teacher_dtype or dtype)
    return KDCase(hs.to(**student), ws.to(**student), ht.to(**teacher), wt.to(**teacher),
                  lab.to(device) if labels else None, grad_kl.to(device), grad_ce.to(device),
                  vocab_size=v, temperature=temperature, kl=kl, compute_ce=compute_ce,
                  name=name)


# ======================================================================================
# Fused KD: runs
# ======================================================================================

def reference_outputs(case: KDCase, compute_dtype: torch.dtype | None = None, *,
                      need_grad_ws: bool = True) -> Outputs:
    """`fused_linear_kd_ref` on the case's inputs cast to compute_dtype (torch.float64: the
    truth), or as given (None: the same-precision reference). Returns every KD_OUTPUTS entry:
    ce and student_lse_t1 = logsumexp_v(hs ws[:V]^T) None unless compute_ce, grad_ws None
    unless need_grad_ws. With a logit transform, student_lse_t1 is that of the transformed
    student logits y_s."""
    cast = (lambda t: t.to(compute_dtype)) if compute_dtype is not None else (lambda t: t)
    xs, _ = logit_transforms(case.logit_scale, case.softcap)
    hs = cast(case.hs.detach()).requires_grad_()
    ws = cast(case.ws.detach()).requires_grad_(need_grad_ws)
    out = fused_linear_kd_ref(hs, ws, cast(case.ht), cast(case.wt), case.labels,
                              temperature=case.temperature, kl=case.kl,
                              ignore_index=IGNORE_INDEX, vocab_size=case.vocab_size,
                              compute_ce=case.compute_ce, logit_scale=case.logit_scale,
                              softcap=case.softcap)
    cd = out.kl.dtype
    loss = (out.kl * case.grad_kl.to(cd)).sum()
    lse_t1 = None
    if case.compute_ce:
        loss = loss + (out.ce * case.grad_ce.to(cd)).sum()
        with torch.no_grad():
            lse_t1 = torch.logsumexp(xs.apply(hs.to(cd) @ ws[:case.vocab_size].to(cd).T), dim=-1)
    loss.backward()
    return {"kl": out.kl.detach(), "teacher_entropy": out.teacher_entropy.detach(),
            "student_lse": out.student_lse.detach(), "teacher_lse": out.teacher_lse.detach(),
            "ce": out.ce.detach() if case.compute_ce else None, "student_lse_t1": lse_t1,
            "grad_hs": hs.grad, "grad_ws": ws.grad if need_grad_ws else None}


def kernel_outputs(case: KDCase, backend: str, *, launch: LaunchOptions | None = None,
                   need_grad_ws: bool = True, shared_head: bool = False) -> Outputs:
    """The fused KD op on `backend` ("cpp" or "triton") through `fused_kd_stats` and its
    autograd formula, with the outputs of `reference_outputs`. shared_head: the student head
    tensor itself is passed as the teacher head (ws is wt)."""
    hs = case.hs.detach().clone().requires_grad_()
    ws = case.ws.detach().clone().requires_grad_(need_grad_ws)
    xs, xt = logit_transforms(case.logit_scale, case.softcap)
    cfg = FusedKDConfig(inv_temperature=1.0 / case.temperature, reverse=case.kl == "reverse",
                        ignore_index=IGNORE_INDEX, vocab_size=case.vocab_size,
                        compute_ce=case.compute_ce, backend=backend,
                        launch=launch or LaunchOptions(), student=xs, teacher=xt)
    st = fused_kd_stats(hs, ws, case.ht, ws if shared_head else case.wt, case.labels, cfg)
    loss = (st.kl * case.grad_kl).sum()
    if case.compute_ce:
        loss = loss + (st.ce * case.grad_ce).sum()
    loss.backward()
    ce = dict(ce=st.ce.detach(), student_lse_t1=st.student_lse_t1) if case.compute_ce else \
        dict(ce=None, student_lse_t1=None)
    return {"kl": st.kl.detach(), "teacher_entropy": st.teacher_entropy,
            "student_lse": st.student_lse, "teacher_lse": st.teacher_lse, **ce,
            "grad_hs": hs.grad, "grad_ws": ws.grad}


# ======================================================================================
# Fused KD: the accuracy rule
# ======================================================================================

def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def kd_accuracy(ours: Outputs, ref: Outputs, truth: Outputs,
                floor: Floor = stats_floor) -> dict[str, dict]:
    """The accuracy rule on every output that `truth` has (not None). Returns {output:
    {"ours": err(ours), "reference": err(ref), "bound": 2 err(ref) + floor, "finite", "shape",
    "pass"}}; the floor is taken at the dtype of our output."""
    result = {}
    for name, t in truth.items():
        if t is None:
            continue
        t, o, r = t.double(), ours.get(name), ref[name].double()
        err_r, scale = _max_abs(r - t), _max_abs(t)
        shape_ok = o is not None and o.shape == t.shape
        finite = o is not None and bool(torch.isfinite(o).all())
        err_o = _max_abs(o.double() - t) if shape_ok else float("inf")
        bound = 2 * err_r + floor(o.dtype if o is not None else torch.float32, scale)
        result[name] = {"ours": err_o, "reference": err_r, "bound": bound, "finite": finite,
                        "shape": shape_ok, "pass": shape_ok and finite and err_o <= bound}
    return result


def assert_kd_accurate(ours: Outputs, ref: Outputs, truth: Outputs, *, backend: str,
                       case: KDCase | str, floor: Floor = stats_floor) -> None:
    """AssertionError naming every output that breaks the rule, its dtype, the backend and the
    case (a KDCase, or a description)."""
    lines = []
    for name, r in kd_accuracy(ours, ref, truth, floor).items():
        if r["pass"]:
            continue
        o = ours.get(name)
        what = ("missing" if o is None else
                f"shape {tuple(o.shape)} != {tuple(truth[name].shape)}" if not r["shape"] else
                "non-finite values" if not r["finite"] else
                f"error {r['ours']:.3e} > bound {r['bound']:.3e} "
                f"(reference error {r['reference']:.3e})")
        dtype = "" if o is None else f" ({str(o.dtype).removeprefix('torch.')})"
        lines.append(f"{name}{dtype} on {backend}: {what}")
    assert not lines, f"{case}:\n  " + "\n  ".join(lines)


def assert_masked_outputs_zero(ours: Outputs, *, backend: str, case: KDCase) -> None:
    """Tokens with an ignored label: kl = H = ce = 0 and zero rows of grad_hs. Head rows >= V
    (padding): zero rows of grad_ws."""
    if case.labels is not None:
        ignored = case.labels == IGNORE_INDEX
        for name in ("kl", "teacher_entropy", "ce", "grad_hs"):
            if ours.get(name) is not None:
                assert (ours[name][ignored] == 0).all(), \
                    f"{case}: {name} on {backend} is not 0 on ignored tokens"
    if ours.get("grad_ws") is not None:
        assert (ours["grad_ws"][case.vocab_size:] == 0).all(), \
            f"{case}: padding rows of ws got a gradient on {backend}"


# ======================================================================================
# Gumbel-TopK: cases and the accuracy rule
# ======================================================================================

def gumbel_logits(b: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                  scale: float = 1.5) -> torch.Tensor:
    """[b, n] logits ~ N(0, scale^2) drawn in fp64, then rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, generator=g, dtype=torch.float64) * scale).to(dtype)


def gumbel_k(b: int, n: int, seed: int = 0, kmax: int | None = None) -> torch.Tensor:
    """[b] int64 k per row, uniform in [0, n]; rows 0 and 1 (when b >= 2) get the edge cases
    k = 0 and k = n; clamped to kmax."""
    g = torch.Generator().manual_seed(seed + 1)
    k = torch.randint(0, n + 1, (b,), generator=g)
    if b >= 2:
        k[0], k[1] = 0, n
    if kmax is not None:
        k = k.clamp_max(kmax)
    return k


def gumbel_upstream(b: int, n: int, seed: int = 0) -> torch.Tensor:
    """[b, n] fp64 upstream gradient of the mask, ~ N(0, 1)."""
    return torch.randn(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gumbel_accuracy(ours: Outputs, dtype: torch.dtype, *, truth: Outputs | None = None,
                    ref32: Outputs | None = None) -> dict[str, dict]:
    """The Gumbel-TopK rule on "soft" and "grad" ([B, L] each), for logits of `dtype`: truth
    (fp64 reference) is needed for fp64/fp32, ref32 (fp32-compute reference) for fp32 and
    below. Returns {output: {"err", "bound", "pass"}}; for bf16/fp16, err is
    max_i (|ours_i - r_i| - c eps |r_i|), so err <= atol is the elementwise rule."""
    atol = GUMBEL_ATOL[dtype]
    result = {}
    for name, c in GUMBEL_EPS_FACTOR.items():
        o = ours[name].double()
        if dtype in (torch.float64, torch.float32):
            t = truth[name].double()
            excess = (o - t).abs() if o.shape == t.shape else None
            bound = atol if dtype == torch.float64 else \
                2 * _max_abs(ref32[name].double() - t) + atol
        else:
            r = ref32[name].double()
            eps = torch.finfo(dtype).eps
            excess = (o - r).abs() - c * eps * r.abs() if o.shape == r.shape else None
            bound = atol
        err = float("inf") if excess is None else excess.max().item() if excess.numel() else 0.0
        result[name] = {"err": err, "bound": bound,
                        "pass": bool(torch.isfinite(o).all()) and err <= bound}
    return result


def assert_gumbel_accurate(ours: Outputs, dtype: torch.dtype, *, truth: Outputs | None = None,
                           ref32: Outputs | None = None, label: str = "") -> None:
    """AssertionError naming every output that breaks the Gumbel-TopK rule."""
    bad = [f"{name}: error {r['err']:.3e} > bound {r['bound']:.3e}"
           for name, r in gumbel_accuracy(ours, dtype, truth=truth, ref32=ref32).items()
           if not r["pass"]]
    assert not bad, f"{label} ({str(dtype).removeprefix('torch.')}): " + "; ".join(bad)
