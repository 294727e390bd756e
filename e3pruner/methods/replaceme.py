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

Attention sinks: in SmolLM-family models the block can create the massive activation of
the first token (|Y| ~ 24,000 against a median of ~110 on SmolLM2, 98% of sum |Y|^2). A
linear map cannot make it without leaking a 200x gain into every other token, and a map
fitted without those rows sends the sink token somewhere new (both far worse than plain
removal). So a row with |Y_i| > outlier_factor * median_batch |Y| is an outlier: its target
becomes Y_i = X_i (the block leaves it as plain removal does, h_{s+n} := h_s), and the
outlier rows are weighted by c = tr(X_n^T X_n) / tr(X_o^T X_o) so that together they
weigh as much as the normal rows (X_n, X_o: normal and outlier rows).
    "lstsq":  T = (X^T X + lam I)^{-1} X^T Y,  lam = ridge * tr(X^T X) / D, with
              X^T X = X_n^T X_n + c X_o^T X_o and X^T Y = X_n^T Y_n + c X_o^T X_o
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
    outlier_factor: float | None = 10.0  # |Y_i| above this times the batch median: a sink row

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge}")
        if self.cosine_steps < 1 or self.cosine_batch < 1 or not self.cosine_lr > 0:
            raise ValueError("need cosine_steps >= 1, cosine_batch >= 1 and cosine_lr > 0")
        if self.outlier_factor is not None and not (self.outlier_factor > 1
                                                    and math.isfinite(self.outlier_factor)):
            raise ValueError("outlier_factor must be a finite number > 1 (or None: no "
                             f"outlier rows), got {self.outlier_factor}")
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


def outlier_rows(y: torch.Tensor, factor: float | None) -> torch.Tensor:
    """[N] bool: rows of y [N, D] whose norm exceeds factor * the median row norm (massive
    activations such as attention sinks); none when factor is None."""
    norms = y.norm(dim=-1)
    if factor is None:
        return torch.zeros_like(norms, dtype=torch.bool)
    return norms > factor * norms.median()


@dataclass
class BlockSums:
    """Normal-equation sums of the fit, kept apart for the normal (n) and outlier (o) rows:
    xtx_n = X_n^T X_n, xty_n = X_n^T Y_n, xtx_o = X_o^T X_o [D, D] fp64, yty_n = sum Y_n^2,
    yty_o = sum Y_o^2 (the outliers' original targets), counts."""
    xtx_n: torch.Tensor
    xty_n: torch.Tensor
    xtx_o: torch.Tensor
    yty_n: float = 0.0
    yty_o: float = 0.0
    rows_n: int = 0
    rows_o: int = 0

    def outlier_weight(self) -> float:
        """c = tr(X_n^T X_n) / tr(X_o^T X_o): the outlier rows together weigh as the rest."""
        if self.rows_o == 0:
            return 0.0
        return float(torch.trace(self.xtx_n)) / max(float(torch.trace(self.xtx_o)), 1e-300)

    def system(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X^T X, X^T Y) of the fit: X_n^T X_n + c X_o^T X_o, X_n^T Y_n + c X_o^T X_o."""
        c = self.outlier_weight()
        return self.xtx_n + c * self.xtx_o, self.xty_n + c * self.xtx_o


@torch.no_grad()
def block_activations(model, sets: list[torch.Tensor], start: int, n_prune: int,
                      batch_size: int, keep_rows: bool, outlier_factor: float | None = None):
    """(BlockSums, X, Y [N, D] fp32 on the CPU or None) with X = M, the MLP output of layer
    start-1, and Y = h_{start+n} - h_start + M over every token; outlier rows (per batch,
    `outlier_rows`) get the target Y = X in the kept rows."""
    layers = decoder_layers(model)
    end = start + n_prune
    target = layers[end] if end < len(layers) else final_norm(model)
    box: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    sums = None
    xs, ys = [], []
    with (on_outputs([layers[start - 1].mlp], lambda _i, h: box.__setitem__("m", h)),
          on_inputs([layers[start], target], lambda i, h: box.__setitem__(("in", "out")[i], h)),
          gated(model, None)):
        for ids in _batches(sets, batch_size):
            final_hidden(model, ids.to(device))
            m = box["m"].reshape(-1, box["m"].shape[-1]).double()
            y = (box["out"].reshape(m.shape).double() - box["in"].reshape(m.shape).double()) + m
            out = outlier_rows(y, outlier_factor)
            mn, yn, mo = m[~out], y[~out], m[out]
            if sums is None:
                zero = torch.zeros(m.shape[1], m.shape[1], dtype=torch.float64, device=m.device)
                sums = BlockSums(zero, zero.clone(), zero.clone())
            sums.xtx_n += mn.T @ mn
            sums.xty_n += mn.T @ yn
            sums.xtx_o += mo.T @ mo
            sums.yty_n += float((yn * yn).sum())
            sums.yty_o += float((y[out] ** 2).sum())
            sums.rows_n += int(mn.shape[0])
            sums.rows_o += int(mo.shape[0])
            if keep_rows:
                y[out] = m[out]
                xs.append(m.float().cpu())
                ys.append(y.float().cpu())
    rows = (torch.cat(xs), torch.cat(ys)) if keep_rows else (None, None)
    return sums, *rows


def _check_family(layer) -> None:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear):
        raise ValueError("replaceme folds its map into layer.mlp.down_proj: this model's "
                         "decoder layers have none")
    if mlp.down_proj.bias is not None or hasattr(layer, "post_feedforward_layernorm"):
        raise ValueError("replaceme needs the MLP output added to the residual as is (no "
                         "down_proj bias, no post-feedforward norm, as in Llama/Qwen/Mistral)")


def _fit_quality(sums: BlockSums, t: torch.Tensor) -> dict:
    """Relative squared error ||X_n T - Y_n||^2 / ||Y_n||^2 on the normal rows, of T and of
    T = I (plain removal), and the outlier rows (count, share of the original sum |Y|^2)."""
    def err(tt):
        return float((sums.yty_n - 2 * torch.trace(tt.T @ sums.xty_n)
                      + torch.trace(tt.T @ sums.xtx_n @ tt)) / max(sums.yty_n, 1e-300))

    eye = torch.eye(sums.xtx_n.shape[0], dtype=torch.float64, device=sums.xtx_n.device)
    return {"rel_sq_error": err(t.to(sums.xtx_n.device)), "rel_sq_error_identity": err(eye),
            "outlier_rows": sums.rows_o, "rows": sums.rows_n + sums.rows_o,
            "outlier_share_of_y2": sums.yty_o / max(sums.yty_n + sums.yty_o, 1e-300),
            "outlier_weight": sums.outlier_weight()}


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
        sums, x, y = block_activations(model, sets, start, n_prune, budget.batch_size,
                                       keep_rows=cfg.objective == "cosine",
                                       outlier_factor=cfg.outlier_factor)
    xtx, xty = sums.system()
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
    info["fit"] = _fit_quality(sums, t)
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
