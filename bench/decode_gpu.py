"""Decode speedup of Qwen3-8B / Qwen3-32B shapes with 25% of the layers removed, on one GPU.

Needs torch (CUDA), transformers and this checkout; no vLLM and no network: the models are
built from the real configs (written below) with random bf16 weights. Decode time depends
only on the shapes, the dtype and the kernels, never on the weight values (dense GEMMs,
greedy decoding with EOS ignored: every run does exactly the same work), so random weights
measure the same speed as the released checkpoints.

Engine: HF `generate` with a static KV cache and `torch.compile` of the decode step
(transformers' automatic compile, mode "reduce-overhead" = CUDA graphs); timing as in
`e3pruner/eval/decode.py` (streamer timestamps, decode = token N - token 1). The original and the
pruned model are built and measured one after the other (the 32B pair does not fit in
memory at once). The table compares the speedup with the bytes-of-weights ideal.

    python bench/decode_gpu.py                                  # qwen3-8b and qwen3-32b
    python bench/decode_gpu.py --models qwen3-8b --batch-sizes 1,8
    python bench/decode_gpu.py --dry-run                        # tiny shapes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from e3pruner.eval.decode import (  # noqa: E402
    DecodeBenchConfig,
    add_ratios,
    bench_hf,
    config_dict,
    decode_weight_bytes,
    default_out_path,
    device_facts,
    format_table,
    kv_bytes_per_position,
    say,
    versions,
    write_json,
)

# Qwen/Qwen3-8B and Qwen/Qwen3-32B config.json (architecture fields; untied heads).
CONFIGS = {
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, max_window_layers=36,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                     attention_bias=False, hidden_act="silu", use_sliding_window=False,
                     bos_token_id=151643, eos_token_id=151645),
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      vocab_size=151936, max_position_embeddings=40960, max_window_layers=64,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                      attention_bias=False, hidden_act="silu", use_sliding_window=False,
                      bos_token_id=151643, eos_token_id=151645),
}
PRUNE_FRACTION = 0.25


def tiny(cfg: dict) -> dict:
    """Same family and ratios, small enough for a CPU: 8 layers, hidden 64, vocab 512."""
    return dict(cfg, hidden_size=64, intermediate_size=64 * cfg["intermediate_size"] // cfg["hidden_size"],
                num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                vocab_size=512, max_position_embeddings=512, max_window_layers=8,
                bos_token_id=1, eos_token_id=2)


def removed_layers(n_layers: int, fraction: float = PRUNE_FRACTION) -> list[int]:
    """A contiguous block just before the last layer (where layer pruning usually cuts);
    which layers go does not change the speed."""
    k = round(n_layers * fraction)
    return list(range(n_layers - 1 - k, n_layers - 1))


def qwen3_config(cfg: dict, keep: list[int] | None = None):
    from transformers import Qwen3Config

    from e3pruner.models.export import pruned_config

    config = Qwen3Config(**cfg)
    return pruned_config(config, keep) if keep is not None else config


def build(config, dtype: torch.dtype, device: torch.device):
    """Random-weight model, created directly on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def gen_overrides(compile_: bool) -> dict:
    from transformers import CompileConfig

    if not compile_:
        return {"cache_implementation": "static", "disable_compile": True}
    return {"cache_implementation": "static",
            "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")}


def bench_pair(name: str, cfg: dict, bench: DecodeBenchConfig, dtype, device, compile_: bool,
               log=say) -> dict:
    n = cfg["num_hidden_layers"]
    removed = removed_layers(n)
    keep = [i for i in range(n) if i not in removed]
    rows_by_model, wbytes, errors = {}, {}, {}
    kv = None
    for which, config in (("original", qwen3_config(cfg)), ("pruned", qwen3_config(cfg, keep))):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        model = build(config, dtype, device)
        log(f"{name} {which}: {config.num_hidden_layers} layers, "
            f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
            f"built in {time.perf_counter() - t0:.1f} s")
        wbytes[which] = decode_weight_bytes(model)
        kv = kv_bytes_per_position(config, torch.empty(0, dtype=dtype).element_size())
        try:
            rows_by_model[which] = bench_hf({which: model}, bench, device=device,
                                            gen_overrides=gen_overrides(compile_), progress=log)
        except Exception as err:  # noqa: BLE001 - compile trouble: record it, measure eager
            if not compile_:
                raise
            errors[which] = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"  compile failed ({errors[which]}); measuring without torch.compile")
            rows_by_model[which] = bench_hf({which: model}, bench, device=device,
                                            gen_overrides=gen_overrides(False), progress=log)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for ro, rp in zip(rows_by_model["original"], rows_by_model["pruned"]):
        rows.append({"batch_size": ro["batch_size"],
                     "models": {**ro["models"], **rp["models"]},
                     "loadavg_1m_start": ro["loadavg_1m_start"],
                     "loadavg_1m_end": rp["loadavg_1m_end"]})
    add_ratios(rows, wbytes["original"], wbytes["pruned"], bench, kv)
    return {"model": name, "config": cfg, "removed_layers": removed, "kept_layers": keep,
            "weight_bytes_per_token": wbytes, "kv_bytes_per_position_per_layer": kv,
            "compile_errors": errors, "results": rows, "table": format_table(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    ap.add_argument("--batch-sizes", default=None, help="default 1,8,32 (dry run: 1,2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 (dry run: 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (dry run: 8)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="default 2 (compile, then CUDA-graph capture; dry run: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (dry run: 2)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-compile", action="store_true", help="static cache without torch.compile")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (dry run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny versions of the configs on the CPU (no compile): the whole path")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/decode_gpu_<gpu>.json)")
    args = ap.parse_args(argv)

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in CONFIGS]
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 2
    sizes = args.batch_sizes or ("1,2" if dry else "1,8,32")
    bench = DecodeBenchConfig(
        prompt_len=args.prompt_len or (16 if dry else 128),
        new_tokens=args.new_tokens or (8 if dry else 128),
        batch_sizes=tuple(int(x) for x in sizes.split(",")),
        warmup=args.warmup if args.warmup is not None else (1 if dry else 2),
        repeats=args.repeats or (2 if dry else 5), dtype=args.dtype)
    bench.check()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    compile_ = not (dry or args.no_compile)
    facts = device_facts(device)
    print(f"device {facts.get('device_name')}, {args.dtype}, static cache, "
          f"torch.compile {'on' if compile_ else 'off'}{', DRY RUN (tiny shapes)' if dry else ''}")
    print("random weights: decode speed depends on shapes, dtype and kernels only, not on the "
          "weight values (same GEMMs, EOS ignored), so it matches the released checkpoints")
    payload = {"benchmark": "decode speed, 25% of layers removed, random-weight Qwen3 shapes",
               "engine": "hf-static-cache" + ("-compile" if compile_ else ""), "dry_run": dry,
               "device_info": facts, "versions": versions(), "dtype": args.dtype,
               "config": config_dict(bench), "prune_fraction": PRUNE_FRACTION, "models": []}
    if args.out:
        out = Path(args.out)
    elif dry:
        out = Path(tempfile.mkdtemp(prefix="decode-gpu-dry-")) / "decode_gpu_dryrun.json"
    else:
        out = default_out_path("gpu", facts.get("slug", "cuda"))
    for name in names:
        cfg = tiny(CONFIGS[name]) if dry else CONFIGS[name]
        res = bench_pair(name, cfg, bench, dtype, device, compile_)
        payload["models"].append(res)
        print(f"\n{name}: removed layers {res['removed_layers']}\n{res['table']}\n", flush=True)
        write_json(payload, out)  # partial results survive a crash of the next model
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
