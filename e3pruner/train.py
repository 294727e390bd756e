"""Training-loop plumbing shared by the mask searches and recovery: atomic checkpoints, a
JSONL metrics log that stays consistent across resumes, LR and temperature schedules,
finite checks, deterministic seeding and RNG state, strict JSON files."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from e3pruner.disk_space import full_disk_as_error, require_free_space, tensor_bytes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temp name, then rename; checks the free space first (the old file
    stays until the rename, so a checkpoint needs its own size free) and turns a full disk
    into a DiskSpaceError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = tensor_bytes(obj)
    what = f"the checkpoint {path.name}"
    require_free_space(path.parent, needed, what)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with full_disk_as_error(path.parent, needed, what):
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
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _finite_or_none(obj):
    """`obj` with every non-finite float (NaN, +-inf) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 2, **kw) -> str:
    """The one way we write JSON: strict JSON (never a bare NaN/Infinity); non-finite floats,
    i.e. values that are undefined, become null."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False, **kw)


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """`json_text(obj)` written atomically to `path`."""
    atomic_write_text(path, json_text(obj, indent) + "\n")


class RunFileError(ValueError):
    """A file of a run directory that cannot be used (corrupted, or not a plain-data file)."""


class NonFiniteError(RuntimeError):
    """A loss or weight became NaN/inf: the run stops instead of producing a broken model."""


def check_finite(value: float, phase: str, step: int | None = None, hint: str = "") -> None:
    """Raise NonFiniteError naming the phase and step when `value` is NaN or +-inf."""
    if math.isfinite(value):
        return
    where = phase if step is None else f"{phase}, step {step}"
    raise NonFiniteError(
        f"{where}: the value became {value} (non-finite); stopping without exporting. "
        f"{hint or 'Try --dtype float32, --amp none or a lower learning rate.'}")


def check_finite_params(model, phase: str, hint: str = "") -> None:
    """NonFiniteError when any parameter of `model` holds NaN or inf."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteError(
                f"{phase}: parameter {name} holds NaN/inf values; stopping without exporting. "
                f"{hint or 'Try --dtype float32, --amp none or a lower learning rate.'}")


_STALE_TEMP_NAMES = ("state.json", "metrics.jsonl", "report.json", "search_ckpt.pt",
                     "recovery_ckpt.pt", "compare.json", "compare.md")


def remove_stale_temp_files(run_dir: str | Path, depth: int = 2) -> list[Path]:
    """Delete the temp files an interrupted atomic write of ours left in `run_dir` (and its
    subdirectories down to `depth`): `.NAME.*.tmp` of our file names, `.teacher-*.tmp` cache
    shards, `.model.tmp-*` export dirs of processes no longer alive. Returns what went."""
    import shutil

    from e3pruner.models.export import stale_export_temp

    removed: list[Path] = []
    root = Path(run_dir)
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        name = p.name
        if p.is_file() and name.endswith(".tmp") and (
                name.startswith(".teacher-")
                or any(name.startswith(f".{n}.") for n in _STALE_TEMP_NAMES)):
            p.unlink(missing_ok=True)
            removed.append(p)
        elif p.is_dir() and not p.is_symlink():
            if stale_export_temp(p):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif depth > 0 and not name.startswith("."):
                removed += remove_stale_temp_files(p, depth - 1)
    return removed


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
        """The saved state, or None. Loads tensors and plain data only (weights_only): a file
        holding anything else (e.g. a pickled object) or a corrupted one is refused, naming
        the file to delete."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - corrupted zip, refused pickle, EOF...
            why = (str(err).splitlines() or [""])[0][:200]
            raise RunFileError(
                f"cannot use the checkpoint {self.path}: it is corrupted or holds more than "
                f"tensors and plain data ({type(err).__name__}: {why}). "
                f"Delete {self.path} to redo that phase from its start, or rerun with "
                "--overwrite to start the whole run over") from None
        if not isinstance(state, dict) or "step" not in state:
            raise RunFileError(f"{self.path} is not a checkpoint of ours; delete it to redo "
                               "that phase from its start, or rerun with --overwrite")
        return state

    def remove(self) -> None:
        if self.path is not None and self.write:
            self.path.unlink(missing_ok=True)


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
            f.write(json_text({"phase": self.phase, **record}, indent=None) + "\n")

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
    """Python, numpy and torch RNG states as tensors and plain data (a checkpoint holds
    nothing that needs more than torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
