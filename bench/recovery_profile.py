"""Where the time of one default recovery step goes, on the bundled SmolLM2-135M.

Default `e3pruner prune` recovery settings: live teacher, bf16 autocast, 2 blocks of 256
tokens per step, entropy-weighted KD + 0.3 x CE, full scope (22 decoder layers + final
norm trainable, tied embedding/head frozen). Each part of a step is timed on its own,
in step order, over `--steps` steps after one warm-up step:

    student_forward   final hidden of the student (autocast, builds the graph)
    teacher_forward   final hidden of the teacher (no grad, autocast)
    kd_forward        fused_linear_kd_loss forward (both heads' logits, KL, CE)
    kd_backward       its backward to the student hidden states
    student_backward  backward of the student from those hidden-state grads
    clip_grad_norm    gradient clipping
    optimizer_step    AdamW step

The sum is compared with the same step run by `recovery.distill._train_step`, and a
torch.profiler table (top ops by self CPU time) of one whole step is added.

    python bench/recovery_profile.py [--steps 4] [--out bench/results/recovery_profile_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, native_amp  # noqa: E402

PARTS = ("student_forward", "teacher_forward", "kd_forward", "kd_backward",
         "student_backward", "clip_grad_norm", "optimizer_step")
REMOVED = (4, 5, 12, 13, 14, 17, 19, 25)


def setup():
    from e3pruner.data import PruneData, TokenBlocks, token_stream
    from e3pruner.models import load_model
    from e3pruner.recovery.distill import RecoveryConfig, make_student
    from e3pruner.train import seed_everything

    seed_everything(0)
    model, tok = load_model("smollm2-135m")
    blocks = TokenBlocks(token_stream("bundled", tok, seed=0), 256, seed=0)
    data = PruneData(calib=blocks.take(4, 0), blocks=blocks, train_start=4)
    keep = [i for i in range(30) if i not in REMOVED]
    cfg = RecoveryConfig(tokens=10**6, batch_size=2, lr=4e-4, ce_weight=0.3, amp=native_amp())
    return model, make_student(model, keep), data, keep, cfg


def parts_of_step(step, student_forward, teacher, data, cfg, params, opt, ws, wt) -> dict:
    from e3pruner.amp import autocast
    from e3pruner.data import batch_at
    from e3pruner.losses import kd_from_hidden
    from e3pruner.models.activations import final_hidden
    from e3pruner.recovery.distill import next_token_labels

    t: dict[str, float] = {}

    def mark(name, t0):
        t[name] = time.perf_counter() - t0
        return time.perf_counter()

    opt.zero_grad(set_to_none=True)
    ids = batch_at(data, step, cfg.batch_size)
    t0 = time.perf_counter()
    with autocast("cpu", cfg.amp):
        hs = student_forward(ids)
    t0 = mark("student_forward", t0)
    with torch.no_grad(), autocast("cpu", cfg.amp):
        ht = final_hidden(teacher, ids)
    t0 = mark("teacher_forward", t0)
    hs_leaf = hs.detach().requires_grad_(True)
    out = kd_from_hidden(hs_leaf, ws, ht, wt, amp=cfg.amp, temperature=cfg.temperature,
                         kl=cfg.kl, weighting=cfg.weighting, reduction="sum",
                         labels=next_token_labels(ids).reshape(-1), compute_ce=True,
                         ce_weight=cfg.ce_weight, check_labels=False)
    loss = out.loss / ids.numel()
    t0 = mark("kd_forward", t0)
    loss.backward()
    t0 = mark("kd_backward", t0)
    hs.backward(hs_leaf.grad)
    t0 = mark("student_backward", t0)
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    t0 = mark("clip_grad_norm", t0)
    opt.step()
    mark("optimizer_step", t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from e3pruner.distributed import SINGLE
    from e3pruner.models.families import lm_head
    from e3pruner.recovery.distill import _prepare_training, _train_step

    model, student, data, keep, cfg = setup()
    student, _, params, _, fwd, no_sync, opt = _prepare_training(student, model, cfg, keep,
                                                                 SINGLE)
    ws, wt = lm_head(student).weight, lm_head(model).weight
    parts_of_step(0, fwd, model, data, cfg, params, opt, ws, wt)  # warm-up
    rows = [parts_of_step(1 + s, fwd, model, data, cfg, params, opt, ws, wt)
            for s in range(a.steps)]
    median = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in PARTS}
    whole = []
    for s in range(a.steps):
        t0 = time.perf_counter()
        _train_step(1 + a.steps + s, 10**6, 1, fwd, no_sync, model, data, cfg, params, opt,
                    ws, wt, None, torch.device("cpu"), SINGLE)
        whole.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _train_step(1 + 2 * a.steps, 10**6, 1, fwd, no_sync, model, data, cfg, params, opt,
                    ws, wt, None, torch.device("cpu"), SINGLE)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
    table = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4),
              "calls": e.count} for e in ops]
    total = sum(median.values())
    whole_med = sorted(whole)[len(whole) // 2]
    result = {
        "what": "one default recovery step (2 x 256 tokens, bf16 autocast, KD + 0.3 CE, "
                "full scope) split into parts, median over steps (seconds)",
        "device": device_info(torch.device("cpu")),
        "steps": a.steps,
        "parts_s": {k: round(v, 4) for k, v in median.items()},
        "parts_share": {k: round(v / total, 3) for k, v in median.items()},
        "sum_of_parts_s": round(total, 4),
        "whole_step_s": round(whole_med, 4),
        "whole_step_tokens_per_s": round(2 * 256 / whole_med, 1),
        "trainable_params": sum(p.numel() for p in params),
        "top_ops_one_step": table,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
