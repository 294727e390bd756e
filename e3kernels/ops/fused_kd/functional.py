"""Fused linear KD loss, functional and Module layer: validation, backend dispatch, per-token
weighting, reduction, the result object and `nn.Module`s. See docs/fused_kd.md.

The dispatcher ops (`e3kernels.ops.fused_kd.op`) return per-token statistics only; everything here is
plain torch on [N] vectors, so any weighting or reduction plugs in.

Loss (reduction="mean"):

    loss = s_T * sum_i w_i KL_i / n_valid  +  ce_weight * sum_i ce_i / n_valid   (ce if compute_ce)

with s_T = T^2 when `t2_scale` (Hinton et al. 2015: keeps the gradient magnitude of the soft
targets independent of T), else 1; n_valid = number of tokens whose label != ignore_index
(all tokens without labels; at least 1 in the division, so an all-ignored batch gives 0 with
zero gradients). "sum" drops the division, "none" returns the per-token loss.

Non-finite inputs: a NaN or +-inf anywhere in hs, ht, ws[:V] or wt[:V] (for the top-K loss:
hs, ws, or a NaN / +inf in topk_logprobs) makes the loss NaN on every backend: the affected
tokens report NaN kl / teacher_entropy / ce (all tokens when a head is non-finite), and every
gradient of hs and ws is NaN. Detection is a sync-free row sum, O((N + V) D).

Temperature: fp32 statistics lose the KL to cancellation as T grows (T^2 KL is a difference of
O(T^2) terms); T is accepted in TEMPERATURE_RANGE, where every backend was verified against
fp64 (tests/kernels/test_kd_nonfinite.py), and rejected outside it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from e3kernels.dispatch import BACKENDS, resolve_backend
from e3kernels.ops.fused_kd.cpp import has_fused_kd as cpp_has_fused_kd
from e3kernels.ops.fused_kd.logit_transform import logit_transforms
from e3kernels.ops.fused_kd.op import (
    SUPPORTED_DTYPES,
    FusedKDConfig,
    LaunchOptions,
    check_label_range,
    fused_kd_stats,
)
from e3kernels.ops.fused_kd.topk import (
    GatheredLogitsFunction,
    default_max_elems,
    teacher_topk_forward,
    topk_kd_per_token,
)
from e3kernels.reference import fused_linear_kd_ref

KL_DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "none")
WEIGHTINGS = ("none", "entropy", "normalized_entropy", "confidence")
DEFAULT_WEIGHT_CLIP = (0.1, 5.0)
TEMPERATURE_RANGE = (1e-3, 20.0)

WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class KDLossOutput:
    """Result of `fused_linear_kd_loss` / `fused_linear_kd_loss_topk`.

    loss: scalar (reduction "mean"/"sum") or per-token [...] ("none"); the only differentiable
        field. Per-token fields have the leading shape of `hs` ([N] for 2-D inputs), are fp32
        (fp64 for fp64 inputs) and detached, 0 on ignored tokens.
    """

    loss: torch.Tensor
    kl: torch.Tensor  # KL_i at temperature T (not multiplied by T^2)
    teacher_entropy: torch.Tensor  # H_i of the teacher at temperature T, nats
    weights: torch.Tensor  # w_i of the weighting scheme (0 on ignored tokens)
    ce: torch.Tensor | None = None  # hard-label CE_i (unscaled logits) when compute_ce
    num_valid: torch.Tensor | None = None  # number of non-ignored tokens (0-d int64)


# ======================================================================================
# Weighting schemes: plain functions of the detached teacher entropy
# ======================================================================================

def kd_token_weights(teacher_entropy: torch.Tensor, valid: torch.Tensor | None = None,
                     scheme: str | WeightFn = "entropy", *, vocab_size: int | None = None,
                     clip: tuple[float, float] = DEFAULT_WEIGHT_CLIP) -> torch.Tensor:
    """Per-token weights w_i (detached, 0 where not valid) from the teacher entropy H_i.

    - "none":               w = 1
    - "entropy":            w = clip(H / mean_valid(H), lo, hi), default [0.1, 5.0]: mean 1
                            before clipping; up-weights tokens where the teacher is uncertain
                            (more information in its soft targets than the hard label), the
                            floor keeps a gradient on confident tokens, the ceiling stops a
                            few near-uniform tokens from dominating. If mean(H) = 0, w = 1.
    - "normalized_entropy": w = H / log V in [0, 1]: the same preference without the batch
                            mean, so a token's weight does not depend on its batch-mates
                            (small or ragged batches, gradient accumulation).
    - "confidence":         w = 1 - H / log V in [0, 1]: the opposite choice, trusting the
                            teacher where it is sure and fading out near-uniform (noisy)
                            targets, as in confidence-weighted / reliability-aware KD.
    - a callable f(H, valid) -> w [N].
    `vocab_size` (V) is needed by the normalized schemes; log V uses max(V, 2).
    """
    h = teacher_entropy.detach()
    if valid is None:
        valid = torch.ones_like(h, dtype=torch.bool)
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    if callable(scheme):
        w = scheme(h, valid).detach().to(h.dtype)
    elif scheme == "none":
        w = torch.ones_like(h)
    elif scheme == "entropy":
        lo, hi = clip
        n = valid.sum().clamp(min=1)
        mean = torch.where(valid, h, zero).sum() / n
        w = torch.where(mean > 0, h / torch.where(mean > 0, mean, 1.0), torch.ones_like(h))
        w = w.clamp(lo, hi)
    elif scheme in ("normalized_entropy", "confidence"):
        if vocab_size is None:
            raise ValueError(f"weighting {scheme!r} needs vocab_size")
        hn = (h / math.log(max(int(vocab_size), 2))).clamp(0.0, 1.0)
        w = hn if scheme == "normalized_entropy" else 1.0 - hn
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a callable, got {scheme!r}")
    return torch.where(valid, w, zero)


# ======================================================================================
# Validation and dispatch
# ======================================================================================

def _shape(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else tuple(t.shape)


def _check_common(temperature, kl, reduction, weighting, weight_clip) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    lo_t, hi_t = TEMPERATURE_RANGE
    if not lo_t <= temperature <= hi_t:
        raise ValueError(f"temperature must be in [{lo_t:g}, {hi_t:g}], the range verified against "
                         f"fp64 (beyond it fp32 statistics lose the T^2-scaled KL to "
                         f"cancellation); got {temperature!r}")
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be one of {KL_DIRECTIONS}, got {kl!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not callable(weighting) and weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS} or a callable, got {weighting!r}")
    lo, hi = weight_clip
    if not (0 <= lo <= hi):
        raise ValueError(f"weight_clip must satisfy 0 <= lo <= hi, got {weight_clip!r}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype} "
                         f"with shape {tuple(t.shape)}")


def _check_labels(labels, lead, hs_shape) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point \
            or labels.dtype.is_complex or labels.dtype == torch.bool:
        what = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor, got {what}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the leading shape "
                         f"{tuple(lead)} of hs {hs_shape}")


def _validate(hs, ws, ht, wt, labels, vocab_size, compute_ce) -> int:
    """Shape/dtype checks of the fused loss; returns V. Raises ValueError naming the shapes."""
    for name, t in (("hs", hs), ("ws", ws), ("ht", ht), ("wt", wt)):
        _check_float(name, t)
    shapes = (f"hs {_shape(hs)}, ws {_shape(ws)}, ht {_shape(ht)}, wt {_shape(wt)}, "
              f"labels {_shape(labels)}")
    if hs.dim() < 2 or ht.dim() < 2 or ws.dim() != 2 or wt.dim() != 2:
        raise ValueError(f"expected hs [..., Ds], ws [Vs, Ds], ht [..., Dt], wt [Vt, Dt] "
                         f"(hs/ht at least 2-D); got {shapes}")
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student hidden size mismatch: hs {_shape(hs)} vs ws {_shape(ws)}")
    if wt.shape[1] != ht.shape[-1]:
        raise ValueError(f"teacher hidden size mismatch: ht {_shape(ht)} vs wt {_shape(wt)}")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"token shapes differ: hs {_shape(hs)} vs ht {_shape(ht)}")
    _check_labels(labels, hs.shape[:-1], _shape(hs))
    devs = {t.device for t in (hs, ws, ht, wt)} | ({labels.device} if labels is not None else set())
    if len(devs) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))} ({shapes})")
    vs, vt = ws.shape[0], wt.shape[0]
    if vocab_size is None:
        if vs != vt:
            raise ValueError(f"student vocab {vs} != teacher vocab {vt} (ws {_shape(ws)}, "
                             f"wt {_shape(wt)}): pass vocab_size=V to use the first V rows")
        vocab_size = vs
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not 0 < vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size must be an int in [1, min(Vs, Vt)] = [1, {min(vs, vt)}] "
                         f"for ws {_shape(ws)}, wt {_shape(wt)}; got {vocab_size!r}")
    if compute_ce and labels is None:
        raise ValueError("compute_ce=True needs labels")
    return vocab_size


def _check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int | None) -> None:
    # A host sync: skipped while torch.compile traces and on fake tensors (then the reference's
    # gather fails on a bad label, the Triton op's gather asserts on the device).
    if not _has_values(labels):
        return
    if ignore_index is None:
        ignore_index = torch.iinfo(torch.int64).min
    check_label_range(labels, vocab_size, int(ignore_index))


def _head_for(w: torch.Tensor, h_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The head as the backend takes it for hidden states of h_dtype: the kernels cast an fp32
    head (and any head of fp32 hidden states) per tile; other pairs are cast here."""
    if w.dtype == h_dtype:
        return w
    if backend != "reference" and w.dtype in SUPPORTED_DTYPES \
            and (w.dtype == torch.float32 or h_dtype == torch.float32):
        return w
    return w.to(h_dtype)


def _has_values(t: torch.Tensor) -> bool:
    """False while torch.compile traces or for a FakeTensor: no data to check on the host."""
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and not is_fake(t)


_fallback_warned: set[str] = set()


def _resolve_kd_backend(device: torch.device, backend: str, dtypes) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if any(d not in SUPPORTED_DTYPES for d in dtypes):
        # fp64 (ground truth, gradcheck): only the reference computes in fp64
        if backend in ("auto", "reference"):
            return "reference"
        raise ValueError(f"backend {backend!r} supports {SUPPORTED_DTYPES}, got {tuple(dtypes)}; "
                         "use backend='reference' for float64")
    b = resolve_backend(device, backend)
    if b == "cpp" and not cpp_has_fused_kd():
        if backend == "cpp":
            raise ValueError("backend 'cpp': e3kernels._C was built without fused_kd_forward/"
                             "fused_kd_backward; rebuild with `pip install --no-build-isolation -e .`")
        if "cpp-kd" not in _fallback_warned:
            _fallback_warned.add("cpp-kd")
            warnings.warn("e3kernels._C has no fused_kd ops: the fused KD loss uses the "
                          "PyTorch reference on CPU (materializes [N, V]).", RuntimeWarning,
                          stacklevel=3)
        return "reference"
    return b


# ======================================================================================
# Non-finite inputs
# ======================================================================================

class _NaNGradIfFlagged(torch.autograd.Function):
    """Identity on x [...]; the gradient becomes NaN everywhere when `flag` (bool scalar
    tensor) is set, so a loss that read a non-finite input has the same (NaN) gradient on
    every backend instead of whatever each kernel makes of the bad values."""

    @staticmethod
    def forward(ctx, x, flag):
        ctx.save_for_backward(flag)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (flag,) = ctx.saved_tensors
        if g.device.type == "cpu" and not torch.compiler.is_compiling():
            # eager CPU: no sync to avoid, so skip the pass over g when all is finite
            return (torch.full_like(g, float("nan")) if bool(flag) else g), None
        # traced (no data-dependent branch) or GPU (no host sync): one select, same values
        return torch.where(flag, torch.full((), float("nan"), dtype=g.dtype, device=g.device),
                           g), None


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """[R, D] -> [R] bool: rows holding a NaN or +-inf (a sum is NaN/inf iff some term is,
    short of overflow of values no model produces)."""
    return ~torch.isfinite(x.detach().sum(-1, dtype=torch.float32))


def _nonfinite_any(*xs: torch.Tensor) -> torch.Tensor:
    """bool scalar tensor: some element of the given tensors is NaN or +-inf."""
    total = sum(x.detach().sum(dtype=torch.float32) for x in xs)
    return ~torch.isfinite(total)


def _poison(t: torch.Tensor | None, bad: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    return torch.where(bad, torch.full((), float("nan"), dtype=t.dtype, device=t.device), t)


# ======================================================================================
# Public ops
# ======================================================================================

def _reduce(kl, w, ce, valid, reduction, t2, ce_weight):
    n_valid = valid.sum()
    kd = w * kl * t2
    if reduction == "none":
        per = kd if ce is None else kd + ce_weight * ce
        return per, n_valid
    total = kd.sum()
    if ce is not None:
        total = total + ce_weight * ce.sum()
    if reduction == "mean":
        total = total / n_valid.clamp(min=1).to(total.dtype)
    return total, n_valid


def fused_linear_kd_loss(
    hs: torch.Tensor,
    ws: torch.Tensor,
    ht: torch.Tensor,
    wt: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl: str = "forward",
    weighting: str | WeightFn = "entropy",
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    vocab_size: int | None = None,
    compute_ce: bool = False,
    ce_weight: float = 1.0,
    t2_scale: bool = True,
    weight_clip: tuple[float, float] = DEFAULT_WEIGHT_CLIP,
    backend: str = "auto",
    launch: LaunchOptions | None = None,
    check_labels: bool = True,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | None | tuple[float | None, float | None] = None,
) -> KDLossOutput:
    """Entropy-weighted KD loss from hidden states and LM heads, never materializing [N, V]
    (Triton on CUDA, C++ on CPU; the "reference" backend does materialize).

    hs [..., Ds] student hidden states, ws [Vs, Ds] student head, ht [..., Dt] teacher hidden
    states, wt [Vt, Dt] teacher head (may be `ws` itself), labels [...] int or None.
    Logits z_s = y_s / T, z_t = y_t / T with V = vocab_size (needed when Vs != Vt; head rows
    >= V are padding), else Vs == Vt, and per side y = c tanh(s r / c) (or s r without a
    softcap) of the raw head product r = h w[:V]^T: logit_scale s (Cohere's logit_scale,
    Granite's 1 / logits_scaling) and softcap c (Gemma 2 / 3 final_logit_softcapping), each a
    scalar for both sides or a (student, teacher) pair; the defaults (1.0, None) are the
    identity and give bit-identical results to the untransformed loss.

    kl: "forward" KL(p_t || p_s) (default) or "reverse" KL(p_s || p_t).
    weighting: see `kd_token_weights` ("none", "entropy", "normalized_entropy", "confidence",
        or a callable f(H, valid) -> w); computed from the detached teacher entropy.
    reduction: "mean" (sum_i w_i KL_i / n_valid), "sum", "none" (per token).
    t2_scale: multiply the KL term by T^2 (default True, Hinton et al.).
    compute_ce / ce_weight: add ce_weight * CE of the hard labels on the student logits y_s
        (T = 1), reduced like the KL but unweighted.
    Tokens with label == ignore_index contribute 0 and get zero gradient. Gradients flow to hs
    and ws only: the teacher (ht, wt) gets none. fp16/bf16/fp32 inputs are computed with fp32
    statistics; fp64 inputs use the reference. Within a side, a head of another float dtype
    computes with its values cast to the hidden states' dtype (as autocast would); the kernels
    cast it per tile, so no copy of the head is made, and grad of ws comes in ws's own dtype.
    Invalid input raises ValueError. With compute_ce, labels are range-checked once: by the
    C++ op itself, else here (one host sync); check_labels=False skips that sync for labels
    known to be in range (e.g. shifted token ids).
    """
    _check_common(temperature, kl, reduction, weighting, weight_clip)
    if isinstance(ce_weight, bool) or not isinstance(ce_weight, (int, float)) \
            or not math.isfinite(ce_weight) or ce_weight < 0:
        raise ValueError(f"ce_weight must be a finite number >= 0, got {ce_weight!r}")
    xs, xt = logit_transforms(logit_scale, softcap)
    v = _validate(hs, ws, ht, wt, labels, vocab_size, compute_ce)
    lead = hs.shape[:-1]
    hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]).detach()
    lab = labels.reshape(-1) if labels is not None else None
    be = _resolve_kd_backend(hs2.device, backend, (hs2.dtype, ht2.dtype))
    ws, wt_ = _head_for(ws, hs2.dtype, be), _head_for(wt.detach(), ht2.dtype, be)
    if compute_ce and check_labels and be != "cpp":
        _check_label_range(lab, v, ignore_index)
    bad = _nonfinite_rows(hs2) | _nonfinite_rows(ht2) | _nonfinite_any(ws[:v], wt_[:v])
    any_bad = bad.any()
    hs2, ws = _NaNGradIfFlagged.apply(hs2, any_bad), _NaNGradIfFlagged.apply(ws, any_bad)
    if be == "reference" or hs2.shape[0] == 0:  # (an empty batch needs no kernel)
        ref = fused_linear_kd_ref(hs2, ws, ht2, wt_, lab, temperature=float(temperature), kl=kl,
                                  ignore_index=ignore_index, vocab_size=v, compute_ce=compute_ce,
                                  logit_scale=(xs.scale, xt.scale),
                                  softcap=(xs.softcap, xt.softcap))
        kl_i, ent, ce = ref.kl, ref.teacher_entropy, ref.ce
    else:
        cfg = FusedKDConfig(inv_temperature=1.0 / float(temperature), reverse=kl == "reverse",
                            ignore_index=int(ignore_index), vocab_size=v,
                            compute_ce=bool(compute_ce), backend=be,
                            launch=launch or LaunchOptions(), student=xs, teacher=xt)
        st = fused_kd_stats(hs2, ws, ht2, wt_, lab, cfg)
        kl_i, ent, ce = st.kl, st.teacher_entropy, st.ce if compute_ce else None
    kl_i, ent, ce = _poison(kl_i, bad), _poison(ent, bad), _poison(ce, bad)
    valid = (lab != ignore_index) if lab is not None else \
        torch.ones(hs2.shape[0], dtype=torch.bool, device=hs2.device)
    w = kd_token_weights(ent, valid, weighting, vocab_size=v, clip=weight_clip).to(kl_i.dtype)
    t2 = float(temperature) ** 2 if t2_scale else 1.0
    loss, n_valid = _reduce(kl_i, w, ce, valid, reduction, t2, float(ce_weight))
    if reduction == "none":
        loss = loss.reshape(lead)
    return KDLossOutput(
        loss=loss,
        kl=kl_i.detach().reshape(lead),
        teacher_entropy=ent.detach().reshape(lead),
        weights=w.reshape(lead),
        ce=ce.detach().reshape(lead) if ce is not None else None,
        num_valid=n_valid,
    )


def teacher_topk(ht: torch.Tensor, wt: torch.Tensor, k: int, *, temperature: float = 1.0,
                 vocab_size: int | None = None, block_tokens: int = 1024,
                 block_vocab: int = 8192, logit_scale: float | tuple[float, float] = 1.0,
                 softcap: float | None | tuple[float | None, float | None] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher tokens for an offline cache, without an [N, V] tensor.

    ht [..., Dt], wt [Vt, Dt] -> (ids [..., k] int64, log-probs [..., k]) sorted by decreasing
    probability; log p = z - logsumexp over the FULL vocab (first `vocab_size` rows of wt) of
    z = y / T, y = c tanh(s r / c) (or s r) of r = ht wt^T: the teacher's logit_scale s and
    softcap c (scalars, or (student, teacher) pairs of which the teacher entry is used; see
    `fused_linear_kd_loss`). Log-probs are fp32 (fp64 for fp64 inputs). Works tile by tile
    ([block_tokens, block_vocab] logits at a time) with an online logsumexp and a running top-k
    merge. Cache at T = 1 and let the loss apply its temperature. No gradient.
    """
    _, xt = logit_transforms(logit_scale, softcap)
    _check_float("ht", ht)
    _check_float("wt", wt)
    if ht.dim() < 2 or wt.dim() != 2 or wt.shape[1] != ht.shape[-1]:
        raise ValueError(f"expected ht [..., Dt] and wt [Vt, Dt]; got ht {_shape(ht)}, "
                         f"wt {_shape(wt)}")
    if isinstance(temperature, bool) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    v = wt.shape[0] if vocab_size is None else vocab_size
    if not isinstance(v, int) or not 0 < v <= wt.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {wt.shape[0]}] for wt {_shape(wt)}, got {v!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= v:
        raise ValueError(f"k must be an int in [1, {v}], got {k!r}")
    if ht.device != wt.device:
        raise ValueError(f"ht and wt must be on one device, got {ht.device} and {wt.device}")
    lead = ht.shape[:-1]
    ids, lp = teacher_topk_forward(ht.reshape(-1, ht.shape[-1]).detach(), wt.detach(), k,
                                   1.0 / float(temperature), v, max(1, int(block_tokens)),
                                   max(1, int(block_vocab)), xt)
    return ids.reshape(*lead, k), lp.reshape(*lead, k)


def fused_linear_kd_loss_topk(
    hs: torch.Tensor,
    ws: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl: str = "forward",
    weighting: str | WeightFn = "entropy",
    reduction: str = "mean",
    ignore_index: int = -100,
    *,
    t2_scale: bool = True,
    weight_clip: tuple[float, float] = DEFAULT_WEIGHT_CLIP,
    max_gather_elems: int | None = None,
    logit_scale: float | tuple[float, float] = 1.0,
    softcap: float | None | tuple[float | None, float | None] = None,
) -> KDLossOutput:
    """KD loss against an offline teacher cache (`teacher_topk`): the KL on the top-K support.

    hs [..., Ds], ws [Vs, Ds], topk_ids [..., K] (int, in [0, Vs)), topk_logprobs [..., K].
    Teacher q = softmax over the K ids of topk_logprobs / T (renormalized; -inf entries allowed),
    student r = softmax over the same K ids of z_s / T with z_s[k] = hs . ws[ids[k]] (only K rows
    of ws are gathered per token, in chunks: no [N, V] and no [N, K, Ds] tensor is kept).
    Both sides renormalized on the same support, so KL >= 0 and it is exactly 0 when the
    student matches the teacher there; the student's mass outside the support is not penalized
    (train with compute_ce-style hard labels, or a larger K, if that matters).
    Weighting, reduction, t2_scale, ignore_index: as in `fused_linear_kd_loss`; the normalized
    weightings use log K (the maximum entropy on the support).
    logit_scale / softcap: the student's transform y_s = c tanh(s z_s / c) (or s z_s) before
    the temperature; only the student side matters (the teacher's transform is already in the
    cached log-probs, see `teacher_topk`): a scalar, or a (student, teacher) pair whose
    teacher entry is validated and otherwise unused.
    """
    _check_common(temperature, kl, reduction, weighting, weight_clip)
    xs, _ = logit_transforms(logit_scale, softcap)
    _check_float("hs", hs)
    _check_float("ws", ws)
    _check_float("topk_logprobs", topk_logprobs)
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype.is_floating_point \
            or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got "
                         f"{getattr(topk_ids, 'dtype', type(topk_ids).__name__)}")
    shapes = (f"hs {_shape(hs)}, ws {_shape(ws)}, topk_ids {_shape(topk_ids)}, "
              f"topk_logprobs {_shape(topk_logprobs)}")
    if hs.dim() < 2 or ws.dim() != 2 or ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"expected hs [..., Ds] and ws [Vs, Ds]; got {shapes}")
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != hs.shape[:-1] \
            or topk_ids.dim() != hs.dim() or topk_ids.shape[-1] < 1:
        raise ValueError(f"expected topk_ids and topk_logprobs [..., K] with the leading shape "
                         f"of hs; got {shapes}")
    _check_labels(labels, hs.shape[:-1], _shape(hs))
    devs = {t.device for t in (hs, ws, topk_ids, topk_logprobs)}
    if len(devs) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")
    vs = ws.shape[0]
    if topk_ids.numel() and _has_values(topk_ids):  # (a host sync: eager only)
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= vs:
            raise ValueError(f"topk_ids must be in [0, {vs}) for ws {_shape(ws)}, got values "
                             f"in [{lo}, {hi}]")
    lead, kk = hs.shape[:-1], topk_ids.shape[-1]
    hs2 = hs.reshape(-1, hs.shape[-1])
    ids = topk_ids.reshape(-1, kk).long()
    lp = topk_logprobs.reshape(-1, kk).detach()
    lab = labels.reshape(-1) if labels is not None else None
    bad = _nonfinite_rows(hs2) | (torch.isnan(lp) | torch.isposinf(lp)).any(-1) \
        | _nonfinite_any(ws)
    any_bad = bad.any()
    hs2, ws = _NaNGradIfFlagged.apply(hs2, any_bad), _NaNGradIfFlagged.apply(ws, any_bad)
    zs = GatheredLogitsFunction.apply(hs2, ws, ids, max_gather_elems or default_max_elems())
    if not xs.is_identity:
        zs = xs.apply(zs)
    kl_i, ent = topk_kd_per_token(zs, lp, float(temperature), kl == "reverse")
    valid = (lab != ignore_index) if lab is not None else \
        torch.ones(hs2.shape[0], dtype=torch.bool, device=hs2.device)
    zero = torch.zeros((), dtype=kl_i.dtype, device=kl_i.device)
    kl_i, ent = torch.where(valid, kl_i, zero), torch.where(valid, ent, zero)
    kl_i, ent = _poison(kl_i, bad), _poison(ent, bad)
    w = kd_token_weights(ent, valid, weighting, vocab_size=kk, clip=weight_clip).to(kl_i.dtype)
    t2 = float(temperature) ** 2 if t2_scale else 1.0
    loss, n_valid = _reduce(kl_i, w, None, valid, reduction, t2, 0.0)
    if reduction == "none":
        loss = loss.reshape(lead)
    return KDLossOutput(loss=loss, kl=kl_i.detach().reshape(lead),
                        teacher_entropy=ent.detach().reshape(lead), weights=w.reshape(lead),
                        ce=None, num_valid=n_valid)


class FusedLinearKDLoss(nn.Module):
    """`nn.Module` around `fused_linear_kd_loss`; the options are fixed at construction.

    forward(hs, ws, ht, wt, labels=None) -> KDLossOutput (e.g. `crit(...).loss.backward()`).
    """

    def __init__(self, temperature: float = 1.0, kl: str = "forward",
                 weighting: str | WeightFn = "entropy", reduction: str = "mean",
                 ignore_index: int = -100, *, vocab_size: int | None = None,
                 compute_ce: bool = False, ce_weight: float = 1.0, t2_scale: bool = True,
                 weight_clip: tuple[float, float] = DEFAULT_WEIGHT_CLIP, backend: str = "auto",
                 logit_scale: float | tuple[float, float] = 1.0,
                 softcap: float | None | tuple[float | None, float | None] = None):
        super().__init__()
        _check_common(temperature, kl, reduction, weighting, weight_clip)
        logit_transforms(logit_scale, softcap)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.temperature, self.kl, self.weighting = float(temperature), kl, weighting
        self.reduction, self.ignore_index, self.vocab_size = reduction, ignore_index, vocab_size
        self.compute_ce, self.ce_weight, self.t2_scale = compute_ce, ce_weight, t2_scale
        self.weight_clip, self.backend = tuple(weight_clip), backend
        self.logit_scale, self.softcap = logit_scale, softcap

    def forward(self, hs, ws, ht, wt, labels=None) -> KDLossOutput:
        return fused_linear_kd_loss(
            hs, ws, ht, wt, labels, self.temperature, self.kl, self.weighting, self.reduction,
            self.ignore_index, vocab_size=self.vocab_size, compute_ce=self.compute_ce,
            ce_weight=self.ce_weight, t2_scale=self.t2_scale, weight_clip=self.weight_clip,
            backend=self.backend, logit_scale=self.logit_scale, softcap=self.softcap)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kl={self.kl!r}, weighting={self.weighting!r}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"compute_ce={self.compute_ce}, t2_scale={self.t2_scale}, backend={self.backend!r}, "
                f"logit_scale={self.logit_scale!r}, softcap={self.softcap!r}")


__all__ = ["KDLossOutput", "FusedLinearKDLoss", "fused_linear_kd_loss",
           "fused_linear_kd_loss_topk", "teacher_topk", "kd_token_weights", "WEIGHTINGS",
           "DEFAULT_WEIGHT_CLIP"]
