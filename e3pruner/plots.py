"""PNG plots of a pruning run (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_mask_probabilities(records: list[dict], removed: list[int], path: str | Path) -> Path:
    """Heatmap of P(layer kept) per search step (rows: layers, columns: steps)."""
    recs = [r for r in records if r.get("phase") == "search" and "keep_prob" in r]
    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if recs:
        probs = np.array([r["keep_prob"] for r in recs]).T
        im = ax.imshow(probs, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                       extent=(0, len(recs), -0.5, probs.shape[0] - 0.5), interpolation="nearest")
        fig.colorbar(im, ax=ax, label="P(layer kept)")
        for layer in removed:
            ax.annotate("x", (len(recs), layer), xytext=(3, 0), textcoords="offset points",
                        va="center", color="crimson", fontsize=8, annotation_clip=False)
    ax.set_xlabel("search step")
    ax.set_ylabel("layer")
    ax.set_title("E3 mask search: keep probability per layer (x = removed at the end)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_importance(scores: dict[str, list[float]], removed: dict[str, list[int]],
                          path: str | Path) -> Path:
    """One bar panel per score (standardized), removed layers in red."""
    path = Path(path)
    names = [k for k, v in scores.items() if v]
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.2 * max(1, len(names))), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        v = np.asarray(scores[name], dtype=float)
        rm = set(removed.get(name, []))
        colors = ["crimson" if i in rm else "steelblue" for i in range(len(v))]
        ax.bar(np.arange(len(v)), v, color=colors)
        ax.set_ylabel(name, fontsize=8)
        ax.set_xticks(np.arange(len(v)))
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("layer (red = removed by that method)")
    fig.suptitle("Per-layer importance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(y: list[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), [len(y)]."""
    c = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss(records: list[dict], path: str | Path) -> Path:
    """Search KD loss and recovery loss per step (thin) with a moving average (thick); when
    the recovery has a cross-entropy term, its KD part and its CE (right axis) separately."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, phase in zip(axes, ("search", "recovery")):
        r = [x for x in records if x.get("phase") == phase and "loss" in x]
        key = "kd" if r and all("kd" in x for x in r) else "loss"
        ax.set_title(f"{phase} KD loss" + (" (+ CE, right axis)" if key == "kd" else ""))
        ax.set_xlabel("tokens")
        if not r:
            continue
        t = [x["tokens"] for x in r]
        w = max(1, len(r) // 20)
        ax.plot(t, [x[key] for x in r], lw=0.6, alpha=0.35, color="C0")
        ax.plot(t, _smooth([x[key] for x in r], w), lw=1.8, color="C0",
                label=f"KD, {w}-step mean")
        if key == "kd":
            ax2 = ax.twinx()
            ax2.plot(t, _smooth([x["ce"] for x in r], w), lw=1.8, color="C1",
                     label=f"CE, {w}-step mean")
            ax2.set_ylabel("next-token CE (nats)", color="C1")
            lines = ax.get_lines()[1:] + ax2.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def removed_share(removed: list[int] | list[list[int]], num_layers: int) -> np.ndarray:
    """[num_layers] share of the runs that removed each layer: `removed` is one run's
    layers or a list of runs' layer lists (e.g. one per seed)."""
    runs = removed if removed and isinstance(removed[0], (list, tuple)) else [removed]
    share = np.zeros(num_layers)
    for layers in runs:
        share[list(layers)] += 1.0 / len(runs)
    return share


def plot_removed_layers(removed: dict[str, list[int] | list[list[int]]], num_layers: int,
                        path: str | Path, title: str = "removed layers per method") -> Path:
    """Grid: one row per method, one column per layer, shaded by the share of runs (seeds)
    that removed the layer (full: every run)."""
    path = Path(path)
    names = list(removed)
    grid = np.zeros((max(1, len(names)), num_layers))
    for row, name in enumerate(names):
        grid[row] = removed_share(removed[name], num_layers)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * num_layers + 2), 0.45 * len(names) + 1.6))
    ax.imshow(grid, aspect="auto", cmap="Reds", vmin=0, vmax=1.25, interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(num_layers), [str(i) if i % 2 == 0 else "" for i in range(num_layers)])
    ax.set_xticks(np.arange(-0.5, num_layers), minor=True)
    ax.set_yticks(np.arange(-0.5, len(names)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("layer (filled = removed; lighter = removed by fewer seeds)"
                  if (grid % 1).any() else "layer (filled = removed)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
