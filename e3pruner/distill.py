"""Recovery after layer removal: entropy-aware KD from the frozen original model.

The student is the physically pruned model; the teacher is the original (live, through
`e3kernels.fused_linear_kd_loss` straight from both final hidden states and heads) or an
offline top-K cache of the teacher's log-probs built with `e3kernels.teacher_topk`
(sharded safetensors), consumed by `fused_linear_kd_loss_topk`.

Trainable scope: "full" (every decoder layer and the final norm; embeddings/head too with
train_embeddings=True), "endpoints" (the kept layers adjacent to each removed segment:
cutoff endpoint tuning), "lora" (peft adapters on the decoder layers, merged at the end).
Loss per token: the teacher-entropy-weighted KL, plus ce_weight x the next-token cross-entropy
of the data on the student (live teacher only; the last position of a block has no next token
and then leaves the KD sum too; both summed over tokens, so the CE's scale
does not depend on the KD weighting).
Gradient accumulation: each micro-batch's loss is a token sum divided by the number of
tokens in the whole optimizer step, so the update equals that of one big batch.
Under torchrun (see distributed.py) each rank trains on its B / world_size rows of every
micro-batch; DDP or FSDP averages the gradients, so the update is again that of the
whole batch, and the run matches a single-process run up to float rounding.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from e3pruner.distributed import SINGLE, DistContext
from e3pruner.export import remove_layers_inplace
from e3pruner.hidden import final_hidden
from e3pruner.methods.base import PruneData
from e3pruner.methods.e3 import batch_at, batch_rows
from e3pruner.models.families import decoder_layers, embed_tokens, lm_head
from e3pruner.train import (
    Checkpointer,
    MetricsLog,
    autocast,
    check_finite,
    cosine_lr,
    head_input,
    rng_state,
    set_rng_state,
    write_json,
)

SCOPES = ("full", "endpoints", "lora")
WEIGHTINGS = ("none", "entropy", "normalized_entropy", "confidence")  # e3kernels' KD weightings
_HINT = "Try a lower --lr, --dtype float32 or --amp none."


@dataclass
class RecoveryConfig:
    tokens: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: float = 0.05  # fraction of steps
    min_lr: float = 0.1  # fraction of lr at the end of the cosine
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scope: str = "full"
    train_embeddings: bool = False
    weighting: str = "entropy"
    temperature: float = 1.0
    kl: str = "forward"
    ce_weight: float = 0.0  # + ce_weight * next-token cross-entropy on the data (live teacher)
    teacher: str = "live"  # "live" or "cache"
    cache_topk: int = 64
    lora_rank: int = 16
    amp: str | None = None  # "bf16": autocast forward/backward (fp32 master weights)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.teacher not in ("live", "cache"):
            raise ValueError(f"teacher must be 'live' or 'cache', got {self.teacher!r}")
        if self.tokens < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("tokens >= 0, batch_size >= 1 and grad_accum >= 1 are required")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.weighting not in WEIGHTINGS and not callable(self.weighting):
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not (self.ce_weight >= 0 and self.ce_weight < float("inf")):
            raise ValueError(f"ce_weight must be a finite number >= 0, got {self.ce_weight}")
        if self.ce_weight > 0 and self.teacher == "cache":
            raise ValueError("ce_weight > 0 needs the live teacher: the top-K cache loss has no "
                             "cross-entropy term; use teacher='live' or ce_weight=0")


def make_student(model, keep: list[int]):
    """A physically pruned copy of `model` (the original stays intact as the teacher)."""
    from e3pruner.gates import remove_gates

    student = copy.deepcopy(model)
    remove_gates(student)
    remove_layers_inplace(student, keep)
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()
    return student


def endpoint_layers(keep: list[int], num_layers: int) -> list[int]:
    """New indices of the kept layers adjacent to a removed segment (cut endpoints)."""
    kept = sorted(keep)
    out = set()
    for new, old in enumerate(kept):
        if old - 1 >= 0 and old - 1 not in kept:
            out.add(new)  # right after a cut
        if old + 1 < num_layers and old + 1 not in kept:
            out.add(new)  # right before a cut
    return sorted(out)


def set_trainable(student, cfg: RecoveryConfig, keep: list[int], original_layers: int):
    """Mark the trainable parameters for `cfg.scope`; returns (student, [params])."""
    for p in student.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(student)
    if cfg.scope == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ImportError("scope='lora' needs peft: `pip install peft`") from err
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        student = get_peft_model(student, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank,
                                                     target_modules=targets, lora_dropout=0.0))
        params = [p for p in student.parameters() if p.requires_grad]
        return student, params
    if cfg.scope == "endpoints":
        chosen = endpoint_layers(keep, original_layers)
        modules = [layers[i] for i in chosen]
    else:
        from e3pruner.models.families import final_norm

        modules = list(layers) + [final_norm(student)]
        if cfg.train_embeddings:
            modules += [embed_tokens(student), lm_head(student)]
    params = []
    seen = set()
    for mod in modules:
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                params.append(p)
    return student, params


# ---------------------------------------------------------------- offline teacher cache
def build_teacher_cache(teacher, blocks: torch.Tensor, out_dir: str | Path, k: int = 64,
                        batch_size: int = 4, shard_blocks: int = 256,
                        progress: bool = True) -> Path:
    """Top-k teacher token ids and log-probs for every block: shards of
    {"ids": int32 [n, T, k], "logprobs": fp32 [n, T, k]} + index.json. Existing complete
    shards are reused (resumable); each shard is written atomically."""
    from e3kernels import teacher_topk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight = lm_head(teacher).weight
    device = weight.device
    n = blocks.shape[0]
    shards = []
    bar = tqdm(total=n, desc="teacher top-k cache", disable=not progress, leave=False)
    for s0 in range(0, n, shard_blocks):
        name = f"teacher-{s0:08d}.safetensors"
        shards.append(name)
        if (out / name).is_file():
            bar.update(min(shard_blocks, n - s0))
            continue
        ids_all, lp_all = [], []
        for i in range(s0, min(n, s0 + shard_blocks), batch_size):
            ids = blocks[i:min(i + batch_size, s0 + shard_blocks, n)].to(device)
            with torch.no_grad():
                ht = final_hidden(teacher, ids)
                top = teacher_topk(ht.reshape(-1, ht.shape[-1]), weight, k)
            ids_all.append(top[0].reshape(ids.shape[0], ids.shape[1], k).to(torch.int32).cpu())
            lp_all.append(top[1].reshape(ids.shape[0], ids.shape[1], k).float().cpu())
            bar.update(ids.shape[0])
        tmp = out / f".{name}.tmp"
        save_file({"ids": torch.cat(ids_all), "logprobs": torch.cat(lp_all)}, str(tmp))
        tmp.replace(out / name)
    bar.close()
    write_json(out / "index.json",
               {"blocks": n, "block_len": int(blocks.shape[1]), "k": k,
                "shard_blocks": shard_blocks, "shards": shards}, indent=None)
    return out


class TeacherCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index = json.loads((self.path / "index.json").read_text())
        self._shard: tuple[int, dict] | None = None

    def get(self, rows: list[int]):
        ids, lps = [], []
        per = self.index["shard_blocks"]
        for r in rows:
            s = r // per
            if self._shard is None or self._shard[0] != s:
                self._shard = (s, load_file(str(self.path / self.index["shards"][s])))
            ids.append(self._shard[1]["ids"][r - s * per])
            lps.append(self._shard[1]["logprobs"][r - s * per])
        return torch.stack(ids).long(), torch.stack(lps)


def next_token_labels(ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T] labels of the next token at each position; the last position is ignored."""
    labels = torch.full_like(ids, ignore_index)
    labels[:, :-1] = ids[:, 1:]
    return labels


# ---------------------------------------------------------------- the recovery loop
class _FinalHidden(nn.Module):
    """The student's final hidden states as a module forward, so DDP sees the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return final_hidden(self.model, ids)


def _parallelize(student, params, cfg: RecoveryConfig, dist: DistContext):
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

    from e3pruner.models.families import final_norm

    trainable = {id(p) for p in params}
    for mod in list(decoder_layers(student)) + [final_norm(student)]:
        if any(id(p) in trainable for p in mod.parameters()):
            fully_shard(mod)
    return (lambda ids: final_hidden(student, ids)), nullcontext


def _full_params(student, names: dict, params) -> dict[str, torch.Tensor]:
    """{name: full tensor on CPU} of the trainable params (gathers FSDP shards)."""
    from torch.distributed.tensor import DTensor

    return {names[id(p)]: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for p in params}


def _load_params_(params, names: dict, saved: dict[str, torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for p in params:
            full = saved[names[id(p)]].to(p.device, p.dtype)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements)
            p.copy_(full)


def _optimizer_state(student, opt, dist: DistContext) -> dict:
    if dist.enabled and dist.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(student, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def _load_optimizer_state(student, opt, state: dict, dist: DistContext) -> None:
    if dist.enabled and dist.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(student, opt, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def recover(student, teacher, data: PruneData, cfg: RecoveryConfig, *, keep: list[int],
            seed: int = 0, run_dir: str | None = None, resume: bool = False,
            checkpoint_every: int = 50, progress: bool = True, dist: DistContext = SINGLE):
    """Train `student` (in place) to match `teacher`. Returns (student, summary dict);
    under FSDP the returned student is a plain (unsharded) copy."""
    from e3kernels import fused_linear_kd_loss, fused_linear_kd_loss_topk

    cfg.validate()
    dist.check_divides(cfg.batch_size, "batch_size")
    original_layers = len(decoder_layers(teacher))
    tokens_per_step = cfg.batch_size * cfg.grad_accum * data.blocks.block_len
    steps = cfg.tokens // tokens_per_step
    if steps == 0:
        return student, {"steps": 0, "tokens": 0, "config": asdict(cfg)}
    peft_model = None
    if cfg.scope == "lora":  # LoRA layers are injected in place; the wrapper merges at the end
        peft_model, params = set_trainable(student, cfg, keep, original_layers)
        student = peft_model.get_base_model()
    else:
        student, params = set_trainable(student, cfg, keep, original_layers)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    device = next(student.parameters()).device
    names = {id(p): n for n, p in student.named_parameters()}
    student_forward, no_sync = _parallelize(student, params, cfg, dist)
    if dist.enabled and dist.strategy == "fsdp":  # fully_shard swapped in DTensor params
        by_name = dict(student.named_parameters())
        params = [by_name[names[id(p)]] for p in params]
        names = {id(p): n for n, p in student.named_parameters()}
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.95))
    warmup = max(1, int(cfg.warmup * steps))

    cache = None
    if cfg.teacher == "cache":
        if run_dir is None:
            raise ValueError("teacher='cache' needs a run directory to store the cache")
        needed = sorted({int(b) for i in range(steps * cfg.grad_accum)
                         for b in batch_rows(data, i, cfg.batch_size)})
        path = Path(f"{run_dir}/teacher_cache")
        with dist.main_first():
            if dist.is_main:
                build_teacher_cache(teacher, data.blocks.blocks[needed], path, cfg.cache_topk,
                                    cfg.batch_size, progress=progress)
        cache = TeacherCache(path)
        cache_row = {b: i for i, b in enumerate(needed)}

    ckpt = Checkpointer(f"{run_dir}/recovery_ckpt.pt" if run_dir else None, checkpoint_every,
                        write=dist.is_main)
    log = MetricsLog(f"{run_dir}/metrics.jsonl" if run_dir and dist.is_main else None,
                     "recovery")
    start = 0
    state = ckpt.load() if resume else None
    if state is not None:
        _load_params_(params, names, state["params"])
        _load_optimizer_state(student, opt, state["optimizer"], dist)
        start = state["step"]
        set_rng_state(state["rng"])
        log.truncate_after(start - 1)
    else:
        log.clear_phase()

    ws = lm_head(student).weight
    wt = lm_head(teacher).weight
    bar = tqdm(total=steps, initial=start, desc="recovery (KD)", unit="step",
               disable=not (progress and dist.is_main))
    loss_val = float("nan") if state is None else state.get("loss", float("nan"))
    t_start = time.time()
    for step in range(start, steps):
        lr = cosine_lr(step, steps, cfg.lr, warmup, cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, KD part, CE sum, CE tokens
        for micro in range(cfg.grad_accum):
            idx = step * cfg.grad_accum + micro
            ids = dist.shard(batch_at(data, idx, cfg.batch_size)).to(device)
            sync = micro == cfg.grad_accum - 1
            with (nullcontext() if sync else no_sync()), autocast(device, cfg.amp):
                hs = student_forward(ids)
            hs2 = head_input(hs.reshape(-1, hs.shape[-1]), cfg.amp)
            ce = {}
            if cache is None:
                with torch.no_grad(), autocast(device, cfg.amp):
                    ht = final_hidden(teacher, ids)
                ht2 = head_input(ht.reshape(-1, ht.shape[-1]), cfg.amp)
                if cfg.ce_weight > 0:  # (the cache path has none: validate() refuses it)
                    ce = dict(labels=next_token_labels(ids).reshape(-1), compute_ce=True,
                              ce_weight=cfg.ce_weight)
                out = fused_linear_kd_loss(hs2, ws, ht2, wt,
                                           temperature=cfg.temperature, kl=cfg.kl,
                                           weighting=cfg.weighting, reduction="sum", **ce)
            else:
                rows = [cache_row[int(b)]
                        for b in dist.shard(batch_rows(data, idx, cfg.batch_size))]
                t_ids, t_lp = cache.get(rows)
                out = fused_linear_kd_loss_topk(hs2, ws, t_ids.reshape(hs2.shape[0], -1).to(device),
                                                t_lp.reshape(hs2.shape[0], -1).to(device),
                                                temperature=cfg.temperature,
                                                weighting=cfg.weighting, reduction="sum")
            scale = cfg.grad_accum * ids.numel()
            loss = out.loss / scale
            with nullcontext() if sync else no_sync():
                loss.backward()
            value = loss.item()
            ce_sum = float(out.ce.sum()) if ce else 0.0
            sums += torch.tensor([value, value - cfg.ce_weight * ce_sum / scale, ce_sum,
                                  float(out.num_valid) if ce else 0.0], dtype=torch.float64)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        opt.step()
        sums = dist.all_reduce_sum_(sums)
        total = sums[0].item() / dist.world_size
        check_finite(total, "recovery (KD loss)", step, _HINT)
        check_finite(float(gnorm), "recovery (gradient norm)", step, _HINT)
        loss_val = total
        done = (step + 1) * tokens_per_step
        elapsed = max(1e-9, time.time() - t_start)
        rec = {"step": step, "tokens": done, "loss": total, "lr": lr, "grad_norm": float(gnorm)}
        if cfg.ce_weight > 0:  # the two parts: weighted KL (same scale as loss), mean CE
            rec.update(kd=sums[1].item() / dist.world_size,
                       ce=sums[2].item() / max(1.0, sums[3].item()))
        log.write(rec)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.1e}",
                        tok_s=f"{(step + 1 - start) * tokens_per_step / elapsed:.0f}")
        bar.update(1)
        if ckpt.due(step + 1, last=step + 1 == steps):
            ckpt.save({"step": step + 1, "optimizer": _optimizer_state(student, opt, dist),
                       "rng": rng_state(), "params": _full_params(student, names, params),
                       "loss": loss_val})
    bar.close()
    if dist.enabled and dist.strategy == "fsdp":
        full = _full_params(student, names, params)
        student = make_student(teacher, keep)
        student.load_state_dict(full, strict=False)
        params = list(full.values())
    if peft_model is not None:
        student = peft_model.merge_and_unload()
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    return student, {"steps": steps, "tokens": steps * tokens_per_step, "final_loss": loss_val,
                     "trainable_params": sum(p.numel() for p in params), "config": asdict(cfg),
                     "processes": dist.world_size, "parallel": dist.strategy if dist.enabled else None}
