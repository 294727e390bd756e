"""`e3pruner prune` end to end on tiny models: report, export, plots, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from e3pruner.pipeline import PruneArgs, PruneError, run_prune
from tests.pruner.tiny_models import tiny_model_dir
from tests.records import assert_records_close


def _args(root, model_path, train, held, **kw):
    base = dict(model=str(model_path), data=str(train), heldout=str(held), block_len=32,
                batch_size=2, calib_blocks=4, search_tokens=32 * 2 * 12,
                recovery_tokens=32 * 2 * 10, eval_tokens=1500, eval_ctx=64,
                out=str(root / "run"), progress=False, checkpoint_every=3, prune_layers=2)
    base.update(kw)
    return base


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prune_end_to_end(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model_dir, train, held = tiny_model_dir(tmp_path, family)
    report = run_prune(PruneArgs(**_args(tmp_path, model_dir, train, held)), log=lambda *_: None)
    run = tmp_path / "run"
    assert len(report["removed_layers"]) == 2 and len(report["kept_layers"]) == 4
    for key in ("teacher", "pruned_before_recovery", "pruned_after_recovery"):
        assert report["ppl"][key] > 1
    assert report["shortgpt"]["ppl_before_recovery"] > 1
    assert report["tokens"] == {"search": 768, "recovery": 640}
    assert report["params_pruned"] < report["params"]
    for png in report["plots"].values():
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    info = json.loads((run / "model" / "pruning.json").read_text())
    assert info["kept_layers"] == report["kept_layers"] and info["original_num_layers"] == 6
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model")
    assert reloaded.config.num_hidden_layers == 4
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    search = [r for r in recs if r["phase"] == "search" and r["step"] >= 0]
    recovery = [r for r in recs if r["phase"] == "recovery"]
    assert [r["step"] for r in search] == list(range(10))  # 12 less the polish's 2
    assert [r["step"] for r in recovery] == list(range(10))
    assert all(abs(sum(r["keep_prob"]) - 4) < 1e-4 for r in search)
    # curriculum: the number of pruned layers grows to the target
    assert search[0]["n_pruned"] == 1 and search[-1]["n_pruned"] == 2
    # a fresh run refuses to overwrite without a flag
    with pytest.raises(PruneError, match="--resume"):
        run_prune(PruneArgs(**_args(tmp_path, model_dir, train, held)))


def test_bad_input_fails_before_work(tmp_path):
    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    cases = [({"prune_layers": 6}, "prune-layers"), ({"prune_layers": None, "ratio": 1.0}, "ratio"),
             ({"search_tokens": 0}, "search-tokens"), ({"recovery_tokens": 5}, "recovery-tokens"),
             ({"out": "/proc/forbidden/run"}, "not writable"), ({"model": str(tmp_path)}, "config"),
             ({"recovery_batch_size": 0}, "recovery-batch-size"), ({"ce_weight": -1.0}, "ce-weight"),
             ({"ce_weight": 0.3, "teacher": "cache"}, "ce-weight")]
    for kw, match in cases:
        with pytest.raises(PruneError, match=match):
            run_prune(PruneArgs(**_args(tmp_path, model_dir, train, held, **kw)))
    assert not (tmp_path / "run" / "state.json").exists()
    from e3pruner.pipeline import recovery_ce_weight

    assert recovery_ce_weight(PruneArgs()) == 0.3  # KD + CE with the live teacher
    assert recovery_ce_weight(PruneArgs(teacher="cache")) == 0.0  # the top-K loss has no CE
    assert recovery_ce_weight(PruneArgs(teacher="live", ce_weight=0.0)) == 0.0


def _flags(args: dict) -> list[str]:
    """`e3pruner prune` flags from run_prune-style kwargs (True: a bare flag)."""
    out = []
    for k, v in args.items():
        if k != "progress":
            out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def _cli(args: dict) -> list[str]:
    return [sys.executable, "-m", "e3pruner", "prune", "--no-progress"] + _flags(args)


def _run_until(cmd, env, stop) -> None:
    """Start `cmd` and SIGKILL its whole process group (torchrun's workers too) once
    `stop()` holds."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if stop():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    raise AssertionError(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")


def _phase_steps(path, phase):
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        n += r.get("phase") == phase and r.get("step", -1) >= 0
    return n


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    model_dir, train, held = tiny_model_dir(tmp_path, "qwen3")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    a = _args(tmp_path, model_dir, train, held, search_tokens=32 * 2 * 20,
              recovery_tokens=32 * 2 * 20, out=str(tmp_path / "a"))
    subprocess.run(_cli(a), env=env, check=True, capture_output=True, timeout=600)

    b = dict(a, out=str(tmp_path / "b"))
    metrics = tmp_path / "b" / "metrics.jsonl"
    # kill in the middle of the search, after a checkpoint and some steps past it
    _run_until(_cli(b), env, lambda: _phase_steps(metrics, "search") >= 8)
    assert (tmp_path / "b" / "search_ckpt.pt").exists()
    # resume, then kill in the middle of the recovery
    _run_until(_cli(b) + ["--resume"], env, lambda: _phase_steps(metrics, "recovery") >= 7)
    assert (tmp_path / "b" / "recovery_ckpt.pt").exists()
    subprocess.run(_cli(b) + ["--resume"], env=env, check=True, capture_output=True, timeout=600)

    ra = json.loads((tmp_path / "a" / "report.json").read_text())
    rb = json.loads((tmp_path / "b" / "report.json").read_text())
    assert ra["kept_layers"] == rb["kept_layers"]
    assert ra["ppl"] == pytest.approx(rb["ppl"], rel=1e-6)

    def records(run):
        out = []
        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            out.append({k: v for k, v in r.items() if k not in ("grad_norm",)})
        return out

    rec_a, rec_b = records("a"), records("b")
    assert [(r["phase"], r["step"]) for r in rec_a] == [(r["phase"], r["step"]) for r in rec_b]
    for x, y in zip(rec_a, rec_b):
        assert_records_close(x, y, rel=1e-5, abs=1e-6)
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_prune_bundled_model_small_budget(tmp_path):
    """`e3pruner prune` end to end on the bundled SmolLM2-135M with a tiny budget."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "e3pruner", "prune", "--no-progress", "--out", str(out),
           "--block-len", "128", "--batch-size", "2", "--calib-blocks", "1",
           "--search-tokens", "512", "--recovery-tokens", "256", "--eval-tokens", "1024",
           "--eval-ctx", "256"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher held-out perplexity" in res.stdout and "after recovery" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["num_layers"] == 30 and report["pruned_layers"] == 8
    assert len(report["kept_layers"]) == 22
    assert report["tokens"] == {"search": 512, "recovery": 256}
    assert report["ppl"]["pruned_before_recovery"] > report["ppl"]["teacher"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 22


def _tiny_model_and_data(family: str, seed: int):
    from e3pruner.data import TokenBlocks, tokenize_stream
    from e3pruner.methods.base import PruneData
    from tests.pruner.tiny_models import markov_text, tiny_model, word_tokenizer

    stream = tokenize_stream(markov_text(60, seed=seed).split("\n\n"), word_tokenizer())
    blocks = TokenBlocks(stream, 32, seed=0)
    return tiny_model(family), PruneData(calib=blocks.take(2, 0), blocks=blocks, train_start=2)


@pytest.mark.parametrize("scope,teacher", [("endpoints", "cache"), ("full", "live"), ("lora", "live")])
def test_recovery_scopes_and_teacher_cache(tmp_path, scope, teacher):
    from e3pruner.recovery.distill import RecoveryConfig, endpoint_layers, make_student, recover

    model, data = _tiny_model_and_data("qwen2", 4)
    keep = [0, 1, 3, 5]
    assert endpoint_layers(keep, 6) == [1, 2, 3]  # kept 1 (before cut 2), 3 (around 4), 5 (after 4)
    student = make_student(model, keep)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = RecoveryConfig(tokens=2 * 32 * 6, batch_size=2, lr=1e-3, scope=scope, teacher=teacher,
                         cache_topk=16, amp=None, lora_rank=2)
    student, summary = recover(student, model, data, cfg, keep=keep, run_dir=str(tmp_path),
                               progress=False)
    assert summary["steps"] == 6 and summary["tokens"] == 384
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    if scope == "endpoints":
        assert changed and all(k.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3."))
                               for k in changed)
        assert (tmp_path / "teacher_cache" / "index.json").is_file()
    else:
        assert any(k.startswith("model.layers.0.") for k in changed)
        assert not any("embed_tokens" in k for k in changed)
    if scope == "lora":  # adapters merged back: plain module names, only the projections move
        assert student.state_dict().keys() == before.keys()
        assert all(k.endswith("_proj.weight") for k in changed)
        assert summary["trainable_params"] < sum(v.numel() for v in before.values()) / 5
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(np_isfinite(v) for v in losses)


def np_isfinite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


@pytest.mark.parametrize("teacher", ["live", "cache"])
def test_recovery_under_bf16_amp_feeds_the_head_bf16(tmp_path, teacher):
    """amp="bf16": the KD loss gets bf16 hidden states (its bf16 GEMM path), as autocast would
    give the LM head; every step's loss stays within 5% of the fp32 run's."""
    from e3pruner.recovery.distill import RecoveryConfig, make_student, recover
    from e3pruner.amp import head_input

    h = torch.randn(3, 5, requires_grad=True)
    assert head_input(h, "bf16").dtype == torch.bfloat16 and head_input(h, None) is h
    head_input(h, "bf16").float().sum().backward()
    assert torch.equal(h.grad, torch.ones_like(h))

    model, data = _tiny_model_and_data("llama", 5)
    keep = [0, 2, 3, 5]
    losses = {}
    for amp in (None, "bf16"):
        run = tmp_path / str(amp)
        cfg = RecoveryConfig(tokens=2 * 32 * 4, batch_size=2, lr=1e-3, teacher=teacher,
                             cache_topk=16, amp=amp)
        recover(make_student(model, keep), model, data, cfg, keep=keep, run_dir=str(run),
                progress=False)
        losses[amp] = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["bf16"]) == 4
    assert losses["bf16"] == pytest.approx(losses[None], rel=0.05)


def test_recovery_cross_entropy_term(tmp_path):
    """ce_weight=w adds w x the next-token CE of the data, summed over the positions that have
    a next token (the last position of a block has none and drops out of the KD sum too) and
    divided by the tokens of the step like the KD sum. The first step's logged loss is checked
    against a CE from the student's full logits; with w=0 every position stays in the KD."""
    import torch.nn.functional as F

    from e3kernels import fused_linear_kd_loss
    from e3pruner.recovery.distill import RecoveryConfig, make_student, next_token_labels, recover
    from e3pruner.models.activations import final_hidden
    from e3pruner.data import batch_at
    from e3pruner.models.families import lm_head

    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert torch.equal(next_token_labels(ids), torch.tensor([[6, 7, -100], [9, 10, -100]]))
    model, data = _tiny_model_and_data("qwen3", 6)
    keep = [0, 1, 3, 5]
    first = {}
    for w in (0.0, 0.7):
        run = tmp_path / str(w)
        cfg = RecoveryConfig(tokens=2 * 32 * 2, batch_size=2, lr=1e-3, amp=None, ce_weight=w)
        recover(make_student(model, keep), model, data, cfg, keep=keep, run_dir=str(run),
                progress=False)
        first[w] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    x = batch_at(data, 0, 2)
    student = make_student(model, keep)
    with torch.no_grad():
        logits = student(x).logits.double()
        hs = final_hidden(student, x).reshape(x.numel(), -1)
        ht = final_hidden(model, x).reshape(x.numel(), -1)
        ws, wt = lm_head(student).weight, lm_head(model).weight
        kd_all = fused_linear_kd_loss(hs, ws, ht, wt, reduction="sum").loss.item()
        kd_next = fused_linear_kd_loss(hs, ws, ht, wt, labels=next_token_labels(x).reshape(-1),
                                       reduction="sum").loss.item()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                         reduction="sum").item()
    assert first[0.0]["loss"] == pytest.approx(kd_all / x.numel(), rel=1e-4)
    assert "ce" not in first[0.0]
    assert first[0.7]["loss"] == pytest.approx((kd_next + 0.7 * ce) / x.numel(), rel=1e-4)
    assert first[0.7]["kd"] == pytest.approx(kd_next / x.numel(), rel=1e-4)
    assert first[0.7]["ce"] == pytest.approx(ce / (x.numel() - x.shape[0]), rel=1e-4)
    for bad in (dict(ce_weight=-1.0), dict(ce_weight=float("nan")),
                dict(ce_weight=0.5, teacher="cache")):
        with pytest.raises(ValueError, match="ce_weight"):
            RecoveryConfig(tokens=64, **bad).validate()
