"""Exact MS-SL++ search over a whole index, fast on a CPU.

The reference path (`prvr.model.score`) makes two fp32 (Q, V, K) products. Here
the same ranking comes from two stages:

1. Screening of every clip in low precision (`prvr.search.screen`: int8 integer products
   or bf16 ones), each cosine within a rigorous error bound. The frame score is screened
   only at the clips that may be a video's key clip (within twice the bound of its
   screened max), not over all K. From them each video gets an upper bound on its exact
   fused score.
2. Exact fp32 re-scoring of the M best videos by that bound (only the clips that
   can still be the key clip, gathered from the stored arrays).

The top-k is certified: when the k-th exact fused score is >= the bound of the
best video left out, no left-out video can enter the top-k. A query that fails
the certificate (rare) is recomputed with the plain fp32 path, so results are
always those of `score` + topk (up to fp32 rounding; order may differ on exact ties).

A few queries at the index's alpha (a server's requests) take a shorter way with the
int8 screen: a video's fused score is q.z at its key clip (z = alpha c + (1-alpha) a),
so the largest screened q.z over its clips bounds it from above in one pass over an
int8 copy of z (`FusedScreen`); the best videos by that bound are re-scored from all
their clips, under the same certificate. A query it cannot certify takes the two steps.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from prvr.metrics import ranks_from_scores
from prvr.model import fuse, score
from prvr.search.index import VideoIndex
from prvr.search.screen import FOLD_MAX_H, Bf16Screen, FusedScreen, Int8Screen, _tensor, _view, bf16_supported

logger = logging.getLogger(__name__)

__all__ = ["SearchResult", "ExactSearch", "bf16_supported", "as_queries",
           "merge_topk", "empty_result", "PRECISIONS"]

PRECISIONS = ("int8", "bf16", "fp32")         # search.screen
FUSED_ROWS = 1 << 14      # most clip rows (queries x re-scored videos x K) the fused screen re-scores
FIRST_ROUND = 16          # the fused screen re-scores k + 16 videos first, the rest of its budget if needed


class SearchResult(NamedTuple):
    """Top-k of each query, best first; video_idx -1 (scores -inf) where fewer were found."""
    video_idx: torch.Tensor  # (Q, k) int64 row in the index
    fused: torch.Tensor      # (Q, k) float32
    clip: torch.Tensor       # (Q, k) float32
    frame: torch.Tensor      # (Q, k) float32
    key_clip: torch.Tensor   # (Q, k) int64 in 0..K-1


def as_queries(queries: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(Q, H) or (H,) -> L2-normalised float32 (Q, H)."""
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
    q = q.detach().float().cpu()
    if q.ndim == 1:
        q = q[None]
    return F.normalize(q, dim=-1)


def empty_result(Q: int, k: int) -> SearchResult:
    neg = torch.full((Q, k), float("-inf"))
    return SearchResult(torch.full((Q, k), -1, dtype=torch.long), neg, neg.clone(), neg.clone(),
                        torch.zeros(Q, k, dtype=torch.long))


def merge_topk(best: SearchResult, new: SearchResult, k: int) -> SearchResult:
    """Running top-k: concatenate along results and keep the k best fused."""
    cat = [torch.cat([a, b], 1) for a, b in zip(best, new)]
    vals, order = cat[1].topk(min(k, cat[1].shape[1]), dim=1)
    return SearchResult(*(t.gather(1, order) for t in cat))


def _keep_best(best: tuple, new: tuple, keep: int) -> tuple:
    """Running best `keep` along dim 1 by the first tensor (Q, n), sorted best first; the
    others (Q, n, ...) follow it."""
    cat = [torch.cat([a, b], 1) for a, b in zip(best, new)]
    _, order = cat[0].topk(min(keep, cat[0].shape[1]), dim=1)
    return tuple(t.gather(1, order.view(*order.shape, *[1] * (t.ndim - 2)).expand(-1, -1, *t.shape[2:]))
                 for t in cat)


def _top(cand: torch.Tensor, sc: torch.Tensor, fs: torch.Tensor, key: torch.Tensor, alpha: float,
         k: int) -> SearchResult:
    """The k best of re-scored candidates (Q, M) by their fused score (all M where M < k)."""
    vals, o = fuse(sc, fs, alpha).topk(min(k, cand.shape[1]), dim=1)
    return SearchResult(cand.gather(1, o), vals, sc.gather(1, o), fs.gather(1, o), key.gather(1, o))


def _bound_after(ub_val: torch.Tensor, m: int) -> torch.Tensor:
    """Bound of the best video left out after the m best of sorted bounds (Q, >= m); -inf when
    every video is in."""
    return ub_val[:, m] if ub_val.shape[1] > m else torch.full((len(ub_val),), float("-inf"))


def _put(res: SearchResult, rows: torch.Tensor, part: SearchResult) -> SearchResult:
    """res with its query rows `rows` replaced by part's."""
    return SearchResult(*(r.index_copy(0, rows, p) for r, p in zip(res, part)))


def _rows(arr: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Gather rows of a flat (R, H) (possibly memory-mapped, fp16) array as fp32 (sorted reads)."""
    if len(rows) == 0:
        return torch.zeros(0, arr.shape[-1])
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), arr.shape[-1]), np.float32)
    out[order] = arr[rows[order]]
    return torch.from_numpy(out)


class ExactSearch:
    """Exact fused top-k over a `VideoIndex` (the default engine).

    precision (search.screen): "int8" (int8 screen + certified fp32 re-scoring; in RAM 3 bytes
    per (clip, attended) value pair: the int8 clips, ONNX Runtime's pre-packed copy of them,
    the int8 attended vectors; with `fused` (search.fused_screen) 2 more, the fused vectors'
    screen), "bf16" (bf16 screen; 4 bytes per pair; fast only with native bf16) or "fp32"
    (chunked fp32 products only, no copy). threads (search.screen_threads): ONNX Runtime
    threads of the int8 screens (None: torch's)."""

    def __init__(self, index: VideoIndex, video_chunk: int = 4096, precision: str = "int8",
                 margin: int = 32, gather_queries: int = 4, fused: bool = True, threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {' | '.join(PRECISIONS)}, got {precision!r}")
        self.index = index
        self.video_chunk = video_chunk
        self.margin = margin
        N, K, H = index.clips.shape
        self.N, self.K, self.H = N, K, H
        self._clips = index.clips.reshape(N * K, H)        # (N*K, H) views of the (mmap) arrays
        self._clip_view = _view(index.clips)                # (N, K, H) tensor over the same memory
        self._attended = index.attended.reshape(N * K, H)
        self._att_view = _view(self._attended)
        self.precision = precision
        self.gather_queries = gather_queries
        self.stats = {"queries": 0, "fallbacks": 0, "fused": 0, "fused_misses": 0}
        self._screen: Int8Screen | Bf16Screen | None = None
        self._fused: FusedScreen | None = None
        if self.precision == "int8":
            self._screen = Int8Screen(self._clips, self._attended, K, video_chunk, threads, gather_queries)
            if fused and H > FOLD_MAX_H:
                logger.warning("search.fused_screen: vectors of %d values are past the fused screen's %d; "
                               "the two-step screen serves every query", H, FOLD_MAX_H)
            elif fused:
                self._fused = FusedScreen(self._clips, self._attended, index.alpha, K, video_chunk, threads)
        elif self.precision == "bf16":
            if not bf16_supported():
                logger.warning("search.screen bf16 on a CPU without native bf16: emulated, several times "
                               "slower than the int8 screen")
            self._screen = Bf16Screen(self._clips, self._attended, K, gather_queries)

    @torch.no_grad()
    def search(self, queries: torch.Tensor | np.ndarray, top_k: int = 10,
               alpha: float | None = None) -> SearchResult:
        """Top-k videos of each query (Q, H) by the fused score."""
        q = as_queries(queries)                                            # (Q, H)
        alpha = self.index.alpha if alpha is None else float(alpha)
        k = max(1, min(int(top_k), self.N))
        if len(q) == 0:                                  # nothing to rank
            return empty_result(0, k)
        self.stats["queries"] += len(q)
        if self._screen is None:
            return self._search_fp32(q, k, alpha)
        if self._takes_fused(len(q), k, alpha):
            return self._search_fused(q, k, alpha)
        return self._search_screened(q, k, alpha)

    def _takes_fused(self, Q: int, k: int, alpha: float) -> bool:
        """The fused screen serves the index's alpha for a few queries: its re-score reads
        every clip of each candidate (the two-step screen only the few that may be the key)."""
        return (self._fused is not None and alpha == self._fused.alpha and Q <= self.gather_queries
                and Q * self._budget(k) * self.K <= FUSED_ROWS)

    def _budget(self, k: int) -> int:
        """Videos re-scored exactly per query."""
        return min(self.N, k + max(self.margin, k))

    @torch.no_grad()
    def truth_ranks(self, queries: torch.Tensor | np.ndarray, truth: np.ndarray, alpha: float | None = None,
                    query_chunk: int = 2048) -> dict[str, np.ndarray]:
        """1-based rank of each query's true video under the fused, clip and frame scores.

        Evaluation needs whole score rows, not a top-k: fp32 `prvr.model.score` over the
        index arrays, a (query_chunk, N) block at a time; ties ranked pessimistically."""
        q = as_queries(queries)
        alpha = self.index.alpha if alpha is None else float(alpha)
        clips, attended = _view(self.index.clips), _view(self.index.attended)
        ranks: dict[str, list[np.ndarray]] = {"fused": [], "clip": [], "frame": []}
        for i in range(0, len(q), query_chunk):
            s = score(q[i:i + query_chunk], clips, attended, alpha, self.video_chunk)
            for kind, rows in ranks.items():
                rows.append(ranks_from_scores(getattr(s, kind).numpy(), truth[i:i + query_chunk]))
        return {kind: np.concatenate(rows) for kind, rows in ranks.items()}

    # -- plain fp32 ------------------------------------------------------------
    def _search_fp32(self, q: torch.Tensor, k: int, alpha: float) -> SearchResult:
        K, H = self.K, self.H
        best = empty_result(len(q), k)
        for start in range(0, self.N, self.video_chunk):
            end = min(start + self.video_chunk, self.N)
            c = _tensor(self._clips[start * K:end * K])                                     # (n*K, H)
            a = _tensor(self._attended[start * K:end * K])
            sc, key = (q @ c.T).view(len(q), end - start, K).max(-1)                        # (Q, n)
            fs = (q @ a.T).view(len(q), end - start, K).gather(2, key[..., None]).squeeze(-1)
            fused = fuse(sc, fs, alpha)
            idx = torch.arange(start, end).expand(len(q), -1)
            best = merge_topk(best, SearchResult(idx, fused, sc, fs, key), k)
        return best

    # -- low-precision screening + certified fp32 re-scoring -----------------
    def _search_screened(self, q: torch.Tensor, k: int, alpha: float) -> SearchResult:
        K, Q = self.K, len(q)
        M = self._budget(k)
        state = self._screen.prepare(q)
        best = (torch.full((Q, 0), float("-inf")), torch.zeros((Q, 0), dtype=torch.long),
                torch.zeros((Q, 0, K), dtype=torch.bool))
        for start in range(0, self.N, self.video_chunk):
            end = min(start + self.video_chunk, self.N)
            s, smax, err = self._screen.clips(state, start, end)     # (Q, n, K), (Q, n); |s - exact| <= err
            near = s >= (smax - 2 * err)[..., None]         # clips that may be the exact key clip
            ub = fuse(smax + err, self._screen.frame_ub(state, near, start), alpha)
            best = _keep_best(best, (ub, torch.arange(start, end).expand(Q, -1), near), M + 1)
        return self._certified(q, k, alpha, best)

    def _search_fused(self, q: torch.Tensor, k: int, alpha: float) -> SearchResult:
        """One pass over the fused vectors bounds every video; the best are re-scored from all
        their clips, k + FIRST_ROUND first and the rest of the budget for a query the first
        round cannot certify. A query still uncertified takes the two-step screen."""
        Q, M = len(q), self._budget(k)
        state = self._fused.prepare(q)
        bounds = torch.cat([self._fused.bounds(state, start, min(start + self.video_chunk, self.N))
                            for start in range(0, self.N, self.video_chunk)], 1)            # (Q, N)
        ub_val, ub_idx = bounds.topk(min(M + 1, self.N), dim=1)                           # sorted
        self.stats["fused"] += Q
        res, done, todo = None, 0, torch.arange(Q)
        for m in sorted({min(M, k + FIRST_ROUND), M}):
            part = self._rescore_videos(q[todo], ub_idx[todo, done:m], alpha, k)
            if res is None:                                               # k <= m: a whole top-k
                res = part
            else:
                part = merge_topk(SearchResult(*(r[todo] for r in res)), part, k)
                res = _put(res, todo, part)
            todo, done = todo[part.fused[:, -1] < _bound_after(ub_val[todo], m)], m   # the certificate
            if len(todo) == 0:
                return res
        self.stats["fused_misses"] += len(todo)
        return _put(res, todo, self._search_screened(q[todo], k, alpha))

    def _certified(self, q: torch.Tensor, k: int, alpha: float, best: tuple) -> SearchResult:
        """Exact re-score of the M best videos by their bound (best: bounds (Q, M+1) sorted,
        videos, the clips that may be the key (Q, M+1, K)); a query whose k-th exact score is
        below the bound of the best video left out is answered by the plain fp32 path instead."""
        M = self._budget(k)
        ub_val, ub_idx, near = best
        res = self._rescore(q, ub_idx[:, :M], near[:, :M], alpha, k)
        bad = (res.fused[:, -1] < _bound_after(ub_val, M)).nonzero().squeeze(1)   # certificate per query
        if len(bad):
            self.stats["fallbacks"] += len(bad)
            res = _put(res, bad, self._search_fp32(q[bad], k, alpha))
        return res

    def _rescore(self, q: torch.Tensor, cand: torch.Tensor, near: torch.Tensor, alpha: float,
                 k: int) -> SearchResult:
        """Exact fp32 fused scores of candidate videos (Q, M), computing only the near-max clips."""
        Q, M, K = near.shape
        qi, mi, ki = near.nonzero(as_tuple=True)                                           # (R,)
        rows = (cand[qi, mi] * K + ki).numpy()
        sims = (_rows(self._clips, rows) * q[qi]).sum(-1)                                  # (R,)
        S = torch.full((Q, M, K), float("-inf"))
        S[qi, mi, ki] = sims
        sc, key = S.max(-1)                                                                # (Q, M)
        av = _rows(self._attended, (cand * K + key).reshape(-1).numpy()).view(Q, M, -1)    # (Q, M, H)
        fs = (av * q[:, None, :]).sum(-1)                                                  # (Q, M)
        return _top(cand, sc, fs, key, alpha, k)

    def _rescore_videos(self, q: torch.Tensor, cand: torch.Tensor, alpha: float, k: int) -> SearchResult:
        """Exact fp32 fused scores of candidate videos (Q, M) from all K clips of each. Each
        row's products are summed alike wherever it lies (a matrix product may round equal
        rows apart, and a video that repeats a clip would then get another key clip)."""
        (Q, M), H = cand.shape, self.H
        c = self._clip_view.index_select(0, cand.reshape(-1)).float().view(Q, M, self.K, H)
        sc, key = (c * q[:, None, None, :]).sum(-1).max(-1)                              # (Q, M)
        av = self._att_view.index_select(0, (cand * self.K + key).reshape(-1)).float().view(Q, M, H)
        fs = (av * q[:, None, :]).sum(-1)                                                # (Q, M)
        return _top(cand, sc, fs, key, alpha, k)
