"""Exact MS-SL++ search over a whole index, fast on a CPU.

The reference path (`prvr.model.score`) makes two fp32 (Q, V, K) products. Here
the same ranking comes from two stages:

1. Screening in bf16 (native AVX-512 BF16 matmuls, ~3-4x fp32 speed) of every
   clip and attended vector, with a rigorous error bound `eps` on each cosine.
   A single query screens the clips with a bf16 matrix-vector product (memory-bound:
   about twice as fast as the same product as a one-row matrix) and, like any small
   batch, computes the frame score only at the clips that may be its key clip, not
   over all K.
   From it each video gets an upper bound on its exact fused score (taking into
   account that the key clip may be any clip within 2*eps of the screened max).
2. Exact fp32 re-scoring of the M best videos by that bound (only the clips that
   can still be the key clip, gathered from the stored arrays).

The top-k is certified: when the k-th exact fused score is >= the bound of the
best video left out, no left-out video can enter the top-k. A query that fails
the certificate (rare) is recomputed with the plain fp32 path, so results are
always those of `score` + topk (up to fp32 rounding; order may differ on exact ties).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from prvr.metrics import ranks_from_scores
from prvr.model import fuse, score
from prvr.search.index import VideoIndex

__all__ = ["SearchResult", "ExactSearch", "bf16_supported", "as_queries",
           "merge_topk", "empty_result"]

# Error of a bf16 product q~.c~ against the fp32 q.c (Cauchy-Schwarz, no cancellation assumed):
#   |q~.c~ - q.c| <= ||q~ - q|| ||c~|| + ||q|| ||c~ - c||  (input rounding, measured exactly)
#                  + 2^-8 |x| (bf16 output rounding: 8 significant bits) + H 2^-24 (fp32 accumulation).
BF16_OUT_REL = 2.0 ** -8 * 1.01       # (fp32 accumulation and one rounding: checked at init)


class SearchResult(NamedTuple):
    """Top-k of each query, best first; video_idx -1 (scores -inf) where fewer were found."""
    video_idx: torch.Tensor  # (Q, k) int64 row in the index
    fused: torch.Tensor      # (Q, k) float32
    clip: torch.Tensor       # (Q, k) float32
    frame: torch.Tensor      # (Q, k) float32
    key_clip: torch.Tensor   # (Q, k) int64 in 0..K-1


def bf16_supported() -> bool:
    """Native bf16 matmuls (AVX-512 BF16 / AMX): otherwise bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older builds
        return False


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


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """fp32 tensor view of an array slice (no copy for fp32 mmaps; they are only read)."""
    return _view(np.asarray(arr, np.float32))


def _view(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing a (read-only, memory-mapped) array's memory and dtype; only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(arr))


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

    precision: "auto" (bf16 screening + certified fp32 re-scoring when the CPU has
    native bf16, else fp32), "bf16" or "fp32" (chunked fp32 products only, no copy).
    The bf16 path keeps a bf16 copy of both arrays in RAM (4 bytes per value pair)."""

    def __init__(self, index: VideoIndex, video_chunk: int = 4096, precision: str = "auto",
                 margin: int = 32, gather_queries: int = 4):
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto | bf16 | fp32, got {precision!r}")
        self.index = index
        self.video_chunk = video_chunk
        self.margin = margin
        self.gather_queries = gather_queries
        N, K, H = index.clips.shape
        self.N, self.K, self.H = N, K, H
        self._clips = index.clips.reshape(N * K, H)        # (N*K, H) views of the (mmap) arrays
        self._attended = index.attended.reshape(N * K, H)
        self.precision = "bf16" if precision == "bf16" or (precision == "auto" and bf16_supported()) \
            else "fp32"
        self.stats = {"queries": 0, "fallbacks": 0}
        if self.precision == "bf16":
            self._c16, self._c_err, self._c_norm = self._low_copy(self._clips)   # (N*K, H) bfloat16
            self._a16, self._a_err, self._a_norm = self._low_copy(self._attended)
        # one query: a matrix-vector product, if this build's accumulates in fp32 as the bound assumes
        self._mv = self.precision == "bf16" and self._mv_accumulates_in_fp32()

    @staticmethod
    def _low_copy(arr: np.ndarray, dtype: torch.dtype = torch.bfloat16,
                 rows: int = 1 << 16) -> tuple[torch.Tensor, float, float]:
        """Low-precision copy, max ||low(x) - x|| and max ||low(x)|| over rows (for the bound)."""
        out = torch.empty(arr.shape, dtype=dtype)
        err = norm = 0.0
        for i in range(0, arr.shape[0], rows):
            x = _tensor(arr[i:i + rows])
            out[i:i + rows] = xb = x.to(dtype)
            err = max(err, float((xb.float() - x).norm(dim=-1).max()))
            norm = max(norm, float(xb.float().norm(dim=-1).max()))
        return out, err * 1.001, norm * 1.001

    def _mv_accumulates_in_fp32(self, rows: int = 4096) -> bool:
        """The bound assumes fp32 accumulation and one bf16 rounding of each output; a build
        whose matrix-vector product does otherwise would break it, so check on real rows and
        keep the one-row matrix product if it does not hold."""
        g = torch.Generator().manual_seed(0)
        qb = F.normalize(torch.randn(4, self.H, generator=g), dim=-1).bfloat16()
        c = self._c16[:rows]
        got = torch.stack([torch.mv(c, qb[i]) for i in range(len(qb))]).double()
        ref = qb.double() @ c.double().T
        return bool(((got - ref).abs() <= BF16_OUT_REL * ref.abs() + self.H * 2.0 ** -24).all())

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
        if self.precision == "fp32":
            return self._search_fp32(q, k, alpha)
        return self._search_bf16(q, k, alpha)

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

    # -- bf16 screening + certified fp32 re-scoring ----------------------------
    def _search_bf16(self, q: torch.Tensor, k: int, alpha: float) -> SearchResult:
        K, Q, H = self.K, len(q), self.H
        M = min(self.N, k + max(self.margin, k))           # videos re-scored exactly
        keep = min(self.N, M + 1)                           # + the best one left out (the bound)
        qb = q.to(torch.bfloat16)
        dq = (qb.float() - q).norm(dim=-1) * 1.001                                         # (Q,)
        acc = H * 2.0 ** -24
        e_a = (dq * self._a_norm + self._a_err + acc)[:, None]
        e_c = (dq * self._c_norm + self._c_err + acc)[:, None]                            # (Q, 1)
        ub_val = torch.full((Q, 0), float("-inf"))
        ub_idx = torch.zeros((Q, 0), dtype=torch.long)
        near_sel = torch.zeros((Q, 0, K), dtype=torch.bool)
        for start in range(0, self.N, self.video_chunk):
            end = min(start + self.video_chunk, self.N)
            n = end - start
            # fp32 copy first: reductions over the last dim are ~10x slower in bf16 on CPU
            s = self._screen(qb, start, end).view(Q, n, K)                                 # (Q, n, K)
            smax = s.amax(-1)                                                              # (Q, n)
            # output rounding matters only near each video's max: |x| <= max|smax| + window
            big = smax.abs().amax(1, keepdim=True) + 2 * (e_c + 2 * BF16_OUT_REL)          # (Q, 1)
            err_c = e_c + BF16_OUT_REL * big
            near = s >= (smax - 2 * err_c)[..., None]       # clips that may be the exact key clip
            fmax = self._frame_max(qb, near, start)                                        # (Q, n)
            ub = fuse(smax + err_c, fmax + e_a + BF16_OUT_REL * fmax.abs(), alpha)
            v, i = ub.topk(min(keep, n), dim=1)
            ub_val, ub_idx = torch.cat([ub_val, v], 1), torch.cat([ub_idx, i + start], 1)
            near_sel = torch.cat([near_sel, near.gather(1, i[..., None].expand(-1, -1, K))], 1)
            if ub_val.shape[1] > keep:
                ub_val, o = ub_val.topk(keep, dim=1)
                ub_idx, near_sel = ub_idx.gather(1, o), near_sel.gather(1, o[..., None].expand(-1, -1, K))
        cand, near_c = ub_idx[:, :M], near_sel[:, :M]                                      # (Q, M)
        bound = ub_val[:, M] if ub_val.shape[1] > M else torch.full((Q,), float("-inf"))
        res = self._rescore(q, cand, near_c, alpha, k)
        ok = res.fused[:, -1] >= bound                      # certificate per query
        if not bool(ok.all()):
            bad = (~ok).nonzero().squeeze(1)
            self.stats["fallbacks"] += len(bad)
            fix = self._search_fp32(q[bad], k, alpha)
            res = SearchResult(*(r.index_copy(0, bad, fx) for r, fx in zip(res, fix)))
        return res

    def _screen(self, qb: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """bf16 clip scores of videos start..end as fp32 (Q, n*K)."""
        clips = self._c16[start * self.K:end * self.K]
        if len(qb) == 1 and self._mv:
            return torch.mv(clips, qb[0]).float()[None]
        return F.linear(qb, clips).float()

    def _frame_max(self, qb: torch.Tensor, near: torch.Tensor, start: int) -> torch.Tensor:
        """Screened frame score max over each video's near-key clips (Q, n, K) -> (Q, n).

        Few queries: gather only the near clips' attended vectors (about one per video),
        half the memory traffic of a full product. Many: one bf16 product is cheaper."""
        Q, n, K = near.shape
        if Q > self.gather_queries:
            f = F.linear(qb, self._a16[start * K:(start + n) * K]).float().view(Q, n, K)
            return torch.where(near, f, float("-inf")).amax(-1)
        qi, vi, ki = near.nonzero(as_tuple=True)                                           # (R,)
        rows = self._a16.index_select(0, (vi + start) * K + ki)                            # (R, H)
        if Q == 1 and self._mv:                                  # bf16 output: within the bound
            fv = torch.mv(rows, qb[0]).float()                                             # (R,)
        else:
            fv = (rows.float() @ qb.float().T).gather(1, qi[:, None]).squeeze(1)
        f = torch.full((Q, n * K), float("-inf"))
        f[qi, vi * K + ki] = fv
        return f.view(Q, n, K).amax(-1)

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
        fused = fuse(sc, fs, alpha)
        vals, o = fused.topk(k, dim=1)
        return SearchResult(cand.gather(1, o), vals, sc.gather(1, o), fs.gather(1, o), key.gather(1, o))
