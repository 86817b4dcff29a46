"""Human reports: Markdown tables and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor


def pct_ci(summary: dict[str, Any] | None) -> str:
    """``61.2 [58.1, 64.2]`` from a ``summarize`` dict."""
    if not summary:
        return "—"
    lo, hi = summary["ci95"]
    return f"{100 * summary['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def radius(threat: dict[str, Any]) -> str:
    """A threat model's record (``Threat.to_dict()``) in words: ``L∞ ε = 0.1``, ``L2 ε = 0.5``."""
    norm = {"Linf": "L∞"}.get(threat.get("norm", "Linf"), threat.get("norm", "Linf"))
    return f"{norm} ε = {threat['eps']:g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: Path | BinaryIO, curves: dict[str, list[dict[str, Any]]], xkey: str, xlabel: str, title: str
) -> None:
    """One line per method: robust accuracy (with 95% CI band) against ``xkey``; PNG into ``path`` (a file or a buffer)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, rows in curves.items():
        xs = [r[xkey] for r in rows]
        ys = [100 * r["value"] for r in rows]
        lo = [100 * r["ci95"][0] for r in rows]
        hi = [100 * r["ci95"][1] for r in rows]
        ax.plot(xs, ys, marker="o", label=name)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


Caption = tuple[str, bool]  # text under an image, and whether the prediction it names is right


def grid_captions(y: Tensor, pred: Tensor, classes: Sequence[str] = ()) -> list[Caption]:
    """What goes under each image of an example grid: ``true <class>`` and ``pred <class>`` on two
    lines (class names from ``classes``, the index where there are none), and whether they agree."""

    def name(k: int) -> str:
        return classes[k] if 0 <= k < len(classes) else str(k)

    return [(f"true {name(t)}\npred {name(p)}", t == p) for t, p in zip(y.tolist(), pred.tolist(), strict=True)]


def plot_image_grid(
    path: Path,
    rows: dict[str, tuple[Tensor, Tensor]],
    eps: float,
    n: int = 8,
    captions: dict[str, tuple[list[Caption], list[Caption]]] | None = None,
) -> None:
    """Per method: clean images, adversarial images and the perturbation (scaled to [-eps, eps]).

    ``captions[method]``: the :func:`grid_captions` under its clean and its adversarial images
    (a wrong prediction in red)."""
    plt = _plt()
    names = list(rows)
    cell = 1.15 if captions else 0.95
    fig, axes = plt.subplots(3 * len(names), n, figsize=(n * 0.9 * cell, 3 * len(names) * cell), dpi=100)
    axes = axes.reshape(3 * len(names), n)
    for r, name in enumerate(names):
        x, xa = rows[name]
        below = (captions or {}).get(name, ([], []))
        for c in range(n):
            for k, (img, cmap, vmin, vmax) in enumerate(
                [(x[c], "gray", 0, 1), (xa[c], "gray", 0, 1), (xa[c] - x[c], "seismic", -eps, eps)]
            ):
                ax = axes[3 * r + k, c]
                ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
                if k < 2 and c < len(below[k]):
                    text, right = below[k][c]
                    ax.set_xlabel(text, fontsize=5, labelpad=1, color="black" if right else "red")
                if c == 0:
                    ax.set_ylabel(f"{name}\n{['clean', 'adv', 'delta'][k]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(path: Path, values: dict[str, Tensor], xlabel: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    hi = max(float(v.max()) for v in values.values())
    bins = torch.linspace(0, hi, 50).numpy()
    for name, v in values.items():
        ax.hist(
            v.numpy(),
            bins=bins,
            histtype="step",
            linewidth=1.5,
            label=f"{name} (median {float(v.median()):.1f})",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heatmaps(
    path: Path,
    panels: dict[str, list[list[float | None]]],
    rows: list[str],
    cols: list[str],
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    outline: list[tuple[int, int]] | None = None,
) -> None:
    """One heatmap per panel, side by side: values are fractions, shown in % (0 to 100) and
    written in each cell; ``outline`` cells (row, column) get a black frame. PNG."""
    import numpy as np
    from matplotlib.patches import Rectangle

    plt = _plt()
    w = 1.6 + 0.75 * len(cols)
    h = 1.6 + 0.5 * len(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(w * len(panels) + 1.0, h), dpi=110, squeeze=False,
                             layout="constrained")  # fmt: skip
    image = None
    for ax, (name, matrix) in zip(axes[0], panels.items(), strict=True):
        values = np.array([[np.nan if v is None else 100 * v for v in r] for r in matrix], dtype=float)
        image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values[i, j]):
                    color = "black" if values[i, j] > 60 else "white"
                    ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8, color=color)
        for i, j in outline or []:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="accuracy (%)", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, format="png")
    plt.close(fig)
