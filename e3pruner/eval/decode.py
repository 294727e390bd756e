"""Decode speed of a pruned model against its original: measured tokens/s and the bytes-ideal.

Decoding one token reads every weight once, so a memory-bound decoder's speedup from
removing layers is at most the ratio of the bytes of weights read per decoded token:

    bytes(model) = sum(decoder layer weights) + final norm + LM head + one embedding row

(a tied head is the embedding matrix: counted once for the head matmul, plus the one row
the token lookup reads). `ideal_bytes = bytes(original) / bytes(pruned)`; the naive
`L / (L - k)` ignores the head and the embedding and overstates it. `ideal_bytes_kv` also
counts the KV cache read per step (batch x layers x mean context), which grows with the
batch and the context and scales with the layer count like the layer weights.

Measurement (HF engine): `model.generate` greedy, `use_cache`, `min_new_tokens =
max_new_tokens = N` (EOS never ends a sequence), on prompts of random token ids (fixed
seed, the same for both models). A streamer records the time each token reaches the host;
decode time = time of token N - time of token 1, i.e. N - 1 decode steps without the
prefill. The two models alternate within each repeat, so load from other processes hits
both alike. vLLM engine: `e3pruner.eval.vllm_runner` in its own venv (see there).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from e3pruner.models.families import decoder_layers, embed_tokens, final_norm, lm_head

say = functools.partial(print, flush=True)


# ------------------------------------------------------------------------------------------
# Bytes read per decoded token (the ideal)
# ------------------------------------------------------------------------------------------
def _bytes(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def decode_weight_bytes(model) -> dict:
    """Bytes of weights one decode step reads, by part (works on meta-device models too).

    layers: all decoder layer parameters; norm: final norm; head: LM head weight (+ bias);
    embed_row: one row of the token embedding; other: any parameter outside these (counted
    in full); total: their sum. A tied head counts once as `head`, plus `embed_row`.
    """
    layers = decoder_layers(model)
    head, embed, norm = lm_head(model), embed_tokens(model), final_norm(model)
    layer_bytes = [_bytes(layer.parameters()) for layer in layers]
    head_bytes = _bytes(head.parameters())
    row = embed.weight[0]
    parts = {"layers": sum(layer_bytes), "norm": _bytes(norm.parameters()), "head": head_bytes,
             "embed_row": row.numel() * row.element_size()}
    known = {id(p) for m in (*layers, head, embed, norm) for p in m.parameters()}
    parts["other"] = _bytes(p for p in model.parameters() if id(p) not in known)
    parts["total"] = sum(parts.values())
    parts["num_layers"] = len(layers)
    parts["per_layer"] = layer_bytes[0] if len(set(layer_bytes)) == 1 else layer_bytes
    parts["tied_head"] = head.weight is embed.weight
    return parts


def kv_bytes_per_position(config, itemsize: int) -> int:
    """KV-cache bytes per layer per cached position of one sequence (K and V)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * kv_heads * head_dim * itemsize


def ideal_ratios(orig: dict, pruned: dict, *, batch_size: int = 1, mean_context: float = 0.0,
                 kv_per_position: int = 0) -> dict:
    """Speedup ceilings: bytes of weights, bytes of weights + KV cache, naive L/(L-k)."""
    def with_kv(b):
        return b["total"] + batch_size * b["num_layers"] * mean_context * kv_per_position

    return {"ideal_bytes": orig["total"] / pruned["total"],
            "ideal_bytes_kv": with_kv(orig) / with_kv(pruned),
            "ideal_naive": orig["num_layers"] / pruned["num_layers"]}


def model_on_meta(path: str, dtype: torch.dtype):
    """The model of an HF directory with meta tensors (shapes and dtypes, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# ------------------------------------------------------------------------------------------
# Settings and statistics
# ------------------------------------------------------------------------------------------
@dataclass
class DecodeBenchConfig:
    prompt_len: int = 128
    new_tokens: int = 128
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 1
    repeats: int = 3
    dtype: str = "bfloat16"
    seed: int = 0
    threads: int | None = None

    def check(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"--prompt-len must be >= 1, got {self.prompt_len}")
        if self.new_tokens < 2:
            raise ValueError(f"--new-tokens must be >= 2 (decode = tokens 2..N), got {self.new_tokens}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("--repeats must be >= 1 and --warmup >= 0")

    @property
    def mean_context(self) -> float:
        """Mean number of cached positions a decode step attends to."""
        return self.prompt_len + self.new_tokens / 2


def stats(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "q1": q[0], "q3": q[2]}


def summarize(decode_s: list[float], batch_size: int, steps: int) -> dict:
    """tokens/s (all sequences) and per-token latency (one step) from decode times."""
    return {"tokens_per_s": stats([batch_size * steps / t for t in decode_s]),
            "ms_per_token": stats([1e3 * t / steps for t in decode_s])}


def random_prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch_size)
    return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=g)


# ------------------------------------------------------------------------------------------
# HF engine
# ------------------------------------------------------------------------------------------
class _TokenClock:
    """Streamer that records when each put() arrives (the prompt first, then each token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generation_config(model, new_tokens: int, **overrides):
    """Greedy, exactly `new_tokens` tokens (EOS suppressed until then), KV cache on."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else model.config.eos_token_id
    pad = model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, num_beams=1, use_cache=True, eos_token_id=eos,
                            pad_token_id=pad if pad is not None else 0, **overrides)


@torch.inference_mode()
def time_generate(model, input_ids: torch.Tensor, gen_config) -> dict:
    """One generate call: prefill_s (to token 1), decode_s (token 1 -> token N), total_s."""
    clock = _TokenClock()
    attn = torch.ones_like(input_ids)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gen_config,
                         streamer=clock)
    total = time.perf_counter() - t0
    n = out.shape[1] - input_ids.shape[1]
    if n != gen_config.max_new_tokens or len(clock.times) != n + 1:
        raise RuntimeError(f"generate made {n} tokens ({len(clock.times)} streamer calls), "
                           f"expected {gen_config.max_new_tokens}")
    return {"prefill_s": clock.times[1] - t0, "decode_s": clock.times[-1] - clock.times[1],
            "total_s": total}


def bench_hf(models: dict, cfg: DecodeBenchConfig, *, device="cpu", gen_overrides=None,
             progress=say) -> list[dict]:
    """Time every model at every batch size (models alternate within each repeat).

    models: {"original": model, "pruned": model}. Returns one row per batch size with raw
    timings and summaries per model.
    """
    vocab = {name: m.config.vocab_size for name, m in models.items()}
    if len(set(vocab.values())) != 1:
        raise ValueError(f"the models have different vocabularies {vocab}: not a pruned pair")
    gens = {name: generation_config(m, cfg.new_tokens, **(gen_overrides or {}))
            for name, m in models.items()}
    rows = []
    for bs in cfg.batch_sizes:
        ids = random_prompts(next(iter(vocab.values())), bs, cfg.prompt_len, cfg.seed).to(device)
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for _ in range(cfg.warmup):
            for name, m in models.items():
                time_generate(m, ids, gens[name])
        raw = {name: {"prefill_s": [], "decode_s": [], "total_s": []} for name in models}
        for _ in range(cfg.repeats):
            for name, m in models.items():
                for k, v in time_generate(m, ids, gens[name]).items():
                    raw[name][k].append(v)
        row = {"batch_size": bs, "loadavg_1m_start": load0,
               "loadavg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "models": {name: {**summarize(r["decode_s"], bs, cfg.new_tokens - 1),
                                 "prefill_s": stats(r["prefill_s"]), "raw": r}
                          for name, r in raw.items()}}
        rows.append(row)
        if progress:
            progress(f"  bs {bs:3d}: " + ", ".join(
                f"{name} {row['models'][name]['tokens_per_s']['median']:.1f} tok/s"
                for name in models))
    return rows


# ------------------------------------------------------------------------------------------
# Report: ratios, device facts, table, JSON
# ------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict], bytes_orig: dict, bytes_pruned: dict, cfg: DecodeBenchConfig,
               kv_per_position: int) -> None:
    """Speedups (pruned tok/s over original) and how close they come to the bytes-ideal.

    speedup: ratio of the median tokens/s; speedup_best: ratio of the best (max) tokens/s,
    the steadier figure on a shared machine, where other jobs only ever slow a run down;
    speedup_paired: per repeat (the two models ran back to back).
    """
    for row in rows:
        o, p = row["models"]["original"], row["models"]["pruned"]
        row.update(ideal_ratios(bytes_orig, bytes_pruned, batch_size=row["batch_size"],
                                mean_context=cfg.mean_context, kv_per_position=kv_per_position))
        row["speedup"] = p["tokens_per_s"]["median"] / o["tokens_per_s"]["median"]
        row["speedup_best"] = p["tokens_per_s"]["max"] / o["tokens_per_s"]["max"]
        row["speedup_paired"] = [a / b for a, b in zip(o["raw"]["decode_s"], p["raw"]["decode_s"])]
        row["fraction_of_ideal_bytes"] = row["speedup"] / row["ideal_bytes"]
        row["fraction_of_ideal_bytes_best"] = row["speedup_best"] / row["ideal_bytes"]
        row["fraction_of_ideal_bytes_kv"] = row["speedup"] / row["ideal_bytes_kv"]


def _bench_common():
    """bench/common.py of this checkout (device names, result paths), or None."""
    path = Path(__file__).resolve().parents[2] / "bench" / "common.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("e3_bench_common", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def device_facts(device: str | torch.device = "cpu") -> dict:
    dev = torch.device(device)
    common = _bench_common()
    if common is not None:
        info = common.device_info(dev)
        info["slug"] = common.device_slug(dev)
        return info
    info = {"device": str(dev), "device_name": platform.processor() or platform.machine(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "slug": "cpu" if dev.type == "cpu" else dev.type}
    if hasattr(os, "getloadavg"):
        info["loadavg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
    return info


def default_out_path(engine: str, slug: str) -> Path:
    results = Path(__file__).resolve().parents[2] / "bench" / "results"
    if not results.parent.is_dir():
        results = Path("bench") / "results"
    return results / f"decode_{engine}_{slug}.json"


def check_out_path(path: str | Path) -> Path:
    """The JSON file `path` can be written (checked before any benchmark runs)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory: give the path of the JSON file to "
                         f"write, e.g. {path / 'decode.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: cannot write there ({parent} is not a writable "
                         "directory)")
    return path


def write_json(payload: dict, path: str | Path) -> Path:
    from e3pruner.train import json_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json_text(payload, default=str) + "\n")
    tmp.replace(path)
    return path


def format_table(rows: list[dict]) -> str:
    """Markdown table: medians (best run in brackets) and the ideals."""
    head = ("| batch | original tok/s | pruned tok/s | original ms/token | pruned ms/token | "
            "speedup (best) | ideal (bytes) | % of ideal (best) | ideal (bytes+KV) | naive L/(L-k) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        o, p = r["models"]["original"], r["models"]["pruned"]
        lines.append(
            f"| {r['batch_size']} | {o['tokens_per_s']['median']:.1f} ({o['tokens_per_s']['max']:.1f}) | "
            f"{p['tokens_per_s']['median']:.1f} ({p['tokens_per_s']['max']:.1f}) | "
            f"{o['ms_per_token']['median']:.1f} | {p['ms_per_token']['median']:.1f} | "
            f"{r['speedup']:.3f}x ({r['speedup_best']:.3f}x) | {r['ideal_bytes']:.3f}x | "
            f"{100 * r['fraction_of_ideal_bytes']:.0f}% ({100 * r['fraction_of_ideal_bytes_best']:.0f}%) | "
            f"{r['ideal_bytes_kv']:.3f}x | {r['ideal_naive']:.3f}x |")
    return "\n".join(lines)


def versions() -> dict:
    from importlib.metadata import version

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "triton"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - absent: not reported
            pass
    return out


def config_dict(cfg: DecodeBenchConfig) -> dict:
    d = asdict(cfg)
    d["batch_sizes"] = list(cfg.batch_sizes)
    return d


# ------------------------------------------------------------------------------------------
# Engines end to end
# ------------------------------------------------------------------------------------------
def bench_vllm(paths: dict, cfg: DecodeBenchConfig, *, venv=None, progress=say) -> tuple:
    """Same rows as bench_hf, measured by vLLM in its venv (e3pruner.eval.vllm_runner)."""
    from e3pruner.eval.vllm_runner import run_vllm

    vocab = {name: model_on_meta(p, torch.float32).config.vocab_size for name, p in paths.items()}
    if len(set(vocab.values())) != 1:
        raise ValueError(f"the models have different vocabularies {vocab}: not a pruned pair")
    prompts = {str(bs): random_prompts(next(iter(vocab.values())), bs, cfg.prompt_len,
                                       cfg.seed).tolist() for bs in cfg.batch_sizes}
    request = {"models": paths, "dtype": cfg.dtype, "seed": cfg.seed,
               "max_model_len": cfg.prompt_len + cfg.new_tokens + 16,
               "max_num_seqs": max(cfg.batch_sizes),
               "bench": {"prompts": prompts, "new_tokens": cfg.new_tokens,
                         "warmup": cfg.warmup, "repeats": cfg.repeats}}
    if progress:
        progress(f"  vLLM runner: loading {len(paths)} models, then "
                 f"{len(cfg.batch_sizes)} batch sizes (minutes)...")
    answer = run_vllm(request, venv=venv)
    rows = []
    for r in answer["bench"]:
        bs = r["batch_size"]
        rows.append({"batch_size": bs, "loadavg_1m_start": r.get("loadavg_1m_start"),
                     "loadavg_1m_end": r.get("loadavg_1m_end"),
                     "models": {name: {**summarize(raw["decode_s"], bs, cfg.new_tokens - 1),
                                       "first_token_s": stats(raw["first_s"]), "raw": raw}
                                for name, raw in r["models"].items()}})
        if progress:
            progress(f"  bs {bs:3d}: " + ", ".join(
                f"{name} {m['tokens_per_s']['median']:.1f} tok/s"
                for name, m in rows[-1]["models"].items()))
    meta = {"vllm_versions": answer.get("versions"), "vllm_load_s": answer.get("load_s"),
            "vllm_env": answer.get("env")}
    return rows, meta


def run_decode_bench(pruned: str, against: str, *, engine: str = "hf",
                     cfg: DecodeBenchConfig | None = None, device: str = "cpu",
                     out: str | Path | None = None, vllm_venv=None, progress=say) -> dict:
    """Benchmark `pruned` against `against` with one engine; write and return the JSON."""
    from e3pruner.models.export import PRUNING_FILE
    from e3pruner.models.loading import load_model, parse_dtype, resolve_model_path

    progress = progress or (lambda *_: None)
    cfg = cfg or DecodeBenchConfig()
    cfg.check()
    if engine not in ("hf", "vllm"):
        raise ValueError(f"--engine must be hf or vllm, got {engine!r}")
    if out:
        check_out_path(out)
    dtype = parse_dtype(cfg.dtype)
    if dtype is None:
        raise ValueError("--dtype must be explicit (bfloat16, float32, float16), not 'auto'")
    paths = {"original": resolve_model_path(against), "pruned": resolve_model_path(pruned)}
    for name, p in paths.items():
        if engine == "vllm" or name == "pruned" or Path(p).exists():
            if not (Path(p) / "config.json").is_file():
                raise FileNotFoundError(f"{p} ({name}) is not an HF model directory (no config.json)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    metas = {name: model_on_meta(p, dtype) for name, p in paths.items()}
    wbytes = {name: decode_weight_bytes(m) for name, m in metas.items()}
    if wbytes["pruned"]["num_layers"] >= wbytes["original"]["num_layers"]:
        progress(f"note: the pruned model has {wbytes['pruned']['num_layers']} layers, the "
                 f"original {wbytes['original']['num_layers']}")
    kv = kv_bytes_per_position(metas["original"].config, torch.empty(0, dtype=dtype).element_size())
    facts = device_facts(device)
    path = check_out_path(out if out else default_out_path(engine, facts.get("slug", "cpu")))
    payload = {
        "benchmark": "decode speed, pruned vs original",
        "engine": engine, "device_info": facts, "versions": versions(),
        "threads": torch.get_num_threads(), "dtype": cfg.dtype, "config": config_dict(cfg),
        "models": paths, "weight_bytes_per_token": wbytes, "kv_bytes_per_position_per_layer": kv,
        "method": ("HF generate, greedy, min_new_tokens=max_new_tokens, streamer timestamps: "
                   "decode = token N - token 1 (N-1 steps); models alternate per repeat"
                   if engine == "hf" else
                   "vLLM LLM.generate (enforce_eager, greedy, ignore_eos, min_tokens=max_tokens): "
                   "decode = time(N tokens) - time(1 token), same prompts; models alternate"),
    }
    info_path = Path(paths["pruned"]) / PRUNING_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        payload["pruning"] = {k: info.get(k) for k in ("original_num_layers", "kept_layers",
                                                       "removed_layers", "method")}
    progress(f"decode bench ({engine}, {cfg.dtype}, {torch.get_num_threads()} threads, "
             f"{facts.get('device_name')}): prompt {cfg.prompt_len}, {cfg.new_tokens} new tokens, "
             f"load {facts.get('loadavg_1m_5m_15m')}")
    t0 = time.perf_counter()
    if engine == "hf":
        models = {name: load_model(p, dtype=dtype, device=device)[0] for name, p in paths.items()}
        rows = bench_hf(models, cfg, device=device, progress=progress)
    else:
        rows, meta = bench_vllm(paths, cfg, venv=vllm_venv, progress=progress)
        payload.update(meta)
    add_ratios(rows, wbytes["original"], wbytes["pruned"], cfg, kv)
    payload["results"] = rows
    payload["wall_s"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        payload["loadavg_1m_5m_15m_end"] = [round(x, 2) for x in os.getloadavg()]
    payload["table"] = format_table(rows)
    write_json(payload, path)
    progress(payload["table"])
    progress(f"wrote {path}")
    return payload
