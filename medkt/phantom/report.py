"""Figures and the markdown report of a phantom knowledge-transfer run."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_rows_figure(rows: Sequence[tuple[str, torch.Tensor]], path: Path, ncol: int = 8) -> Path:
    """One row per ``(label, images (N, 1, S, S) in [0, 1])``; the first ``ncol`` images of each."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.3 * ncol, 1.45 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(imgs):
                ax.imshow(imgs[c, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        # a row label that may be wider than one image (tight_layout would shrink the images)
        axes[r, 0].annotate(label, xy=(0, 1.03), xycoords="axes fraction", fontsize=8, ha="left", va="bottom",
                            annotation_clip=False)
    height = 1.45 * len(rows)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.3 / height, bottom=0.01, wspace=0.04, hspace=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def per_class_bars(series: dict[str, dict[str, float]], path: Path, title: str = "") -> Path:
    """Grouped bars of per-class accuracy: ``{"before": {class: acc}, "after": {...}, ...}``."""
    plt = _plt()
    names = list(series)
    classes = list(next(iter(series.values())))
    x = np.arange(len(classes))
    w = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.0 * len(classes) + 2, 3.4))
    for i, n in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * w, [100 * series[n][c] for c in classes], w, label=n)
    ax.set_xticks(x, classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(names))
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def confusion_figure(mats: dict[str, np.ndarray], classes: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrices side by side (rows = true class)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 4.0), squeeze=False)
    short = [c.replace("pleural ", "pl. ").replace("no finding", "normal") for c in classes]
    for ax, (title, m) in zip(axes[0], mats.items()):
        m = np.asarray(m, float)
        norm = m / np.maximum(1, m.sum(1, keepdims=True))
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), short, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(classes)), short, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0][0].set_ylabel("true", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


#: point colours by ``kind``: inverted-image transfers, their placebos, real-image upper bounds
FRONTIER_COLORS = {"transfer": "tab:blue", "placebo": "tab:red", "upper_bound": "tab:green"}


def frontier_figure(points: list[dict[str, Any]], path: Path) -> Path:
    """Novel-accuracy gain vs known-accuracy loss (points = recipes; error bars = 95% CI).

    Blue: transfers from inverted images; red: placebos; green: ``kind="upper_bound"`` (real images).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for p in points:
        ax.errorbar(100 * p["known_loss"], 100 * p["novel_gain"], xerr=100 * p.get("known_loss_ci", 0),
                    yerr=100 * p.get("novel_gain_ci", 0), fmt="o", capsize=2,
                    color=FRONTIER_COLORS.get(p.get("kind", "placebo" if p.get("placebo") else "transfer"), "tab:gray"))
        ax.annotate(p["name"], (100 * p["known_loss"], 100 * p["novel_gain"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.axvline(2, ls="--", lw=0.8, color="gray")
    ax.axhline(30, ls="--", lw=0.8, color="gray")
    ax.set_xlabel("known-findings accuracy loss (points)")
    ax.set_ylabel("novel-finding accuracy gain (points)")
    ax.set_title("transfer frontier (target: upper left of the dashed lines)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def matplotlib_ticker():
    """``matplotlib.ticker``, imported on first use (matplotlib is optional)."""
    import matplotlib.ticker

    return matplotlib.ticker


def wise_frontier_figure(panels: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """WiSE-FT curves per finding: novel gain and AUROC gain vs known loss (all in points / AUROC).

    ``panels``: finding -> curves; a curve is ``{"label", "group" (colour; default the label), "kind":
    "transfer" | "placebo" | "upper_bound", "points": [{"alpha", "known_loss", "novel_gain",
    "auroc_gain"}, ...]}`` (fractions;
    ``alpha`` 0 is the start model). Top row: novel-accuracy gain; bottom row: novel-AUROC gain.
    Dashed lines: the issue's targets (known loss <= 2 points, gain >= 30 points / +0.10 AUROC).
    """
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.0), squeeze=False)
    styles = {"transfer": "-", "placebo": ":", "upper_bound": "--"}
    markers = {"transfer": "o", "placebo": "x", "upper_bound": "s"}
    groups: list[str] = []  # one colour per group (recipe): its transfer, placebo and real-image curves
    for curves in panels.values():
        groups += [c.get("group", c["label"]) for c in curves if c.get("group", c["label"]) not in groups]
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    for j, (finding, curves) in enumerate(panels.items()):
        for c in curves:
            pts = sorted(c["points"], key=lambda p: p["alpha"])
            x = [100 * p["known_loss"] for p in pts]
            kind = c.get("kind", "transfer")
            kw = {"ls": styles.get(kind, "-"), "marker": markers.get(kind, "o"), "ms": 4, "label": c["label"],
                  "color": colors[c.get("group", c["label"])]}
            line = axes[0, j].plot(x, [100 * p["novel_gain"] for p in pts], **kw)[0]
            axes[1, j].plot(x, [p["auroc_gain"] for p in pts], **kw)
            last = pts[-1]
            axes[0, j].annotate(f"a={last['alpha']:g}", (x[-1], 100 * last["novel_gain"]), fontsize=6,
                                xytext=(2, 2), textcoords="offset points", color=line.get_color())
        for i, (target, label) in enumerate([(30, "novel-accuracy gain (points)"), (0.10, "novel-AUROC gain")]):
            ax = axes[i, j]
            ax.axvline(2, ls="--", lw=0.8, color="gray")
            ax.axhline(target, ls="--", lw=0.8, color="gray")
            ax.set_xlabel("known-findings accuracy loss (points)")
            ax.set_ylabel(label)
            ax.set_xscale("symlog", linthresh=2)
            ax.xaxis.set_major_formatter(matplotlib_ticker().ScalarFormatter())
        axes[0, j].set_title(finding, fontsize=10)
    axes[0, 0].legend(fontsize=6, loc="lower right")
    fig.suptitle("WiSE-FT weight a from 0 (start) to 1; target: upper left of the dashed lines", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fmt_ci(d: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± ci95`` of a statistics dict, scaled (default: fractions as points)."""
    return f"{scale * d['mean']:.{digits}f} ± {scale * d['ci95']:.{digits}f}"


def results_table(arms: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """Markdown rows: arm | novel acc | known acc | novel AUROC (means ± 95% CI over seeds)."""
    from medkt.utils import markdown_table

    return markdown_table(["method", "novel accuracy (%)", "known mean accuracy (%)", "novel AUROC"],
                          [[label, fmt_ci(arms[key]["novel_accuracy"]), fmt_ci(arms[key]["known_accuracy"]),
                            fmt_ci(arms[key]["novel_auroc"], 1.0, 3)] for key, label in labels.items() if key in arms])
