import pytest


def _cpu_isa_levels() -> list[str]:
    """The ISA levels of the multi-ISA C++ kernels that this CPU can run, lowest first."""
    from e3kernels.dispatch import cpp_extension

    ext = cpp_extension()
    if ext is None:
        return ["unbuilt"]
    info = ext.build_info()
    built = info["isa_built"]
    return built[:built.index(info["isa_cpu"]) + 1]


@pytest.fixture(params=_cpu_isa_levels())
def cpu_isa(request):
    """Runs the test at one ISA level of the C++ kernels (e3kernels._C.set_cpu_isa), then
    restores the level chosen at start-up (CPUID, or E3_CPU_ISA)."""
    from e3kernels.dispatch import cpp_extension

    ext = cpp_extension()
    assert ext is not None, "e3kernels._C is not built"
    prev = ext.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        ext.set_cpu_isa(prev)


@pytest.fixture(params=[True, False], ids=["bf16-gemm", "fp32-gemm"])
def bf16_route(request):
    """Runs the test with the C++ fused KD's bf16 GEMM route on (skipped where the CPU has
    none) and off (fp32 sgemm on converted values), then restores the setting."""
    from e3kernels.dispatch import cpp_extension

    ext = cpp_extension()
    assert ext is not None, "e3kernels._C is not built"
    prev = ext.fused_kd_set_bf16_gemm(request.param)
    try:
        route = ext.fused_kd_info()["gemm_bf16"]
        if request.param and not route.startswith("cpublas::brgemm"):
            pytest.skip(f"no bf16 GEMM route on this machine: {route}")
        if not request.param:
            assert route.startswith("off"), route
        yield request.param
    finally:
        ext.fused_kd_set_bf16_gemm(prev)
