"""The student under torchrun (DDP or FSDP2), and its trainable parameters and optimizer
state as full tensors for checkpoints."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from e3pruner.distributed import DistContext
from e3pruner.models.activations import final_hidden
from e3pruner.models.families import decoder_layers, final_norm


class _FinalHidden(nn.Module):
    """The student's final hidden states as a module forward, so DDP sees the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return final_hidden(self.model, ids)


def parallelize(student, params, cfg, dist: DistContext):
    """(forward callable, no_sync context factory) for the student under `dist`."""
    if not dist.enabled:
        return (lambda ids: final_hidden(student, ids)), nullcontext
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_FinalHidden(student))
        return ddp, ddp.no_sync
    if cfg.scope == "lora":
        raise ValueError("--parallel fsdp supports the full and endpoints scopes; use ddp "
                         "with lora")
    if cfg.train_embeddings:
        raise ValueError("--parallel fsdp keeps the embedding and head replicated; use ddp "
                         "to train them")
    from torch.distributed.fsdp import fully_shard

    trainable = {id(p) for p in params}
    for mod in list(decoder_layers(student)) + [final_norm(student)]:
        if any(id(p) in trainable for p in mod.parameters()):
            fully_shard(mod)
    return (lambda ids: final_hidden(student, ids)), nullcontext


def full_params(student, names: dict, params) -> dict[str, torch.Tensor]:
    """{name: full tensor on CPU} of the trainable params (gathers FSDP shards)."""
    from torch.distributed.tensor import DTensor

    return {names[id(p)]: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for p in params}


def load_params_(params, names: dict, saved: dict[str, torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for p in params:
            full = saved[names[id(p)]].to(p.device, p.dtype)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full)


def optimizer_state(student, opt, dist: DistContext) -> dict:
    if dist.enabled and dist.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(student, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(student, opt, state: dict, dist: DistContext) -> None:
    if dist.enabled and dist.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(student, opt, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)
