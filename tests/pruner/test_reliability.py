"""Run-directory reliability of `e3pruner prune` on tiny models: checkpoints load as plain
data only, damaged run files are named, non-finite runs stop, --resume refuses changed
settings, --overwrite clears the whole previous run, finished runs clean up after
themselves, bad data files name their line, Ctrl-C prints the resume command."""

import json
import shutil
from dataclasses import asdict

import pytest
import torch

from e3pruner.cli import main
from e3pruner.pipeline import PruneArgs, PruneError, run_prune
from e3pruner.train import Checkpointer, RunFileError, json_text
from tests.pruner.test_pipeline import _args as pipeline_args
from tests.pruner.tiny_models import tiny_model_dir

CKPTS = ("search_ckpt.pt", "recovery_ckpt.pt")


def _args(root, model_dir, train, held, **kw):
    """test_pipeline's tiny run, shorter: 6 search and 4 recovery steps."""
    return pipeline_args(root, model_dir, train, held, **{
        "search_tokens": 32 * 2 * 6, "recovery_tokens": 32 * 2 * 4, "checkpoint_every": 2, **kw})


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (default: its checkpoints removed at the end)."""
    root = tmp_path_factory.mktemp("finished")
    model_dir, train, held = tiny_model_dir(root, "llama")
    args = _args(root, model_dir, train, held)
    report = run_prune(PruneArgs(**args), log=lambda *_: None)
    return root, args, report


def _copy_run(finished, tmp_path, **kw):
    root, args, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    return dict(args, out=str(tmp_path / "run"), **kw)


def _interrupt(run, phase: str) -> None:
    """Make a finished run look killed during `phase` ("search" or "recovery")."""
    state = json.loads((run / "state.json").read_text())
    drop = {"search": ("search", "ppl_before", "shortgpt", "recovery", "ppl_after"),
            "recovery": ("recovery", "ppl_after")}[phase]
    state = {k: v for k, v in state.items() if k not in drop}
    state["finished"] = False
    (run / "state.json").write_text(json.dumps(state))
    (run / "report.json").unlink()


# ------------------------------------------------------------------ 8: a finished run
def test_finished_run_records_it_and_removes_its_checkpoints(finished):
    root, _, report = finished
    run = root / "run"
    state = _strict_json((run / "state.json").read_text())
    assert state["finished"] is True
    assert not any((run / c).exists() for c in CKPTS)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    _strict_json((run / "report.json").read_text())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    assert report["ppl"]["pruned_after_recovery"] > 1


# ------------------------------------------------------------------ 1: checkpoints
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_object_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "search_ckpt.pt"
    torch.save({"step": 1, "alpha": torch.zeros(3), "x": _Payload(marker)}, path)
    with pytest.raises(RunFileError, match="Delete .*search_ckpt.pt"):
        Checkpointer(path).load()
    assert not marker.exists()


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from e3pruner.train import rng_state, seed_everything, set_rng_state

    seed_everything(3)
    Checkpointer(tmp_path / "c.pt").save({"step": 1, "rng": rng_state()})
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(Checkpointer(tmp_path / "c.pt").load()["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


@pytest.mark.parametrize("phase", ["search", "recovery"])
def test_resume_refuses_unsafe_or_damaged_checkpoint(finished, tmp_path, capsys, phase):
    args = _copy_run(finished, tmp_path, resume=True)
    run = tmp_path / "run"
    _interrupt(run, phase)
    name = f"{phase}_ckpt.pt"
    marker = tmp_path / "payload-ran"
    torch.save({"step": 1, "x": _Payload(marker)}, run / name)
    with pytest.raises(RunFileError, match=f"Delete {run / name}"):
        run_prune(PruneArgs(**args), log=lambda *_: None)
    assert not marker.exists()
    (run / name).write_bytes(b"PK\x03\x04 not a zip at all")
    rc = main(["prune", "--model", args["model"], "--data", args["data"], "--heldout",
               args["heldout"], "--out", str(run), "--block-len", "32", "--batch-size", "2",
               "--calib-blocks", "4", "--search-tokens", str(args["search_tokens"]),
               "--recovery-tokens", str(args["recovery_tokens"]), "--eval-tokens", "1500",
               "--eval-ctx", "64", "--checkpoint-every", "2", "--prune-layers", "2",
               "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and str(run / name) in err and "Delete" in err and "Traceback" not in err


def test_damaged_state_json_is_named_and_overwrite_recovers(finished, tmp_path):
    args = _copy_run(finished, tmp_path, resume=True)
    run = tmp_path / "run"
    (run / "state.json").write_text('{"args": {"model": ')  # cut short
    with pytest.raises(RunFileError, match=r"state\.json.*--overwrite"):
        run_prune(PruneArgs(**args), log=lambda *_: None)
    # --overwrite accepts the damaged run dir (it is ours) and starts over
    args.update(resume=False, overwrite=True, baseline=False, recovery_tokens=0)
    report = run_prune(PruneArgs(**args), log=lambda *_: None)
    assert report["tokens"]["recovery"] == 0
    assert _strict_json((run / "state.json").read_text())["finished"] is True


# ------------------------------------------------------------------ 2: non-finite runs
def test_json_text_writes_no_nan():
    text = json_text({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert _strict_json(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_non_finite_recovery_stops_and_exports_nothing(tmp_path, capsys):
    """fp16 weights and a learning rate that overflows them: the recovery loss becomes NaN.
    (fp16 on CPU alone no longer does: the fused AdamW computes its update in fp32.)"""
    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    run = tmp_path / "run"
    rc = main(["prune", "--model", str(model_dir), "--data", str(train), "--heldout", str(held),
               "--out", str(run), "--block-len", "32", "--batch-size", "2", "--calib-blocks",
               "4", "--search-tokens", "384", "--recovery-tokens", "256", "--eval-tokens",
               "1500", "--eval-ctx", "64", "--prune-layers", "2", "--dtype", "float16",
               "--lr", "1e30", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "non-finite" in err and "step" in err and "--dtype float32" in err
    assert "Traceback" not in err
    assert not (run / "model").exists() and not (run / "report.json").exists()
    assert _strict_json((run / "state.json").read_text())["finished"] is False
    for line in (run / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)


def test_non_finite_search_loss_stops_naming_the_step(monkeypatch):
    from e3pruner.methods import e3
    from e3pruner.methods.base import Budget
    from e3pruner.train import NonFiniteError
    from tests.pruner.test_pipeline import _tiny_model_and_data

    model, data = _tiny_model_and_data("llama", 1)
    real = e3._score_function_step

    def nan_at_step_2(*a, offset, **k):
        mask, loss = real(*a, offset=offset, **k)
        return mask, float("nan") if offset == 2 else loss

    monkeypatch.setattr(e3, "_score_function_step", nan_at_step_2)
    with pytest.raises(NonFiniteError, match="mask search.*step 2.*--search-lr"):
        e3.select(model, data, 2, Budget(search_tokens=32 * 2 * 5, batch_size=2,
                                         progress=False), e3.E3Config(init="zeros"))


# ------------------------------------------------------------------ 3: resume settings
def test_resume_refuses_changed_settings_and_keeps_stored_args(finished, tmp_path, capsys):
    args = _copy_run(finished, tmp_path, resume=True)
    run = tmp_path / "run"
    _interrupt(run, "recovery")
    stored = (run / "state.json").read_text()
    for change, flag in ((dict(prune_layers=3), "--prune-layers"), (dict(lr=0.01), "--lr"),
                         (dict(eval_tokens=1400), "--eval-tokens"),
                         (dict(baseline=False, seed=1), "--no-baseline")):
        with pytest.raises(PruneError, match=f"different settings.*{flag}"):
            run_prune(PruneArgs(**dict(args, **change)), log=lambda *_: None)
        assert (run / "state.json").read_text() == stored
    rc = main(["prune", "--model", args["model"], "--data", args["data"], "--heldout",
               args["heldout"], "--out", str(run), "--resume", "--lr", "0.01",
               "--eval-tokens", "4096", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lr" in err and "--eval-tokens" in err and "--block-len" in err
    assert (run / "state.json").read_text() == stored
    # harmless flags may differ: the run resumes (here: finishes its recovery)
    report = run_prune(PruneArgs(**dict(args, checkpoint_every=5, keep_checkpoints=True,
                                        progress=True)), log=lambda *_: None)
    assert report["kept_layers"] == finished[2]["kept_layers"]
    assert json.loads((run / "state.json").read_text())["args"] == json.loads(stored)["args"]
    assert (run / "recovery_ckpt.pt").is_file()  # --keep-checkpoints


# ------------------------------------------------------------------ 4: --overwrite
def test_overwrite_clears_the_whole_previous_run(finished, tmp_path, monkeypatch):
    from e3pruner.methods import base

    args = _copy_run(finished, tmp_path, overwrite=True)
    run = tmp_path / "run"
    (run / "teacher_cache").mkdir()
    (run / "teacher_cache" / "teacher-00000000.safetensors").write_bytes(b"old shard")
    old = {p.name for p in run.iterdir()}
    assert {"report.json", "model", "loss.png", "teacher_cache"} <= old

    def failing_search(*_a, **_k):
        raise RuntimeError("search failed (simulated)")

    monkeypatch.setitem(base._METHODS, "e3", failing_search)
    with pytest.raises(RuntimeError, match="simulated"):
        run_prune(PruneArgs(**args), log=lambda *_: None)
    left = {p.name for p in run.iterdir()}
    assert left <= {"state.json", "metrics.jsonl"}, left
    state = _strict_json((run / "state.json").read_text())
    assert state["finished"] is False and "teacher_ppl" in state and "search" not in state


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PruneError, match="no e3pruner run"):
        run_prune(PruneArgs(**_args(tmp_path, model_dir, train, held, out=str(out),
                                    overwrite=True)))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------ 6: --per-sample
def test_per_sample_needs_the_straight_through_estimator():
    from e3pruner.methods import e3
    from tests.pruner.test_pipeline import _tiny_model_and_data

    model, data = _tiny_model_and_data("llama", 2)
    with pytest.raises(ValueError, match="per_sample"):
        e3.select(model, data, 2, None, e3.E3Config(per_sample=True))
    with pytest.raises(PruneError, match="--per-sample.*--estimator st"):
        run_prune(PruneArgs(per_sample=True, out="/nonexistent/never"))
    from e3pruner.methods.base import Budget

    alphas = {}
    for per_sample in (False, True):
        sel = e3.select(model, data, 2, Budget(search_tokens=32 * 4 * 3, batch_size=4,
                                               progress=False),
                        e3.E3Config(estimator="st", per_sample=per_sample, init="zeros"))
        alphas[per_sample] = sel.scores
    assert alphas[False] != alphas[True]  # it means something there


# ------------------------------------------------------------------ 7: input checks
def test_too_short_heldout_is_refused_and_leaves_no_out_dir(tmp_path):
    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    (tmp_path / "short.txt").write_text("w1 w2")
    out = tmp_path / "new" / "run"
    with pytest.raises(PruneError, match=r"--heldout .*short\.txt.* only \d+ tokens"):
        run_prune(PruneArgs(**_args(tmp_path, model_dir, train, tmp_path / "short.txt",
                                    out=str(out))), log=lambda *_: None)
    assert not (tmp_path / "new").exists()


def test_fewer_heldout_tokens_than_asked_warns(tmp_path):
    from e3pruner.pipeline import prepare_data
    from tests.pruner.tiny_models import word_tokenizer

    _, train, held = tiny_model_dir(tmp_path, "llama")
    lines = []
    _, heldout = prepare_data(PruneArgs(**_args(tmp_path, "m", train, held,
                                                eval_tokens=10**6)), word_tokenizer(),
                              lines.append)
    assert heldout.numel() < 10**6
    assert any("warning" in x and f"{heldout.numel():,}" in x for x in lines)


def test_heldout_extra_texts_are_checked_like_heldout(tmp_path):
    """compare's --heldout-extra goes through the same held-out checks, named by its flag."""
    from e3pruner.pipeline import check_data_specs, heldout_tokens
    from tests.pruner.tiny_models import word_tokenizer

    _, train, held = tiny_model_dir(tmp_path, "llama")
    args = PruneArgs(**_args(tmp_path, "m", train, held, eval_tokens=64, eval_ctx=16))
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\n{"text": w2}\n')
    with pytest.raises(PruneError, match=r"--heldout-extra .*short\.txt.* only \d+ tokens.* 32"):
        heldout_tokens(args, word_tokenizer(), str(tmp_path / "short.txt"), "--heldout-extra")
    with pytest.raises(PruneError, match=r"--heldout-extra: .*bad\.jsonl, line 2"):
        heldout_tokens(args, word_tokenizer(), str(tmp_path / "bad.jsonl"), "--heldout-extra")
    with pytest.raises(PruneError, match=r"--heldout-extra: .*missing\.txt"):
        check_data_specs(args, extra_heldout=(str(tmp_path / "missing.txt"),))
    lines = []
    ids = heldout_tokens(args, word_tokenizer(), str(held), "--heldout-extra", lines.append)
    assert 32 <= ids.numel() <= 64
    assert all("--heldout-extra" in x for x in lines)


@pytest.mark.parametrize("name,content,match", [
    ("a.jsonl", '{"text": "w1 w2"}\n{"text": null}\n', r"a\.jsonl, line 2: field 'text' is null"),
    ("b.jsonl", '{"text": "w1"}\n\n{"text": w2}\n', r"b\.jsonl, line 3: not valid JSON"),
    ("c.jsonl", '{"text": "w1"}\n{"body": "w2"}\n', r"c\.jsonl, line 2: .*no field 'text'"),
    ("d.jsonl", '["w1"]\n', r"d\.jsonl, line 1: .*not a JSON object"),
    ("e.txt", b"w1 w2\n\nw3 \xff w4\n", r"e\.txt, line 3: not UTF-8"),
    ("f.txt", "\n\n  \n", r"f\.txt holds no text"),
    ("g.jsonl", "", r"g\.jsonl holds no text"),
])
def test_data_file_errors_name_file_and_line(tmp_path, name, content, match):
    from e3pruner.data import DataError, load_texts

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        load_texts(str(path))


def test_bad_data_file_in_prune_names_the_flag(tmp_path, capsys):
    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"text": null}\n')
    rc = main(["prune", "--model", str(model_dir), "--data", str(bad), "--heldout", str(held),
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--data" in err and "bad.jsonl, line 2" in err, err
    assert not (tmp_path / "run").exists()


def test_keep_layers_and_ce_weight_checked_in_the_api():
    from e3pruner.recovery.distill import RecoveryConfig
    from e3pruner.models.export import validate_keep_layers

    with pytest.raises(ValueError, match="integer"):
        validate_keep_layers([0.0, 2.7], 6)
    with pytest.raises(ValueError, match="integer"):
        validate_keep_layers([True, 2], 6)
    assert validate_keep_layers([torch.tensor(3), 1], 6) == [1, 3]
    with pytest.raises(ValueError, match="ce_weight"):
        RecoveryConfig(tokens=64, ce_weight=-5)
    with pytest.raises(ValueError, match="lr"):
        RecoveryConfig(tokens=64, lr=float("nan"))
    from e3pruner.eval.perplexity import perplexity

    with pytest.raises(ValueError, match="max_tokens"):
        perplexity(None, torch.arange(10), 4, max_tokens=-3)


def test_ctrl_c_prints_the_resume_command(monkeypatch, capsys):
    import e3pruner.pipeline as pipeline

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_prune", interrupted)
    assert main(["prune", "--out", "runs/x y", "--overwrite", "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.endswith("e3pruner prune --out 'runs/x y' --no-progress --resume")


# ------------------------------------------------------------------ 8: leftovers
def test_stale_temp_files_are_removed_on_the_next_start(finished, tmp_path):
    args = _copy_run(finished, tmp_path, resume=True)
    run = tmp_path / "run"
    stale = [run / ".recovery_ckpt.pt.x1y2.tmp", run / ".state.json.abc.tmp",
             run / ".model.tmp-999999999-abc", run / ".model.tmp-legacy"]
    for p in stale[:2]:
        p.write_bytes(b"partial")
    for p in stale[2:]:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    (run / "user.tmp").write_text("not ours")
    report = run_prune(PruneArgs(**args), log=lambda *_: None)  # finished: nothing reruns
    assert report["kept_layers"] == finished[2]["kept_layers"]
    assert not any(p.exists() for p in stale)
    assert (run / "user.tmp").exists()


def test_eval_ppl_warns_when_fewer_tokens_than_asked(tmp_path, capsys):
    model_dir, _, held = tiny_model_dir(tmp_path, "llama")
    rc = main(["eval-ppl", "--model", str(model_dir), "--data", str(held), "--ctx-len", "64",
               "--max-tokens", "1000000", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "warning" in captured.err and "--max-tokens" in captured.err
    assert _strict_json(captured.out[captured.out.index("{"):])["tokens"] < 10**6
