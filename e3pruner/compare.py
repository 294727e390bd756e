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

import math
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
    heldout_tokens,
    model_num_layers,
    prepare_data,
    prepare_out_dir,
    resolve_n_prune,
    training_data,
    with_resolved_amp,
)
from e3pruner.hardware import cpu_name
from e3pruner.run_args import RunArgs
from e3pruner.train import atomic_write_text, remove_stale_temp_files, seed_everything, write_json

DEFAULT_METHODS = "e3,clp,self-pruner,shortgpt,angular,ppl,taylor,sleb"
# CompareArgs that may differ on --resume (zero-shot settings: only those columns run again)
RESUME_FREE = ("progress", "resume", "overwrite", "out", "methods", "export", "tasks",
               "zeroshot_limit", "seeds", "heldout_extra")
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
    seeds: int = 1  # rerun data order, selection and recovery for seed, seed+1, ...
    heldout_extra: str | None = "sciq"  # more held-out texts (comma-separated specs)


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
    check_int(args, "seeds", 1)
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
    check_data_specs(args, extra_heldout=tuple(heldout_specs(args)[1:]))
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
    args = with_resolved_amp(args, log)
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


def seed_list(args: CompareArgs) -> list[int]:
    """The seeds of the comparison: --seed, --seed + 1, ..., --seed + --seeds - 1."""
    return [args.seed + i for i in range(args.seeds)]


def heldout_specs(args: CompareArgs) -> list[str]:
    """--heldout first, then the --heldout-extra texts (comma-separated), each once."""
    extra = [x.strip() for x in (args.heldout_extra or "").split(",") if x.strip()]
    return list(dict.fromkeys([args.heldout] + extra))


def _run_compare(args: CompareArgs, state: RunState, methods: list[str], n_layers: int,
                 n_prune: int, log) -> dict:
    from dataclasses import replace

    from e3pruner.eval.perplexity import perplexity
    from e3pruner.eval.zeroshot import resolve_tasks, zero_shot
    from e3pruner.models import load_model
    from e3pruner.plots import plot_removed_layers

    t0 = time.time()
    run = Path(args.out)
    prior_wall = float(state.get("wall_seconds") or 0.0)
    invocations = int(state.get("invocations") or 0) + 1
    state.update({"invocations": invocations, "finished": False})
    seed_everything(args.seed)
    tasks = resolve_tasks(args.tasks)
    do_zeroshot = args.zeroshot_limit != 0
    seeds = seed_list(args)

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    log(f"compare {', '.join(methods)} on {args.model}: removing {n_prune} of {n_layers} "
        f"layers, {len(seeds)} seed(s)")
    data, main_heldout = prepare_data(args, tok, log)
    specs = heldout_specs(args)
    streams = {specs[0]: main_heldout}
    for spec in specs[1:]:
        streams[spec] = heldout_tokens(args, tok, spec, "--heldout-extra", log)

    def ppl(m) -> dict:
        """{spec: {"ppl", "window_nll"}} on every held-out text."""
        out = {}
        for spec, stream in streams.items():
            r = perplexity(m, stream, args.eval_ctx, batch_size=4, progress=args.progress)
            out[spec] = {"ppl": r["ppl"], "window_nll": r["window_nll"],
                         "window_tokens": r["window_tokens"]}
        return out

    def zeroshot(m):
        if not do_zeroshot:
            return None
        return zero_shot(m, tok, tasks, limit=args.zeroshot_limit, progress=args.progress)

    zs_settings = {"limit": args.zeroshot_limit, "tasks": tasks} if do_zeroshot else None
    teacher = state.get("teacher")
    if teacher is None or set(teacher.get("heldout", {})) != set(specs):
        t = time.time()
        held = ppl(model)
        teacher = {"ppl": held[specs[0]]["ppl"], "heldout": held,
                   "zeroshot": zeroshot(model) if teacher is None else teacher["zeroshot"],
                   "zeroshot_settings": zs_settings if teacher is None
                   else teacher["zeroshot_settings"], "eval_seconds": time.time() - t}
        state.set("teacher", teacher)
    if teacher.get("zeroshot_settings") != zs_settings:
        teacher = {**teacher, "zeroshot": zeroshot(model), "zeroshot_settings": zs_settings}
        state.set("teacher", teacher)
    log(f"teacher held-out perplexity {teacher['ppl']:.3f}")

    runs = {k: dict(v) for k, v in (state.get("runs") or {}).items()}
    for seed in seeds:
        args_s = replace(args, seed=seed)
        data_s = data if seed == args.seed else training_data(args_s, tok)
        results = runs.setdefault(str(seed), {})
        scorer = _LazyScorer(model, data_s.calib, args)
        for name in methods:
            res = dict(results.get(name) or {})
            (run / _method_dir(name, seed, args.seed)).mkdir(parents=True, exist_ok=True)

            def save(res=res, name=name, results=results, seed=seed):
                results[name] = res
                runs[str(seed)] = results
                state.update({"runs": runs, "wall_seconds": prior_wall + time.time() - t0})

            _compare_method(name, res, save, args_s, model, data_s, tok, n_layers, n_prune,
                            ppl, zeroshot, zs_settings, log, scorer,
                            run / _method_dir(name, seed, args.seed))
            after = res["heldout_after"]
            log(f"{name} (seed {seed}): ppl before {res['heldout_before'][specs[0]]['ppl']:.2f}, "
                f"after {'-' if after is None else round(after[specs[0]]['ppl'], 2)}")

    per_seed = {str(s): {m: runs[str(s)][m] for m in methods} for s in seeds}
    seconds = time.time() - t0
    report = build_report(args, teacher, per_seed, n_layers, n_prune, tasks, specs, seconds,
                          prior_wall + seconds, invocations)
    report["plot"] = str(plot_removed_layers(
        {m: report["methods"][m]["removed_layers_per_seed"] for m in methods
         if report["methods"][m]["removed_layers"] is not None},
        n_layers, run / "removed_layers.png",
        title=f"{args.model}: {n_prune} of {n_layers} layers removed"
              + (f" ({len(seeds)} seeds; shade = share of seeds)" if len(seeds) > 1 else "")))
    write_json(run / "compare.json", report)
    table = format_markdown(report)
    atomic_write_text(run / "compare.md", table)
    state.update({"finished": True, "wall_seconds": report["seconds_all_invocations"]})
    log(table)
    return report


def _method_dir(name: str, seed: int, first_seed: int) -> str:
    return name if seed == first_seed else f"{name}@seed{seed}"


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
                    scorer: _LazyScorer, method_dir: Path) -> None:
    """One method's row for one seed (args.seed), each step stored by `save` as it
    finishes: selection, perplexity before recovery, recovery (or the width masks),
    perplexity and zero-shot after."""
    from e3pruner.methods import Budget, Selection, get_method, method_recovery
    from e3pruner.models.export import export_pruned
    from e3pruner.models.gates import gated, remove_gates
    from e3pruner.models.weight_updates import apply_weight_updates
    from e3pruner.recovery.distill import RecoveryConfig, make_student, recover

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
    if "heldout_before" not in res:
        with torch.no_grad():
            if width is not None:
                res["heldout_before"] = _with_width_masks(model, sel, data, lambda: ppl(model))
            elif updates is not None:
                res["heldout_before"] = ppl(apply_weight_updates(make_student(model, sel.keep),
                                                                 updates, sel.keep))
            else:
                with gated(model, sel.mask(args.device)):
                    res["heldout_before"] = ppl(model)
                remove_gates(model)
        save()

    recovered = "heldout_after" in res
    if not recovered or res.get("zeroshot_settings") != zs_settings:
        t = time.time()
        if width is not None:
            res.update(heldout_after=None, recovery={"steps": 0, "tokens": 0},
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
                res["heldout_after"] = (ppl(student) if summary["steps"]
                                        else res["heldout_before"])
            res["zeroshot"] = zeroshot(student)
            if args.export and not recovered:
                res["export"] = str(export_pruned(
                    student, list(range(len(sel.keep))), method_dir / "model", tok,
                    info={"original_num_layers": n_layers, "kept_layers": sel.keep,
                          "removed_layers": sel.removed, "method": name,
                          "source": args.model, "recovery_tokens": summary["tokens"],
                          "search_tokens": sel.tokens, "seed": args.seed}))
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


def _window_values(heldout: dict, spec: str) -> list[float]:
    """Per-token NLL of each held-out window."""
    h = heldout[spec]
    return [nll / max(1, n) for nll, n in zip(h["window_nll"], h["window_tokens"])]


def _seed_mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)]


def _zeroshot_summary(zs_per_seed: list[dict | None], tasks: list[str]) -> dict | None:
    """Seed-averaged zero-shot: per task the mean score, its std over seeds, and the
    item-level standard error of the seed-averaged items; the average over tasks."""
    from e3pruner.eval.stats import mean_std

    if not zs_per_seed or any(z is None for z in zs_per_seed):
        return None
    out: dict = {}
    for t in tasks:
        scores = mean_std([z[t]["score"] for z in zs_per_seed])
        items = _seed_mean([z[t]["item_scores"] for z in zs_per_seed])
        spread = mean_std(items)["std"]
        stderr = None if spread is None else spread / math.sqrt(len(items))
        out[t] = {"score": scores["mean"], "score_std": scores["std"], "stderr": stderr,
                  "n": zs_per_seed[0][t]["n"], "metric": zs_per_seed[0][t]["metric"]}
    avg = mean_std([z["average"] for z in zs_per_seed])
    out["average"], out["average_std"] = avg["mean"], avg["std"]
    return out


def _paired_vs(rows: list[dict], ref: list[dict], specs: list[str], tasks: list[str],
               zeroshot: bool) -> dict:
    """A method's per-item paired differences against the reference method (E3), the
    items' values averaged over the seeds first: held-out windows (NLL per token, before
    and after recovery; reported as a perplexity ratio) and zero-shot items (all tasks
    pooled); plus a sign test over the seeds' main held-out perplexities after recovery."""
    from e3pruner.eval.stats import paired_difference, sign_test

    out: dict = {}
    for when in ("before", "after"):
        key = f"heldout_{when}"
        if any(r.get(key) is None for r in rows + ref):
            continue
        for spec in specs:
            a = _seed_mean([_window_values(r[key], spec) for r in rows])
            b = _seed_mean([_window_values(r[key], spec) for r in ref])
            w = rows[0][key][spec]["window_tokens"]
            d = paired_difference(a, b, weights=w)
            out[f"ppl_{when}:{spec}"] = {
                **d, "ppl_ratio": math.exp(d["mean_diff"]),
                "ppl_ratio_ci": [math.exp(d["ci"][0]), math.exp(d["ci"][1])]}
    if zeroshot and all(r.get("zeroshot") for r in rows + ref):
        a = [x for t in tasks for x in _seed_mean([r["zeroshot"][t]["item_scores"] for r in rows])]
        b = [x for t in tasks for x in _seed_mean([r["zeroshot"][t]["item_scores"] for r in ref])]
        out["zeroshot_items"] = paired_difference(a, b)
    if all(r.get("heldout_after") is not None for r in rows + ref):
        diffs = [r["heldout_after"][specs[0]]["ppl"] - q["heldout_after"][specs[0]]["ppl"]
                 for r, q in zip(rows, ref)]
        out["seeds_sign_test"] = {"diffs": diffs, "p": sign_test(diffs)}
    return out


def build_report(args: CompareArgs, teacher: dict, per_seed: dict[str, dict], n_layers: int,
                 n_prune: int, tasks: list[str], specs: list[str], seconds: float,
                 total_seconds: float, invocations: int) -> dict:
    """compare.json: per method the seed means (and stds) of every column, the per-seed
    rows (without per-item lists), and the paired comparison with E3."""
    from e3pruner.eval.stats import mean_std

    seeds = list(per_seed)
    names = list(per_seed[seeds[0]])
    methods = {}
    for name in names:
        rows = [per_seed[s][name] for s in seeds]
        sel0 = rows[0]["selection"]
        width = sel0["info"].get("width_rates")
        removed = None if width else [[i for i in range(n_layers) if i not in set(r["selection"]["keep"])]
                                      for r in rows]

        def stat(get):
            vals = [get(r) for r in rows]
            return None if any(v is None for v in vals) else mean_std(vals)

        heldout = {}
        for spec in specs:
            heldout[spec] = {
                "before": stat(lambda r, spec=spec: r["heldout_before"][spec]["ppl"]),
                "after": stat(lambda r, spec=spec: None if r["heldout_after"] is None
                              else r["heldout_after"][spec]["ppl"])}
        calib_kd = stat(lambda r: r.get("mask_kd"))
        rec_seconds = stat(lambda r: r.get("recovery", {}).get("seconds"))
        masks = [tuple(x) for x in removed] if removed else []
        modal = max(set(masks), key=masks.count) if masks else None
        methods[name] = {
            "removed_layers": None if removed is None else removed[0],
            "removed_layers_per_seed": removed,
            "mask_stability": None if not masks else {
                "distinct_masks": len(set(masks)), "modal_mask": list(modal),
                "share_modal": masks.count(modal) / len(masks)},
            "width_rates": width,
            "calib_kd_of_mask": None if calib_kd is None else calib_kd["mean"],
            "calib_kd_of_mask_stats": calib_kd,
            "ppl_before_recovery": heldout[specs[0]]["before"]["mean"],
            "ppl_after_recovery": (None if heldout[specs[0]]["after"] is None
                                   else heldout[specs[0]]["after"]["mean"]),
            "heldout": heldout,
            "zeroshot": _zeroshot_summary([r.get("zeroshot") for r in rows], tasks),
            "search_seconds": stat(lambda r: r["search_seconds"])["mean"],
            "recovery_seconds": None if rec_seconds is None else rec_seconds["mean"],
            "tokens": {"selection": sel0["tokens"], "recovery": rows[0]["recovery"]["tokens"]},
            "recovery_scope": (rows[0]["recovery"].get("config") or {}).get("scope"),
            "info": {k: v for k, v in sel0["info"].items() if k in (
                "operator_counts", "operator_shares", "fitness_evaluations", "best_fitness",
                "segment", "config", "polish")},
            "note": rows[0].get("note"),
            "export": rows[0].get("export"),
            "per_seed": {s: {"removed_layers": None if removed is None else removed[i],
                             "calib_kd": r.get("mask_kd"),
                             "ppl_before": {sp: r["heldout_before"][sp]["ppl"] for sp in specs},
                             "ppl_after": None if r["heldout_after"] is None else
                             {sp: r["heldout_after"][sp]["ppl"] for sp in specs},
                             "zeroshot_average": (r.get("zeroshot") or {}).get("average"),
                             "search_seconds": r["search_seconds"],
                             "recovery_seconds": r.get("recovery", {}).get("seconds")}
                         for i, (s, r) in enumerate(zip(seeds, rows))},
        }
    ref = "e3" if "e3" in names else None
    if ref is not None:
        ref_rows = [per_seed[s][ref] for s in seeds]
        for name in names:
            if name != ref and methods[name]["width_rates"] is None:
                methods[name]["vs_e3"] = _paired_vs([per_seed[s][name] for s in seeds],
                                                    ref_rows, specs, tasks,
                                                    args.zeroshot_limit != 0)
    t_zs = teacher.get("zeroshot")
    teacher_out = {"ppl": teacher["ppl"],
                   "heldout": {sp: teacher["heldout"][sp]["ppl"] for sp in specs},
                   "zeroshot": None if t_zs is None else _zeroshot_summary([t_zs], tasks),
                   "eval_seconds": teacher.get("eval_seconds")}
    return {"model": args.model, "num_layers": n_layers, "pruned_layers": n_prune,
            "device": args.device, "cpu": cpu_name(), "tasks": tasks,
            "zeroshot_limit": args.zeroshot_limit, "seeds": [int(s) for s in seeds],
            "heldout": {"data": args.heldout, "tokens": args.eval_tokens, "ctx": args.eval_ctx,
                        "texts": specs},
            "recovery_tokens": args.recovery_tokens, "search_tokens": args.search_tokens,
            "teacher": teacher_out, "methods": methods, "reference": ref,
            "seconds_this_invocation": seconds,
            "seconds_all_invocations": total_seconds, "invocations": invocations,
            "command": command_line(args),
            "args": asdict(args)}


def command_line(args: CompareArgs) -> str:
    """The `e3pruner compare` invocation that reproduces this table."""
    d = CompareArgs()
    parts = ["e3pruner compare"]
    for key in ("methods", "model", "prune_layers", "ratio", "data", "heldout", "block_len",
                "batch_size", "calib_blocks", "search_tokens", "recovery_tokens", "lr", "amp",
                "weighting", "eval_tokens", "eval_ctx", "tasks", "zeroshot_limit",
                "population", "generations", "operator", "out", "seed", "seeds",
                "heldout_extra"):
        value = getattr(args, key)
        if value != getattr(d, key) and value is not None:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def _fmt(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pm(stats: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    """mean ± std of a mean_std record (the mean alone for one seed)."""
    if stats is None:
        return "–"
    if stats.get("std") is None:
        return f"{scale * stats['mean']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _verdict(d: dict | None, ratio: bool) -> str:
    if d is None:
        return "–"
    word = {"a<b": "lower", "a>b": "higher", "tie": "tie"}[d["verdict"]]
    if ratio:
        lo, hi = d["ppl_ratio_ci"]
        return f"{d['ppl_ratio']:.3f} [{lo:.3f}, {hi:.3f}] {word}"
    lo, hi = d["ci"]
    return f"{100 * d['mean_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] {word}"


def format_markdown(r: dict) -> str:
    tasks = r["tasks"] if r["zeroshot_limit"] != 0 else []
    specs = r["heldout"]["texts"]
    main, extra = specs[0], specs[1:]
    ref = r.get("reference")
    multi = len(r["seeds"]) > 1
    head = (["method", "removed layers" + (" (first seed)" if multi else "")]
            + (["same mask over seeds"] if multi else [])
            + ["calib KD", "ppl before", "ppl after"]
            + [f"{sp} ppl after" for sp in extra]
            + [TASK_LABELS.get(t, t) for t in tasks] + (["avg"] if tasks else [])
            + ([f"ppl after / {ref}'s [95% CI]"] + ([f"zero-shot − {ref}'s, points [95% CI]"]
                                                   if tasks else []) if ref else [])
            + ["select s / recover s", "tokens (select / recover)", "LLM / fallback ops"])
    rows = []

    def acc_cells(zs):
        if not tasks:
            return []
        if not zs:
            return ["–"] * (len(tasks) + 1)
        cells = [_pm({"mean": zs[t]["score"], "std": zs[t]["score_std"]}, 1, 100) for t in tasks]
        return cells + [_pm({"mean": zs["average"], "std": zs["average_std"]}, 1, 100)]

    t = r["teacher"]
    rows.append(["teacher (unpruned)", "–"] + (["–"] if multi else [])
                + [_fmt(0.0, 4), _fmt(t["ppl"]), _fmt(t["ppl"])]
                + [_fmt(t["heldout"][sp]) for sp in extra] + acc_cells(t.get("zeroshot"))
                + (["–"] + (["–"] if tasks else []) if ref else []) + ["–", "–", "–"])
    for name, m in r["methods"].items():
        removed = (", ".join(map(str, m["removed_layers"])) if m["removed_layers"] is not None
                   else "width masks (not exported)")
        scope = f" ({m['recovery_scope']})" if m["recovery_scope"] not in (None, "full") else ""
        shares = m["info"].get("operator_shares")
        ops = ("–" if not shares else
               f"{100 * shares['llm_ok']:.0f}% / {100 * shares['fallback']:.0f}%")
        rec_s = m.get("recovery_seconds")
        stab = m.get("mask_stability")
        vs = m.get("vs_e3")
        cmp_cells = []
        if ref:
            if name == ref:
                cmp_cells = ["1 (reference)"] + (["0 (reference)"] if tasks else [])
            else:
                cmp_cells = [_verdict((vs or {}).get(f"ppl_after:{main}"), True)]
                if tasks:
                    cmp_cells.append(_verdict((vs or {}).get("zeroshot_items"), False))
        rows.append([name + scope, removed]
                    + ([f"{stab['share_modal'] * len(r['seeds']):.0f}/{len(r['seeds'])}"
                        if stab else "–"] if multi else [])
                    + [_pm(m.get("calib_kd_of_mask_stats"), 4),
                       _pm(m["heldout"][main]["before"]), _pm(m["heldout"][main]["after"])]
                    + [_pm(m["heldout"][sp]["after"]) for sp in extra]
                    + acc_cells(m["zeroshot"]) + cmp_cells
                    + [f"{m['search_seconds']:.0f} / " + ("–" if rec_s is None else f"{rec_s:.0f}"),
                       f"{m['tokens']['selection']:,} / {m['tokens']['recovery']:,}", ops])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    seeds = r["seeds"]
    notes = [
        f"{r['model']}, {r['pruned_layers']} of {r['num_layers']} layers removed, on "
        f"{r.get('cpu', 'this CPU')}; "
        + (f"{len(seeds)} seeds ({', '.join(map(str, seeds))}: each reruns every method's "
           "data order, selection and recovery), mean ± std over seeds; " if multi else
           f"one seed ({seeds[0]}); ")
        + f"held-out perplexity on {r['heldout']['tokens']:,} tokens of each of "
        f"{', '.join(repr(sp) for sp in specs)} at ctx {r['heldout']['ctx']}; recovery: "
        f"{r['recovery_tokens']:,} tokens of entropy-aware KD per method (scope in brackets "
        "when the method defines its own).",
    ]
    notes.append("calib KD: the search objective, the entropy-weighted KD loss of the method's "
                 "hard mask against the unpruned model on the calibration blocks, weights "
                 "frozen (no fold, no recovery), measured the same way for every method. "
                 "LLM / fallback ops: Self-Pruner's share of operations answered by the LLM "
                 "operator and of those replaced by the classic operator.")
    if ref:
        notes.append(f"Paired with {ref} on the same items, each item's value averaged over "
                     "the seeds first: held-out windows (per-token NLL, shown as the ratio of "
                     "perplexities) and zero-shot items (all tasks pooled); 95% percentile-"
                     "bootstrap intervals over items. 'lower'/'higher': the interval excludes "
                     "1 (or 0), outside the noise; 'tie': it does not. Seed-level sign tests "
                     "are in compare.json (with 3 seeds no sign test can reach p < 0.05).")
    if tasks:
        limit = r["zeroshot_limit"]
        ns = ", ".join(f"{TASK_LABELS.get(t, t)} {t_n}" for t, t_n in
                       ((t, (r["teacher"].get("zeroshot") or {}).get(t, {}).get("n")) for t in tasks))
        notes.append(f"Zero-shot accuracy (%) after recovery, "
                     f"{'all items' if limit is None else f'the first {limit} items per task'}"
                     f" ({ns}): acc_norm for ARC, HellaSwag, PIQA, OBQA; acc for BoolQ, "
                     "WinoGrande (lm-eval's stock metrics).")
    wall = f"Wall time of this invocation: {r['seconds_this_invocation']:.0f} s"
    if r["invocations"] > 1:
        wall += (f"; of the {r['invocations']} invocations recorded in state.json: "
                 f"{r['seconds_all_invocations']:.0f} s")
    notes.append(f"{wall}. Reproduce: `{r['command']}`")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
