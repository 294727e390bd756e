"""E3-Pruner: differentiable layer-mask search with Gumbel-TopK and entropy-aware KD.

1. init   alpha_l from the KL shift of the output distribution when layer l alone is
          skipped (calibration batch): alpha = init_scale * standardize(log KL_l).
2. search weights frozen; each step draws a hard keep-k mask m ~ Gumbel-TopK(alpha, tau)
          (straight-through gradient to alpha), runs the gated student and the all-on
          teacher of the same weights (sharing the forward up to the first gated-off
          layer), and minimizes the entropy-weighted KD loss with Adam on alpha.
          tau anneals exponentially tau_start -> tau_end; a curriculum raises the number
          of pruned layers linearly from 1 to n over the first `curriculum` fraction.
3. final  keep = top-k(alpha), k = L - n.
4. polish local search on that hard mask (`polish_evals` > 0): swap moves (one kept layer
          out, one removed layer in) scored exactly by the hard mask's KD loss
          (eval/mask_kd.py) on `polish_batches` batches of training blocks that the
          search did not use; the least certain pairs (closest alpha) are tried first, the
          first swap that lowers the loss is taken, until no swap among the `polish_width`
          least certain ones does or the evaluations are spent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from e3pruner.amp import autocast
from e3pruner.data import batch_at
from e3pruner.distributed import SINGLE, DistContext
from e3pruner.eval.mask_kd import MaskKDScorer
from e3pruner.losses import kd_from_hidden
from e3pruner.methods.base import Budget, PruneData, Selection, check_n_prune, register
from e3pruner.models.activations import hidden_from, layer_inputs
from e3pruner.models.families import decoder_layers, kd_head_kwargs, lm_head
from e3pruner.models.teacher_prefix import student_and_teacher_hidden
from e3pruner.train import (
    Checkpointer,
    MetricsLog,
    check_finite,
    exp_anneal,
    rng_state,
    set_rng_state,
)


@dataclass
class E3Config:
    lr: float = 0.1
    optimizer: str = "nsgd"  # "nsgd" (momentum SGD on the globally normalized gradient) or "adam"
    momentum: float = 0.9
    tau_start: float = 1.0
    tau_end: float = 0.2
    curriculum: float = 0.5
    init: str = "kl"  # "kl" or "zeros"
    init_scale: float = 1.0
    per_sample: bool = False
    estimator: str = "score"  # "score" (Plackett-Luce score function) or "st" (straight-through)
    weighting: str = "entropy"
    temperature: float = 1.0
    mc_samples: int = 2048  # Monte-Carlo draws to log per-layer keep probabilities
    amp: str | None = None  # "bf16": autocast the frozen model's forward/backward
    polish_evals: int = 40  # exact hard-mask evaluations of the swap polish (0: no polish)
    polish_batches: int = 2  # batches of training blocks (after the search's) it scores on
    polish_width: int = 16  # swap candidates tried around each mask (least certain first)

    def validate(self) -> None:
        if self.estimator not in ("score", "st"):
            raise ValueError(f"estimator must be 'score' or 'st', got {self.estimator!r}")
        if self.per_sample and self.estimator == "score":
            raise ValueError("per_sample only changes the straight-through estimator "
                             "(estimator='st'): the score-function estimator always draws one "
                             "mask per sample")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("polish_evals", "polish_batches", "polish_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@torch.no_grad()
def skip_one_kl(model, calib: torch.Tensor, batch_size: int = 4, progress: bool = True,
                dist: DistContext = SINGLE):
    """[L] mean per-token KL(teacher || model without layer l), one layer at a time.

    One teacher pass records every layer's input; skipping layer l then only runs layers
    l+1..L-1 from the recorded input of l (half the teacher cost on average). Under
    torchrun each rank takes every world_size-th micro-batch and the sums are reduced.
    """
    n = len(decoder_layers(model))
    device = next(model.parameters()).device
    weight, head = lm_head(model).weight, kd_head_kwargs(model)
    kl_sum = torch.zeros(n, dtype=torch.float64)
    count = 0
    starts = list(range(0, calib.shape[0], batch_size))
    mine = [starts[j] for j in dist.strided(len(starts))]
    bar = tqdm(total=n * len(mine), desc="init: skip-one KL", disable=not progress, leave=False)
    for i in mine:
        ids = calib[i:i + batch_size].to(device)
        inputs, ht = layer_inputs(model, ids)
        for idx in range(n):
            hs = hidden_from(model, ids, idx + 1, inputs[idx])
            out = kd_from_hidden(hs, weight, ht, weighting="none", reduction="none", **head)
            kl_sum[idx] += out.kl.double().sum().cpu()
            bar.update(1)
        count += ids.numel()
    bar.close()
    totals = dist.all_reduce_sum_(torch.cat([kl_sum, torch.tensor([float(count)], dtype=torch.float64)]))
    return (totals[:n] / totals[n]).float()


def init_logits(kl: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.log(kl.clamp_min(1e-8))
    std = s.std() if s.numel() > 1 else torch.tensor(1.0)
    return scale * (s - s.mean()) / std.clamp_min(1e-6)


def _optimizer(alpha: torch.nn.Parameter, cfg: E3Config) -> torch.optim.Optimizer:
    """nsgd keeps the relative size of the per-layer gradients (Adam's per-coordinate
    scaling would blow a layer's tiny-but-consistent gradient up to the size of a crucial
    layer's, blurring exactly the distinction the search has to make)."""
    if cfg.optimizer == "nsgd":
        return torch.optim.SGD([alpha], lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam([alpha], lr=cfg.lr)
    raise ValueError(f"optimizer must be 'nsgd' or 'adam', got {cfg.optimizer!r}")


def curriculum_pruned(step: int, total: int, n_prune: int, frac: float) -> int:
    """Number of pruned layers at `step`: linear 1 -> n_prune over frac * total steps."""
    ramp = max(1, int(frac * total))
    if step >= ramp or n_prune <= 1:
        return n_prune
    return 1 + int((n_prune - 1) * step / ramp)


def plackett_luce_log_prob(alpha: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """log P(order) [B] of drawing the columns `order` [B, k] in that order without
    replacement, P(i) = softmax(alpha) over the columns not yet drawn. Differentiable in
    alpha [L]."""
    a = alpha.float()[None].expand(order.shape[0], -1)
    sel = a.gather(1, order)
    total = torch.logsumexp(alpha.float(), 0)
    prefix = torch.logcumsumexp(sel, 1)
    before = torch.cat([torch.full_like(prefix[:, :1], float("-inf")), prefix[:, :-1]], 1)
    # log(sum over remaining) = log(e^total - e^before), stable
    remaining = total + torch.log1p(-torch.exp(before - total).clamp(max=1 - 1e-7))
    return (sel - remaining).sum(1)


def _score_function_step(model, ids, alpha, k: int, weight, cfg: E3Config, *, seed: int,
                         offset: int, dist: DistContext = SINGLE):
    """One REINFORCE step on E_{m ~ Gumbel-TopK(alpha)}[KD loss of m].

    Every sample b of the batch gets its own hard mask m_b (the Gumbel-TopK draw of row b:
    top-k of alpha + g_b with the kernel's counter-based noise); the gated student runs
    forward only (no backward through the model), and
        d alpha = mean_b (L_b - mean_{b' != b} L_b') d log P_PL(order_b; alpha)
    (leave-one-out baseline). Unbiased for the expected loss of *hard* masks, which the
    straight-through slope at m in {0, 1} is not: on SmolLM2 that slope pushed the
    indispensable last layers out of the mask (docs/design-changes.md).
    Under torchrun every rank draws all B masks, runs its B / world_size rows and gathers
    the per-row losses, so every rank computes the same gradient (no all-reduce needed).
    """
    from e3kernels import gumbel_noise

    rows, n = ids.shape[0], alpha.numel()
    if rows < 2:
        raise ValueError("the score-function estimator needs batch_size >= 2")
    with torch.no_grad():
        g = gumbel_noise(rows, n, seed=seed, offset=offset, device=alpha.device)
        z = alpha.detach().float()[None] + g
        order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]
        mask = torch.zeros(rows, n, device=alpha.device).scatter_(1, order, 1.0)
        with autocast(alpha.device, cfg.amp):
            hs, ht = student_and_teacher_hidden(model, dist.shard(ids), dist.shard(mask))
        out = kd_from_hidden(hs, weight, ht, amp=cfg.amp, weighting=cfg.weighting,
                             temperature=cfg.temperature, reduction="none",
                             **kd_head_kwargs(model))
        per_row = dist.all_gather_cat(out.loss.reshape(hs.shape[0], -1).float().mean(1))
        baseline = (per_row.sum() - per_row) / (rows - 1)
        adv = per_row - baseline
    logp = plackett_luce_log_prob(alpha, order)
    (adv * logp).mean().backward()
    return mask, per_row.mean().item()


@torch.no_grad()
def keep_probabilities(alpha: torch.Tensor, k: int, samples: int, seed: int, offset: int):
    """Monte-Carlo P(layer kept) under Gumbel-TopK(alpha) sampling: [L]."""
    from e3kernels import gumbel_topk

    rows = alpha.detach().float()[None].expand(samples, -1).contiguous()
    return gumbel_topk(rows, k, tau=1.0, seed=seed, offset=offset).float().mean(0)


def _init_alpha(model, data: PruneData, cfg: E3Config, budget: Budget):
    """(initial logits [L], skip-one KL [L] or None) for cfg.init."""
    if cfg.init == "kl":
        init_kl = skip_one_kl(model, data.calib, budget.batch_size, budget.progress, budget.dist)
        return init_logits(init_kl, cfg.init_scale), init_kl
    if cfg.init == "zeros":
        return torch.zeros(len(decoder_layers(model))), None
    raise ValueError(f"init must be 'kl' or 'zeros', got {cfg.init!r}")


def _start_search(model, data: PruneData, cfg: E3Config, budget: Budget, ckpt: Checkpointer,
                  log: MetricsLog, device):
    """(alpha, optimizer, first step, init KL): resumed from the checkpoint, else fresh."""
    state = ckpt.load() if budget.resume else None
    if state is not None:
        alpha = torch.nn.Parameter(state["alpha"].to(device))
        opt = _optimizer(alpha, cfg)
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        log.truncate_after(state["step"] - 1)
        return alpha, opt, state["step"], state["init_kl"]
    alpha0, init_kl = _init_alpha(model, data, cfg, budget)
    alpha = torch.nn.Parameter(alpha0.to(device))
    log.clear_phase()
    log.write({"step": -1, "init_kl": None if init_kl is None else init_kl.tolist(),
               "alpha": alpha.detach().cpu().tolist()})
    return alpha, _optimizer(alpha, cfg), 0, init_kl


def _straight_through_step(model, ids, alpha, k: int, weight, cfg: E3Config, *, tau: float,
                           seed: int, offset: int, dist: DistContext = SINGLE):
    """One step of the straight-through estimator: (mask, mean KD loss)."""
    from e3kernels import gumbel_topk

    n = alpha.numel()
    rows = ids.shape[0] if cfg.per_sample else 1
    m = gumbel_topk(alpha[None].expand(rows, n), k, tau=tau, seed=seed, offset=offset)
    mask = dist.shard(m) if cfg.per_sample else m[0]
    with autocast(alpha.device, cfg.amp):
        hs, ht = student_and_teacher_hidden(model, dist.shard(ids), mask)
    out = kd_from_hidden(hs, weight, ht, amp=cfg.amp, weighting=cfg.weighting,
                         temperature=cfg.temperature, **kd_head_kwargs(model))
    out.loss.backward()
    dist.average_grads_([alpha])
    return m, dist.all_reduce_sum_(out.loss.detach().reshape(1)).item() / dist.world_size


def _search_step(model, data: PruneData, alpha, opt, step: int, steps: int, n_prune: int,
                 weight, cfg: E3Config, budget: Budget) -> dict:
    """One mask-search update of alpha; returns the step's metrics record."""
    n = alpha.numel()
    n_t = curriculum_pruned(step, steps, n_prune, cfg.curriculum)
    tau = exp_anneal(step, steps, cfg.tau_start, cfg.tau_end)
    ids = batch_at(data, step, budget.batch_size).to(alpha.device)
    opt.zero_grad(set_to_none=True)
    step_fn = _score_function_step if cfg.estimator == "score" else _straight_through_step
    extra = {} if cfg.estimator == "score" else {"tau": tau}
    m, loss = step_fn(model, ids, alpha, n - n_t, weight, cfg, seed=budget.seed, offset=step,
                      dist=budget.dist, **extra)
    hint = "Try --dtype float32, --amp none or a lower --search-lr."
    check_finite(loss, "mask search (KD loss)", step, hint)
    check_finite(float(alpha.grad.norm()), "mask search (gradient)", step, hint)
    if cfg.optimizer == "nsgd":
        alpha.grad /= alpha.grad.norm().clamp_min(1e-12)
    opt.step()
    probs = keep_probabilities(alpha, n - n_prune, cfg.mc_samples, seed=budget.seed + 7919,
                               offset=step)
    return {"step": step, "tokens": (step + 1) * budget.batch_size * data.blocks.block_len,
            "loss": loss, "tau": tau, "n_pruned": n_t,
            "mask": [int(x) for x in (m.detach().float().mean(0) > 0.5)],
            "alpha": alpha.detach().cpu().tolist(), "keep_prob": probs.cpu().tolist()}


@register("e3", config=E3Config, shared=("weighting", "amp"))
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config: E3Config | None = None) -> Selection:
    budget = budget or Budget()
    cfg = config or E3Config()
    cfg.validate()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    dist = budget.dist
    dist.check_divides(budget.batch_size, "batch_size")
    if data.blocks is None:
        raise ValueError("e3 needs training blocks (PruneData.blocks) for the mask search")
    device = next(model.parameters()).device
    tokens_per_step = budget.batch_size * data.blocks.block_len
    budget_steps = max(1, budget.search_tokens // tokens_per_step)
    polish = bool(cfg.polish_evals and cfg.polish_batches and cfg.polish_width)
    # The polish scores on the last `polish_batches` batches of the search budget, so the
    # search's Plackett-Luce phase gets the rest (at least one step) and the method reads
    # no more than search_tokens.
    reserved = min(cfg.polish_batches, budget_steps - 1) if polish else 0
    steps = budget_steps - reserved
    weight = lm_head(model).weight
    kd_head_kwargs(model)  # checked before the search starts
    run = budget.run_dir
    ckpt = Checkpointer(f"{run}/search_ckpt.pt" if run else None, budget.checkpoint_every,
                        write=dist.is_main)
    log = MetricsLog(f"{run}/metrics.jsonl" if run and dist.is_main else None, "search")

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    alpha, opt, start, init_kl = _start_search(model, data, cfg, budget, ckpt, log, device)
    bar = tqdm(total=steps, initial=start, desc="e3 mask search", unit="step",
               disable=not (budget.progress and dist.is_main))
    try:
        for step in range(start, steps):
            rec = _search_step(model, data, alpha, opt, step, steps, n_prune, weight, cfg, budget)
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tau=f"{rec['tau']:.2f}",
                            pruned=rec["n_pruned"])
            bar.update(1)
            if ckpt.due(step + 1, last=step + 1 == steps):
                ckpt.save({"step": step + 1, "alpha": alpha.detach().cpu(),
                           "optimizer": opt.state_dict(), "rng": rng_state(),
                           "init_kl": init_kl})
    finally:
        bar.close()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)

    final = alpha.detach().cpu()
    keep = sorted(torch.topk(final, n - n_prune).indices.tolist())
    info = {"config": asdict(cfg), "steps": steps,
            "init_kl": None if init_kl is None else init_kl.tolist()}
    tokens = budget_steps * tokens_per_step
    if polish:
        # Fresh batches when the budget has room for them, else the search's own last ones.
        first = steps if reserved else max(0, steps - cfg.polish_batches)
        ids = polish_blocks(data, first, budget.batch_size, max(reserved, 1))
        scorer = MaskKDScorer(model, ids, amp=cfg.amp, weighting=cfg.weighting,
                              temperature=cfg.temperature, batch_size=budget.batch_size)
        keep, info["polish"] = polish_mask(scorer, keep, final, cfg.polish_evals,
                                           cfg.polish_width, progress=budget.progress
                                           and dist.is_main)
    return Selection(keep=keep, num_layers=n, scores=final.tolist(), tokens=tokens, info=info)


def polish_blocks(data: PruneData, search_steps: int, batch_size: int,
                  batches: int) -> torch.Tensor:
    """[batches * batch_size, T] training blocks of the `batches` steps after the search's
    `search_steps`: the polish scores its swaps on data the search did not use."""
    return torch.cat([batch_at(data, search_steps + j, batch_size) for j in range(batches)])


def swap_candidates(keep: list[int], scores: torch.Tensor, width: int) -> list[tuple[int, int]]:
    """The `width` swaps (kept layer out, removed layer in) of `keep` whose two layers have
    the closest scores, closest first (ties by layer index, so the order is fixed)."""
    kept = set(keep)
    removed = [i for i in range(scores.numel()) if i not in kept]
    pairs = [(abs(float(scores[k]) - float(scores[r])), k, r) for k in keep for r in removed]
    return [(k, r) for _, k, r in sorted(pairs)[:width]]


def polish_mask(scorer: MaskKDScorer, keep: list[int], scores: torch.Tensor, evals: int,
                width: int, progress: bool = False) -> tuple[list[int], dict]:
    """First-improvement local search over swap moves of the hard mask `keep`, each scored
    by `scorer.loss` (exact, weights frozen); at most `evals` new masks are scored. Returns
    (the best keep found, a record of the moves and losses)."""
    keep = sorted(keep)
    start = best = scorer.loss(keep)
    first = scorer.evaluations  # (masks scored from here on are the polish's spending)
    moves = []
    bar = tqdm(total=evals, desc="e3 swap polish", unit="mask", disable=not progress)
    improved = True
    while improved and scorer.evaluations - first < evals:
        improved = False
        for k, r in swap_candidates(keep, scores, width):
            if scorer.evaluations - first >= evals:
                break
            cand = sorted((set(keep) - {k}) | {r})
            loss = scorer.loss(cand)
            bar.update(scorer.evaluations - first - bar.n)
            if loss < best:
                moves.append({"out": k, "in": r, "loss": loss})
                keep, best, improved = cand, loss, True
                bar.set_postfix(loss=f"{best:.4f}", swaps=len(moves))
                break
    bar.close()
    return keep, {"loss_before": start, "loss_after": best, "moves": moves,
                  "evaluations": scorer.evaluations - first, "tokens": scorer.tokens}
