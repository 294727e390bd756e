"""`e3pruner prune`: search -> baseline check -> recovery -> export -> report, resumable.

Every phase stores its result in RUN/state.json (atomically) as soon as it finishes; the
long phases (mask search, recovery) also checkpoint every N steps. `--resume` skips the
finished phases and continues the interrupted one from its last checkpoint, so an
interrupted run ends with the same mask, metrics and weights as an uninterrupted one.
Under torchrun every rank runs this function; rank 0 alone evaluates, writes and prints
(its results are broadcast), the search and recovery split each batch across ranks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from e3pruner.distributed import SINGLE, DistContext
from e3pruner.train import atomic_write_text, seed_everything


@dataclass
class PruneArgs:
    model: str = "smollm2-135m"
    prune_layers: int | None = None
    ratio: float | None = None  # default 0.25 when prune_layers is None
    data: str = "bundled"
    heldout: str = "heldout"
    block_len: int = 256
    batch_size: int = 4  # mask search (the score estimator needs >= 2 rows)
    recovery_batch_size: int | None = 2  # None: batch_size
    calib_blocks: int = 4
    search_tokens: int = 65_536
    recovery_tokens: int = 122_880
    grad_accum: int = 1
    lr: float = 4e-4
    search_lr: float = 0.1
    scope: str = "full"
    teacher: str = "live"
    weighting: str = "entropy"
    ce_weight: float | None = None  # recovery: + ce_weight * next-token CE of the data
    # (None: 0.3 with the live teacher, 0 with the top-K cache, whose loss has no CE term)
    per_sample: bool = False
    amp: str = "bf16"  # autocast for the search and recovery forward/backward ("none": off)
    eval_tokens: int = 8_192
    eval_ctx: int = 512
    out: str = "runs/e3-smollm2"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 25
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" for recovery
    baseline: bool = True
    progress: bool = True
    extra: dict = field(default_factory=dict)


class PruneError(ValueError):
    pass


def resolve_n_prune(n_layers: int, prune_layers: int | None, ratio: float | None) -> int:
    if prune_layers is not None and ratio is not None:
        raise PruneError("give either --prune-layers or --ratio, not both")
    if prune_layers is None:
        ratio = 0.25 if ratio is None else ratio
        if not 0 < ratio < 1:
            raise PruneError(f"--ratio must be in (0, 1), got {ratio}")
        n = int(round(ratio * n_layers))
        if n < 1:
            raise PruneError(f"--ratio {ratio} removes no layer of {n_layers}; raise it")
        if n >= n_layers:
            raise PruneError(f"--ratio {ratio} would remove all {n_layers} layers")
        return n
    if not 1 <= prune_layers < n_layers:
        raise PruneError(f"--prune-layers must be in [1, {n_layers - 1}] for a model with "
                         f"{n_layers} layers, got {prune_layers}")
    return prune_layers


def validate(args: PruneArgs) -> tuple[int, int]:
    """Check everything that can be checked before loading weights; returns (L, n)."""
    from e3pruner.models import parse_dtype

    if args.ratio is not None and not 0 < args.ratio < 1:
        raise PruneError(f"--ratio must be in (0, 1), got {args.ratio}")
    step_tokens = args.batch_size * args.block_len
    if args.search_tokens < step_tokens:
        raise PruneError(f"--search-tokens must be >= one step ({args.batch_size} x "
                         f"{args.block_len} = {step_tokens} tokens), got {args.search_tokens}")
    if args.block_len < 8 or args.batch_size < 1 or args.calib_blocks < 1:
        raise PruneError("--block-len >= 8, --batch-size >= 1, --calib-blocks >= 1 required")
    if args.recovery_batch_size is not None and args.recovery_batch_size < 1:
        raise PruneError(f"--recovery-batch-size must be >= 1, got {args.recovery_batch_size}")
    rec_step = recovery_batch(args) * args.block_len * args.grad_accum
    if args.recovery_tokens != 0 and args.recovery_tokens < rec_step:
        raise PruneError(f"--recovery-tokens must be 0 (no recovery) or >= one step "
                         f"({rec_step} tokens), got {args.recovery_tokens}")
    if args.eval_tokens < 2 or args.eval_ctx < 2:
        raise PruneError("--eval-tokens and --eval-ctx must be >= 2")
    parse_dtype(args.dtype)
    if args.amp not in ("bf16", "fp16", "none"):
        raise PruneError(f"--amp must be bf16, fp16 or none, got {args.amp!r}")
    if args.scope not in ("full", "endpoints", "lora"):
        raise PruneError(f"--scope must be full, endpoints or lora, got {args.scope!r}")
    if args.teacher not in ("live", "cache"):
        raise PruneError(f"--teacher must be live or cache, got {args.teacher!r}")
    if args.ce_weight is not None and not 0 <= args.ce_weight < float("inf"):
        raise PruneError(f"--ce-weight must be a finite number >= 0, got {args.ce_weight}")
    if recovery_ce_weight(args) > 0 and args.teacher == "cache":
        raise PruneError("--ce-weight > 0 needs --teacher live (the top-K cache loss has no "
                         "cross-entropy term); pass --ce-weight 0 with --teacher cache")
    check_out_dir(args.out, args.resume, args.overwrite)
    n_layers = model_num_layers(args.model)
    return n_layers, resolve_n_prune(n_layers, args.prune_layers, args.ratio)


def recovery_ce_weight(args: PruneArgs) -> float:
    if args.ce_weight is not None:
        return args.ce_weight
    return 0.3 if args.teacher == "live" else 0.0


def recovery_batch(args) -> int:
    """Blocks per recovery micro-batch: --recovery-batch-size, else --batch-size (compare)."""
    rb = getattr(args, "recovery_batch_size", None)
    return args.batch_size if rb is None else rb


def check_out_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """`out` is (or can be made) a writable directory that holds no run unless resuming."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise PruneError(f"--out {out} already holds a run: pass --resume to continue it or "
                         "--overwrite to start over")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PruneError(f"--out {out} is not writable: {err}") from err
    return out


def model_num_layers(model: str) -> int:
    """Decoder layers of a supported model, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from e3pruner.models import adapter_for_config, resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
    except (OSError, ValueError) as err:
        raise PruneError(f"cannot read the config of --model {model!r}: {err}") from err
    adapter_for_config(config)
    return config.num_hidden_layers


class RunState:
    def __init__(self, run_dir: Path, fresh: bool, write: bool = True):
        self.path = run_dir / "state.json"
        self.write = write
        self.data = {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())

    def get(self, key):
        return self.data.get(key)

    def set(self, key, value) -> None:
        self.data[key] = value
        if self.write:
            atomic_write_text(self.path, json.dumps(self.data, indent=2))

    def check_resume(self, args, keys: tuple[str, ...]) -> None:
        """On --resume, refuse settings (`keys` of args) that differ from the stored run's."""
        old = self.data.get("args")
        if not args.resume or not old:
            return
        diff = {k: (old.get(k), getattr(args, k)) for k in keys if old.get(k) != getattr(args, k)}
        if diff:
            raise PruneError(f"--resume with different settings than the run in "
                             f"{self.path.parent}: {diff}")


def prepare_data(args, tok):
    """(PruneData, held-out token ids [eval_tokens]) from args.data / args.heldout: the
    first calib_blocks blocks of the seeded block order calibrate, the rest train."""
    from e3pruner.data import TokenBlocks, token_stream
    from e3pruner.methods import PruneData

    stream = token_stream(args.data, tok, seed=args.seed)
    blocks = TokenBlocks(stream, args.block_len, seed=args.seed)
    if len(blocks) < args.calib_blocks + max(args.batch_size, recovery_batch(args)):
        raise PruneError(f"data {args.data!r} gives only {len(blocks)} blocks of "
                         f"{args.block_len} tokens; need more text")
    data = PruneData(calib=blocks.take(args.calib_blocks, 0), blocks=blocks,
                     train_start=args.calib_blocks)
    return data, token_stream(args.heldout, tok)[: args.eval_tokens]


def run_prune(args: PruneArgs, log=print, dist: DistContext = SINGLE) -> dict:
    from e3pruner.distill import RecoveryConfig, make_student, recover
    from e3pruner.evaluate import perplexity
    from e3pruner.export import export_pruned
    from e3pruner.gates import gated, remove_gates
    from e3pruner.methods import Budget, Selection, get_method
    from e3pruner.methods.e3 import E3Config
    from e3pruner.models import load_model
    from e3pruner.plots import plot_layer_importance, plot_loss, plot_mask_probabilities
    from e3pruner.train import MetricsLog

    t0 = time.time()
    if not dist.is_main:
        log = lambda *_a, **_k: None  # noqa: E731
    run = Path(args.out)
    checked: tuple = (None, None, None)
    if dist.is_main:  # rank 0 validates and clears --out; the others wait for its verdict
        try:
            checked = (*validate(args), None)
            if args.overwrite and not args.resume:
                for name in ("state.json", "metrics.jsonl", "search_ckpt.pt", "recovery_ckpt.pt"):
                    (run / name).unlink(missing_ok=True)
        except PruneError as err:
            checked = (None, None, str(err))
    n_layers, n_prune, error = dist.broadcast(checked)
    if error:
        raise PruneError(error)
    dist.check_divides(args.batch_size, "--batch-size")
    if args.recovery_tokens:
        dist.check_divides(recovery_batch(args), "--recovery-batch-size")
    state = RunState(run, fresh=not args.resume, write=dist.is_main)
    state.check_resume(args, ("model", "data", "block_len", "batch_size", "recovery_batch_size",
                              "seed", "search_tokens", "recovery_tokens", "calib_blocks",
                              "grad_accum"))
    state.set("args", asdict(args))
    seed_everything(args.seed)

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    log(f"model {args.model}: {n_layers} layers, pruning {n_prune} "
        f"({100 * n_prune / n_layers:.0f}%)")
    data, heldout = prepare_data(args, tok)

    def ppl(m) -> float:
        value = (perplexity(m, heldout, args.eval_ctx, batch_size=4,
                            progress=args.progress)["ppl"] if dist.is_main else None)
        return dist.broadcast(value)

    if state.get("teacher_ppl") is None:
        state.set("teacher_ppl", ppl(model))
    log(f"teacher held-out perplexity: {state.get('teacher_ppl'):.3f}")

    budget = Budget(search_tokens=args.search_tokens, batch_size=args.batch_size,
                    seed=args.seed, progress=args.progress and dist.is_main, run_dir=str(run),
                    resume=args.resume, checkpoint_every=args.checkpoint_every, dist=dist)
    t_search = time.time()
    if state.get("search") is None:
        cfg = E3Config(lr=args.search_lr, per_sample=args.per_sample, weighting=args.weighting,
                       amp=args.amp)
        sel = get_method("e3")(model, data, n_prune, budget, config=cfg)
        state.set("search", {**asdict(sel), "seconds": time.time() - t_search})
    sel = Selection(**{k: v for k, v in state.get("search").items() if k != "seconds"})
    log(f"e3 removes layers {sel.removed}")

    if state.get("ppl_before") is None:
        with torch.no_grad(), gated(model, sel.mask(args.device)):
            state.set("ppl_before", ppl(model))
    remove_gates(model)

    if args.baseline and state.get("shortgpt") is None:
        t = time.time()
        base = get_method("shortgpt")(model, data, n_prune, budget)  # cheap: every rank
        with torch.no_grad(), gated(model, base.mask(args.device)):
            base_ppl = ppl(model)
        remove_gates(model)
        state.set("shortgpt", {**asdict(base), "ppl_before": base_ppl,
                               "seconds": time.time() - t})

    rec_cfg = RecoveryConfig(tokens=args.recovery_tokens, batch_size=recovery_batch(args),
                             grad_accum=args.grad_accum, lr=args.lr, scope=args.scope,
                             weighting=args.weighting, ce_weight=recovery_ce_weight(args),
                             teacher=args.teacher, amp=args.amp)
    student = make_student(model, sel.keep)
    t_rec = time.time()
    student, rec_summary = recover(student, model, data, rec_cfg, keep=sel.keep, seed=args.seed,
                                   run_dir=str(run), resume=args.resume,
                                   checkpoint_every=args.checkpoint_every,
                                   progress=args.progress, dist=dist)
    rec_summary["seconds"] = time.time() - t_rec
    if state.get("ppl_after") is None or state.get("recovery") is None:
        state.set("recovery", rec_summary)
        state.set("ppl_after", ppl(student) if rec_summary["steps"] else state.get("ppl_before"))

    if not dist.is_main:
        dist.barrier()  # rank 0 exports and reports
        return {}
    n_params = sum(p.numel() for p in model.parameters())
    n_params_pruned = sum(p.numel() for p in student.parameters())
    export_dir = export_pruned(student, list(range(len(sel.keep))), run / "model", tok, info={
        "original_num_layers": n_layers, "kept_layers": sel.keep, "removed_layers": sel.removed,
        "method": "e3", "source": args.model, "recovery_tokens": rec_summary["tokens"],
        "search_tokens": sel.tokens})

    records = MetricsLog(run / "metrics.jsonl", "x").read()
    plots = {
        "mask_probabilities": str(plot_mask_probabilities(records, sel.removed,
                                                          run / "mask_probabilities.png")),
        "loss": str(plot_loss(records, run / "loss.png")),
    }
    scores = {"E3 logits (final)": sel.scores,
              "skip-one KL (init)": sel.info.get("init_kl")}
    removed = {"E3 logits (final)": sel.removed}
    if sel.info.get("init_kl"):
        from e3pruner.methods.base import keep_lowest_removed

        init_keep = set(keep_lowest_removed(torch.tensor(sel.info["init_kl"]), n_prune))
        removed["skip-one KL (init)"] = [i for i in range(n_layers) if i not in init_keep]
    if state.get("shortgpt"):
        scores["ShortGPT block influence"] = state.get("shortgpt")["scores"]
        keep_b = set(state.get("shortgpt")["keep"])
        removed["ShortGPT block influence"] = [i for i in range(n_layers) if i not in keep_b]
    plots["layer_importance"] = str(plot_layer_importance(scores, removed,
                                                          run / "layer_importance.png"))
    report = {
        "model": args.model, "device": args.device, "dtype": args.dtype,
        "num_layers": n_layers, "pruned_layers": n_prune, "kept_layers": sel.keep,
        "removed_layers": sel.removed, "params": n_params, "params_pruned": n_params_pruned,
        "heldout": {"data": args.heldout, "tokens": int(heldout.numel()), "ctx": args.eval_ctx},
        "processes": dist.world_size,
        "ppl": {"teacher": state.get("teacher_ppl"), "pruned_before_recovery": state.get("ppl_before"),
                "pruned_after_recovery": state.get("ppl_after")},
        "shortgpt": None if not state.get("shortgpt") else {
            "removed_layers": [i for i in range(n_layers)
                               if i not in set(state.get("shortgpt")["keep"])],
            "ppl_before_recovery": state.get("shortgpt")["ppl_before"]},
        "tokens": {"search": sel.tokens, "recovery": rec_summary["tokens"]},
        "seconds": {"search": state.get("search").get("seconds"),
                    "recovery": state.get("recovery").get("seconds"),
                    "total_this_invocation": time.time() - t0},
        "recovery": state.get("recovery"), "search": sel.info,
        "export": str(export_dir), "plots": plots, "args": asdict(args),
    }
    atomic_write_text(run / "report.json", json.dumps(report, indent=2))
    log(format_table(report))
    dist.barrier()
    return report


def format_table(r: dict) -> str:
    p = r["ppl"]
    rows = [
        ("teacher held-out perplexity", f"{p['teacher']:.3f}"),
        ("pruned, before recovery (E3)", f"{p['pruned_before_recovery']:.3f}"),
    ]
    if r.get("shortgpt"):
        rows.append(("pruned, before recovery (ShortGPT)",
                     f"{r['shortgpt']['ppl_before_recovery']:.3f}"))
    rows += [
        ("pruned, after recovery (E3)", f"{p['pruned_after_recovery']:.3f}"
                                        f"  ({p['pruned_after_recovery'] / p['teacher']:.2f}x teacher)"),
        ("layers kept", f"{len(r['kept_layers'])}/{r['num_layers']}  removed {r['removed_layers']}"),
        ("parameters", f"{r['params_pruned']:,} / {r['params']:,} "
                       f"({100 * r['params_pruned'] / r['params']:.1f}%)"),
        ("tokens: search / recovery", f"{r['tokens']['search']:,} / {r['tokens']['recovery']:,}"),
        ("wall time (this invocation)", f"{r['seconds']['total_this_invocation']:.0f} s"),
        ("held-out", f"{r['heldout']['data']}: {r['heldout']['tokens']:,} tokens, ctx {r['heldout']['ctx']}"),
        ("checkpoint", r["export"]),
    ]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
