"""Evaluation charts as PNG files: recall@K of the three scores and SumR per moment/video bin.

Drawn with matplotlib's object API on the Agg canvas, so nothing touches pyplot's
global state or needs a display; callers (``prvr evaluate --plots``, the pipeline's
evaluate stage, DVC ``plots:``) get the written paths back.

Usage::

    paths = plot_evaluation(metrics, "runs/evaluate/plots")       # [recall_at_k.png, sumr_by_mv.png]
    plot_variants({"ms-sl++": m1, "mean-pool": m2}, "runs/variants.png")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_evaluation", "plot_variants", "RECALL_KS", "SCORES", "RECALL_PNG", "MV_PNG"]

RECALL_KS = (1, 5, 10, 100)
SCORES = ("fused", "clip", "frame")
RECALL_PNG = "recall_at_k.png"
MV_PNG = "sumr_by_mv.png"
COLORS = {"fused": "#1f77b4", "clip": "#ff7f0e", "frame": "#2ca02c"}
DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _grouped_bars(ax: Any, groups: list[str], series: Mapping[str, list[float]],
                  counts: list[int] | None = None) -> None:
    """One group of bars per x label, one bar per series, values printed on top."""
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label, color=COLORS.get(label))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    labels = groups if counts is None else [f"{g}\n(n={n})" for g, n in zip(groups, counts)]
    ax.set_xticks(range(len(groups)), labels)


def plot_evaluation(metrics: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write recall@K curves of the fused/clip/frame scores and, when moments are known,
    the SumR of each score per M/V bin. Returns the PNG paths written."""
    out_dir = Path(out_dir)
    scores = [s for s in SCORES if s in metrics]
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for s in scores:
        ax.plot(range(len(RECALL_KS)), [metrics[s][f"r{k}"] for k in RECALL_KS], marker="o",
                color=COLORS[s], label=f"{s} (SumR {metrics[s]['sumr']:.1f})")
    ax.set_xticks(range(len(RECALL_KS)), [f"R@{k}" for k in RECALL_KS])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    split, variant = metrics.get("split"), metrics.get("variant")
    ax.set_title("Recall@K" + (f" on {split}" if split else "") + (f" ({variant})" if variant else ""))
    paths = [_save(fig, out_dir / RECALL_PNG)]

    bins = metrics.get("fused", {}).get("mv_bins")
    if bins:
        groups = list(bins)
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        _grouped_bars(ax, groups, {s: [metrics[s]["mv_bins"][g]["sumr"] for g in groups] for s in scores},
                      [bins[g]["n"] for g in groups])
        ax.set_xlabel("moment length / video length")
        ax.set_ylabel("SumR")
        ax.set_title("SumR per M/V bin")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out_dir / MV_PNG))
    return paths


def plot_variants(metrics_by_variant: Mapping[str, Mapping[str, Any]], out_png: str | Path,
                  score: str = "fused") -> Path:
    """SumR of ``score`` per M/V bin, one bar per model variant side by side (plus "all")."""
    if not metrics_by_variant:
        raise ValueError("plot_variants needs the metrics of at least one variant")
    groups: list[str] = []
    for m in metrics_by_variant.values():
        for g in m[score].get("mv_bins") or {}:
            if g not in groups:
                groups.append(g)
    groups.append("all")

    def sumr(m: Mapping[str, Any], g: str) -> float:
        if g == "all":
            return float(m[score]["sumr"])
        b = (m[score].get("mv_bins") or {}).get(g)
        return float(b["sumr"]) if b else 0.0

    series = {name: [sumr(m, g) for g in groups] for name, m in metrics_by_variant.items()}
    fig = Figure(figsize=(max(6.0, 1.3 * len(groups) * max(1, len(series)) / 2), 4))
    ax = fig.add_subplot()
    _grouped_bars(ax, groups, series)
    ax.set_xlabel("moment length / video length")
    ax.set_ylabel(f"SumR ({score})")
    ax.set_title("SumR per M/V bin by model variant")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, Path(out_png))
