"""Retrieval metrics of the PRVR protocol: ranks of the true video, R@K, SumR, M/V bins.

Ranks are computed per block so a caller can score a (Q_chunk, V) slice of the
query x video matrix at a time and concatenate the ranks; the metrics then only
need the ranks (and the optional moment-to-video ratios of the queries).

Usage::

    ranks = np.concatenate([ranks_from_scores(block, truth[i:j]) for ...])
    m = metrics_from_ranks(ranks, mv_ratios)   # {"r1": .., "sumr": .., "mv_bins": {...}}
"""
from __future__ import annotations

import math
from decimal import Decimal
from typing import Any, Sequence

import numpy as np

__all__ = ["RECALL_KS", "ranks_from_scores", "metrics_from_ranks", "retrieval_metrics", "mv_bin_labels"]

RECALL_KS = (1, 5, 10, 100)


def ranks_from_scores(scores: Any, truth: Any) -> np.ndarray:
    """1-based rank of each query's true video in its row of ``scores`` (Q, V).

    Ties are pessimistic: every other video scoring >= the true one ranks above it,
    so a constant scorer earns rank V, not 1 (no credit for degenerate models).
    """
    s = np.asarray(scores)
    t = np.asarray(truth)
    if s.ndim != 2:
        raise ValueError(f"scores must be a (queries, videos) matrix, got shape {s.shape}")
    if t.ndim != 1 or t.shape[0] != s.shape[0]:
        raise ValueError(f"truth must have one video index per query row ({s.shape[0]}), got shape {t.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"truth must hold integer video indices, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= s.shape[1]):
        raise ValueError(f"truth indices must lie in [0, {s.shape[1]}), got range [{t.min()}, {t.max()}]")
    if not np.issubdtype(s.dtype, np.number):
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.floating) and np.isnan(s).any():
        rows = np.unique(np.nonzero(np.isnan(s))[0])
        raise ValueError(f"scores contain NaN in {rows.size} query row(s) (first rows: {rows[:5].tolist()}); "
                         "the model or its inputs produced NaN")
    true_scores = s[np.arange(s.shape[0]), t]  # (Q,)
    # Counting >= includes the true video itself, which is exactly the "1 +" of the rank.
    return (s >= true_scores[:, None]).sum(axis=1).astype(np.int64)


def _recalls(ranks: np.ndarray) -> dict[str, float]:
    out = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_KS}
    out["sumr"] = float(sum(out[f"r{k}"] for k in RECALL_KS))
    return out


def _decimals(bin_width: float) -> int:
    return max(1, -Decimal(str(bin_width)).normalize().as_tuple().exponent)


def mv_bin_labels(bin_width: float = 0.2) -> list[str]:
    """Labels "0.0-0.2", "0.2-0.4", ... covering [0, 1] (the last bin holds ratio 1.0)."""
    if not 0.0 < bin_width <= 1.0:
        raise ValueError(f"bin_width must lie in (0, 1], got {bin_width}")
    n = math.ceil(1.0 / bin_width - 1e-9)
    d = _decimals(bin_width)
    return [f"{i * bin_width:.{d}f}-{min(1.0, (i + 1) * bin_width):.{d}f}" for i in range(n)]


def metrics_from_ranks(ranks: Any, mv_ratios: Sequence[float | None] | None = None,
                       bin_width: float = 0.2) -> dict[str, Any]:
    """R@1/5/10/100 (percent), SumR, median/mean rank and n; ``mv_bins`` when ratios are given.

    ``mv_ratios[i]`` is query i's moment length / video length, or None when unknown
    (skipped). Bins are [lo, hi) except the last, which also holds 1.0; bins with no
    query are left out so every reported number is backed by data.
    """
    r = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if r.size == 0:
        raise ValueError("no ranks given: cannot compute retrieval metrics of zero queries")
    if r.min() < 1:
        raise ValueError(f"ranks are 1-based; got a rank of {int(r.min())}")
    out: dict[str, Any] = _recalls(r)
    out["medr"] = float(np.median(r))
    out["mnr"] = float(np.mean(r))
    out["n"] = int(r.size)
    if mv_ratios is None:
        return out
    ratios = list(mv_ratios)
    if len(ratios) != r.size:
        raise ValueError(f"mv_ratios has {len(ratios)} entries for {r.size} ranks")
    labels = mv_bin_labels(bin_width)
    groups: dict[int, list[int]] = {}
    for i, ratio in enumerate(ratios):
        if ratio is None or math.isnan(ratio := float(ratio)):
            continue
        if not 0.0 <= ratio <= 1.0 + 1e-9:
            raise ValueError(f"moment/video ratio of query {i} is {ratio}, outside [0, 1]")
        b = min(int(math.floor(ratio / bin_width + 1e-9)), len(labels) - 1)
        groups.setdefault(b, []).append(i)
    out["mv_bins"] = {labels[b]: {"n": len(idx), **_recalls(r[idx])} for b, idx in sorted(groups.items())}
    return out


def retrieval_metrics(scores: Any, truth: Any, mv_ratios: Sequence[float | None] | None = None,
                      bin_width: float = 0.2) -> dict[str, Any]:
    """Metrics of one whole (Q, V) score matrix; chunked callers use the two functions above."""
    return metrics_from_ranks(ranks_from_scores(scores, truth), mv_ratios, bin_width)
