"""ReplaceMe (Shopkhoev et al., NeurIPS 2025, arXiv:2505.02819; code mts-ai/ReplaceMe):
training-free depth pruning. A contiguous block of n layers is replaced by one linear map T
[D, D], folded into the MLP down-projection of the layer before the block, so the pruned
model is an ordinary checkpoint with the original shapes.

Block: the start s in [1, L - n] (a layer s-1 must exist to absorb T) with the least angular
distance between the last-token inputs of layers s and s + n, on the calibration blocks
(as the reference code: `compute_block_distances` on the last non-padded token)

    d(s, n) = mean_b arccos(clamp(cos(h_s[b, -1], h_{s+n}[b, -1]), -1, 1)) / pi
    s* = argmin_{s >= 1} d(s, n)  (ties: lowest s);   removed = [s*, s* + n)

h_l is the input of layer l (h_L: the final hidden state before the norm).
Fit, on every token of the calibration blocks: layer s-1 computes h_s = r + M with
r = h_{s-1} + attn(...) the residual after attention and M = mlp(norm(r)) [N, D] its MLP
output. After the cut, layer s-1 returns r + M T, which should be h_{s+n}:

    X = M,   Y = h_{s+n} - h_s + M   (= h_{s+n} - r)
    "lstsq":  T = (X^T X + lam I)^{-1} X^T Y,  lam = ridge * tr(X^T X) / D
              (fp64 normal equations summed over batches; the reference uses lam = 0)
    "cosine": T = argmin_T 1 - mean_rows cos(X T, Y), Adam from T = I (or from the lstsq
              solution), minibatches of rows (the reference's default, `accurate=False`)

Fold: M T = a W^T T = a (T^T W)^T for the down-projection W [D, I], so W <- T^T W (fp64,
then the weight's dtype). The model passed in is not modified: the new W is returned in
`info["weight_updates"]` (models/weight_updates.py; a safetensors file in the run directory
when there is one) and applied to the physically pruned student.

Calibration: `data.calib` plus the first search_tokens // T free training blocks (the
method's search budget), for both the distance and the fit. Cost: 2 F, no gradients (the
cosine fit: `cosine_steps` Adam steps on [batch, D] x [D, D]).
Families: those whose MLP output is added to the residual as is (Llama, Mistral, Qwen2/3);
a post-feedforward norm (Gemma) would make the fold inexact and is refused.
scores[i] = min { d(s, n) : s <= i < s + n, s >= 1 } (1.0, the largest distance, for layer 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from e3pruner.angular_distance import angular_distances, last_token_states
from e3pruner.methods.base import (
    Budget,
    PruneData,
    Selection,
    check_n_prune,
    preserved_model_state,
    register,
)
from e3pruner.models.activations import final_hidden, on_inputs, on_outputs
from e3pruner.models.families import decoder_layers, final_norm, get_adapter
from e3pruner.models.gates import gated
from e3pruner.models.weight_updates import save_weight_updates

OBJECTIVES = ("lstsq", "cosine")
FOLD_FILE = "replaceme_fold.safetensors"


@dataclass
class ReplaceMeConfig:
    objective: str = "lstsq"  # "lstsq" or "cosine"
    ridge: float = 1e-6  # lam = ridge * tr(X^T X) / D
    cosine_steps: int = 500
    cosine_lr: float = 1e-3
    cosine_batch: int = 1024  # rows (tokens) per Adam step
    cosine_init: str = "identity"  # "identity" (the paper) or "lstsq"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge}")
        if self.cosine_steps < 1 or self.cosine_batch < 1 or not self.cosine_lr > 0:
            raise ValueError("need cosine_steps >= 1, cosine_batch >= 1 and cosine_lr > 0")
        if self.cosine_init not in ("identity", "lstsq"):
            raise ValueError(f"cosine_init must be 'identity' or 'lstsq', got {self.cosine_init!r}")


def solve_lstsq(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """T [D, D] = (X^T X + lam I)^{-1} X^T Y in fp64, lam = ridge * tr(X^T X) / D, from the
    normal-equation sums xtx = X^T X [D, D] and xty = X^T Y [D, D]."""
    xtx, xty = xtx.double(), xty.double()
    d = xtx.shape[0]
    lam = ridge * float(torch.diagonal(xtx).sum()) / d
    try:
        return torch.linalg.solve(xtx + lam * torch.eye(d, dtype=xtx.dtype, device=xtx.device),
                                  xty)
    except RuntimeError as err:  # singular: fewer independent tokens than D and no ridge
        raise ValueError("the least-squares system is singular (too few calibration tokens "
                         "for the hidden size?): use more calibration data or ridge > 0") from err


def lstsq_fit(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """T [D, D] minimizing ||X T - Y||^2 + lam ||T||^2 for X, Y [N, D] (fp64)."""
    x, y = x.double(), y.double()
    return solve_lstsq(x.T @ x, x.T @ y, ridge)


def cosine_loss(xt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - mean over rows of cos(xt, y) for [N, D] rows."""
    return 1 - torch.nn.functional.cosine_similarity(xt, y, dim=-1).mean()


def cosine_fit(x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, steps: int, lr: float,
               batch: int, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """(T [D, D] fp64, loss per step): Adam on cosine_loss(X T, Y) from `init`, each step on
    `batch` rows drawn without replacement (a seeded permutation per pass over the rows)."""
    g = torch.Generator().manual_seed(seed)
    x, y = x.float(), y.float()
    t = torch.nn.Parameter(init.float().clone())
    opt = torch.optim.Adam([t], lr=lr)
    order, pos, losses = torch.randperm(x.shape[0], generator=g), 0, []
    for _ in range(steps):
        if pos >= x.shape[0]:
            order, pos = torch.randperm(x.shape[0], generator=g), 0
        rows = order[pos:pos + batch].to(x.device)
        pos += batch
        loss = cosine_loss(x[rows] @ t, y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return t.detach().double(), losses


def fold_into_down_proj(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """W' = T^T W [D, I] (fp64, returned in W's dtype): the MLP output a W'^T = (a W^T) T."""
    return (t.double().T @ weight.double()).to(weight.dtype)


def calibration_sets(data: PruneData, search_tokens: int) -> list[torch.Tensor]:
    """[data.calib] plus the first search_tokens // T free training blocks, when there are."""
    sets = [data.calib]
    if data.blocks is not None:
        free = len(data.blocks) - data.train_start
        extra = min(free, search_tokens // data.blocks.block_len)
        if extra > 0:
            sets.append(data.blocks.take(extra, data.train_start))
    return sets


def _batches(sets: list[torch.Tensor], batch_size: int):
    for ids in sets:
        for i in range(0, ids.shape[0], batch_size):
            yield ids[i:i + batch_size]


def block_distances(model, sets: list[torch.Tensor], n_prune: int, batch_size: int) -> torch.Tensor:
    """d [L - n + 1] (d[s] for every start s; s = 0 is not a ReplaceMe candidate)."""
    states = torch.cat([last_token_states(model, ids, batch_size) for ids in sets], 1)
    return angular_distances(states, n_prune)


@torch.no_grad()
def block_activations(model, sets: list[torch.Tensor], start: int, n_prune: int,
                      batch_size: int, keep_rows: bool):
    """(X^T X, X^T Y [D, D] fp64, sum Y^2, X, Y [N, D] fp32 on the CPU or None) with X = M,
    the MLP output of layer start-1, and Y = h_{start+n} - h_start + M, over every token."""
    layers = decoder_layers(model)
    end = start + n_prune
    target = layers[end] if end < len(layers) else final_norm(model)
    box: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    xtx = xty = None
    yty = 0.0
    xs, ys = [], []
    with (on_outputs([layers[start - 1].mlp], lambda _i, h: box.__setitem__("m", h)),
          on_inputs([layers[start], target], lambda i, h: box.__setitem__(("in", "out")[i], h)),
          gated(model, None)):
        for ids in _batches(sets, batch_size):
            final_hidden(model, ids.to(device))
            m = box["m"].reshape(-1, box["m"].shape[-1]).double()
            y = (box["out"].reshape(m.shape).double() - box["in"].reshape(m.shape).double()) + m
            xtx = m.T @ m if xtx is None else xtx + m.T @ m
            xty = m.T @ y if xty is None else xty + m.T @ y
            yty += float((y * y).sum())
            if keep_rows:
                xs.append(m.float().cpu())
                ys.append(y.float().cpu())
    rows = (torch.cat(xs), torch.cat(ys)) if keep_rows else (None, None)
    return xtx, xty, yty, *rows


def _check_family(layer) -> None:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear):
        raise ValueError("replaceme folds its map into layer.mlp.down_proj: this model's "
                         "decoder layers have none")
    if mlp.down_proj.bias is not None or hasattr(layer, "post_feedforward_layernorm"):
        raise ValueError("replaceme needs the MLP output added to the residual as is (no "
                         "down_proj bias, no post-feedforward norm, as in Llama/Qwen/Mistral)")


def _fit_quality(xtx, xty, yty, t) -> dict:
    """Relative squared error ||X T - Y||^2 / ||Y||^2 of T and of T = I (plain removal)."""
    def err(tt):
        return float((yty - 2 * torch.trace(tt.T @ xty) + torch.trace(tt.T @ xtx @ tt)) / yty)

    eye = torch.eye(xtx.shape[0], dtype=torch.float64, device=xtx.device)
    return {"rel_sq_error": err(t.to(xtx.device)), "rel_sq_error_identity": err(eye)}


def _select(model, data: PruneData, n_prune: int, budget: Budget | None,
            cfg: ReplaceMeConfig) -> Selection:
    budget = budget or Budget()
    layers = decoder_layers(model)
    n = len(layers)
    check_n_prune(n_prune, n)
    _check_family(layers[0])
    sets = calibration_sets(data, budget.search_tokens)
    with preserved_model_state(model):
        d = block_distances(model, sets, n_prune, budget.batch_size)
        start = 1 + int(torch.argmin(d[1:]))  # first minimum: the lowest start on ties
        xtx, xty, yty, x, y = block_activations(model, sets, start, n_prune,
                                                budget.batch_size,
                                                keep_rows=cfg.objective == "cosine")
    info = {"config": asdict(cfg), "start": start, "segment": [start, start + n_prune],
            "fold_layer": start - 1, "distances": d.tolist()}
    if cfg.objective == "cosine":
        device = xtx.device
        x, y = x.to(device), y.to(device)
        init = (solve_lstsq(xtx, xty, cfg.ridge) if cfg.cosine_init == "lstsq" else
                torch.eye(xtx.shape[0], dtype=torch.float64, device=device))
        t, losses = cosine_fit(x, y, init, cfg.cosine_steps, cfg.cosine_lr, cfg.cosine_batch,
                               budget.seed)
        info["cosine_loss"] = {"first_step": losses[0], "last_step": losses[-1],
                               "identity": float(cosine_loss(x, y)),
                               "fitted": float(cosine_loss(x @ t.float(), y))}
    else:
        t = solve_lstsq(xtx, xty, cfg.ridge)
    info["fit"] = _fit_quality(xtx, xty, yty, t)
    weight = layers[start - 1].mlp.down_proj.weight
    name = f"{get_adapter(model).layers_path}.{start - 1}.mlp.down_proj.weight"
    updates = {name: fold_into_down_proj(weight.detach(), t.to(weight.device))}
    if budget.run_dir is not None:
        updates = save_weight_updates(updates, Path(budget.run_dir) / FOLD_FILE)
    info["weight_updates"] = updates
    keep = [i for i in range(n) if not start <= i < start + n_prune]
    scores = [1.0 if i == 0 else min(float(d[s]) for s in range(max(1, i - n_prune + 1),
                                                                 min(i, n - n_prune) + 1))
              for i in range(n)]
    return Selection(keep=keep, num_layers=n, scores=scores, info=info,
                     tokens=sum(int(s.numel()) for s in sets))


@register("replaceme")
def select(model, data: PruneData, n_prune: int, budget: Budget | None = None,
           config: ReplaceMeConfig | None = None) -> Selection:
    return _select(model, data, n_prune, budget, config or ReplaceMeConfig())


@register("replaceme-cosine")
def select_cosine(model, data: PruneData, n_prune: int, budget: Budget | None = None,
                  config: ReplaceMeConfig | None = None) -> Selection:
    return _select(model, data, n_prune, budget, config or ReplaceMeConfig(objective="cosine"))
