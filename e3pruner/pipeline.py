"""`e3pruner prune`: search -> baseline check -> recovery -> export -> report, resumable.

Every phase stores its result in RUN/state.json (atomically) as soon as it finishes; the
long phases (mask search, recovery) also checkpoint every N steps (tensors and plain data
only: checkpoints load with torch.load(weights_only=True)). `--resume` skips the finished
phases and continues the interrupted one from its last checkpoint, so an interrupted run
ends with the same mask, metrics and weights as an uninterrupted one; it refuses settings
that differ from the run's stored ones (all but RESUME_FREE). `--overwrite` deletes all of
a previous run first (only in a directory with our state.json). state.json says whether the
run "finished"; report.json is written at the very end, after which the checkpoints go
(unless --keep-checkpoints). A non-finite loss, perplexity or weight stops the run before
anything is exported. Every JSON file is strict JSON (train.json_text).
Under torchrun every rank runs this function; rank 0 alone evaluates, writes and prints
(its results are broadcast), the search and recovery split each batch across ranks.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from e3pruner.distributed import SINGLE, DistContext
from e3pruner.run_args import RunArgs
from e3pruner.train import (
    RunFileError,
    json_text,
    remove_stale_temp_files,
    seed_everything,
    write_json,
)


@dataclass
class PruneArgs(RunArgs):
    recovery_batch_size: int | None = 2  # more, smaller steps recover more per token
    search_tokens: int = 32_768
    recovery_tokens: int = 139_264
    out: str = "runs/e3-smollm2"
    grad_accum: int = 1
    search_lr: float = 0.1
    scope: str = "full"
    teacher: str = "live"
    ce_weight: float | None = None  # recovery: + ce_weight * next-token CE of the data
    # (None: 0.3 with the live teacher, 0 with the top-K cache, whose loss has no CE term)
    per_sample: bool = False  # one mask per sample with estimator "st" ("score" always does)
    estimator: str = "score"  # mask-search gradient: "score" (score function) or "st"
    checkpoint_every: int = 25
    keep_checkpoints: bool = False  # else a finished run deletes search/recovery_ckpt.pt
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" for recovery
    baseline: bool = True


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


WEIGHTINGS = ("none", "entropy", "normalized_entropy", "confidence")  # e3kernels' KD weightings
ESTIMATORS = ("score", "st")
# PruneArgs that do not change the result: they may differ on --resume
RESUME_FREE = ("progress", "resume", "overwrite", "keep_checkpoints", "checkpoint_every", "out")


def flag(name: str) -> str:
    """The command-line flag of a PruneArgs/CompareArgs field."""
    return {"baseline": "--no-baseline", "progress": "--no-progress"}.get(
        name, "--" + name.replace("_", "-"))


def check_int(args, name: str, minimum: int, *, allow_none: bool = False) -> None:
    value = getattr(args, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise PruneError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")


def check_positive(args, name: str) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise PruneError(f"{flag(name)} must be a finite number > 0, got {value!r}")


def check_choice(args, name: str, choices) -> None:
    value = getattr(args, name)
    if value not in choices:
        raise PruneError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")


def check_model_options(args) -> None:
    """--dtype and --device: parseable, and the device present on this machine."""
    from e3pruner.models import check_device, parse_dtype

    try:
        parse_dtype(args.dtype)
    except ValueError as err:
        raise PruneError(f"--dtype: {err}") from None
    try:
        check_device(args.device)
    except ValueError as err:
        raise PruneError(str(err)) from None


def validate(args: PruneArgs, dist: DistContext = SINGLE) -> tuple[int, int]:
    """Check everything that can be checked before loading weights; returns (L, n).
    Creates nothing: --out is checked here and made by `prepare_out_dir`."""
    if args.ratio is not None and (isinstance(args.ratio, bool) or not 0 < args.ratio < 1):
        raise PruneError(f"--ratio must be in (0, 1), got {args.ratio}")
    check_int(args, "prune_layers", 1, allow_none=True)
    for name, minimum in (("block_len", 8), ("batch_size", 1), ("calib_blocks", 1),
                          ("search_tokens", 1), ("recovery_tokens", 0), ("grad_accum", 1),
                          ("eval_tokens", 2), ("eval_ctx", 2), ("checkpoint_every", 1),
                          ("seed", -2**63)):
        check_int(args, name, minimum)
    check_int(args, "recovery_batch_size", 1, allow_none=True)
    check_positive(args, "lr")
    check_positive(args, "search_lr")
    check_choice(args, "amp", ("bf16", "fp16", "none"))  # (after with_resolved_amp)
    check_choice(args, "scope", ("full", "endpoints", "lora"))
    check_choice(args, "teacher", ("live", "cache"))
    check_choice(args, "weighting", WEIGHTINGS)
    check_choice(args, "estimator", ESTIMATORS)
    check_choice(args, "parallel", ("ddp", "fsdp"))
    if args.estimator == "score" and args.batch_size < 2:
        raise PruneError(f"--batch-size must be >= 2 for the mask search (its score-function "
                         f"estimator compares the samples of a batch), got {args.batch_size}")
    if args.per_sample and args.estimator == "score":
        raise PruneError("--per-sample only changes the straight-through estimator "
                         "(--estimator st): the default score-function search already draws "
                         "one mask per sample; drop --per-sample or add --estimator st")
    step_tokens = args.batch_size * args.block_len
    if args.search_tokens < step_tokens:
        raise PruneError(f"--search-tokens must be >= one step ({args.batch_size} x "
                         f"{args.block_len} = {step_tokens} tokens), got {args.search_tokens}")
    rec_step = args.recovery_batch() * args.block_len * args.grad_accum
    if args.recovery_tokens != 0 and args.recovery_tokens < rec_step:
        raise PruneError(f"--recovery-tokens must be 0 (no recovery) or >= one step "
                         f"({rec_step} tokens), got {args.recovery_tokens}")
    if args.ce_weight is not None and (isinstance(args.ce_weight, bool)
                                       or not 0 <= args.ce_weight < float("inf")):
        raise PruneError(f"--ce-weight must be a finite number >= 0, got {args.ce_weight}")
    if recovery_ce_weight(args) > 0 and args.teacher == "cache":
        raise PruneError("--ce-weight > 0 needs --teacher live (the top-K cache loss has no "
                         "cross-entropy term); pass --ce-weight 0 with --teacher cache")
    try:
        dist.check_divides(args.batch_size, "--batch-size")
        if args.recovery_tokens:
            dist.check_divides(args.recovery_batch(), "--recovery-batch-size")
    except ValueError as err:
        raise PruneError(str(err)) from None
    check_model_options(args)
    check_data_specs(args)
    check_out_dir(args.out, args.resume, args.overwrite)
    n_layers = model_num_layers(args.model)
    return n_layers, resolve_n_prune(n_layers, args.prune_layers, args.ratio)


def check_data_specs(args, extra_heldout: tuple[str, ...] = ()) -> None:
    """Every text spec readable: --data, --heldout and the `extra_heldout` specs
    (compare's --heldout-extra); errors name the flag."""
    from e3pruner.data import check_spec

    named = [(flag(name), getattr(args, name)) for name in ("data", "heldout")]
    for option, spec in named + [("--heldout-extra", s) for s in extra_heldout]:
        try:
            check_spec(spec)
        except (OSError, ValueError) as err:
            raise PruneError(f"{option}: {err}") from None


def _tokens_of(spec: str, option: str, tok, **kw) -> torch.Tensor:
    """token_stream of one text spec; a file's errors name the flag, file and line."""
    from e3pruner.data import DataError, token_stream

    try:
        return token_stream(spec, tok, **kw)
    except (DataError, FileNotFoundError) as err:
        raise PruneError(f"{option}: {err}") from None


def heldout_tokens(args, tok, spec: str | None = None, option: str = "--heldout",
                   log=print) -> torch.Tensor:
    """Held-out token ids [<= eval_tokens] of `spec` (default --heldout). Fewer than
    min(eval_tokens, 2 * eval_ctx) raise (a perplexity needs two windows); fewer than
    eval_tokens warn."""
    spec = args.heldout if spec is None else spec
    ids = _tokens_of(spec, option, tok)[: args.eval_tokens]
    need = min(args.eval_tokens, 2 * args.eval_ctx)
    if ids.numel() < need:
        raise PruneError(f"{option} {spec!r} gives only {ids.numel()} tokens: a "
                         f"perplexity needs at least {need} (two windows of --eval-ctx "
                         f"{args.eval_ctx}, or --eval-tokens); give more held-out text")
    if ids.numel() < args.eval_tokens:
        log(f"warning: {option} {spec!r} has only {ids.numel():,} tokens: the "
            f"perplexities score those, not the {args.eval_tokens:,} of --eval-tokens")
    return ids


def recovery_ce_weight(args: PruneArgs) -> float:
    if args.ce_weight is not None:
        return args.ce_weight
    return 0.3 if args.teacher == "live" else 0.0


STATE_FILE = "state.json"


def is_run_dir(path: str | Path) -> bool:
    """A directory of one of our runs: it has our state.json (a JSON object with the run's
    "args"), or a state.json too damaged to read (which we tell people to --overwrite)."""
    state = Path(path) / STATE_FILE
    if not state.is_file():
        return False
    try:
        data = json.loads(state.read_text())
    except (ValueError, UnicodeDecodeError):
        return True
    return isinstance(data, dict) and isinstance(data.get("args"), dict)


def check_out_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """`out` can hold this run: new, empty, one of our runs with --resume/--overwrite, and
    writable (or creatable). Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out {out} exists and is not a directory")
    if _holds_files(out):
        ours = is_run_dir(out)
        if not ours:
            raise PruneError(f"--out {out} is not empty and holds no e3pruner run (no "
                             f"{STATE_FILE}): choose a new or empty directory (--overwrite "
                             "only clears run directories)")
        if not (resume or overwrite):
            raise PruneError(f"--out {out} already holds a run: pass --resume to continue it "
                             "or --overwrite to start over")
    target = out
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
        raise PruneError(f"--out {out} is not writable (nor creatable in {target})")
    return out


def _holds_files(out: Path) -> bool:
    """`out` is a directory with something in it (a left-over write probe aside)."""
    return out.is_dir() and any(p.name != ".write-probe" for p in out.iterdir())


def prepare_out_dir(out: str | Path, resume: bool) -> tuple[bool, Path | None]:
    """Make --out (after `check_out_dir`). A run dir without --resume is an --overwrite:
    all of the previous run in it is deleted first. Returns (fresh: this invocation starts
    a new run, created: the topmost directory it created or None) for `discard_out_dir`."""
    out = Path(out)
    holds_run = _holds_files(out)
    created = None
    if holds_run and not resume:  # --overwrite of one of our runs (check_out_dir made sure)
        clear_dir(out)
    elif not out.exists():
        created = out
        while not created.parent.exists() and created.parent != created:
            created = created.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise PruneError(f"--out {out} is not writable: {err}") from err
    return not (holds_run and resume), created


def clear_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def discard_out_dir(out: str | Path, created: Path | None) -> None:
    """Undo `prepare_out_dir` of a new run that failed before its first result, so that
    neither an empty --out nor a state.json that blocks the rerun stays behind."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    elif Path(out).is_dir():
        clear_dir(Path(out))


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
    """RUN/state.json: the run's arguments and each finished phase's result."""

    def __init__(self, run_dir: Path, fresh: bool, write: bool = True):
        self.path = Path(run_dir) / STATE_FILE
        self.write = write
        self.data = {} if fresh or not self.path.is_file() else self._read()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise RunFileError(f"cannot read {self.path} ({err}): the run's state is lost. "
                               f"Delete {self.path.parent} or rerun with --overwrite to "
                               "start over") from None
        if not isinstance(data, dict):
            raise RunFileError(f"{self.path} is not a run state of ours: delete it or rerun "
                               "with --overwrite to start over")
        return data

    def get(self, key):
        return self.data.get(key)

    def set(self, key, value) -> None:
        self.update({key: value})

    def update(self, values: dict) -> None:
        """Set several keys with one write of the state file."""
        self.data.update(values)
        if self.write:
            write_json(self.path, self.data)

    def has_results(self) -> bool:
        return any(k not in ("args", "finished", "processes", "invocations", "wall_seconds")
                   for k in self.data)

    def check_resume(self, args, keys: tuple[str, ...] | None = None,
                     free: tuple[str, ...] = RESUME_FREE) -> None:
        """On --resume, refuse settings that differ from the stored run's: the fields `keys`
        of args, or (None) every field but the `free` ones. Stores args on the first run
        only (a resume never overwrites them)."""
        old = self.data.get("args")
        if not args.resume or not old:
            if old is None:
                self.set("args", asdict(args))
            return
        defaults = type(args)()
        names = keys if keys is not None else [k for k in asdict(args) if k not in free]
        diff = [k for k in names
                if _plain(old.get(k, getattr(defaults, k, None))) != _plain(getattr(args, k))]
        if diff:
            detail = ", ".join(f"{flag(k)} (run: {old.get(k, getattr(defaults, k, None))!r}, "
                               f"now: {getattr(args, k)!r})" for k in diff)
            raise PruneError(
                f"--resume with different settings than the run in {self.path.parent}: "
                f"{detail}. Resume with the run's settings, or start over with --overwrite "
                "(or another --out)")


def _plain(value):
    """A value as it reads back from state.json (tuples become lists, paths strings)."""
    return json.loads(json_text(value if not isinstance(value, Path) else str(value)))


def prepare_data(args, tok, log=print):
    """(PruneData, held-out token ids [<= eval_tokens]) from args.data / args.heldout (see
    training_data and heldout_tokens)."""
    return training_data(args, tok), heldout_tokens(args, tok, log=log)


def training_data(args, tok):
    """PruneData of args.data in the block order of args.seed: the first calib_blocks
    blocks calibrate, the rest train."""
    from e3pruner.data import TokenBlocks
    from e3pruner.methods import PruneData

    stream = _tokens_of(args.data, "--data", tok, seed=args.seed)
    if stream.numel() < args.block_len:
        raise PruneError(f"--data {args.data!r} gives only {stream.numel()} tokens: fewer than "
                         f"one block of --block-len {args.block_len}; give more text")
    blocks = TokenBlocks(stream, args.block_len, seed=args.seed)
    if len(blocks) < args.calib_blocks + max(args.batch_size, args.recovery_batch()):
        raise PruneError(f"data {args.data!r} gives only {len(blocks)} blocks of "
                         f"{args.block_len} tokens; need more text")
    return PruneData(calib=blocks.take(args.calib_blocks, 0), blocks=blocks,
                     train_start=args.calib_blocks)


def with_resolved_amp(args, log=print):
    """`args` with --amp auto made concrete for its device (bf16 where native, else fp32;
    see amp.resolve_amp), a warning logged when an explicit bf16 is emulated here."""
    from dataclasses import replace

    from e3pruner.amp import AMP_CHOICES, native_bf16, resolve_amp

    if args.amp not in AMP_CHOICES:
        return args  # validate() names the bad value
    try:
        if args.amp == "auto":
            amp = resolve_amp("auto", args.device)
            log(f"amp: auto -> {amp} ({'bf16 is native' if amp == 'bf16' else 'no native bf16'}"
                f" on {args.device})")
            return replace(args, amp=amp)
        emulated_bf16 = args.amp == "bf16" and not native_bf16(args.device)
    except (RuntimeError, ValueError):
        return args  # a bad --device: validate() says so
    if emulated_bf16:
        log(f"warning: --amp bf16 on {args.device} without native bf16: autocast emulates it, "
            "several times slower than fp32 here (--amp auto picks fp32)")
    return args


def run_prune(args: PruneArgs, log=print, dist: DistContext = SINGLE) -> dict:
    """Run (or with --resume continue) a prune into args.out; returns the report."""
    args = with_resolved_amp(args, log if dist.is_main else (lambda *_a, **_k: None))
    run = Path(args.out)
    outcome: tuple = (None, None, None, None, None)
    if dist.is_main:  # rank 0 validates and makes --out; the others wait for its verdict
        try:
            n_layers, n_prune = validate(args, dist)
            outcome = (n_layers, n_prune, *prepare_out_dir(run, args.resume), None)
        except PruneError as err:
            outcome = (None, None, None, None, str(err))
    n_layers, n_prune, fresh, created, error = dist.broadcast(outcome)
    if error:
        raise PruneError(error)
    if not dist.is_main:
        log = lambda *_a, **_k: None  # noqa: E731
    state = None
    try:
        if dist.is_main:
            remove_stale_temp_files(run)
        state = RunState(run, fresh=not args.resume, write=dist.is_main)
        return _run_prune(args, state, n_layers, n_prune, log, dist)
    except BaseException:
        if dist.is_main and fresh and (state is None or not state.has_results()):
            discard_out_dir(run, created)
        raise


def _run_prune(args: PruneArgs, state: RunState, n_layers: int, n_prune: int, log,
               dist: DistContext) -> dict:
    from e3pruner.eval.perplexity import perplexity
    from e3pruner.models import load_model
    from e3pruner.models.export import export_pruned
    from e3pruner.train import Checkpointer, check_finite

    t0 = time.time()
    run = Path(args.out)
    state.check_resume(args)
    if state.get("processes") not in (None, dist.world_size):
        raise PruneError(f"--resume under {dist.world_size} process(es), but the run in {run} "
                         f"ran under {state.get('processes')}: resume it with as many")
    ckpts = [Checkpointer(run / name, write=dist.is_main)
             for name in ("search_ckpt.pt", "recovery_ckpt.pt")]
    if state.get("finished") and (run / "report.json").is_file():
        report = json.loads((run / "report.json").read_text())
        if not args.keep_checkpoints:
            for ckpt in ckpts:
                ckpt.remove()
        log(f"the run in {run} has finished already (report: {run / 'report.json'}); "
            "pass --overwrite to run it again")
        return report if dist.is_main else {}
    state.update({"processes": dist.world_size, "finished": False})
    if dist.is_main:
        (run / "report.json").unlink(missing_ok=True)  # written again at the very end
    seed_everything(args.seed)
    hint = (f"Try --dtype float32{' and --amp none' if args.amp != 'none' else ''}"
            f" (now --dtype {args.dtype}, --amp {args.amp} on {args.device})")

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    log(f"model {args.model}: {n_layers} layers, pruning {n_prune} "
        f"({100 * n_prune / n_layers:.0f}%)")
    data, heldout = prepare_data(args, tok, log)

    def ppl(m, what: str) -> float:
        value = (perplexity(m, heldout, args.eval_ctx, batch_size=4,
                            progress=args.progress)["ppl"] if dist.is_main else None)
        value = dist.broadcast(value)
        check_finite(value, f"held-out perplexity of the {what}", hint=hint + ".")
        return value

    if state.get("teacher_ppl") is None:
        state.set("teacher_ppl", ppl(model, "unpruned model"))
    log(f"teacher held-out perplexity: {state.get('teacher_ppl'):.3f}")

    sel = _search_phase(args, state, model, data, n_prune, ppl, log, dist)
    student, rec_summary = _recovery_phase(args, state, model, data, sel, ppl, hint, dist)

    if not dist.is_main:
        dist.barrier()  # rank 0 exports and reports
        return {}
    export_dir = export_pruned(student, list(range(len(sel.keep))), run / "model", tok, info={
        "original_num_layers": n_layers, "kept_layers": sel.keep, "removed_layers": sel.removed,
        "method": "e3", "source": args.model, "recovery_tokens": rec_summary["tokens"],
        "search_tokens": sel.tokens})
    gguf_path = _export_gguf(args, sel.keep, rec_summary, run, log)

    plots = _write_plots(run, sel, state.get("shortgpt"), n_layers, n_prune)
    report = _build_report(args, state, sel, rec_summary, heldout, export_dir, plots, n_layers,
                           n_prune, dist, n_params=sum(p.numel() for p in model.parameters()),
                           n_params_pruned=sum(p.numel() for p in student.parameters()),
                           seconds=time.time() - t0)
    report["gguf"] = None if gguf_path is None else str(gguf_path)
    write_json(run / "report.json", report)
    state.set("finished", True)
    if not args.keep_checkpoints:
        for ckpt in ckpts:
            ckpt.remove()
    log(format_table(report))
    dist.barrier()
    return report


GGUF_ROUTE = ("llama.cpp's convert_hf_to_gguf.py {model} --outfile pruned-f16.gguf, then "
              "llama-quantize pruned-f16.gguf pruned.gguf Q4_K_M (docs/gguf.md)")


def _export_gguf(args: PruneArgs, keep: list[int], rec_summary: dict, run: Path,
                 log) -> Path | None:
    """RUN/model.gguf, the pruned source GGUF with its quantized tensors as they are, when the
    model came from a GGUF and recovery left the weights unchanged; else None (with a GGUF
    input and recovered weights, the log names the route from the HF export to a GGUF)."""
    from e3pruner.models.gguf_export import export_pruned_gguf
    from e3pruner.models.loading import gguf_source

    src = gguf_source(args.model)
    if src is None:
        return None
    if rec_summary["steps"]:
        log("the weights were recovered, so no pruned GGUF is written (it would drop the "
            "recovery); to make one from the HF export: "
            + GGUF_ROUTE.format(model=run / "model"))
        return None
    return export_pruned_gguf(src, keep, run / "model.gguf")


def _search_phase(args: PruneArgs, state: RunState, model, data, n_prune: int, ppl, log,
                  dist: DistContext):
    """The E3 mask search, the perplexity of its mask and the ShortGPT baseline (each
    skipped when state.json has it); returns the Selection."""
    from e3pruner.methods import Budget, Selection, get_method
    from e3pruner.methods.e3 import E3Config
    from e3pruner.models.gates import gated, remove_gates

    run = Path(args.out)
    budget = Budget(search_tokens=args.search_tokens, batch_size=args.batch_size,
                    seed=args.seed, progress=args.progress and dist.is_main, run_dir=str(run),
                    resume=args.resume, checkpoint_every=args.checkpoint_every, dist=dist)
    t_search = time.time()
    if state.get("search") is None:
        cfg = E3Config(lr=args.search_lr, per_sample=args.per_sample, weighting=args.weighting,
                       amp=args.amp, estimator=args.estimator)
        sel = get_method("e3")(model, data, n_prune, budget, config=cfg)
        state.set("search", {**asdict(sel), "seconds": time.time() - t_search})
    sel = Selection(**{k: v for k, v in state.get("search").items() if k != "seconds"})
    log(f"e3 removes layers {sel.removed}")

    if state.get("ppl_before") is None:
        with torch.no_grad(), gated(model, sel.mask(args.device)):
            state.set("ppl_before", ppl(model, "pruned model before recovery"))
    remove_gates(model)

    if args.baseline and state.get("shortgpt") is None:
        t = time.time()
        base = get_method("shortgpt")(model, data, n_prune, budget)  # cheap: every rank
        with torch.no_grad(), gated(model, base.mask(args.device)):
            base_ppl = ppl(model, "ShortGPT-pruned model")
        remove_gates(model)
        state.set("shortgpt", {**asdict(base), "ppl_before": base_ppl,
                               "seconds": time.time() - t})

    return sel


def _recovery_phase(args: PruneArgs, state: RunState, model, data, sel, ppl, hint: str,
                    dist: DistContext):
    """KD recovery of the pruned student and its perplexity; returns (student, summary)."""
    from e3pruner.recovery.distill import RecoveryConfig, make_student, recover
    from e3pruner.train import check_finite_params

    run = Path(args.out)
    rec_cfg = RecoveryConfig(tokens=args.recovery_tokens, batch_size=args.recovery_batch(),
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
    check_finite_params(student, "recovery", hint=hint + " or a lower --lr.")
    if state.get("ppl_after") is None or state.get("recovery") is None:
        state.set("recovery", rec_summary)
        state.set("ppl_after", ppl(student, "pruned model after recovery")
                  if rec_summary["steps"] else state.get("ppl_before"))

    return student, rec_summary


def _build_report(args: PruneArgs, state: RunState, sel, rec_summary: dict, heldout, export_dir,
                  plots: dict, n_layers: int, n_prune: int, dist: DistContext, *, n_params: int,
                  n_params_pruned: int, seconds: float) -> dict:
    """report.json of a finished prune."""
    return {
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
                    "total_this_invocation": seconds},
        "recovery": state.get("recovery"), "search": sel.info,
        "export": str(export_dir), "plots": plots, "args": asdict(args),
    }


def _write_plots(run: Path, sel, shortgpt: dict | None, n_layers: int, n_prune: int) -> dict:
    """Mask probabilities, loss curves and layer importance (E3, its init, ShortGPT) as PNGs
    in the run directory; returns {name: path}."""
    from e3pruner.methods.base import keep_lowest_removed
    from e3pruner.plots import plot_layer_importance, plot_loss, plot_mask_probabilities
    from e3pruner.train import MetricsLog

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
        init_keep = set(keep_lowest_removed(torch.tensor(sel.info["init_kl"]), n_prune))
        removed["skip-one KL (init)"] = [i for i in range(n_layers) if i not in init_keep]
    if shortgpt:
        scores["ShortGPT block influence"] = shortgpt["scores"]
        keep_b = set(shortgpt["keep"])
        removed["ShortGPT block influence"] = [i for i in range(n_layers) if i not in keep_b]
    plots["layer_importance"] = str(plot_layer_importance(scores, removed,
                                                          run / "layer_importance.png"))
    return plots


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
    if r.get("gguf"):
        rows.append(("pruned GGUF", f"{r['gguf']}  (the source's quantized tensors)"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
