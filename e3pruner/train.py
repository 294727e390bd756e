"""Training-loop plumbing shared by mask search and recovery: atomic checkpoints, a JSONL
metrics log that stays consistent across resumes, LR and temperature schedules, token
accounting, deterministic seeding."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


_AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of `amp` ("bf16", "fp16"), or None for None/"none"/"off"."""
    if amp in (None, "none", "off"):
        return None
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(_AMP_DTYPES)} or 'none', got {amp!r}")
    return _AMP_DTYPES[amp]


def autocast(device: torch.device | str, amp: str | None):
    """bf16/fp16 autocast context for `amp` in {"bf16", "fp16"}, or a no-op for None/"none"."""
    import contextlib

    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def head_input(h: torch.Tensor, amp: str | None) -> torch.Tensor:
    """Final hidden states [..., D] as the LM head sees them under `amp`: in the amp dtype,
    as autocast casts a Linear's input (the fused KD loss then casts the head to match and
    runs its bf16 GEMM path); unchanged without amp. Differentiable."""
    dtype = amp_dtype(amp)
    return h if dtype is None or h.dtype == dtype else h.to(dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Checkpointer:
    """`save(state)` every `every` steps (atomically); `load()` the latest or None."""

    def __init__(self, path: str | Path | None, every: int = 50, write: bool = True):
        self.path = Path(path) if path else None
        self.every = max(1, int(every))
        self.write = write  # False on every torchrun rank but 0 (they only load)

    def due(self, step: int, last: bool = False) -> bool:
        return self.path is not None and (last or step % self.every == 0)

    def save(self, state: dict) -> None:
        if self.path is not None and self.write:
            atomic_torch_save(state, self.path)

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        return torch.load(self.path, weights_only=False)


class MetricsLog:
    """Append-only JSONL log. `truncate_after(step)` drops records written after the last
    checkpoint, so a resumed run ends with exactly the records of an uninterrupted one."""

    def __init__(self, path: str | Path | None, phase: str):
        self.path = Path(path) if path else None
        self.phase = phase

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"phase": self.phase, **record}) + "\n")

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if rec.get("phase") == self.phase and rec.get("step", -1) > step:
                continue
            keep.append(line)
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def clear_phase(self) -> None:
        self.truncate_after(-1)

    def read(self) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines()]


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def exp_anneal(step: int, total: int, start: float, end: float) -> float:
    """Exponential interpolation start -> end over `total` steps (held at end after)."""
    if total <= 1:
        return end
    frac = min(1.0, step / (total - 1))
    return start * (end / start) ** frac


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
