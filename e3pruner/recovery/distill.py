"""Recovery after layer removal: entropy-aware KD from the frozen original model.

The student is the physically pruned model; the teacher is the original (live, through
`e3kernels.fused_linear_kd_loss` straight from both final hidden states and heads) or an
offline top-K cache of the teacher's log-probs built with `e3kernels.teacher_topk`
(sharded safetensors), consumed by `fused_linear_kd_loss_topk`.

Trainable scope: "full" (every decoder layer and the final norm; embeddings/head too with
train_embeddings=True), "endpoints" (the kept layers adjacent to each removed segment:
cutoff endpoint tuning), "last" (the last `last_layers` kept decoder layers, the final norm
and the LM head: partial-layer fine-tuning; a head tied to the embedding is the embedding,
so it trains too; an untied embedding only with train_embeddings=True), "lora" (peft
adapters on the decoder layers, merged at the end).
Loss per token: the teacher-entropy-weighted KL, plus ce_weight x the next-token cross-entropy
of the data on the student (live teacher only; the last position of a block has no next token
and then leaves the KD sum too; both summed over tokens, so the CE's scale
does not depend on the KD weighting).
Gradient accumulation: each micro-batch's loss is a token sum divided by the number of
tokens in the whole optimizer step, so the update equals that of one big batch.
Under torchrun (see distributed.py, recovery/parallel.py) each rank trains on its B / world_size rows of every
micro-batch; DDP or FSDP averages the gradients, so the update is again that of the
whole batch, and the run matches a single-process run up to float rounding.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from e3pruner.amp import autocast, frozen_amp_copy
from e3pruner.data import PruneData, batch_at, batch_rows
from e3pruner.distributed import SINGLE, DistContext
from e3pruner.losses import flat_head_input, kd_from_hidden
from e3pruner.models.activations import final_hidden
from e3pruner.models.export import remove_layers_inplace
from e3pruner.models.families import (decoder_layers, embed_tokens, final_norm, kd_head_kwargs,
                                      lm_head)
from e3pruner.models.gates import remove_gates
from e3pruner.recovery.parallel import (
    full_params,
    load_optimizer_state,
    load_params_,
    optimizer_state,
    parallelize,
)
from e3pruner.recovery.teacher_cache import TeacherCache, build_teacher_cache
from e3pruner.train import (
    Checkpointer,
    MetricsLog,
    check_finite,
    cosine_lr,
    rng_state,
    set_rng_state,
)

SCOPES = ("full", "endpoints", "last", "lora")
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
    last_layers: int = 3  # scope "last": how many of the last kept decoder layers train
    amp: str | None = None  # "bf16": autocast forward/backward (fp32 master weights)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.last_layers, bool) or not isinstance(self.last_layers, int) \
                or self.last_layers < 1:
            raise ValueError(f"last_layers must be an integer >= 1 (the number of last kept "
                             f"layers that scope 'last' trains), got {self.last_layers!r}")
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
    elif cfg.scope == "last":
        if cfg.last_layers > len(layers):
            raise ValueError(f"last_layers={cfg.last_layers} but the pruned model keeps only "
                             f"{len(layers)} layers: choose last_layers in [1, {len(layers)}]")
        modules = [*layers[len(layers) - cfg.last_layers:], final_norm(student), lm_head(student)]
        if cfg.train_embeddings:
            modules.append(embed_tokens(student))
    else:
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


def next_token_labels(ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T] labels of the next token at each position; the last position is ignored."""
    labels = torch.full_like(ids, ignore_index)
    labels[:, :-1] = ids[:, 1:]
    return labels




def _prepare_training(student, teacher, cfg: RecoveryConfig, keep: list[int], dist: DistContext):
    """Freeze the teacher, mark the student's trainable scope and wrap it for `dist`.
    Returns (student, peft wrapper or None, params, {id: name}, forward, no_sync, optimizer)."""
    original_layers = len(decoder_layers(teacher))
    peft_model = None
    if cfg.scope == "lora":  # LoRA layers are injected in place; the wrapper merges at the end
        peft_model, params = set_trainable(student, cfg, keep, original_layers)
        student = peft_model.get_base_model()
    else:
        student, params = set_trainable(student, cfg, keep, original_layers)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    names = {id(p): n for n, p in student.named_parameters()}
    student_forward, no_sync = parallelize(student, params, cfg, dist)
    if dist.enabled and dist.strategy == "fsdp":  # fully_shard swapped in DTensor params
        by_name = dict(student.named_parameters())
        params = [by_name[names[id(p)]] for p in params]
        names = {id(p): n for n, p in student.named_parameters()}
    opt = adamw(params, cfg, dist)
    return student, peft_model, params, names, student_forward, no_sync, opt


def adamw(params, cfg: RecoveryConfig, dist: DistContext) -> torch.optim.AdamW:
    """AdamW over `params`; the fused implementation (one kernel over all tensors) where
    torch has it for these tensors (CPU and CUDA, plain tensors: not FSDP's DTensors),
    else the multi-tensor (foreach) one. Both compute the same update as the per-tensor
    loop (to float rounding); the for-loop is what CPU tensors otherwise get by default."""
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    devices = {p.device.type for p in params}
    fused = (not (dist.enabled and dist.strategy == "fsdp") and devices <= {"cpu", "cuda"}
             and all(p.is_floating_point() for p in params))
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):  # (a dtype/device this torch does not fuse)
            pass
    return torch.optim.AdamW(params, foreach=True, **kw)


def _teacher_cache(teacher, data: PruneData, cfg: RecoveryConfig, steps: int, run_dir,
                   progress: bool, dist: DistContext):
    """(TeacherCache, {block: cache row}) of every block the run trains on; built by rank 0."""
    if run_dir is None:
        raise ValueError("teacher='cache' needs a run directory to store the cache")
    needed = sorted({int(b) for i in range(steps * cfg.grad_accum)
                     for b in batch_rows(data, i, cfg.batch_size)})
    path = Path(f"{run_dir}/teacher_cache")
    with dist.main_first():
        if dist.is_main:
            build_teacher_cache(teacher, data.blocks.blocks[needed], path, cfg.cache_topk,
                                cfg.batch_size, progress=progress)
    return TeacherCache(path), {b: i for i, b in enumerate(needed)}


def _stats_dtype(device: torch.device) -> torch.dtype:
    """fp64 for the loss sums where the device has it (MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _micro_batch(student_forward, teacher, data: PruneData, idx: int, cfg: RecoveryConfig,
                 ws, wt, cache, device, dist: DistContext):
    """(the KD output of micro-batch `idx`, its loss scale: grad_accum x its tokens); the
    forward only: the caller runs the backward."""
    from e3kernels import fused_linear_kd_loss_topk

    ids = dist.shard(batch_at(data, idx, cfg.batch_size)).to(device)
    with autocast(device, cfg.amp):
        hs = student_forward(ids)
    if cache is None:
        with torch.no_grad(), autocast(device, cfg.amp):
            ht = final_hidden(teacher, ids)
        ce = {}
        if cfg.ce_weight > 0:  # (the cache path has none: validate() refuses it)
            ce = dict(labels=next_token_labels(ids).reshape(-1), compute_ce=True,
                      ce_weight=cfg.ce_weight, check_labels=False)  # (token ids: in range)
        out = kd_from_hidden(hs, ws, ht, wt, amp=cfg.amp, temperature=cfg.temperature,
                             kl=cfg.kl, weighting=cfg.weighting, reduction="sum", **ce,
                             **kd_head_kwargs(teacher))
    else:
        cache_obj, cache_row = cache
        rows = [cache_row[int(b)] for b in dist.shard(batch_rows(data, idx, cfg.batch_size))]
        t_ids, t_lp = cache_obj.get(rows)
        hs2 = flat_head_input(hs, cfg.amp)
        out = fused_linear_kd_loss_topk(hs2, ws, t_ids.reshape(hs2.shape[0], -1).to(device),
                                        t_lp.reshape(hs2.shape[0], -1).to(device),
                                        temperature=cfg.temperature,
                                        weighting=cfg.weighting, reduction="sum",
                                        **kd_head_kwargs(teacher))
    scale = cfg.grad_accum * ids.numel()
    return out, scale


def _micro_stats(out, loss: torch.Tensor, scale: int, cfg: RecoveryConfig, dtype) -> torch.Tensor:
    """[loss, KD part, CE sum, CE tokens] of a micro-batch on the device (no host sync)."""
    value = loss.detach().to(dtype)
    if cfg.ce_weight > 0 and out.ce is not None:
        ce_sum = out.ce.sum().to(dtype)
        return torch.stack([value, value - ce_sum * cfg.ce_weight / scale, ce_sum,
                            torch.as_tensor(out.num_valid, device=value.device).to(dtype)])
    zero = torch.zeros((), dtype=dtype, device=value.device)
    return torch.stack([value, value - 0.0, zero, zero])


def _train_step(step: int, steps: int, warmup: int, student_forward, no_sync, teacher,
                data: PruneData, cfg: RecoveryConfig, params, opt, ws, wt, cache, device,
                dist: DistContext) -> dict:
    """One optimizer step over cfg.grad_accum micro-batches; one host sync (the step's loss
    sums and gradient norm, for the log and the finite check)."""
    lr = cosine_lr(step, steps, cfg.lr, warmup, cfg.min_lr)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    dtype = _stats_dtype(device)
    sums = torch.zeros(4, dtype=dtype, device=device)  # loss, KD part, CE sum, CE tokens
    for micro in range(cfg.grad_accum):
        sync = micro == cfg.grad_accum - 1
        with nullcontext() if sync else no_sync():
            out, scale = _micro_batch(student_forward, teacher, data,
                                      step * cfg.grad_accum + micro, cfg, ws, wt, cache,
                                      device, dist)
            loss = out.loss / scale
            loss.backward()
        sums += _micro_stats(out, loss, scale, cfg, dtype)
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    opt.step()
    sums = dist.all_reduce_sum_(sums)
    loss_sum, kd_sum, ce_sum, ce_tokens, grad_norm = torch.cat(
        [sums, gnorm.detach().to(sums.device, dtype).reshape(1)]).tolist()
    total = loss_sum / dist.world_size
    check_finite(total, "recovery (KD loss)", step, _HINT)
    check_finite(grad_norm, "recovery (gradient norm)", step, _HINT)
    rec = {"step": step, "tokens": (step + 1) * cfg.batch_size * cfg.grad_accum
           * data.blocks.block_len, "loss": total, "lr": lr, "grad_norm": grad_norm}
    if cfg.ce_weight > 0:  # the two parts: weighted KL (same scale as loss), mean CE
        rec.update(kd=kd_sum / dist.world_size, ce=ce_sum / max(1.0, ce_tokens))
    return rec


def _finish(student, teacher, peft_model, params, names, keep: list[int], dist: DistContext):
    """The trained student as a plain frozen model in eval mode, and its trained params."""
    if dist.enabled and dist.strategy == "fsdp":
        full = full_params(student, names, params)
        student = make_student(teacher, keep)
        student.load_state_dict(full, strict=False)
        params = list(full.values())
    if peft_model is not None:
        student = peft_model.merge_and_unload()
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    return student, params


def recover(student, teacher, data: PruneData, cfg: RecoveryConfig, *, keep: list[int],
            seed: int = 0, run_dir: str | None = None, resume: bool = False,
            checkpoint_every: int = 50, progress: bool = True, dist: DistContext = SINGLE):
    """Train `student` (in place) to match `teacher`. Returns (student, summary dict);
    under FSDP the returned student is a plain (unsharded) copy."""
    cfg.validate()
    dist.check_divides(cfg.batch_size, "batch_size")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * data.blocks.block_len
    steps = cfg.tokens // tokens_per_step
    if steps == 0:
        return student, {"steps": 0, "tokens": 0, "config": asdict(cfg)}
    student, peft_model, params, names, student_forward, no_sync, opt = _prepare_training(
        student, teacher, cfg, keep, dist)
    device = next(student.parameters()).device
    warmup = max(1, int(cfg.warmup * steps))
    cache = (None if cfg.teacher != "cache" else
             _teacher_cache(teacher, data, cfg, steps, run_dir, progress, dist))

    ckpt = Checkpointer(f"{run_dir}/recovery_ckpt.pt" if run_dir else None, checkpoint_every,
                        write=dist.is_main)
    log = MetricsLog(f"{run_dir}/metrics.jsonl" if run_dir and dist.is_main else None,
                     "recovery")
    start = 0
    state = ckpt.load() if resume else None
    if state is not None:
        load_params_(params, names, state["params"])
        load_optimizer_state(student, opt, state["optimizer"], dist)
        start = state["step"]
        set_rng_state(state["rng"])
        log.truncate_after(start - 1)
    else:
        log.clear_phase()

    ws = lm_head(student).weight
    wt = lm_head(teacher).weight
    kd_head_kwargs(teacher)  # the head is checked once, on the teacher's own weights (the
    # result is cached on the model, and so on its amp copy)
    teacher_forward = teacher if cache is not None else frozen_amp_copy(
        teacher, cfg.amp, list(decoder_layers(teacher)))
    bar = tqdm(total=steps, initial=start, desc="recovery (KD)", unit="step",
               disable=not (progress and dist.is_main))
    loss_val = float("nan") if state is None else state.get("loss", float("nan"))
    t_start = time.time()
    for step in range(start, steps):
        rec = _train_step(step, steps, warmup, student_forward, no_sync, teacher_forward, data,
                          cfg, params, opt, ws, wt, cache, device, dist)
        loss_val = rec["loss"]
        log.write(rec)
        elapsed = max(1e-9, time.time() - t_start)
        bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.1e}",
                        tok_s=f"{(step + 1 - start) * tokens_per_step / elapsed:.0f}")
        bar.update(1)
        if ckpt.due(step + 1, last=step + 1 == steps):
            ckpt.save({"step": step + 1, "optimizer": optimizer_state(student, opt, dist),
                       "rng": rng_state(), "params": full_params(student, names, params),
                       "loss": loss_val})
    bar.close()
    student, params = _finish(student, teacher, peft_model, params, names, keep, dist)
    return student, {"steps": steps, "tokens": steps * tokens_per_step, "final_loss": loss_val,
                     "trainable_params": sum(p.numel() for p in params), "config": asdict(cfg),
                     "processes": dist.world_size, "parallel": dist.strategy if dist.enabled else None}
