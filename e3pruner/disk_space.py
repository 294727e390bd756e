"""Free-space checks before big writes, and a clear message when a write hits a full disk.

A checkpoint or an export is written to a temporary name and renamed, so a full disk never
leaves a half-written file that looks complete; these helpers make the failure say what
happened and how much room is needed, instead of `enforce fail at inline_container.cc`.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# metadata, JSON headers and the tokenizer on top of the tensor bytes
_MARGIN_BYTES = 64 << 20
_FULL_DISK_HINTS = ("No space left", "ENOSPC", "StorageFull", "Disk quota exceeded",
                    "file write failed", "enforce fail at inline_container")


class DiskSpaceError(OSError):
    """Not enough free space for a write (raised before it starts or when it fails)."""


def tensor_bytes(obj) -> int:
    """Total bytes of the tensors in a nested dict / list / tuple (what torch.save or
    safetensors will write, short of headers)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def require_free_space(path: str | Path, needed: int, what: str) -> None:
    """Raise DiskSpaceError unless the filesystem holding `path` has `needed` bytes (plus a
    small margin) free."""
    where = _existing_parent(Path(path))
    free = shutil.disk_usage(where).free
    if free < needed + _MARGIN_BYTES:
        raise DiskSpaceError(errno.ENOSPC,
                             f"not enough free space for {what}: it needs about "
                             f"{_gb(needed + _MARGIN_BYTES)} in {where}, {_gb(free)} free. Free "
                             "some space or write elsewhere (--out); nothing was written.")


def is_full_disk(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(h in str(err) for h in _FULL_DISK_HINTS)


@contextmanager
def full_disk_as_error(path: str | Path, needed: int, what: str) -> Iterator[None]:
    """Turn a full-disk failure inside the block (torch.save's RuntimeError, safetensors'
    error, OSError ENOSPC) into a DiskSpaceError that says how much room is needed."""
    try:
        yield
    except DiskSpaceError:
        raise
    except Exception as err:  # torch: RuntimeError, safetensors: SafetensorError(Exception)
        if not is_full_disk(err):
            raise
        where = _existing_parent(Path(path))
        free = shutil.disk_usage(where).free
        raise DiskSpaceError(errno.ENOSPC,
                             f"the disk filled up while writing {what} in {where}: it needs "
                             f"about {_gb(needed + _MARGIN_BYTES)}, {_gb(free)} free now. The "
                             "partial file was removed; free some space and rerun (with "
                             "--resume to keep the steps done).") from err
