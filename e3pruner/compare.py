"""`e3pruner compare`: several layer-pruning methods on the same model, n, data and budget.

For every method: select the layers (its own search budget), held-out perplexity of the
gated model before recovery, the same KD recovery budget (with the method's own recovery
overrides, e.g. CLP's endpoint tuning), perplexity and zero-shot accuracy after recovery.
The teacher is evaluated the same way. Each finished step is stored in RUN/state.json, so
`--resume` continues an interrupted comparison where it stopped; resumed with other zero-shot
settings (`--zeroshot-limit`, `--tasks`) it re-evaluates only the zero-shot columns, on the
students restored from their final recovery checkpoints. Output: compare.json,
compare.md (the table) and removed_layers.png.

The width variant of Self-Pruner ("self-pruner-width") masks MLP channels and attention
heads instead of removing layers: it is evaluated with its masks on, gets no recovery
and is not exported (vLLM would see the full model).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from e3pruner.pipeline import (
    WEIGHTINGS,
    PruneError,
    RunState,
    check_choice,
    check_data_specs,
    check_int,
    check_model_options,
    check_out_dir,
    check_positive,
    discard_out_dir,
    model_num_layers,
    prepare_data,
    prepare_out_dir,
    resolve_n_prune,
)
from e3pruner.run_args import RunArgs
from e3pruner.train import atomic_write_text, remove_stale_temp_files, seed_everything, write_json

DEFAULT_METHODS = "e3,clp,self-pruner,shortgpt,angular,ppl,taylor,sleb"
# CompareArgs that may differ on --resume (zero-shot settings: only those columns run again)
RESUME_FREE = ("progress", "resume", "overwrite", "out", "methods", "export", "tasks",
               "zeroshot_limit")
TASK_LABELS = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "hellaswag": "HellaSwag",
               "piqa": "PIQA", "boolq": "BoolQ", "winogrande": "WinoG", "openbookqa": "OBQA"}


@dataclass
class CompareArgs(RunArgs):
    methods: str = DEFAULT_METHODS
    out: str = "runs/compare-smollm2"
    tasks: str | None = None  # comma-separated zero-shot tasks (None: all 7)
    zeroshot_limit: int | None = 100  # first N items per task (None: all)
    population: int = 30  # Self-Pruner
    generations: int = 20
    operator: str = "llm"  # Self-Pruner operators: "llm" or "classic"
    export: bool = False  # also write each method's pruned checkpoint


def parse_methods(spec: str) -> list[str]:
    from e3pruner.methods import available_methods

    names = [m.strip() for m in spec.split(",") if m.strip()]
    known = available_methods()
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise PruneError(f"--methods: unknown method(s) {bad or spec!r}; available: "
                         f"{', '.join(known)}")
    if len(set(names)) != len(names):
        raise PruneError(f"--methods lists a method twice: {spec!r}")
    return names


def validate(args: CompareArgs) -> tuple[list[str], int, int]:
    from e3pruner.eval.zeroshot import resolve_tasks

    methods = parse_methods(args.methods)
    if args.ratio is not None and (isinstance(args.ratio, bool) or not 0 < args.ratio < 1):
        raise PruneError(f"--ratio must be in (0, 1), got {args.ratio}")
    check_int(args, "prune_layers", 1, allow_none=True)
    for name, minimum in (("block_len", 8), ("batch_size", 2 if "e3" in methods else 1),
                          ("calib_blocks", 1), ("search_tokens", 1), ("recovery_tokens", 0),
                          ("eval_tokens", 2), ("eval_ctx", 2), ("seed", -2**63)):
        check_int(args, name, minimum)
    check_int(args, "zeroshot_limit", 0, allow_none=True)
    check_int(args, "population", 2)
    check_int(args, "generations", 1)
    check_positive(args, "lr")
    check_choice(args, "weighting", WEIGHTINGS)
    check_choice(args, "operator", ("llm", "classic"))
    if args.search_tokens < args.batch_size * args.block_len:
        raise PruneError(f"--search-tokens must be >= one step ({args.batch_size * args.block_len})")
    if args.recovery_tokens < 0:
        raise PruneError("--recovery-tokens must be >= 0")
    if args.zeroshot_limit is not None and args.zeroshot_limit < 0:
        raise PruneError("--zeroshot-limit must be >= 0 (0: skip zero-shot)")
    if args.population < 2 or args.generations < 1:
        raise PruneError("--population >= 2 and --generations >= 1 are required")
    if args.amp not in ("bf16", "fp16", "none"):
        raise PruneError(f"--amp must be bf16, fp16 or none, got {args.amp!r}")
    try:
        resolve_tasks(args.tasks)
    except ValueError as err:
        raise PruneError(str(err)) from err
    check_model_options(args)
    check_data_specs(args)
    check_out_dir(args.out, args.resume, args.overwrite)
    n_layers = model_num_layers(args.model)
    return methods, n_layers, resolve_n_prune(n_layers, args.prune_layers, args.ratio)


def method_config(name: str, args: CompareArgs):
    """The search configuration each method gets from the shared arguments (the fields it
    registered as shared; see methods.base.register)."""
    from e3pruner.methods import method_config as registered_config

    settings = {**asdict(args), "amp": None if args.amp == "none" else args.amp}
    return registered_config(name, settings)


def run_compare(args: CompareArgs, log=print) -> dict:
    """Run (or with --resume continue) the comparison into args.out; returns the report."""
    methods, n_layers, n_prune = validate(args)
    run = Path(args.out)
    fresh, created = prepare_out_dir(run, args.resume)
    state = None
    try:
        remove_stale_temp_files(run)
        state = RunState(run, fresh=not args.resume)
        state.check_resume(args, free=RESUME_FREE)
        return _run_compare(args, state, methods, n_layers, n_prune, log)
    except BaseException:
        if fresh and (state is None or not state.has_results()):
            discard_out_dir(run, created)
        raise


def _run_compare(args: CompareArgs, state: RunState, methods: list[str], n_layers: int,
                 n_prune: int, log) -> dict:
    from e3pruner.eval.perplexity import perplexity
    from e3pruner.eval.zeroshot import resolve_tasks, zero_shot
    from e3pruner.models import load_model
    from e3pruner.plots import plot_removed_layers

    t0 = time.time()
    run = Path(args.out)
    state.set("finished", False)
    seed_everything(args.seed)
    tasks = resolve_tasks(args.tasks)
    do_zeroshot = args.zeroshot_limit != 0

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    log(f"compare {', '.join(methods)} on {args.model}: removing {n_prune} of {n_layers} layers")
    data, heldout = prepare_data(args, tok, log)

    def ppl(m) -> float:
        return perplexity(m, heldout, args.eval_ctx, batch_size=4, progress=args.progress)["ppl"]

    def zeroshot(m):
        if not do_zeroshot:
            return None
        return zero_shot(m, tok, tasks, limit=args.zeroshot_limit, progress=args.progress)

    zs_settings = {"limit": args.zeroshot_limit, "tasks": tasks} if do_zeroshot else None
    if state.get("teacher") is None:
        t = time.time()
        state.set("teacher", {"ppl": ppl(model), "zeroshot": zeroshot(model),
                              "zeroshot_settings": zs_settings, "eval_seconds": time.time() - t})
    elif state.get("teacher").get("zeroshot_settings") != zs_settings:
        state.set("teacher", {**state.get("teacher"), "zeroshot": zeroshot(model),
                              "zeroshot_settings": zs_settings})
    log(f"teacher held-out perplexity {state.get('teacher')['ppl']:.3f}")

    results = dict(state.get("methods") or {})
    scorer = _LazyScorer(model, data.calib, args)
    for name in methods:
        res = dict(results.get(name) or {})
        (run / name).mkdir(exist_ok=True)

        def save(res=res, name=name):
            results[name] = res
            state.set("methods", results)

        _compare_method(name, res, save, args, model, data, tok, n_layers, n_prune, ppl,
                        zeroshot, zs_settings, log, scorer)
        log(f"{name}: ppl before {res['ppl_before']:.2f}, after "
            f"{res['ppl_after'] if res['ppl_after'] is None else round(res['ppl_after'], 2)}")

    report = build_report(args, state.get("teacher"), {m: results[m] for m in methods},
                          n_layers, n_prune, tasks, time.time() - t0)
    report["plot"] = str(plot_removed_layers(
        {m: report["methods"][m]["removed_layers"] for m in methods
         if report["methods"][m]["removed_layers"] is not None},
        n_layers, run / "removed_layers.png",
        title=f"{args.model}: {n_prune} of {n_layers} layers removed"))
    write_json(run / "compare.json", report)
    table = format_markdown(report)
    atomic_write_text(run / "compare.md", table)
    state.set("finished", True)
    log(table)
    return report


class _LazyScorer:
    """The search-objective column: `eval.mask_kd.MaskKDScorer` on the calibration blocks,
    built at the first mask it scores (one teacher pass), the same for every method."""

    def __init__(self, model, calib, args: CompareArgs):
        self.model, self.calib, self.args, self.scorer = model, calib, args, None

    def loss(self, keep) -> float:
        from e3pruner.eval.mask_kd import MaskKDScorer

        if self.scorer is None:
            self.scorer = MaskKDScorer(self.model, self.calib, weighting=self.args.weighting,
                                       amp=None if self.args.amp == "none" else self.args.amp,
                                       batch_size=self.args.batch_size)
        return self.scorer.loss(keep)


def _compare_method(name: str, res: dict, save, args: CompareArgs, model, data, tok,
                    n_layers: int, n_prune: int, ppl, zeroshot, zs_settings, log,
                    scorer: _LazyScorer) -> None:
    """One method's row, each step stored by `save` as it finishes: selection, perplexity
    before recovery, recovery (or the width masks), perplexity and zero-shot after."""
    from e3pruner.methods import Budget, Selection, get_method, method_recovery
    from e3pruner.models.export import export_pruned
    from e3pruner.models.gates import gated, remove_gates
    from e3pruner.models.weight_updates import apply_weight_updates
    from e3pruner.recovery.distill import RecoveryConfig, make_student, recover

    method_dir = Path(args.out) / name
    if "selection" not in res:
        budget = Budget(search_tokens=args.search_tokens, batch_size=args.batch_size,
                        seed=args.seed, progress=args.progress, run_dir=str(method_dir),
                        resume=args.resume)
        t = time.time()
        config = method_config(name, args)
        kw = {} if config is None else {"config": config}
        sel = get_method(name)(model, data, n_prune, budget, **kw)
        res["selection"] = asdict(sel)
        res["search_seconds"] = time.time() - t
        save()
    sel = Selection(**res["selection"])
    width = sel.info.get("width_rates")
    log(f"{name}: removes {sel.removed if width is None else 'width ' + str(width)}")

    updates = sel.info.get("weight_updates")  # new weights for the pruned model (ReplaceMe)
    if "mask_kd" not in res:  # the hard mask with the original weights (no fold, no tuning)
        res["mask_kd"] = None if width is not None else scorer.loss(sel.keep)
        save()
    if "ppl_before" not in res:
        with torch.no_grad():
            if width is not None:
                res["ppl_before"] = _with_width_masks(model, sel, data, lambda: ppl(model))
            elif updates is not None:
                res["ppl_before"] = ppl(apply_weight_updates(make_student(model, sel.keep),
                                                             updates, sel.keep))
            else:
                with gated(model, sel.mask(args.device)):
                    res["ppl_before"] = ppl(model)
                remove_gates(model)
        save()

    recovered = "ppl_after" in res
    if not recovered or res.get("zeroshot_settings") != zs_settings:
        t = time.time()
        if width is not None:
            res.update(ppl_after=None, recovery={"steps": 0, "tokens": 0},
                       zeroshot=_with_width_masks(model, sel, data, lambda: zeroshot(model)),
                       note="width pruning by masking: no recovery, not exported")
        else:
            overrides = method_recovery(name)
            cfg = RecoveryConfig(**{**dict(tokens=args.recovery_tokens,
                                            batch_size=args.recovery_batch(), lr=args.lr,
                                            weighting=args.weighting,
                                            amp=None if args.amp == "none" else args.amp),
                                    **overrides})
            # recovered already, only the zero-shot settings changed: the final
            # recovery checkpoint restores the student (else recovery runs again, seeded)
            student = make_student(model, sel.keep)
            if updates is not None:
                apply_weight_updates(student, updates, sel.keep)
            student, summary = recover(student, model, data, cfg, keep=sel.keep,
                                       seed=args.seed, run_dir=str(method_dir),
                                       resume=args.resume or recovered,
                                       progress=args.progress)
            if not recovered:
                summary["seconds"] = time.time() - t
                res["recovery"] = summary
                res["ppl_after"] = ppl(student) if summary["steps"] else res["ppl_before"]
            res["zeroshot"] = zeroshot(student)
            if args.export and not recovered:
                res["export"] = str(export_pruned(
                    student, list(range(len(sel.keep))), method_dir / "model", tok,
                    info={"original_num_layers": n_layers, "kept_layers": sel.keep,
                          "removed_layers": sel.removed, "method": name,
                          "source": args.model, "recovery_tokens": summary["tokens"],
                          "search_tokens": sel.tokens}))
            del student
        res["zeroshot_settings"] = zs_settings
        res["eval_seconds" if not recovered else "zeroshot_eval_seconds"] = time.time() - t
        save()


def _with_width_masks(model, sel, data, fn):
    from e3pruner.methods.self_pruner.width import apply_width_masks, collect_width_stats

    stats = collect_width_stats(model, data.calib)
    handle = apply_width_masks(model, sel.info["width_rates"], stats)
    try:
        return fn()
    finally:
        handle.remove()


def build_report(args: CompareArgs, teacher: dict, results: dict, n_layers: int,
                 n_prune: int, tasks: list[str], seconds: float) -> dict:
    methods = {}
    for name, res in results.items():
        sel = res["selection"]
        width = sel["info"].get("width_rates")
        kept = set(sel["keep"])
        methods[name] = {
            "removed_layers": None if width else [i for i in range(n_layers) if i not in kept],
            "width_rates": width,
            "calib_kd_of_mask": res.get("mask_kd"),
            "ppl_before_recovery": res["ppl_before"],
            "ppl_after_recovery": res["ppl_after"],
            "zeroshot": res.get("zeroshot"),
            "search_seconds": res["search_seconds"],
            "recovery_seconds": res.get("recovery", {}).get("seconds"),
            "tokens": {"selection": sel["tokens"], "recovery": res["recovery"]["tokens"]},
            "recovery_scope": (res["recovery"].get("config") or {}).get("scope"),
            "info": {k: v for k, v in sel["info"].items() if k in (
                "operator_counts", "operator_shares", "fitness_evaluations", "best_fitness",
                "segment", "config", "polish")},
            "note": res.get("note"),
            "export": res.get("export"),
        }
    return {"model": args.model, "num_layers": n_layers, "pruned_layers": n_prune,
            "device": args.device, "tasks": tasks, "zeroshot_limit": args.zeroshot_limit,
            "heldout": {"data": args.heldout, "tokens": args.eval_tokens, "ctx": args.eval_ctx},
            "recovery_tokens": args.recovery_tokens, "search_tokens": args.search_tokens,
            "teacher": teacher, "methods": methods, "seconds_this_invocation": seconds,
            "command": command_line(args), "args": asdict(args)}


def command_line(args: CompareArgs) -> str:
    """The `e3pruner compare` invocation that reproduces this table."""
    d = CompareArgs()
    parts = ["e3pruner compare"]
    for key in ("methods", "model", "prune_layers", "ratio", "data", "heldout", "block_len",
                "batch_size", "calib_blocks", "search_tokens", "recovery_tokens", "lr", "amp",
                "weighting", "eval_tokens", "eval_ctx", "tasks", "zeroshot_limit",
                "population", "generations", "operator", "out", "seed"):
        value = getattr(args, key)
        if value != getattr(d, key) and value is not None:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def _fmt(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def format_markdown(r: dict) -> str:
    tasks = r["tasks"] if r["zeroshot_limit"] != 0 else []
    head = (["method", "removed layers", "calib KD", "ppl before", "ppl after"]
            + [TASK_LABELS.get(t, t) for t in tasks] + (["avg"] if tasks else [])
            + ["select s / recover s", "tokens (select / recover)", "LLM / fallback ops"])
    rows = []

    def acc_cells(zs):
        if not tasks:
            return []
        if not zs:
            return ["–"] * (len(tasks) + 1)
        return [_fmt(100 * zs[t]["score"], 1) for t in tasks] + [_fmt(100 * zs["average"], 1)]

    t = r["teacher"]
    rows.append(["teacher (unpruned)", "–", _fmt(0.0, 4), _fmt(t["ppl"]), _fmt(t["ppl"])]
                + acc_cells(t.get("zeroshot")) + ["–", "–", "–"])
    for name, m in r["methods"].items():
        removed = (", ".join(map(str, m["removed_layers"])) if m["removed_layers"] is not None
                   else "width masks (not exported)")
        scope = f" ({m['recovery_scope']})" if m["recovery_scope"] not in (None, "full") else ""
        shares = m["info"].get("operator_shares")
        ops = ("–" if not shares else
               f"{100 * shares['llm_ok']:.0f}% / {100 * shares['fallback']:.0f}%")
        rec_s = m.get("recovery_seconds")
        rows.append([name + scope, removed, _fmt(m.get("calib_kd_of_mask"), 4),
                     _fmt(m["ppl_before_recovery"]), _fmt(m["ppl_after_recovery"])]
                    + acc_cells(m["zeroshot"])
                    + [f"{m['search_seconds']:.0f} / " + ("–" if rec_s is None else f"{rec_s:.0f}"),
                       f"{m['tokens']['selection']:,} / {m['tokens']['recovery']:,}", ops])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [
        f"{r['model']}, {r['pruned_layers']} of {r['num_layers']} layers removed; held-out "
        f"perplexity on {r['heldout']['tokens']:,} tokens of {r['heldout']['data']!r} at ctx "
        f"{r['heldout']['ctx']}; recovery: {r['recovery_tokens']:,} tokens of entropy-aware KD "
        f"per method (scope in brackets when the method defines its own).",
    ]
    notes.append("calib KD: the search objective, the entropy-weighted KD loss of the method's "
                 "hard mask against the unpruned model on the calibration blocks, weights "
                 "frozen (no fold, no recovery), measured the same way for every method. "
                 "LLM / fallback ops: Self-Pruner's share of operations answered by the LLM "
                 "operator and of those replaced by the classic operator.")
    if tasks:
        notes.append(f"Zero-shot accuracy (%) after recovery on the first {r['zeroshot_limit']} "
                     "items per task: acc_norm for ARC, HellaSwag, PIQA, OBQA; acc for BoolQ, "
                     "WinoGrande (lm-eval's stock metrics).")
    notes.append(f"Reproduce: `{r['command']}`")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
