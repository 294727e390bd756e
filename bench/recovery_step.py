"""Seconds per recovery optimizer step on the bundled SmolLM2-135M (default prune settings:
live teacher, CE weight 0.3, bf16 autocast, 2 blocks of 256 tokens per micro-batch).

    python bench/recovery_step.py [--steps 6] [--grad-accum 1] [--threads N]

One warm-up step is run first and not counted. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import device_info, native_amp

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        from e3pruner.recovery.distill import RecoveryConfig, make_student, recover
    except ImportError:  # the layout before issue 15
        from e3pruner.distill import RecoveryConfig, make_student, recover
    try:
        from e3pruner.methods import PruneData
    except ImportError:
        from e3pruner.methods.base import PruneData
    from e3pruner.data import TokenBlocks, token_stream
    from e3pruner.models import load_model
    from e3pruner.train import seed_everything

    seed_everything(0)
    model, tok = load_model("smollm2-135m")
    blocks = TokenBlocks(token_stream("bundled", tok, seed=0), 256, seed=0)
    data = PruneData(calib=blocks.take(4, 0), blocks=blocks, train_start=4)
    keep = [i for i in range(30) if i not in (4, 5, 12, 13, 14, 17, 19, 25)]
    step_tokens = 2 * 256 * a.grad_accum

    def timed(steps: int) -> float:
        cfg = RecoveryConfig(tokens=steps * step_tokens, batch_size=2, grad_accum=a.grad_accum,
                             lr=4e-4, ce_weight=0.3, amp=native_amp())
        student = make_student(model, keep)
        t = time.perf_counter()
        recover(student, model, data, cfg, keep=keep, progress=False)
        return time.perf_counter() - t

    timed(1)
    total = timed(a.steps)
    print(json.dumps({"device": device_info(torch.device("cpu")),
                      "seconds_per_step": total / a.steps, "steps": a.steps,
                      "grad_accum": a.grad_accum, "threads": torch.get_num_threads(),
                      "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
