"""Compile every Triton kernel of e3kernels to sm_80 / sm_90 cubins, no GPU needed, and report
registers, spills, shared memory and tensor-core instructions per kernel / config / target.

    python bench/triton_cubin_report.py [--matrix core|full] [--targets 80,90] [--jobs N]
                                        [--cache DIR | --no-cache] [--out PATH] [--table]
                                        [--check] [--sweep-fused-kd]

Each kernel is specialized exactly as its launcher would specialize it on a CUDA device
(the launchers' non-interpreter flags: `_precision_flags` / `_backward_flags` with
interpret=False, the autotune configs, Triton's own argument specialization computed from
mock arguments: 16-byte aligned pointers, hidden sizes and vocab multiples of 16, unit inner
strides), compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`
and Triton's bundled ptxas, then read back with the bundled `cuobjdump -res-usage` (registers,
stack frame) and `nvdisasm -gi` (SASS with line and inlining info, so that each tensor-core
instruction is attributed to the GEMM it belongs to: the student / teacher logit tiles and the
d hs / d Ws dots of the backward).

Matrices (`--matrix`):
  core  the assertion-critical set, about a minute cold on 2 cores: every autotune config of
        the fused KD forward / backward for all-bf16 inputs without reverse KL / CE (backward
        with labels and d Ws, plain and atomic d hs), and one launch shape of each Gumbel-TopK
        kernel.
  full  core plus: the complete flag product (REVERSE, COMPUTE_CE / HAS_CE, HAS_LABELS,
        NEED_DWS, DHS_ATOMIC) for all-bf16 inputs; fp16, fp32 and mixed-dtype inputs (heads of
        another dtype than their hidden states, student and teacher of different dtypes,
        FUSED_KD_OTHER_DTYPES) with the forward flags off / both on and the typical / heaviest
        backward flag sets (the flags change the code, the dtypes the tiles' shared memory and
        registers); every Gumbel-TopK tile width BLOCK_L = 4 .. MAX_TRITON_L (batch-filled, and
        one-row for 4, 64, 1024) in fp32 with both relaxations and in fp64, every output flag
        combination and dtype on one tile, seed / offset words of both widths (i32, i64),
        every gumbel_noise tile width.
  Every matrix covers every autotune config on every target. Not covered: explicit
  LaunchOptions tiles (tests / tuning only: any block sizes, 4 warps) and the mixed seed-word
  widths (one of the four words >= 2^31).

Results are cached per kernel (key: the job, the kernel's Triton cache key, which hashes its
source and dependencies, the Triton and ptxas versions) in --cache (default
$E3_TRITON_CUBIN_CACHE or ~/.cache/e3kernels/triton_cubin), so a rerun recompiles only kernels
whose source changed. Triton's own compile cache goes to a temporary directory.

The JSON report (stdout, or --out) has one row per kernel; `check_rows` (importable without
triton) lists the violations the test asserts on: compile errors, shared memory over the
target's opt-in limit, register spills where `spill_checked(row)`, and tensor-core
instructions missing from a low-precision GEMM (wgmma = HGMMA on sm_90, mma = HMMA on sm_80)
or present in an exact fp32 (`ieee`) one. --check exits 1 when there are violations.
Exit status 77: triton, its NVIDIA backend or the bundled ptxas / cuobjdump / nvdisasm missing
(the reason is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGETS = (80, 90)
# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB,
# H100 227 KiB. Static + dynamic shared memory of a kernel must fit.
SMEM_LIMIT = {80: 166912, 90: 232448}
# The tensor-core instruction each target's GEMMs must use.
TC_OP = {80: "HMMA", 90: "HGMMA"}
SKIP_EXIT = 77
ANALYSIS_VERSION = 1

# Representative shapes for Triton's argument specialization (only divisibility by 16 and
# == 1 matter): hidden sizes, vocab and token count multiples of 16, contiguous rows.
N_TOK, DS, DT, VOCAB = 8192, 2048, 4096, 151936
V_CHUNK = 76032  # a multiple of _V_ALIGN, as _vocab_chunk returns
IGNORE_INDEX = -100

# (hs, ws) side dtype pairs the fused KD launchers receive (functional._head_for passes an
# fp32 head with low-precision hidden states, and any head with fp32 hidden states).
FUSED_KD_OTHER_DTYPES = [
    ("fp16", "fp16", "fp16", "fp16"),
    ("fp32", "fp32", "fp32", "fp32"),
    ("bf16", "fp32", "bf16", "bf16"),  # autocast: fp32 student head, bf16 teacher
    ("fp16", "fp32", "fp16", "fp16"),
    ("fp32", "bf16", "fp32", "bf16"),  # fp32 hidden states, low-precision heads
    ("bf16", "bf16", "fp32", "fp32"),  # bf16 student, fp32 teacher
]
BF16 = ("bf16", "bf16", "bf16", "bf16")
# kernel -> (module, attribute) of the @triton.jit function the launchers run
KERNELS = {
    "fused_kd_fwd": ("e3kernels.ops.fused_kd.triton_kernels", "_fused_kd_fwd_kernel"),
    "fused_kd_bwd": ("e3kernels.ops.fused_kd.triton_kernels", "_fused_kd_bwd_kernel"),
    "gumbel_topk_fwd": ("e3kernels.ops.gumbel_topk.triton_kernels", "_gumbel_topk_fwd_kernel"),
    "gumbel_topk_bwd": ("e3kernels.ops.gumbel_topk.triton_kernels", "_gumbel_topk_bwd_kernel"),
    "gumbel_noise": ("e3kernels.ops.gumbel_topk.triton_kernels", "_gumbel_noise_kernel"),
    "gumbel_bits": ("e3kernels.ops.gumbel_topk.triton_kernels", "_gumbel_bits_kernel"),
}
# constexpr parameters each job sets from its dtypes (as the launchers derive them), beside
# its "flags" and the BLOCK_* of its "config"
DERIVED_CONSTEXPRS = {
    "fused_kd_fwd": {"UPCAST_S", "UPCAST_T", "PREC_S", "PREC_T"},
    "fused_kd_bwd": {"UPCAST_S", "UPCAST_T", "PREC_S", "PREC_T", "PREC_B", "DZ_LOWP"},
    "gumbel_topk_fwd": {"F64", "EPS", "LOG_EPS"},
    "gumbel_topk_bwd": {"F64", "EPS", "LOG_EPS"},
    "gumbel_noise": set(),
    "gumbel_bits": set(),
}
# backward flag sets (HAS_LABELS, HAS_CE, REVERSE, NEED_DWS, DHS_ATOMIC)
BWD_TYPICAL = (True, False, False, True, True)
BWD_HEAVY = (True, True, True, True, True)


# ======================================================================================
# Matrices (plain data: importable without triton)
# ======================================================================================

def _fused_kd_shapes():
    """(_FWD_SHAPES, _BWD_SHAPES), {target: [shape]}, read from the source, so that the matrix is known without
    importing triton (the test process runs under TRITON_INTERPRET=1)."""
    import ast

    src = (ROOT / "e3kernels/ops/fused_kd/triton_kernels.py").read_text()
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and getattr(node.targets[0], "id", None) in ("_FWD_SHAPES", "_BWD_SHAPES"):
            out[node.targets[0].id] = {t: [tuple(x) for x in shapes]
                                       for t, shapes in ast.literal_eval(node.value).items()}
    return out["_FWD_SHAPES"], out["_BWD_SHAPES"]


def _max_triton_l() -> int:
    src = (ROOT / "e3kernels/ops/gumbel_topk/functional.py").read_text()
    return int(re.search(r"^MAX_TRITON_L\s*=\s*(\d+)", src, re.M).group(1))


def _cfg(shape):
    bn, bv, bd, w, s = shape
    return {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd, "num_warps": w, "num_stages": s}


def _fwd_job(target, shape, dtypes, reverse, ce, xf=0):
    """xf: the logit-transform constexprs XF_S = XF_T (0 none, 2 softcap)."""
    return {"kernel": "fused_kd_fwd", "target": target, "config": _cfg(shape),
            "dtypes": dict(zip(("hs", "ws", "ht", "wt"), dtypes)),
            "flags": {"REVERSE": reverse, "COMPUTE_CE": ce, "XF_S": xf, "XF_T": xf}}


def _bwd_job(target, shape, dtypes, flagset, xf=0):
    lab, ce, rev, dws, atomic = flagset
    return {"kernel": "fused_kd_bwd", "target": target, "config": _cfg(shape),
            "dtypes": dict(zip(("hs", "ws", "ht", "wt"), dtypes)),
            "flags": {"HAS_LABELS": lab, "HAS_CE": ce, "REVERSE": rev, "NEED_DWS": dws,
                      "DHS_ATOMIC": atomic, "XF_S": xf, "XF_T": xf}}


def _gumbel_tiles(max_l: int, batch: str):
    """The launcher's (BLOCK_B, BLOCK_L, num_warps) on CUDA (`_tiles`, 2048 elements per
    tile) for every BLOCK_L, with the batch filling the tile ("full") or one row ("one")."""
    out = []
    bl = 4
    while bl <= max_l:
        bb = max(1, 2048 // bl) if batch == "full" else 1
        out.append((bb, bl, min(16, max(4, bb * bl // 512))))
        bl *= 2
    return out


def _gumbel_job(kernel, target, tile, dtype="fp32", flags=None, words="i32"):
    bb, bl, nw = tile
    return {"kernel": kernel, "target": target,
            "config": {"BLOCK_B": bb, "BLOCK_L": bl, "num_warps": nw},
            "dtypes": {"logits": dtype}, "flags": dict(flags or {}), "words": words}


def _noise_job(target, bb, bl, words="i32"):
    return {"kernel": "gumbel_noise", "target": target,
            "config": {"BLOCK_B": bb, "BLOCK_L": bl, "num_warps": 4}, "dtypes": {},
            "flags": {}, "words": words}


def build_jobs(matrix: str = "core", targets=TARGETS) -> list[dict]:
    fwd_shapes, bwd_shapes = _fused_kd_shapes()
    jobs = []
    fwd_all = [(r, c) for r in (False, True) for c in (False, True)]
    bwd_all = [(lab, ce, rev, dws, at) for lab in (False, True) for ce in (False, True)
               for rev in (False, True) for dws in (False, True) for at in (False, True)
               if lab or not ce]  # a CE gradient needs labels
    max_l = _max_triton_l()
    for t in targets:
        # fused KD: every autotune config
        for shape in fwd_shapes[t]:
            flagsets = fwd_all if matrix == "full" else [(False, False)]
            jobs += [_fwd_job(t, shape, BF16, r, c) for r, c in flagsets]
            if matrix == "full":
                jobs += [_fwd_job(t, shape, d, r, c) for d in FUSED_KD_OTHER_DTYPES
                         for r, c in ((False, False), (True, True))]
                jobs += [_fwd_job(t, shape, BF16, r, c, xf=2) for r, c in ((False, False),
                                                                          (True, True))]
        for shape in bwd_shapes[t]:
            if matrix == "full":
                jobs += [_bwd_job(t, shape, BF16, f) for f in bwd_all]
                jobs += [_bwd_job(t, shape, d, f) for d in FUSED_KD_OTHER_DTYPES
                         for f in (BWD_TYPICAL, BWD_HEAVY)]
                jobs += [_bwd_job(t, shape, BF16, f, xf=2) for f in (BWD_TYPICAL, BWD_HEAVY)]
            else:
                jobs += [_bwd_job(t, shape, BF16, (True, False, False, True, at))
                         for at in (False, True)]
        if matrix == "core":  # the softcapped logit transform, on one config each
            jobs += [_fwd_job(t, fwd_shapes[t][0], BF16, False, False, xf=2),
                     _bwd_job(t, bwd_shapes[t][0], BF16, BWD_TYPICAL, xf=2)]
        # Gumbel-TopK
        heavy = {"RELAX": 0, "WANT_SOFT": True, "WANT_IDX": True}
        if matrix == "core":
            tile = (32, 64, 4)
            jobs += [_gumbel_job("gumbel_topk_fwd", t, tile, "fp32", heavy),
                     _gumbel_job("gumbel_topk_bwd", t, tile, "fp32", {"RELAX": 0}),
                     _noise_job(t, 2, 1024),
                     {"kernel": "gumbel_bits", "target": t, "config": {"BLOCK": 1024,
                      "num_warps": 4}, "dtypes": {}, "flags": {}}]
            continue
        tiles = _gumbel_tiles(max_l, "full") + [x for x in _gumbel_tiles(max_l, "one")
                                                if x[1] in (4, 64, 1024)]
        for tile in tiles:
            for dt, relaxes in (("fp32", (0, 1)), ("fp64", (0,))):
                for relax in relaxes:
                    jobs.append(_gumbel_job("gumbel_topk_fwd", t, tile, dt,
                                            dict(heavy, RELAX=relax)))
                    jobs.append(_gumbel_job("gumbel_topk_bwd", t, tile, dt, {"RELAX": relax}))
        tile = (32, 64, 4)
        for dt in ("fp16", "bf16", "fp32", "fp64"):
            for relax, soft, idx in itertools.product((0, 1), (False, True), (False, True)):
                jobs.append(_gumbel_job("gumbel_topk_fwd", t, tile, dt,
                                        {"RELAX": relax, "WANT_SOFT": soft, "WANT_IDX": idx}))
            for relax in (0, 1):
                jobs.append(_gumbel_job("gumbel_topk_bwd", t, tile, dt, {"RELAX": relax}))
        for relax in (0, 1):  # seed / offset words >= 2^31 are i64 arguments
            jobs.append(_gumbel_job("gumbel_topk_fwd", t, tile, "fp32", dict(heavy, RELAX=relax),
                                    words="i64"))
            jobs.append(_gumbel_job("gumbel_topk_bwd", t, tile, "fp32", {"RELAX": relax},
                                    words="i64"))
        bl = 4
        while bl <= 1024:  # gumbel_noise_triton: BLOCK_L <= 1024, 2048 elements per tile
            jobs.append(_noise_job(t, 2048 // bl, bl))
            if bl in (4, 1024):
                jobs.append(_noise_job(t, 1, bl))
            bl *= 2
        jobs.append(_noise_job(t, 2, 1024, words="i64"))
        jobs.append({"kernel": "gumbel_bits", "target": t,
                     "config": {"BLOCK": 1024, "num_warps": 4}, "dtypes": {}, "flags": {}})
    # dedupe (core jobs reappear in full), keep order
    seen, out = set(), []
    for j in jobs:
        k = job_id(j)
        if k not in seen:
            seen.add(k)
            out.append(j)
    return out


def job_id(job: dict) -> str:
    parts = [job["kernel"], f"sm{job['target']}"]
    parts.append("x".join(str(v) for k, v in job["config"].items() if k.startswith("BLOCK")))
    parts.append(f"w{job['config']['num_warps']}")
    if "num_stages" in job["config"]:
        parts.append(f"s{job['config']['num_stages']}")
    if job["dtypes"]:
        parts.append("/".join(job["dtypes"].values()))
    on = [k for k, v in job["flags"].items() if v is True]
    other = [f"{k}={v}" for k, v in job["flags"].items() if not isinstance(v, bool)]
    parts.append(",".join(other + on) or "-")
    if job.get("words", "i32") != "i32":
        parts.append("words=" + job["words"])
    return " ".join(parts)


# ======================================================================================
# Checks (plain data)
# ======================================================================================

def spill_checked(row: dict) -> bool:
    """Rows that must not spill: the fused KD kernels in the configs the autotuner can pick,
    all-bf16 inputs, no reverse KL, no CE and no logit transform (the softcap path spills in
    the largest configs: 6-42 STL on sm_80/sm_90, see docs/fused_kd.md)."""
    if row["kernel"] not in ("fused_kd_fwd", "fused_kd_bwd"):
        return False
    f = row["flags"]
    return tuple(row["dtypes"].values()) == BF16 and not f.get("REVERSE") \
        and not f.get("COMPUTE_CE") and not f.get("HAS_CE") \
        and not f.get("XF_S") and not f.get("XF_T")  # (softcap: compiled and reported only)


def spilled(row: dict) -> bool:
    return bool(row["stack_bytes"] or row["local_bytes"] or row["stl"] or row["ldl"])


def check_rows(rows: list[dict]) -> dict[str, list[str]]:
    """Violations by category (empty lists when all is well)."""
    bad = {"compile": [], "shared_memory": [], "spills": [], "tensor_cores": []}
    for r in rows:
        rid = r["id"]
        if r.get("error"):
            bad["compile"].append(f"{rid}: {r['error'].splitlines()[0][:300]}")
            continue
        t = r["target"]
        smem = r["shared_dynamic"] + r["shared_static"]
        if smem > SMEM_LIMIT[t]:
            bad["shared_memory"].append(f"{rid}: {smem} bytes shared memory > {SMEM_LIMIT[t]} "
                                        f"(sm_{t} opt-in limit)")
        if spill_checked(r) and spilled(r):
            bad["spills"].append(f"{rid}: {r['regs']} regs, {r['stack_bytes']} bytes stack frame, "
                                 f"{r['stl']} STL / {r['ldl']} LDL (local memory spills)")
        for site, want in r["tc_expected"].items():
            got = r["tc"].get(site, {})
            if want == "tc" and not got.get(TC_OP[t]):
                bad["tensor_cores"].append(f"{rid}: GEMM '{site}' has no {TC_OP[t]} "
                                           f"(found {got or 'no tensor-core op'})")
            elif want == "fma" and (got.get("HMMA") or got.get("HGMMA")):
                bad["tensor_cores"].append(f"{rid}: exact fp32 GEMM '{site}' uses tensor cores "
                                           f"({got})")
    return bad


# ======================================================================================
# Tools
# ======================================================================================

def _nvidia_bin() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"


def unavailable_reason() -> str | None:
    """Why the cubins cannot be built here (None when they can), without importing triton."""
    b = _nvidia_bin()
    if b is None:
        return "triton is not installed"
    if not (b.parent / "compiler.py").exists():
        return f"triton has no NVIDIA backend ({b.parent} missing)"
    for tool in ("ptxas", "cuobjdump", "nvdisasm"):
        p = b / tool
        if not p.exists() or not os.access(p, os.X_OK):
            return f"triton's bundled {tool} is missing ({p})"
    try:
        subprocess.run([str(b / "ptxas"), "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"triton's bundled ptxas does not run: {err}"
    return None


def default_cache_dir() -> Path:
    env = os.environ.get("E3_TRITON_CUBIN_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "e3kernels" / "triton_cubin"


# ======================================================================================
# Compilation (triton with the interpreter off)
# ======================================================================================

_KERNELS = {}  # kernel name -> JITFunction
_GEMM_SITES = {}  # kernel name -> {site: {(source file name, line)}}
_BINDERS = {}


def _load_kernels():
    if _KERNELS:
        return
    sys.path.insert(0, str(ROOT))
    import inspect

    from triton.runtime.jit import JITFunction

    from e3kernels.ops.fused_kd import triton_kernels as kd
    from e3kernels.ops.gumbel_topk import triton_kernels as gt

    for name, (mod, attr) in KERNELS.items():
        fn = getattr(importlib.import_module(mod), attr)
        if not isinstance(fn, JITFunction):  # e.g. an InterpretedFunction
            raise RuntimeError(f"{mod}.{attr} is a {type(fn).__name__}, not a JITFunction: "
                               "run triton_cubin_report in a process without TRITON_INTERPRET=1")
        _KERNELS[name] = fn
    # the autotuned wrappers run these very kernels
    assert kd._fwd_tuned.fn is kd._fused_kd_fwd_kernel
    assert kd._bwd_tuned.fn is kd._fused_kd_bwd_kernel
    # the GEMMs of each fused KD kernel, by the source lines of their calls / dots
    patterns = {"logits_s": r"\bus = _logit_tile\(", "logits_t": r"\but = _logit_tile\(",
                "dhs": r"\bdh = tl\.dot\(", "dws": r"\bdw = tl\.dot\("}
    for name, want in (("fused_kd_fwd", ("logits_s", "logits_t")),
                       ("fused_kd_bwd", ("logits_s", "logits_t", "dhs", "dws"))):
        py = _KERNELS[name].fn
        lines, start = inspect.getsourcelines(py)
        fname = os.path.basename(inspect.getsourcefile(py))
        sites = {}
        for site in want:
            hit = {(fname, start + i) for i, line in enumerate(lines)
                   if re.search(patterns[site], line)}
            if not hit:
                raise RuntimeError(f"GEMM '{site}' ({patterns[site]}) not found in {name}: "
                                   "update the patterns of bench/triton_cubin_report.py")
            sites[site] = hit
        _GEMM_SITES[name] = sites
    global _GUMBEL_CONST
    _GUMBEL_CONST = {"EPS": gt.SOFTMAX_EPS, "LOG_EPS": gt._LOG_EPS}
    global _KD_FLAGS
    _KD_FLAGS = (kd._precision_flags, kd._backward_flags)


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64, "i32": torch.int32, "i64": torch.int64}[name]


def _mock(name):
    from triton.runtime.jit import MockTensor

    return MockTensor(_torch_dtype(name))


def _launch(job):
    """(JITFunction, positional args, keyword args) as the launcher passes them on CUDA."""
    k, cfg, d, f = job["kernel"], job["config"], job["dtypes"], job["flags"]
    m = _mock
    if k in ("fused_kd_fwd", "fused_kd_bwd"):
        prec, bwd_flags = _KD_FLAGS
        up_s, prec_s = prec(_torch_dtype(d["hs"]), False)
        up_t, prec_t = prec(_torch_dtype(d["ht"]), False)
        h = (m(d["hs"]), m(d["ws"]), m(d["ht"]), m(d["wt"]))
        strides = (DS, 1, DS, 1, DT, 1, DT, 1)
        kw = dict(UPCAST_S=up_s, UPCAST_T=up_t, PREC_S=prec_s, PREC_T=prec_t, **cfg)
        if k == "fused_kd_fwd":
            args = (*h, m("fp32"), N_TOK, DS, DT, VOCAB, V_CHUNK, 0.5, 2.0, 1.5, 30.0, 1.5, 30.0,
                    *strides, 7 * N_TOK, N_TOK)
            kw.update(f)
        else:
            dz_lowp, _, prec_b = bwd_flags(_torch_dtype(d["hs"]), False)
            f32 = m("fp32")
            args = (*h, m("i64"), f32, f32, f32, f32, f32, f32, f32, f32,
                    N_TOK, DS, DT, VOCAB, V_CHUNK, 0.5, IGNORE_INDEX, 1.5, 30.0, 1.5, 30.0,
                    *strides, DS, DS)
            kw.update(f, DZ_LOWP=dz_lowp, PREC_B=prec_b)
        return _KERNELS[k], args, kw
    words = (1 << 31) + 7 if job.get("words") == "i64" else 7  # >= 2^31: an i64 argument
    seeds = (words, words + 1, words + 2, words + 3)
    if k == "gumbel_topk_fwd":
        dt, bl = d["logits"], cfg["BLOCK_L"]
        args = (m(dt), m("i32"), m(dt), m(dt), m("i64" if f["WANT_IDX"] else "i32"), m("i32"),
                4096, bl, bl, 0.5, 0.0, *seeds, 8)
        kw = dict(f, F64=dt == "fp64", **_GUMBEL_CONST, **cfg, enable_fp_fusion=False)
    elif k == "gumbel_topk_bwd":
        dt, bl = d["logits"], cfg["BLOCK_L"]
        args = (m(dt), m("i32"), m("i32"), m(dt), m(dt), 4096, bl, bl, 0.5, 0.0, *seeds, 8)
        kw = dict(f, F64=dt == "fp64", **_GUMBEL_CONST, **cfg, enable_fp_fusion=False)
    elif k == "gumbel_noise":
        args = (m("fp32"), 4096, 1 << 20, *seeds)
        kw = dict(cfg, enable_fp_fusion=False)
    elif k == "gumbel_bits":
        args = (m("i64"), m("fp32"), 1 << 20)
        kw = dict(cfg, enable_fp_fusion=False)
    else:
        raise KeyError(k)
    return _KERNELS[k], args, kw


def _tc_expected(job) -> dict[str, str]:
    """site -> "tc" (must use tensor cores) or "fma" (exact fp32, must not)."""
    if job["kernel"] not in ("fused_kd_fwd", "fused_kd_bwd"):
        return {}
    d, f = job["dtypes"], job["flags"]
    lowp = lambda x: "fma" if x == "fp32" else "tc"  # noqa: E731
    out = {"logits_s": lowp(d["hs"]), "logits_t": lowp(d["ht"])}
    if job["kernel"] == "fused_kd_bwd":
        out["dhs"] = lowp(d["hs"])  # bf16: bf16 dot, fp16: tf32 dot, fp32: ieee
        if f["NEED_DWS"]:
            out["dws"] = lowp(d["hs"])
    return out


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_LINE = re.compile(r'"([^"]+)", line (\d+)')


def _analyse(cubin: bytes, kernel: str, tmpdir: str) -> dict:
    b = _nvidia_bin()
    path = os.path.join(tmpdir, f"k{os.getpid()}.cubin")
    with open(path, "wb") as fh:
        fh.write(cubin)
    ru = subprocess.run([str(b / "cuobjdump"), "-res-usage", path], check=True,
                        capture_output=True, text=True).stdout
    m = _RES.search(ru)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{ru}")
    regs, stack, static, local = map(int, m.groups())
    sass = subprocess.run([str(b / "nvdisasm"), "-c", "-gi", path], check=True,
                          capture_output=True, text=True).stdout
    os.remove(path)
    sites = _GEMM_SITES.get(kernel, {})
    ops, tc = {}, {}
    chain, in_group = set(), False
    for line in sass.splitlines():
        s = line.strip()
        if s.startswith("//##"):
            if not in_group:
                chain, in_group = set(), True
            chain.update((os.path.basename(f), int(n)) for f, n in _LINE.findall(s))
            continue
        if not (s.startswith("/*") and "*/" in s):
            continue
        in_group = False
        toks = s.split("*/", 1)[1].split()
        if not toks:
            continue
        op = (toks[1] if toks[0].startswith("@") and len(toks) > 1 else toks[0]).split(".")[0]
        ops[op] = ops.get(op, 0) + 1
        if op in ("HMMA", "HGMMA"):
            for site, lines in sites.items():
                if chain & lines:
                    tc.setdefault(site, {})
                    tc[site][op] = tc[site].get(op, 0) + 1
    return {"regs": regs, "stack_bytes": stack, "shared_static": static, "local_bytes": local,
            "stl": ops.get("STL", 0), "ldl": ops.get("LDL", 0), "hgmma": ops.get("HGMMA", 0),
            "hmma": ops.get("HMMA", 0), "n_instr": sum(ops.values()), "tc": tc}


def _compile_one(job: dict, tmpdir: str) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, args, kw = _launch(job)
    target = GPUTarget("cuda", job["target"], 32)
    key = (job["kernel"], job["target"])
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[key]
    # as JITFunction.run does before binding
    kw = dict(kw, debug=kw.get("debug", fn.debug) or knobs.runtime.debug,
              instrumentation_mode=knobs.compilation.instrumentation_mode,
              fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                       options=options.__dict__)
    row = {"compile_s": round(time.perf_counter() - t0, 2),
           "shared_dynamic": int(k.metadata.shared),
           "signature": {n: s for n, s in signature.items() if s != "constexpr"}}
    row.update(_analyse(k.asm["cubin"], job["kernel"], tmpdir))
    return row


def _worker(item):
    job, cache_file, tmpdir = item
    import warnings

    warnings.filterwarnings("ignore")
    row = dict(job, id=job_id(job), tc_expected=_tc_expected(job))
    try:
        row.update(_compile_one(job, tmpdir))
    except Exception as err:  # noqa: BLE001 (reported per kernel)
        row["error"] = f"{type(err).__name__}: {err}"
        return row
    if cache_file:
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        Path(tmp).write_text(json.dumps(row))
        os.replace(tmp, cache_file)
    row["cached"] = False
    return row


def _versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    out = {"triton": triton.__version__, "analysis": ANALYSIS_VERSION}
    for t in TARGETS:
        tool = get_ptxas(t)
        out[f"ptxas_sm{t}"] = f"{os.path.basename(tool.path)} {tool.version}"
    return out


def _cache_key(job, versions) -> str:
    from triton._C.libtriton import get_cache_invalidating_env_vars

    fn = _KERNELS[job["kernel"]]
    blob = json.dumps([job, fn.cache_key, versions, get_cache_invalidating_env_vars()],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def compile_all(jobs: list[dict], n_jobs: int | None = None, cache_dir: Path | None = None,
                progress: bool = False) -> dict:
    """Compile and analyse every job (cached rows reused). Returns the report dict."""
    t_start = time.perf_counter()
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: run "
                           "triton_cubin_report in a process without it")
    os.environ.pop("TRITON_INTERPRET", None)
    triton_cache = tempfile.mkdtemp(prefix="e3_triton_cubin_")
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    try:
        _load_kernels()
        versions = _versions()
        rows, todo = [None] * len(jobs), []
        if cache_dir is not None:
            (cache_dir / "rows").mkdir(parents=True, exist_ok=True)
        for i, job in enumerate(jobs):
            cf = None
            if cache_dir is not None:
                cf = str(cache_dir / "rows" / f"{_cache_key(job, versions)}.json")
                if os.path.exists(cf):
                    try:
                        rows[i] = dict(json.loads(Path(cf).read_text()), cached=True)
                        continue
                    except (OSError, ValueError):
                        pass
            todo.append((i, (job, cf, triton_cache)))
        n_jobs = max(1, n_jobs or os.cpu_count() or 1)
        if todo:
            if n_jobs == 1 or len(todo) == 1:
                results = map(_worker, [it for _, it in todo])
            else:
                import multiprocessing as mp

                pool = mp.get_context("fork").Pool(min(n_jobs, len(todo)))
                results = pool.imap(_worker, [it for _, it in todo])
            for n, ((i, _), row) in enumerate(zip(todo, results), 1):
                rows[i] = row
                if progress:
                    print(f"[{n}/{len(todo)}] {row['id']}"
                          + (f" ERROR {row['error'][:120]}" if row.get("error") else ""),
                          file=sys.stderr, flush=True)
            if n_jobs > 1 and len(todo) > 1:
                pool.close()
                pool.join()
    finally:
        shutil.rmtree(triton_cache, ignore_errors=True)
    return {"versions": versions, "smem_limit": SMEM_LIMIT, "tc_op": TC_OP,
            "wall_s": round(time.perf_counter() - t_start, 1), "n_kernels": len(rows),
            "n_compiled": len(todo), "n_cached": len(rows) - len(todo), "rows": rows}


# ======================================================================================
# Reporting
# ======================================================================================

def format_table(rows: list[dict]) -> str:
    out = [f"{'kernel / config / dtypes / flags':<92} {'regs':>4} {'stack':>5} {'STL':>4} "
           f"{'smem':>7} {'TC':>5}  GEMM sites"]
    for r in rows:
        if r.get("error"):
            out.append(f"{r['id']:<92} ERROR {r['error'][:80]}")
            continue
        smem = r["shared_dynamic"] + r["shared_static"]
        sites = " ".join(f"{s}:{'/'.join(f'{k}{v}' for k, v in c.items())}"
                         for s, c in sorted(r["tc"].items()))
        out.append(f"{r['id']:<92} {r['regs']:>4} {r['stack_bytes']:>5} {r['stl']:>4} "
                   f"{smem:>7} {r['hgmma'] + r['hmma']:>5}  {sites}")
    return "\n".join(out)


def sweep_fused_kd_jobs(targets) -> list[dict]:
    """Candidate tiles for spill-free bf16 configs (no reverse KL / CE), per target."""
    jobs = []
    for t in targets:
        for bn, bv, bd in [(64, 64, 32), (64, 64, 64), (64, 128, 32), (64, 128, 64),
                           (128, 64, 32), (128, 64, 64), (128, 128, 32), (128, 128, 64),
                           (64, 256, 32), (64, 256, 64)]:
            for w in (4, 8):
                for s in (2, 3, 4):
                    shape = (bn, bv, bd, w, s)
                    jobs.append(_fwd_job(t, shape, BF16, False, False))
                    jobs.append(_bwd_job(t, shape, BF16, BWD_TYPICAL))
                    jobs.append(_bwd_job(t, shape, BF16, (True, False, False, True, False)))
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--matrix", choices=("core", "full"), default="core")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: cpus)")
    ap.add_argument("--cache", type=Path, default=None, help="row cache (default: "
                    "$E3_TRITON_CUBIN_CACHE or ~/.cache/e3kernels/triton_cubin)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--table", action="store_true", help="print a text table (stderr)")
    ap.add_argument("--check", action="store_true", help="exit 1 on violations")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--filter", default=None, help="only jobs whose id contains this")
    ap.add_argument("--sweep-fused-kd", action="store_true",
                    help="candidate bf16 fused KD tiles instead of the matrix")
    a = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"SKIP: {reason}", file=sys.stderr)
        return SKIP_EXIT
    targets = [int(x) for x in a.targets.split(",")]
    jobs = sweep_fused_kd_jobs(targets) if a.sweep_fused_kd else build_jobs(a.matrix, targets)
    if a.filter:
        jobs = [j for j in jobs if a.filter in job_id(j)]
    cache = None if a.no_cache else (a.cache or default_cache_dir())
    report = compile_all(jobs, a.jobs, cache, progress=a.progress)
    report["matrix"] = "sweep" if a.sweep_fused_kd else a.matrix
    report["violations"] = check_rows(report["rows"])
    text = json.dumps(report, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    else:
        print(text)
    if a.table:
        print(format_table(report["rows"]), file=sys.stderr)
    n_bad = sum(map(len, report["violations"].values()))
    print(f"{report['n_kernels']} kernels ({report['n_compiled']} compiled, "
          f"{report['n_cached']} cached) in {report['wall_s']} s; {n_bad} violations",
          file=sys.stderr)
    return 1 if a.check and n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
