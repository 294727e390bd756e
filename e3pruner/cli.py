"""`e3pruner` command line: prune, info, eval-ppl."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="'smollm2-135m' (bundled), a local HF directory or a hub id")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="cpu")


def cmd_info(args) -> int:
    from e3pruner.models import SUPPORTED_FAMILIES, load_model
    from e3pruner.models.families import _ADAPTERS, decoder_layers

    print("supported families:")
    for fam in SUPPORTED_FAMILIES:
        print(f"  {fam:8s} {_ADAPTERS[fam].notes}")
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
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:18s} {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                  else f"{k:18s} {v}")
    return 0


def cmd_eval_ppl(args) -> int:
    from e3pruner.evaluate import perplexity
    from e3pruner.models import load_model

    t0 = time.time()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    res = perplexity(model, args.data, args.ctx_len, tokenizer=tok, stride=args.stride,
                     batch_size=args.batch_size, max_tokens=args.max_tokens)
    res.update(model=args.model, data=args.data, seconds=round(time.time() - t0, 1))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"held-out perplexity of {args.model} on {args.data!r}: {res['ppl']:.3f} "
              f"({res['tokens']:,} tokens, ctx {args.ctx_len}"
              f"{', stride ' + str(args.stride) if args.stride else ''}; {res['seconds']} s)")
    return 0


def _tokens(text: str) -> int:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 65536 or 5e8)") from err
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"token counts are non-negative integers, got {text}")
    return int(value)


def cmd_prune(args) -> int:
    from e3pruner.pipeline import PruneArgs, run_prune

    fields = PruneArgs.__dataclass_fields__
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    run_prune(PruneArgs(**kwargs))
    return 0


def _add_prune_parser(sub) -> None:
    from e3pruner.pipeline import PruneArgs

    d = PruneArgs()
    p = sub.add_parser("prune", help="E3 mask search + entropy-aware KD recovery + export",
                       description="Prune decoder layers with E3-Pruner. With no arguments: the "
                       "bundled SmolLM2-135M, 25%% of its layers, the bundled data.")
    _add_model_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ratio", type=float, default=None, help="fraction of layers to remove (default 0.25)")
    g.add_argument("--prune-layers", type=int, default=None, help="number of layers to remove")
    p.add_argument("--data", default=d.data, help="training/calibration text: 'bundled', a file, hf:NAME")
    p.add_argument("--heldout", default=d.heldout, help="held-out perplexity text (default: bundled LAMBADA)")
    p.add_argument("--search-tokens", type=_tokens, default=d.search_tokens)
    p.add_argument("--recovery-tokens", type=_tokens, default=d.recovery_tokens,
                   help="0 skips recovery")
    p.add_argument("--tokens", type=_tokens, default=None, dest="total_tokens",
                   help="total budget: 20%% to the search, 80%% to recovery (overrides both)")
    p.add_argument("--block-len", type=int, default=d.block_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--calib-blocks", type=int, default=d.calib_blocks)
    p.add_argument("--lr", type=float, default=d.lr, help="recovery peak learning rate")
    p.add_argument("--search-lr", type=float, default=d.search_lr)
    p.add_argument("--scope", default=d.scope, choices=["full", "endpoints", "lora"])
    p.add_argument("--teacher", default=d.teacher, choices=["live", "cache"])
    p.add_argument("--weighting", default=d.weighting)
    p.add_argument("--per-sample", action="store_true", help="one mask per sample in the search")
    p.add_argument("--amp", default=d.amp, choices=["bf16", "fp16", "none"],
                   help="autocast dtype for search and recovery (perplexity is always fp32)")
    p.add_argument("--eval-tokens", type=_tokens, default=d.eval_tokens)
    p.add_argument("--eval-ctx", type=int, default=d.eval_ctx)
    p.add_argument("--out", default=d.out)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the ShortGPT sanity comparison")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e3pruner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune_parser(sub)

    p = sub.add_parser("info", help="supported families; a model's layers, params, vocab")
    p.add_argument("--model", default=None, help="also describe this model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval-ppl", help="held-out perplexity of a model")
    _add_model_args(p)
    p.add_argument("--data", default="heldout",
                   help="'heldout' (bundled LAMBADA passages), 'bundled', a .txt/.jsonl file, hf:NAME")
    p.add_argument("--ctx-len", type=int, default=512)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32768,
                   help="score the first N tokens of the split (0 = all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_tokens", None) == 0:
        args.max_tokens = None
    if getattr(args, "total_tokens", None) is not None:
        args.search_tokens = args.total_tokens // 5
        args.recovery_tokens = args.total_tokens - args.search_tokens
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"e3pruner {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
