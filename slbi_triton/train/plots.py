"""Figures of a training run: the regularisation path and the sparsity of the network.

Built on :class:`matplotlib.figure.Figure` with the Agg canvas, never on ``pyplot``: no
display, no global figure state, safe to call from tests and headless machines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

__all__ = ["FilterPath", "plot_path", "plot_sparsity"]

SELECTED_COLOR = "tab:red"
UNSELECTED_COLOR = "tab:blue"
SGD_COLOR = "0.45"


@dataclass
class FilterPath:
    """Per-epoch norms of every filter of one layer (the data of one ``path.png`` panel).

    Attributes:
        label: panel title, e.g. ``"SLBI"``.
        epochs: the epochs of the rows (0 = the initial weights).
        norms: float tensor (epochs, filters): ‖W_g‖₂ of each filter.
        selected: bool tensor (epochs, filters), whether Γ had selected the filter, or
            ``None`` for an optimizer without Γ (SGD).
    """

    label: str
    epochs: list[int]
    norms: torch.Tensor
    selected: torch.Tensor | None = None


def _draw_path(ax: Axes, path: FilterPath, layer: str) -> None:
    epochs = np.asarray(path.epochs, dtype=float)
    norms = path.norms.float().numpy()
    filters = norms.shape[1]
    # One segment per filter and pair of consecutive epochs, coloured by the later epoch.
    starts = np.stack([np.repeat(epochs[:-1], filters), norms[:-1].reshape(-1)], axis=1)
    ends = np.stack([np.repeat(epochs[1:], filters), norms[1:].reshape(-1)], axis=1)
    segments = np.stack([starts, ends], axis=1)
    if path.selected is None:
        colors: list[str] | str = SGD_COLOR
        title = f"{path.label}: {filters} filters of {layer}"
    else:
        chosen = path.selected[1:].reshape(-1).numpy()
        colors = [SELECTED_COLOR if on else UNSELECTED_COLOR for on in chosen]
        in_support = int(path.selected[-1].sum())
        title = f"{path.label}: {filters} filters of {layer}, {in_support} selected at the end"
    ax.add_collection(LineCollection(segments, colors=colors, linewidths=0.8, alpha=0.75))
    ax.set_xlim(epochs[0], epochs[-1] if len(epochs) > 1 else epochs[0] + 1)
    ax.set_ylim(0.0, max(float(norms.max()), 1e-6) * 1.05)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_path(out: str | Path, layer: str, slbi: FilterPath, others: Sequence[FilterPath] = ()) -> Path:
    """Draw the regularisation path of one layer: each filter's ‖W_g‖₂ over the epochs,
    red while Γ has selected the filter (Γ_g ≠ 0), blue while not; other optimizers'
    filters (e.g. SGD) in grey in panels beside it, on the same scale.

    Args:
        out: the PNG file to write.
        layer: the layer's name, for the titles.
        slbi: the SLBI path (``selected`` set).
        others: paths of other optimizers on the same layer (``selected`` ``None``).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.
    """
    panels = [slbi, *others]
    fig = Figure(figsize=(6.0 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, path in zip(axes, panels, strict=True):
        _draw_path(ax, path, layer)
    axes[0].set_ylabel("filter norm ‖W_g‖₂")
    axes[0].legend(
        handles=[
            Line2D([], [], color=SELECTED_COLOR, label="in the support (Γ_g ≠ 0)"),
            Line2D([], [], color=UNSELECTED_COLOR, label="outside the support (Γ_g = 0)"),
        ],
        loc="upper left",
        fontsize=8,
    )
    top = max(float(path.norms.max()) for path in panels) * 1.05
    axes[0].set_ylim(0.0, max(top, 1e-6))
    fig.suptitle("Regularisation path", fontsize=11)
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out


def plot_sparsity(
    out: str | Path,
    epochs: Sequence[int],
    support_share: Mapping[str, Sequence[float]],
    final: Sequence[tuple[str, int, int]],
    prune_percent: Sequence[float],
    prune_accuracy: Mapping[str, Sequence[float]],
    dense_accuracy: float,
    w_star_accuracy: float,
) -> Path:
    """Draw the sparsity of an SLBI run in three panels: the support share of every
    penalised layer over the epochs; the filters in and outside the support of each conv
    layer at the end; test accuracy after pruning a share of the filters by order.

    Args:
        out: the PNG file to write.
        epochs: the epochs of the ``support_share`` series.
        support_share: ``{layer: [share of weights or filters with Γ ≠ 0, per epoch]}``.
        final: ``(layer, filters in the support, filters in all)`` per conv layer.
        prune_percent: percentages of filters pruned.
        prune_accuracy: ``{which layers were pruned: test accuracy after each percentage}``
            (fractions in [0, 1]).
        dense_accuracy: test accuracy of the dense model (reference line).
        w_star_accuracy: test accuracy of W* (reference line).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.
    """
    fig = Figure(figsize=(16.0, 4.4), layout="constrained")
    share_ax, final_ax, prune_ax = fig.subplots(1, 3)
    _draw_support(share_ax, epochs, support_share)
    _draw_final_filters(final_ax, final)
    _draw_pruning(prune_ax, prune_percent, prune_accuracy, dense_accuracy, w_star_accuracy)
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out


def _draw_support(ax: Axes, epochs: Sequence[int], support_share: Mapping[str, Sequence[float]]) -> None:
    for layer, shares in support_share.items():
        ax.plot(epochs, [100.0 * s for s in shares], marker="o", markersize=3, label=layer)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("support (% of filters / weights with Γ ≠ 0)")
    ax.set_ylim(-2, 102)
    ax.set_title("Support along the path", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _draw_final_filters(ax: Axes, final: Sequence[tuple[str, int, int]]) -> None:
    names = [layer for layer, _, _ in final]
    inside = np.array([support for _, support, _ in final])
    outside = np.array([total - support for _, support, total in final])
    positions = np.arange(len(names))
    ax.bar(positions, inside, color=SELECTED_COLOR, label="in the support")
    ax.bar(positions, outside, bottom=inside, color=UNSELECTED_COLOR, label="outside")
    for x, (n_in, n_out) in enumerate(zip(inside, outside, strict=True)):
        share = 100.0 * n_out / max(n_in + n_out, 1)
        ax.annotate(f"{share:.0f}% out", (x, n_in + n_out), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("conv filters")
    ax.set_title("Conv filters at the end", fontsize=10)
    ax.legend(fontsize=8)


def _draw_pruning(
    ax: Axes,
    prune_percent: Sequence[float],
    prune_accuracy: Mapping[str, Sequence[float]],
    dense_accuracy: float,
    w_star_accuracy: float,
) -> None:
    for label, accuracy in prune_accuracy.items():
        ax.plot(prune_percent, [100.0 * a for a in accuracy], marker="o", markersize=4, label=label)
    ax.axhline(100.0 * dense_accuracy, color="0.3", linestyle="--", label="dense")
    ax.axhline(100.0 * w_star_accuracy, color=SELECTED_COLOR, linestyle=":", label="W*")
    ax.set_xlabel("filters pruned by order (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Pruning, each followed by recover()", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
