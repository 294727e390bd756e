"""CLP: a differentiable gate over ONE contiguous segment of n layers, learned by KD.

The segment is parameterized by a continuous start a (its end b = a + n: width held at
n). Layer l occupies [l, l + 1) with centre c_l = l + 0.5; at temperature T

    r_l(a, T) = sigmoid((c_l - a) / T) * sigmoid((a + n - c_l) / T)     (soft box on [a, a + n])
    g_l(a, T) = clamp(1 - n * r_l / sum_k r_k, 0, 1)                    gates [L]

g_l ~ 0 for layers whose centre lies inside [a, a + n], ~1 outside; as T -> 0, r tends to
the hard box, sum_k r_k -> n, and g to the hard mask removing [round(a), round(a) + n).
The normalization holds the removed mass sum_l (1 - g_l) at n (the width constraint, made
exact at every T): without it the soft box leaks past layer 0 or layer L-1 and the search
learns to slide the segment against an end of the stack just to gate off less (seen on
the tiny test models from T = 1 up). The clamp only acts at moderate T, where n r_l / sum r
can exceed 1 by a few percent. Every decoder layer runs as the gated residual
h <- h + g_l (f_l(h) - h) (gates.py).

Search (weights frozen, no weight gradient): each step takes a [B, T_blk] batch of the
free training blocks, computes the teacher (same model, all gates on, no grad) and the
gated student, and minimizes the mean per-token

    KL(p_teacher || p_student)       (fused_linear_kd_loss, weighting="none" by default)

with Adam on a (learning rate cosine-decayed from `lr` to lr/10); after every step a is
projected onto [0, L - n]. T anneals exponentially t_start -> t_end (train.exp_anneal):
early, the wide soft window smooths the loss over a so the segment can travel; late, the
gates are nearly binary and the loss is that of the hard segment.
Steps = max(min_steps, search_tokens // (batch_size * block_len)).

Init of a ("init"): "angular" (the argmin start of the angular distance, angular_distance.py: one
cheap forward over the calibration set), "middle" ((L - n) / 2), or a number (a start in
[0, L - n], e.g. to test that the search finds the segment on its own). No restarts.

Final: of the two integer starts around a (floor and ceil, clipped to [0, L - n]) the one
whose hard segment has the lower KL on the calibration blocks (the soft optimum settles a
fraction of a layer off the integer, so rounding alone can pick the wrong neighbour);
removed = [start, start + n).
scores = g_l(a_final, t_end) (higher = kept); info has the trajectory of a, T and the loss.
Recovery: registered with scope "endpoints" (cutoff endpoint tuning: only the kept layers
adjacent to the cut are trained, recovery.distill.endpoint_layers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from e3pruner.amp import autocast
from e3pruner.angular_distance import angular_distances, last_token_states
from e3pruner.data import batch_at
from e3pruner.losses import kd_from_hidden
from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_n_prune,
    preserved_model_state,
    register,
)
from e3pruner.models.activations import final_hidden
from e3pruner.models.families import decoder_layers, kd_head_kwargs, lm_head
from e3pruner.models.gates import gated
from e3pruner.train import MetricsLog, cosine_lr, exp_anneal


@dataclass
class CLPConfig:
    lr: float = 0.5  # Adam on a (units: layers per step at most, roughly)
    min_steps: int = 20
    t_start: float = 2.0
    t_end: float = 0.05
    init: str | float = "angular"  # "angular", "middle", or a start in [0, L - n]
    weighting: str = "none"  # KD token weighting (fused_linear_kd_loss)
    temperature: float = 1.0  # KD softmax temperature
    amp: str | None = None  # "bf16": autocast the frozen model's forward/backward

    def __post_init__(self):
        if self.lr <= 0 or self.min_steps < 1:
            raise ValueError(f"need lr > 0 and min_steps >= 1, got {self.lr}, {self.min_steps}")
        if not 0 < self.t_end <= self.t_start:
            raise ValueError(f"need 0 < t_end <= t_start, got {self.t_end}, {self.t_start}")
        if isinstance(self.init, str) and self.init not in ("angular", "middle"):
            raise ValueError(f"init must be 'angular', 'middle' or a number, got {self.init!r}")


def segment_gates(a: torch.Tensor, n: int, num_layers: int, t: float) -> torch.Tensor:
    """g [L] = clamp(1 - n r / sum(r), 0, 1), r_l = sigmoid((c_l - a)/t) sigmoid((a + n - c_l)/t),
    c_l = l + 0.5; differentiable in the 0-d tensor a."""
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    if not 1 <= n <= num_layers:
        raise ValueError(f"segment width must be in [1, {num_layers}], got {n}")
    c = torch.arange(num_layers, device=a.device, dtype=torch.float32) + 0.5
    a = a.float()
    r = torch.sigmoid((c - a) / t) * torch.sigmoid((a + n - c) / t)
    return (1 - r * (n / r.sum().clamp_min(1e-12))).clamp(0.0, 1.0)


def initial_start(model, data: PruneData, n_prune: int, cfg: CLPConfig, batch_size: int):
    """(a_0, angular distances or None) for cfg.init."""
    n = len(decoder_layers(model))
    if cfg.init == "angular":
        d = angular_distances(last_token_states(model, data.calib, batch_size), n_prune)
        return float(torch.argmin(d)), d.tolist()
    if cfg.init == "middle":
        return (n - n_prune) / 2, None
    a0 = float(cfg.init)
    if not 0 <= a0 <= n - n_prune:
        raise ValueError(f"init start must be in [0, {n - n_prune}], got {a0}")
    return a0, None


def kd_loss(hs, ht, weight, cfg: CLPConfig, head: dict | None = None) -> torch.Tensor:
    """Mean per-token KD loss of student hidden `hs` against teacher hidden `ht`; `head`: the
    head's transform (families.kd_head_kwargs)."""
    return kd_from_hidden(hs, weight, ht, amp=cfg.amp, weighting=cfg.weighting,
                          temperature=cfg.temperature, **(head or {})).loss


@torch.no_grad()
def hard_segment_kl(model, calib: torch.Tensor, start: int, n_prune: int, weight, cfg,
                    batch_size: int) -> float:
    """Mean per-token KL(teacher || model without layers [start, start + n_prune))."""
    n = len(decoder_layers(model))
    mask = torch.ones(n, device=weight.device)
    mask[start:start + n_prune] = 0
    total, count = 0.0, 0
    for i in range(0, calib.shape[0], batch_size):
        ids = calib[i:i + batch_size].to(weight.device)
        with autocast(weight.device, cfg.amp):
            with gated(model, None):
                ht = final_hidden(model, ids)
            with gated(model, mask):
                hs = final_hidden(model, ids)
        total += kd_loss(hs, ht, weight, cfg, kd_head_kwargs(model)).item() * ids.numel()
        count += ids.numel()
    return total / count


@register("clp", config=CLPConfig, shared=("amp",), recovery={"scope": "endpoints"})
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config: CLPConfig | None = None) -> Selection:
    budget = budget or Budget()
    cfg = config or CLPConfig()
    n = len(decoder_layers(model))
    check_n_prune(n_prune, n)
    if data.blocks is None:
        raise ValueError("clp needs training blocks (PruneData.blocks) for the segment search")
    device = next(model.parameters()).device
    tokens_per_step = budget.batch_size * data.blocks.block_len
    steps = max(cfg.min_steps, budget.search_tokens // tokens_per_step)
    weight, head = lm_head(model).weight, kd_head_kwargs(model)
    hi = float(n - n_prune)
    log = MetricsLog(f"{budget.run_dir}/metrics.jsonl" if budget.run_dir else None, "search")
    log.clear_phase()

    traj = {"a": [], "T": [], "loss": []}
    with preserved_model_state(model):
        for p in model.parameters():
            p.requires_grad_(False)
        a0, dist = initial_start(model, data, n_prune, cfg, budget.batch_size)
        a = torch.nn.Parameter(torch.tensor(a0, device=device))
        opt = torch.optim.Adam([a], lr=cfg.lr)
        bar = tqdm(range(steps), desc="clp segment search", unit="step",
                   disable=not budget.progress)
        for step in bar:
            t = exp_anneal(step, steps, cfg.t_start, cfg.t_end)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, cfg.lr, warmup=0, floor=0.1)
            ids = batch_at(data, step, budget.batch_size).to(device)
            with torch.no_grad(), autocast(device, cfg.amp), gated(model, None):
                ht = final_hidden(model, ids)
            mask = segment_gates(a, n_prune, n, t)
            with autocast(device, cfg.amp), gated(model, mask):
                hs = final_hidden(model, ids)
            loss = kd_loss(hs, ht, weight, cfg, head)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                a.clamp_(0.0, hi)
            rec = {"step": step, "tokens": (step + 1) * tokens_per_step, "loss": loss.item(),
                   "T": t, "a": a.item()}
            log.write(rec)
            for k in traj:
                traj[k].append(rec[k])
            bar.set_postfix(loss=f"{rec['loss']:.4f}", a=f"{rec['a']:.2f}", T=f"{t:.2f}")
        final = a.detach().cpu()
        candidates = sorted({min(max(int(torch.floor(final)), 0), n - n_prune),
                             min(max(int(torch.ceil(final)), 0), n - n_prune)})
        hard = {c: hard_segment_kl(model, data.calib, c, n_prune, weight, cfg,
                                   budget.batch_size) for c in candidates}
    start = min(candidates, key=lambda c: (hard[c], abs(c - float(final))))
    keep = [i for i in range(n) if not start <= i < start + n_prune]
    scores = segment_gates(final, n_prune, n, cfg.t_end).tolist()
    return Selection(keep=keep, num_layers=n, scores=scores, tokens=steps * tokens_per_step,
                     info={"config": asdict(cfg), "steps": steps, "start": start, "a_init": a0,
                           "segment": [start, start + n_prune],
                           "hard_kl_of_neighbour_starts": {str(c): v for c, v in hard.items()},
                           "a_final": float(final), "angular_distances": dist,
                           "trajectory": traj})
