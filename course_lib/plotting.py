"""Figures the notebooks share: 2D sample panels, image grids, quality-versus-NFE curves, trajectories."""
from __future__ import annotations

from typing import Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

LIM_2D = 3.2  # axis half-width that frames every 2D dataset of the course


def scatter(ax, x: Tensor, title: str = "", s: float = 1.0, color: str = "C0", alpha: float = 0.5, lim: float = LIM_2D):
    x = x.detach().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=s, c=color, alpha=alpha, linewidths=0)
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
    ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def sample_panels(rows: dict[str, dict[str, Tensor]], size: float = 1.6, lim: float = LIM_2D):
    """A grid of 2D scatter plots: rows[row_label][column_label] = samples (N, 2)."""
    row_labels = list(rows)
    col_labels = list(rows[row_labels[0]])
    fig, axes = plt.subplots(len(row_labels), len(col_labels), figsize=(size * len(col_labels), size * len(row_labels)),
                             squeeze=False)
    for i, r in enumerate(row_labels):
        for j, c in enumerate(col_labels):
            scatter(axes[i, j], rows[r][c], title=c if i == 0 else "", lim=lim)
        axes[i, 0].set_ylabel(r, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid(x: Tensor, nrow: int = 8, ax=None, title: str = ""):
    """Show images (N, C, H, W) in [-1, 1] as one grid."""
    import torchvision

    grid = torchvision.utils.make_grid(((x.detach().cpu() + 1) / 2).clamp(0, 1), nrow=nrow, padding=1, pad_value=1.0)
    if ax is None:
        _, ax = plt.subplots(figsize=(nrow * 0.5, (len(x) + nrow - 1) // nrow * 0.5))
    img = grid.permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if img.shape[-1] == 1 or np.allclose(img[..., 0], img[..., 1]) else img, cmap="gray",
              vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def nfe_curves(curves: dict[str, tuple[Sequence[int], Sequence[float | tuple[float, float]]]],
               floor: float | tuple[float, float] | None = None, ylabel: str = "sliced Wasserstein distance",
               title: str = "", ax=None, floor_label: str = "data floor", logy: bool = True):
    """Quality against NFE (log2 x axis), one line per label, with an optional horizontal floor.

    Values may be plain floats or (mean, std) pairs over evaluation seeds (`metrics.spread`): pairs are drawn with
    error bars of one std, and a (mean, std) floor as a line with a shaded band of one std. logy=False for
    metrics in [0, 1] (precision, recall)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.4))
    for label, (nfes, values) in curves.items():
        mean, std = _mean_std(values)
        if std is None:
            ax.plot(nfes, mean, marker="o", ms=3, label=label)
        else:
            ax.errorbar(nfes, mean, yerr=std, marker="o", ms=3, capsize=2, label=label)
    if floor is not None:
        if isinstance(floor, tuple):
            ax.axhspan(floor[0] - floor[1], floor[0] + floor[1], color="k", alpha=0.12, lw=0)
            floor = floor[0]
        ax.axhline(floor, color="k", ls="--", lw=1, label=floor_label)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)"), ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def _mean_std(values: Sequence) -> tuple[list[float], list[float] | None]:
    """Split a list of floats or of (mean, std) pairs into means and stds (None for plain floats)."""
    values = list(values)
    if values and all(isinstance(v, tuple) for v in values):
        return [float(m) for m, _ in values], [float(s) for _, s in values]
    return [float(v) for v in values], None


def trajectories(ax, path: Tensor, n_show: int = 60, color: str = "C1", lw: float = 0.6, lim: float = LIM_2D):
    """Draw sampler trajectories path (n+1, B, 2): grey lines, start points small, end points dark."""
    p = path[:, :n_show].detach().cpu().numpy()
    for k in range(p.shape[1]):
        ax.plot(p[:, k, 0], p[:, k, 1], color=color, lw=lw, alpha=0.7)
    ax.scatter(p[0, :, 0], p[0, :, 1], s=4, c="0.6")
    ax.scatter(p[-1, :, 0], p[-1, :, 1], s=6, c="k")
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
    ax.set_xticks([]), ax.set_yticks([])
    return ax


def table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """A plain-text table of dict rows (for notebooks and benchmark output); (mean, std) pairs print as
    "mean ± std"."""
    rows = list(rows)
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def pm(mean: float, std: float | None, digits: int = 3) -> str:
    """"mean ± std" with the mean to `digits` significant digits and the std to 1 or 2: how the course prints a
    measurement repeated over evaluation seeds (`metrics.spread`); the mean alone when std is None."""
    return f"{mean:.{digits}g}" if std is None else f"{mean:.{digits}g} ± {std:.2g}"


def _fmt(v) -> str:
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(u, float) for u in v):
        return pm(*v)           # a (mean, std) pair from metrics.spread
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
