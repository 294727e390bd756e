"""Weight updates a selection carries: new values for some parameters of the pruned model.

A method that changes weights as well as choosing layers (ReplaceMe folds a linear map into
the layer before the cut) does not touch the model it is given. It returns the new tensors
in `Selection.info["weight_updates"]`, keyed by the parameter names of the ORIGINAL model
(`model.layers.11.mlp.down_proj.weight`): either the dict itself or, when it has a run
directory, the path of a safetensors file of it (so the Selection stays JSON). Whoever
builds the physically pruned student applies them with `apply_weight_updates`, which
renumbers the layer names to the kept order; the updated weights then reach recovery and the
export as ordinary weights (shapes never change).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from e3pruner.models.families import decoder_layers, get_adapter


def save_weight_updates(updates: dict[str, torch.Tensor], path: str | Path) -> str:
    """Write `updates` atomically as a safetensors file (temp file in the same folder, then
    os.replace); returns the path as a string."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in updates.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(path)


def load_weight_updates(updates) -> dict[str, torch.Tensor]:
    """The {original name: tensor} dict of `updates` (a dict, or a safetensors path)."""
    if isinstance(updates, dict):
        return updates
    from safetensors.torch import load_file

    path = Path(updates)
    if not path.is_file():
        raise FileNotFoundError(f"weight updates file {path} is missing: run the method's "
                                "selection again (e.g. compare with --overwrite)")
    return load_file(str(path))


def pruned_name(name: str, keep: list[int], layers_path: str) -> str:
    """The name in the pruned model of the original parameter `name` (layers renumbered in
    kept order); ValueError for a parameter of a removed layer."""
    prefix = layers_path + "."
    if not name.startswith(prefix):
        return name
    index, rest = name[len(prefix):].split(".", 1)
    if int(index) not in keep:
        raise ValueError(f"weight update {name!r} belongs to removed layer {index}")
    return f"{prefix}{keep.index(int(index))}.{rest}"


@torch.no_grad()
def apply_weight_updates(student: nn.Module, updates, keep: list[int]) -> nn.Module:
    """Copy `updates` (original names; a dict or a safetensors path) into the physically
    pruned `student` (which kept the original layers `keep`, in order), in each parameter's
    own dtype and device. Returns the student."""
    keep = sorted(int(k) for k in keep)
    if len(decoder_layers(student)) != len(keep):
        raise ValueError(f"the student has {len(decoder_layers(student))} layers but keep "
                         f"lists {len(keep)}: apply the updates to the pruned student")
    layers_path = get_adapter(student).layers_path
    for name, value in load_weight_updates(updates).items():
        param = student.get_parameter(pruned_name(name, keep, layers_path))
        if param.shape != value.shape:
            raise ValueError(f"weight update {name!r} has shape {tuple(value.shape)}, the "
                             f"parameter {tuple(param.shape)}")
        param.copy_(value.to(device=param.device, dtype=param.dtype))
    return student
