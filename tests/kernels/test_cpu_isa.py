"""The portable C++ build: hot loops compiled per ISA level, the level chosen at run time.

build_info() reports the level; E3_CPU_ISA (or set_cpu_isa) lowers it; the module holds no
wide-vector code outside the per-level objects (csrc/isa/), so the baseline code that runs
first on any CPU never executes an instruction the CPU may lack.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from e3kernels.dispatch import cpp_extension, cpp_import_error

LEVELS = ["baseline", "avx2", "avx512"]


@pytest.fixture(scope="module")
def C():
    ext = cpp_extension()
    assert ext is not None, f"e3kernels._C is not built: {cpp_import_error()}"
    return ext


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _expected_cpu_level(flags: set[str]) -> str:
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma", "f16c",
            "bmi2"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return "avx2"
    return "baseline"


def test_build_info_reports_the_levels(C):
    info = C.build_info()
    assert info["isa_built"] == (LEVELS if platform.machine() in ("x86_64", "AMD64")
                                 else ["baseline"])
    assert LEVELS.index(info["isa"]) <= LEVELS.index(info["isa_cpu"])
    assert C.fused_kd_info()["isa"] == info["isa"]
    flags = _cpu_flags()
    if flags and platform.machine() == "x86_64":
        assert info["isa_cpu"] == _expected_cpu_level(flags), (info, sorted(flags))
    if os.environ.get("E3_CPU_ISA") in (None, ""):
        assert info["isa"] == info["isa_cpu"] and "isa_note" not in info


def test_set_cpu_isa_lowers_and_refuses_what_the_cpu_lacks(C):
    info = C.build_info()
    prev = C.set_cpu_isa("baseline")
    try:
        assert C.build_info()["isa"] == "baseline" and C.fused_kd_info()["isa"] == "baseline"
        assert "lowered" in C.build_info()["isa_note"]
        assert "needs avx512" in C.fused_kd_info()["gemm_bf16"]
        with pytest.raises(ValueError, match="use baseline, avx2 or avx512"):
            C.set_cpu_isa("sse9")
        for level in LEVELS[LEVELS.index(info["isa_cpu"]) + 1:]:
            with pytest.raises(ValueError, match="above what this CPU"):
                C.set_cpu_isa(level)
    finally:
        C.set_cpu_isa(prev)
    assert C.build_info()["isa"] == info["isa"]


_PROBE = r"""
import json, torch
import e3kernels._C as C
from e3kernels.reference import fused_linear_kd_ref
g = torch.Generator().manual_seed(0)
N, V, D = 70, 777, 40
hs, ws, ht, wt = (torch.randn(*s, generator=g) for s in ((N, D), (V, D), (N, D), (V, D)))
lab = torch.randint(0, V, (N,), generator=g)
out = C.fused_kd_forward(hs, ws, ht, wt, lab, 1.0, False, -100, V, False)
ref = fused_linear_kd_ref(hs.double(), ws.double(), ht.double(), wt.double(), labels=lab)
err = (out[0].double() - ref.kl).abs().max().item()
print(json.dumps({"info": C.build_info(), "kd": C.fused_kd_info(), "err": err}))
"""


def _probe(env_isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, E3_CPU_ISA=env_isa)
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=300)


def test_environment_variable_forces_a_lower_level(C):
    cpu = C.build_info()["isa_cpu"]
    for level in LEVELS[:LEVELS.index(cpu) + 1]:
        res = _probe(level)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout.strip().splitlines()[-1])
        assert got["info"]["isa"] == level and got["kd"]["isa"] == level, got
        assert got["err"] < 1e-4, got
        if level != cpu:
            assert got["info"]["isa_note"] == f"lowered by E3_CPU_ISA={level}"
            assert got["kd"]["gemm_bf16"].startswith("off"), got


def test_environment_variable_typo_is_a_clear_error():
    res = _probe("avx-512")
    assert res.returncode != 0
    assert "E3_CPU_ISA = 'avx-512' is not a CPU ISA level: use baseline, avx2 or avx512" in res.stderr


def _functions(so: str) -> dict[str, list[str]]:
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], check=True,
                          capture_output=True, text=True).stdout
    funcs: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            cur = m.group(1)
            funcs.setdefault(cur, [])
        elif cur is not None and "\t" in line:
            funcs[cur].append(line)
    return funcs


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 ISA levels only")
def test_no_wide_vector_code_outside_the_isa_objects(C):
    """YMM/ZMM/mask-register code only in e3::*::isa_avx2 / isa_avx512 (and AVX-512 only in
    isa_avx512): a wide instruction elsewhere (e.g. an inline function from an ISA object
    kept by the linker) could run on a CPU without it."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    funcs = _functions(C.__file__)
    wide = re.compile(r"%[yz]mm\d|%k[0-7]\b")
    avx512_only = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
    outside = {f: [x for x in ins if wide.search(x)] for f, ins in funcs.items()
               if "::isa_avx2::" not in f and "::isa_avx512::" not in f}
    outside = {f: v for f, v in outside.items() if v}
    assert not outside, f"wide-vector code outside csrc/isa: {sorted(outside)[:10]}"
    in_avx2 = {f: [x for x in ins if avx512_only.search(x)] for f, ins in funcs.items()
               if "::isa_avx2::" in f}
    in_avx2 = {f: v for f, v in in_avx2.items() if v}
    assert not in_avx2, f"AVX-512 code in the avx2 objects: {sorted(in_avx2)[:10]}"
    n_avx512 = sum(1 for f, ins in funcs.items() if "::isa_avx512::" in f
                   for x in ins if "%zmm" in x)
    assert n_avx512 > 100, "the avx512 objects hold no 512-bit code: built without -mavx512f?"


def test_levels_agree_closely(C):
    """The levels differ only in vector width and FMA: the same inputs give nearly the same
    numbers (each level is separately checked against fp64 in test_fused_kd_cpp.py)."""
    cpu = C.build_info()["isa_cpu"]
    g = torch.Generator().manual_seed(3)
    N, V, D = 300, 4097, 63
    hs, ws, ht, wt = (torch.randn(*s, generator=g) for s in ((N, D), (V, D), (N, D), (V, D)))
    lab = torch.randint(0, V, (N,), generator=g)
    outs = {}
    prev = C.build_info()["isa"]
    try:
        for level in LEVELS[:LEVELS.index(cpu) + 1]:
            C.set_cpu_isa(level)
            fwd = C.fused_kd_forward(hs, ws, ht, wt, lab, 0.7, True, -100, V, True)
            bwd = C.fused_kd_backward(torch.ones(N), torch.ones(N), hs, ws, ht, wt, lab, fwd[2],
                                      fwd[3], fwd[0], fwd[5], 0.7, True, -100, V, True)
            outs[level] = [*fwd, *bwd]
    finally:
        C.set_cpu_isa(prev)
    base = outs["baseline"]
    for level, out in outs.items():
        for a, b in zip(base, out):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"{level} vs baseline")
