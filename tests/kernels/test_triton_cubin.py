"""GPU readiness without a GPU: every Triton kernel compiles to sm_80 and sm_90 cubins with
Triton's bundled ptxas, in every autotune config (core matrix) and every flag / dtype
combination the CUDA launchers use (full matrix; bench/triton_cubin_report.py builds both and
reads the cubins back with the bundled cuobjdump / nvdisasm), and

* shared memory (static + dynamic) fits each target's opt-in limit (A100 163 KiB, H100 227 KiB),
* the fused KD kernels do not spill registers in the configs the autotuner can pick for bf16
  inputs without reverse KL or CE,
* every low-precision GEMM loop (student / teacher logit tiles, d hs and d Ws dots) runs on
  tensor cores: wgmma (HGMMA) on sm_90, mma (HMMA) on sm_80; the exact fp32 (`ieee`) ones
  do not.

The compile runs in a subprocess with TRITON_INTERPRET unset (tests/conftest.py sets it for
the suite, and under the interpreter `triton.jit` gives InterpretedFunction objects, whose `.fn`
is the plain Python function: nothing there can be compiled). Rows are cached per kernel source
in ~/.cache/e3kernels/triton_cubin (or $E3_TRITON_CUBIN_CACHE), so only the first run, or one
after a kernel changed, compiles.

* core matrix (always): 44 kernels, every autotune config on both targets for the bf16 path;
  ~45 s cold on 2 idle cores (2 min with the cores shared), ~5 s warm.
* full matrix (slow, and only with E3_TRITON_CUBIN_FULL=1): 918 kernels, the complete bf16
  flag product, fp16 / fp32 / mixed dtypes, every Gumbel-TopK tile; ~22 min cold on 2 cores
  (about 2.5 s of CPU per kernel, parallel over all cores), ~10 s warm. CI should set the
  variable and keep ~/.cache/e3kernels/triton_cubin between runs.
"""

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "triton_cubin_report.py"


def _load_report_module():
    spec = importlib.util.spec_from_file_location("triton_cubin_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rep = _load_report_module()
UNAVAILABLE = rep.unavailable_reason()
needs_ptxas = pytest.mark.skipif(UNAVAILABLE is not None,
                                 reason=f"cannot build cubins here: {UNAVAILABLE}")


def _run_report(matrix: str, out: Path) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--matrix", matrix, "--out", str(out)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode == rep.SKIP_EXIT:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, f"triton_cubin_report.py failed:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


FULL = os.environ.get("E3_TRITON_CUBIN_FULL", "0") == "1"


@pytest.fixture(scope="module", params=["core", pytest.param("full", marks=pytest.mark.slow)])
def report(request, tmp_path_factory):
    if UNAVAILABLE is not None:
        pytest.skip(f"cannot build cubins here: {UNAVAILABLE}")
    if request.param == "full" and not FULL:
        pytest.skip("full cubin matrix (918 kernels, ~22 min cold on 2 cores, seconds when "
                    "cached): set E3_TRITON_CUBIN_FULL=1")
    return _run_report(request.param, tmp_path_factory.mktemp("cubin") / "report.json")


def _fmt(lines: list[str], what: str) -> str:
    return f"{len(lines)} {what}:\n  " + "\n  ".join(lines)


# --------------------------------------------------------------------------------------
# The matrix is the launchers' (no compile needed)
# --------------------------------------------------------------------------------------

def _constexpr_params(fn) -> set[str]:
    py = getattr(fn, "fn", fn)  # JITFunction or InterpretedFunction -> the Python function
    return {n for n, p in inspect.signature(py).parameters.items()
            if "constexpr" in str(p.annotation)}


def test_matrix_sets_every_constexpr_of_every_kernel():
    for matrix in ("core", "full"):
        jobs = rep.build_jobs(matrix)
        assert {j["kernel"] for j in jobs} == set(rep.KERNELS), matrix
        for j in jobs:
            mod, attr = rep.KERNELS[j["kernel"]]
            want = _constexpr_params(getattr(importlib.import_module(mod), attr))
            got = set(j["flags"]) | {k for k in j["config"] if k.startswith("BLOCK")} \
                | rep.DERIVED_CONSTEXPRS[j["kernel"]]
            assert got == want, f"{rep.job_id(j)}: matrix sets {sorted(got)}, kernel has " \
                f"{sorted(want)}: update bench/triton_cubin_report.py"


def test_matrix_covers_every_autotune_config():
    from e3kernels.ops.fused_kd import triton_kernels as kd

    for tuner, table, kernel in ((kd._fwd_tuned, kd._FWD_SHAPES, "fused_kd_fwd"),
                                 (kd._bwd_tuned, kd._BWD_SHAPES, "fused_kd_bwd")):
        assert set(table) == set(rep.TARGETS), (kernel, sorted(table))
        for matrix in ("core", "full"):
            jobs = [j for j in rep.build_jobs(matrix) if j["kernel"] == kernel]
            for t in rep.TARGETS:
                # the configs the autotuner keeps on this target (its early_config_prune);
                # num_ctas=1 is triton.compile's default, which the report's jobs rely on
                kept = [{k: v for k, v in c.all_kwargs().items() if (k, v) != ("num_ctas", 1)}
                        for c in tuner.configs if kd._shape_of(c) in set(table[t])]
                assert len(kept) == len(table[t]), (kernel, t)
                have = [j["config"] for j in jobs if j["target"] == t]
                for c in kept:
                    assert c in have, f"{kernel} autotune config {c} not compiled for sm_{t}"


def test_full_matrix_has_the_whole_bf16_flag_product():
    jobs = rep.build_jobs("full")
    fwd_shapes, bwd_shapes = rep._fused_kd_shapes()
    for t in rep.TARGETS:
        for kernel, shapes, flags in (
                ("fused_kd_fwd", fwd_shapes, ("REVERSE", "COMPUTE_CE")),
                ("fused_kd_bwd", bwd_shapes,
                 ("HAS_LABELS", "HAS_CE", "REVERSE", "NEED_DWS", "DHS_ATOMIC"))):
            for shape in shapes[t]:
                got = {tuple(j["flags"][f] for f in flags) for j in jobs
                       if j["kernel"] == kernel and j["target"] == t
                       and j["config"] == rep._cfg(shape)
                       and tuple(j["dtypes"].values()) == rep.BF16}
                n = 4 if kernel == "fused_kd_fwd" else 32 - 8  # a CE gradient needs labels
                assert len(got) == n, (kernel, t, shape, sorted(got))


def test_checks_flag_what_they_should():
    row = {"id": "x", "kernel": "fused_kd_bwd", "target": 90, "dtypes": dict(
        zip(("hs", "ws", "ht", "wt"), rep.BF16)), "flags": {"REVERSE": False, "HAS_CE": False},
        "regs": 255, "stack_bytes": 0, "local_bytes": 0, "stl": 0, "ldl": 0,
        "shared_dynamic": 1000, "shared_static": 1024,
        "tc_expected": {"logits_s": "tc", "dhs": "fma"},
        "tc": {"logits_s": {"HGMMA": 4}}}
    assert not any(rep.check_rows([row]).values())
    bad = rep.check_rows([dict(row, stack_bytes=16, stl=2, shared_dynamic=232448,
                               tc={"logits_s": {"HMMA": 8}, "dhs": {"HGMMA": 1}})])
    assert [len(bad[k]) for k in ("spills", "shared_memory", "tensor_cores")] == [1, 1, 2]
    reverse = dict(row, flags={"REVERSE": True, "HAS_CE": False}, stack_bytes=16)
    assert not rep.check_rows([reverse])["spills"]  # spills are asserted without reverse / CE
    assert rep.check_rows([dict(row, error="RuntimeError: boom")])["compile"]


# --------------------------------------------------------------------------------------
# The cubins
# --------------------------------------------------------------------------------------

@needs_ptxas
def test_every_kernel_compiles(report):
    bad = report["violations"]["compile"]
    assert not bad, _fmt(bad, "kernels fail to compile")
    assert {r["target"] for r in report["rows"]} == set(rep.TARGETS)


@needs_ptxas
def test_shared_memory_fits(report):
    bad = report["violations"]["shared_memory"]
    assert not bad, _fmt(bad, "kernels exceed the shared memory of their target")


@needs_ptxas
def test_no_register_spills_bf16(report):
    checked = [r for r in report["rows"] if rep.spill_checked(r) and not r.get("error")]
    assert checked
    bad = report["violations"]["spills"]
    assert not bad, _fmt(bad, "autotune configs spill registers (bf16, no reverse KL / CE); "
                         "drop them from _FWD_SHAPES / _BWD_SHAPES or prune them per target")


@needs_ptxas
def test_gemms_use_tensor_cores(report):
    sites = [(r["id"], s) for r in report["rows"] for s, w in r.get("tc_expected", {}).items()
             if w == "tc"]
    assert sites
    bad = report["violations"]["tensor_cores"]
    assert not bad, _fmt(bad, "GEMMs without the expected tensor-core instructions")
