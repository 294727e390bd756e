"""torchrun data parallelism: 2 CPU processes on gloo give the run of 1 process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from e3pruner.distributed import DistContext, init_distributed
from tests.pruner.test_pipeline import _args, _cli, _flags, _phase_steps, _run_until
from tests.pruner.tiny_models import tiny_model_dir


def test_shard_splits_rows_contiguously_in_rank_order():
    batch = torch.arange(12).reshape(6, 2)
    parts = [DistContext(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    assert all(p.shape == (2, 2) for p in parts)
    assert DistContext().shard(batch) is batch
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        DistContext(rank=0, world_size=4).shard(batch)
    assert list(DistContext(rank=1, world_size=3).strided(7)) == [1, 4]


def test_single_process_context_without_torchrun():
    ctx = init_distributed({}, "cpu", "fsdp")
    assert not ctx.enabled and ctx.is_main and ctx.strategy == "fsdp"
    t = torch.randn(3)
    assert torch.equal(ctx.all_gather_cat(t), t) and ctx.broadcast(5) == 5
    with pytest.raises(ValueError, match="--parallel"):
        init_distributed({}, "cpu", "tp")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _prune_cmd(n_proc: int, args: dict, parallel: str) -> list[str]:
    """`e3pruner prune` under torchrun with n_proc processes (plain python for 1)."""
    if n_proc == 1:
        return _cli(args)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n_proc}",
            "--standalone", "-m", "e3pruner", "prune", "--no-progress",
            "--parallel", parallel] + _flags(args)


def _launch(n_proc: int, args: dict, parallel: str):
    res = subprocess.run(_prune_cmd(n_proc, args, parallel), env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = __import__("pathlib").Path(args["out"])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "report.json").read_text()), recs


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel):
    """The same global batch split over 2 ranks: same mask, same losses, same weights
    (up to float rounding of a different matmul blocking). fp32 and a per-token weighting:
    "entropy" weighting divides by the mean entropy of the tokens of each forward, i.e.
    per rank (as per micro-batch under accumulation), which is a different estimator."""
    from transformers import AutoModelForCausalLM

    model_dir, train, held = tiny_model_dir(tmp_path, "llama")
    common = dict(batch_size=4, recovery_batch_size=4, grad_accum=2,
                  recovery_tokens=32 * 4 * 2 * 5, amp="none",
                  weighting="normalized_entropy")
    one, recs1 = _launch(1, _args(tmp_path, model_dir, train, held, out=tmp_path / "one",
                                  **common), parallel)
    two, recs2 = _launch(2, _args(tmp_path, model_dir, train, held, out=tmp_path / "two",
                                  **common), parallel)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["recovery"]["parallel"] == parallel
    assert two["removed_layers"] == one["removed_layers"]
    for key in ("teacher", "pruned_before_recovery", "pruned_after_recovery"):
        assert two["ppl"][key] == pytest.approx(one["ppl"][key], rel=1e-4)
    assert two["ppl"]["pruned_after_recovery"] < two["ppl"]["pruned_before_recovery"]
    s1 = [r for r in recs1 if r["phase"] == "search" and r["step"] >= 0]
    s2 = [r for r in recs2 if r["phase"] == "search" and r["step"] >= 0]
    assert [r["mask"] for r in s1] == [r["mask"] for r in s2]
    for a, b in zip(s1, s2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["alpha"] == pytest.approx(a["alpha"], rel=1e-4, abs=1e-5)
    r1 = [r["loss"] for r in recs1 if r["phase"] == "recovery"]
    r2 = [r["loss"] for r in recs2 if r["phase"] == "recovery"]
    assert len(r1) == len(r2) == 5 and r2 == pytest.approx(r1, rel=1e-4)
    w1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    w2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    assert w1.keys() == w2.keys()
    changed = 0
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
        changed += k in base and w1[k].shape == base[k].shape and not torch.equal(w1[k], base[k])
    assert changed > 0  # recovery trained something


@pytest.mark.slow
def test_fsdp_resume_after_kill_matches_uninterrupted(tmp_path):
    """2 ranks under FSDP, killed in the middle of the recovery (after a checkpoint of the
    gathered weights and the full optimizer state): the resumed run gives the losses and
    weights of the uninterrupted one."""
    from transformers import AutoModelForCausalLM


    model_dir, train, held = tiny_model_dir(tmp_path, "qwen3")
    common = dict(batch_size=4, recovery_batch_size=4, recovery_tokens=32 * 4 * 12,
                  amp="none", checkpoint_every=4)
    a = _args(tmp_path, model_dir, train, held, out=tmp_path / "a", **common)
    ref, recs_a = _launch(2, a, "fsdp")

    b = _args(tmp_path, model_dir, train, held, out=tmp_path / "b", **common)
    metrics = tmp_path / "b" / "metrics.jsonl"
    _run_until(_prune_cmd(2, b, "fsdp"), ENV, lambda: _phase_steps(metrics, "recovery") >= 6)
    assert (tmp_path / "b" / "recovery_ckpt.pt").exists()
    assert _phase_steps(metrics, "recovery") < 12
    res, recs_b = _launch(2, dict(b, resume=True), "fsdp")

    assert res["removed_layers"] == ref["removed_layers"]
    la = [r["loss"] for r in recs_a if r["phase"] == "recovery"]
    lb = [r["loss"] for r in recs_b if r["phase"] == "recovery"]
    assert len(la) == len(lb) == 12 and lb == pytest.approx(la, rel=1e-5, abs=1e-7)
    assert res["ppl"]["pruned_after_recovery"] == pytest.approx(
        ref["ppl"]["pruned_after_recovery"], rel=1e-5)
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model").state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
