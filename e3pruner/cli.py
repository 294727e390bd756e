"""`e3pruner` command line: prune, compare, info, eval-ppl, eval-zeroshot, bench-decode."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time


def _json(obj) -> str:
    from e3pruner.train import json_text

    return json_text(obj)


def _int_at_least(minimum: int, zero_ok: bool = False):
    """argparse type: an integer >= minimum (or 0 when zero_ok, meaning 'all'/'off')."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum and not (zero_ok and value == 0):
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}{' (or 0)' if zero_ok else ''}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (bundled), a .gguf file (or a directory holding "
                        "one: dequantized and cached), a local HF directory or a hub id")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="cpu")


def _add_layer_count_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, default=None, help="fraction of layers to remove (default 0.25)")
    g.add_argument("--prune-layers", type=int, default=None, help="number of layers to remove")


def cmd_info(args) -> int:
    from e3pruner.models import SUPPORTED_FAMILIES, load_model
    from e3pruner.models.families import TESTED_FAMILIES, decoder_layers

    print("tested families (any decoder-only transformers causal LM works):")
    for fam in SUPPORTED_FAMILIES:
        print(f"  {fam:12s} {TESTED_FAMILIES[fam]}")
    if args.model is None:
        return 0
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    layers = decoder_layers(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    info = {
        "model": args.model, "class": type(model).__name__, "model_type": cfg.model_type,
        "layers": len(layers), "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
        "params": n_params, "params_per_layer": per_layer,
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if getattr(cfg, "layer_types", None):
        info["layer_types"] = sorted(set(cfg.layer_types))
    if args.json:
        print(_json(info))
    else:
        for k, v in info.items():
            print(f"{k:18s} {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                  else f"{k:18s} {v}")
    return 0


def cmd_eval_ppl(args) -> int:
    from e3pruner.data import check_spec
    from e3pruner.eval.perplexity import perplexity
    from e3pruner.models import load_model

    try:
        check_spec(args.data)
    except (OSError, ValueError) as err:
        raise ValueError(f"--data: {err}") from None
    t0 = time.time()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    res = perplexity(model, args.data, args.ctx_len, tokenizer=tok, stride=args.stride,
                     batch_size=args.batch_size, max_tokens=args.max_tokens)
    for key in ("window_nll", "window_tokens"):
        res.pop(key)
    res.update(model=args.model, data=args.data, seconds=round(time.time() - t0, 1))
    if args.max_tokens and res["tokens"] < args.max_tokens - 1:
        print(f"e3pruner eval-ppl: warning: {args.data!r} has only {res['tokens'] + 1:,} tokens; "
              f"scored {res['tokens']:,}, not the {args.max_tokens:,} of --max-tokens",
              file=sys.stderr)
    if args.json:
        print(_json(res))
    else:
        print(f"held-out perplexity of {args.model} on {args.data!r}: {res['ppl']:.3f} "
              f"({res['tokens']:,} tokens, ctx {args.ctx_len}"
              f"{', stride ' + str(args.stride) if args.stride else ''}; {res['seconds']} s)")
    return 0


def cmd_eval_zeroshot(args) -> int:
    from e3pruner.models import load_model
    from e3pruner.eval.zeroshot import resolve_tasks, zero_shot

    tasks = resolve_tasks(args.tasks)
    t0 = time.time()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    res = zero_shot(model, tok, tasks, limit=args.limit or None, batch_size=args.batch_size,
                    progress=not args.json)
    for t in tasks:
        res[t].pop("item_scores")
    res.update(model=args.model, limit=args.limit or None, seconds=round(time.time() - t0, 1))
    if args.json:
        print(_json(res))
        return 0
    print(f"zero-shot accuracy of {args.model} (first {args.limit or 'all'} items per task)")
    print(f"{'task':14s} {'acc':>7s} {'acc_norm':>9s} {'n':>6s} {'seconds':>8s}")
    for t in tasks:
        r = res[t]
        print(f"{t:14s} {r['acc']:7.4f} {r['acc_norm']:9.4f} {r['n']:6d} {r['seconds']:8.1f}")
    print(f"average {res['average']:.4f} (acc_norm for ARC/HellaSwag/PIQA/OBQA, acc for "
          f"BoolQ/WinoGrande); {res['seconds']} s")
    return 0


def _tokens(text: str) -> int:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 65536 or 5e8)") from err
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"token counts are non-negative integers, got {text}")
    return int(value)


def cmd_prune(args) -> int:
    import os

    from e3pruner.distributed import init_distributed, shutdown
    from e3pruner.pipeline import PruneArgs, run_prune

    fields = PruneArgs.__dataclass_fields__
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    ctx = init_distributed(os.environ, args.device, args.parallel)
    try:
        run_prune(PruneArgs(**kwargs), dist=ctx)
    finally:
        shutdown(ctx)
    return 0


def _add_prune_parser(sub) -> None:
    from e3pruner.amp import AMP_CHOICES
    from e3pruner.pipeline import PruneArgs

    d = PruneArgs()
    p = sub.add_parser("prune", help="E3 mask search + entropy-aware KD recovery + export",
                       description="Prune decoder layers with E3-Pruner. With no arguments: the "
                       "bundled SmolLM2-135M, 25% of its layers, the bundled data.")
    _add_model_args(p)
    _add_layer_count_args(p)
    p.add_argument("--data", default=d.data, help="training/calibration text: 'bundled', a file, hf:NAME")
    p.add_argument("--heldout", default=d.heldout, help="held-out perplexity text (default: bundled LAMBADA)")
    p.add_argument("--search-tokens", type=_tokens, default=d.search_tokens)
    p.add_argument("--recovery-tokens", type=_tokens, default=d.recovery_tokens,
                   help="0 skips recovery (with a GGUF --model, the run then also writes "
                        "RUN/model.gguf: the pruned GGUF, quantized tensors unchanged)")
    p.add_argument("--tokens", type=_tokens, default=None, dest="total_tokens",
                   help="total budget: 20%% to the search, 80%% to recovery (overrides both)")
    p.add_argument("--block-len", type=int, default=d.block_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="blocks per mask-search step")
    p.add_argument("--recovery-batch-size", type=int, default=d.recovery_batch_size,
                   help="blocks per recovery micro-batch (default %(default)s: more, smaller "
                   "steps recover more per token on a small budget)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--calib-blocks", type=int, default=d.calib_blocks)
    p.add_argument("--lr", type=float, default=d.lr, help="recovery peak learning rate")
    p.add_argument("--search-lr", type=float, default=d.search_lr)
    p.add_argument("--scope", default=d.scope, choices=["full", "endpoints", "lora"])
    p.add_argument("--teacher", default=d.teacher, choices=["live", "cache"])
    p.add_argument("--weighting", default=d.weighting)
    p.add_argument("--ce-weight", type=float, default=d.ce_weight,
                   help="recovery loss = KD + CE_WEIGHT x next-token cross-entropy of the data "
                   "(default 0.3 with --teacher live, 0 with --teacher cache, which has no CE)")
    p.add_argument("--estimator", default=d.estimator, choices=["score", "st"],
                   help="mask-search gradient: score (score function, one mask per sample) "
                   "or st (straight-through)")
    p.add_argument("--per-sample", action="store_true",
                   help="with --estimator st: one mask per sample (else one per batch)")
    p.add_argument("--amp", default=d.amp, choices=AMP_CHOICES,
                   help="autocast dtype for search and recovery: auto (default) is bf16 where "
                   "the CPU/GPU runs it natively, else fp32 (perplexity is always fp32)")
    p.add_argument("--eval-tokens", type=_tokens, default=d.eval_tokens)
    p.add_argument("--eval-ctx", type=int, default=d.eval_ctx)
    p.add_argument("--out", default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep search_ckpt.pt and recovery_ckpt.pt of a finished run")
    p.add_argument("--parallel", default=d.parallel, choices=["ddp", "fsdp"],
                   help="data parallelism under torchrun (--nproc-per-node N): ddp, or fsdp "
                   "to shard the trained layers and their optimizer state")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the ShortGPT sanity comparison")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_prune)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"batch sizes are integers like 1,8,32, got {text!r}") from err
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def cmd_bench_decode(args) -> int:
    from e3pruner.eval.decode import DecodeBenchConfig, run_decode_bench

    cfg = DecodeBenchConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                            batch_sizes=args.batch_sizes, warmup=args.warmup,
                            repeats=args.repeats, dtype=args.dtype, seed=args.seed,
                            threads=args.threads)
    try:
        run_decode_bench(args.pruned, args.against, engine=args.engine, cfg=cfg,
                         device=args.device, out=args.out, vllm_venv=args.vllm_venv)
    except RuntimeError as err:  # the vLLM subprocess failed: its log tail is in the message
        print(f"e3pruner bench-decode: error: {err}", file=sys.stderr)
        return 1
    return 0


def _add_bench_decode_parser(sub) -> None:
    p = sub.add_parser("bench-decode", help="decode tokens/s of a pruned model vs its original",
                       description="Measure decode speed (tokens/s, ms/token) of PRUNED and "
                       "ORIGINAL at several batch sizes and compare the speedup with the ideal "
                       "from the bytes of weights read per token. See docs/decode.md.")
    p.add_argument("pruned", help="pruned HF directory (e.g. runs/e3-smollm2/model)")
    p.add_argument("--against", default="smollm2-135m",
                   help="the original: 'smollm2-135m' (bundled), an HF directory or hub id")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate here; vllm: vLLM in its own venv "
                   "(build it with tools/make_vllm_env.sh)")
    p.add_argument("--prompt-len", type=_int_at_least(1), default=128)
    p.add_argument("--new-tokens", type=_int_at_least(2), default=128)
    p.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 8, 32), help="e.g. 1,8,32")
    p.add_argument("--warmup", type=_int_at_least(0), default=1)
    p.add_argument("--repeats", type=_int_at_least(1), default=3)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32, float16")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--device", default="cpu")
    p.add_argument("--vllm-venv", default=None,
                   help="vLLM venv (default $E3_VLLM_VENV or .venv-vllm in the repo root)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/decode_<engine>_<device>.json)")
    p.set_defaults(func=cmd_bench_decode)


def cmd_compare(args) -> int:
    from e3pruner.compare import CompareArgs, run_compare

    fields = CompareArgs.__dataclass_fields__
    run_compare(CompareArgs(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0


def _add_compare_parser(sub) -> None:
    from e3pruner.amp import AMP_CHOICES
    from e3pruner.compare import CompareArgs

    d = CompareArgs()
    p = sub.add_parser("compare", help="several pruning methods, one table (same model, n, "
                       "data and recovery budget)",
                       description="Run layer-pruning methods side by side: selection, held-out "
                       "perplexity before/after the same KD recovery, zero-shot accuracy. "
                       "Writes compare.md, compare.json and removed_layers.png to --out.")
    _add_model_args(p)
    p.add_argument("--methods", default=d.methods,
                   help=f"comma-separated (default {d.methods}; also self-pruner-width)")
    _add_layer_count_args(p)
    p.add_argument("--data", default=d.data)
    p.add_argument("--heldout", default=d.heldout)
    p.add_argument("--search-tokens", type=_tokens, default=d.search_tokens,
                   help="budget of the gradient searches (E3, CLP)")
    p.add_argument("--recovery-tokens", type=_tokens, default=d.recovery_tokens,
                   help="KD recovery budget of every method (0: none)")
    p.add_argument("--block-len", type=int, default=d.block_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--calib-blocks", type=int, default=d.calib_blocks)
    p.add_argument("--lr", type=float, default=d.lr, help="recovery peak learning rate")
    p.add_argument("--amp", default=d.amp, choices=AMP_CHOICES,
                   help="autocast: auto (default: bf16 where native, else fp32), bf16, fp16, none")
    p.add_argument("--weighting", default=d.weighting)
    p.add_argument("--eval-tokens", type=_tokens, default=d.eval_tokens)
    p.add_argument("--eval-ctx", type=int, default=d.eval_ctx)
    p.add_argument("--tasks", default=d.tasks, help="zero-shot tasks, comma-separated (default: all 7)")
    p.add_argument("--zeroshot-limit", type=int, default=d.zeroshot_limit,
                   help="first N items per task (0: skip zero-shot; -1: all)")
    p.add_argument("--population", type=int, default=d.population, help="Self-Pruner population")
    p.add_argument("--generations", type=int, default=d.generations, help="Self-Pruner generations")
    p.add_argument("--operator", default=d.operator, choices=["llm", "classic"],
                   help="Self-Pruner's evolutionary operators")
    p.add_argument("--export", action="store_true", help="also save every pruned checkpoint")
    p.add_argument("--out", default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help="run every method for seeds --seed .. --seed+N-1 (data order, "
                   "selection, recovery) and report mean ± std and paired tests against E3")
    p.add_argument("--heldout-extra", default=d.heldout_extra,
                   help="more held-out texts, comma-separated specs (default: the bundled "
                   "'sciq' science prose; '' for none)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e3pruner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune_parser(sub)
    _add_compare_parser(sub)

    p = sub.add_parser("info", help="supported families; a model's layers, params, vocab")
    p.add_argument("--model", default=None, help="also describe this model (a name, .gguf "
                   "file, HF directory or hub id, as for prune)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval-ppl", help="held-out perplexity of a model")
    _add_model_args(p)
    p.add_argument("--data", default="heldout",
                   help="'heldout' (bundled LAMBADA passages), 'bundled', a .txt/.jsonl file, hf:NAME")
    p.add_argument("--ctx-len", type=_int_at_least(2), default=512)
    p.add_argument("--stride", type=_int_at_least(1), default=None)
    p.add_argument("--batch-size", type=_int_at_least(1), default=8)
    p.add_argument("--max-tokens", type=_int_at_least(2, zero_ok=True), default=32768,
                   help="score the first N tokens of the split (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)
    _add_bench_decode_parser(sub)

    p = sub.add_parser("eval-zeroshot", help="zero-shot accuracy (lm-eval 0.4.13 numbers) on "
                       "ARC-E/C, HellaSwag, PIQA, BoolQ, WinoGrande, OpenBookQA")
    _add_model_args(p)
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all 7)")
    p.add_argument("--limit", type=_int_at_least(0), default=100,
                   help="first N items of each task's validation split (0 = all)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_zeroshot)
    return parser


def _check_common(args) -> None:
    """--device, --dtype and --stride of any command, before anything loads."""
    from e3pruner.models import check_device, parse_dtype

    if getattr(args, "device", None) is not None:
        check_device(args.device)
    if getattr(args, "dtype", None) is not None:
        try:
            parse_dtype(args.dtype)
        except ValueError as err:
            raise ValueError(f"--dtype: {err}") from None
    stride, ctx = getattr(args, "stride", None), getattr(args, "ctx_len", None)
    if stride is not None and ctx is not None and stride > ctx:
        raise ValueError(f"--stride must be <= --ctx-len ({ctx}), got {stride}")


def _resume_command(command: str, argv: list[str]) -> str:
    rest = [a for a in argv[1:] if a not in ("--overwrite", "--resume")]
    return shlex.join(["e3pruner", command, *rest, "--resume"])


def main(argv: list[str] | None = None) -> int:
    from e3pruner.disk_space import DiskSpaceError
    from e3pruner.train import NonFiniteError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", None) == 0:
        args.max_tokens = None
    if getattr(args, "zeroshot_limit", None) == -1:
        args.zeroshot_limit = None
    if getattr(args, "total_tokens", None) is not None:
        args.search_tokens = args.total_tokens // 5
        args.recovery_tokens = args.total_tokens - args.search_tokens
    try:
        _check_common(args)
        return args.func(args)
    except KeyboardInterrupt:
        if args.command not in ("prune", "compare"):
            raise
        print(f"\ne3pruner {args.command}: interrupted; continue with: "
              f"{_resume_command(args.command, argv)}", file=sys.stderr)
        return 130
    except (NonFiniteError, DiskSpaceError) as err:
        print(f"e3pruner {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"e3pruner {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
