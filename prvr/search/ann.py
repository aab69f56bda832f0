"""Approximate candidate retrieval with faiss, then exact MS-SL++ re-ranking.

faiss indexes one vector per clip: its *fused* vector z = fuse(c, a, alpha) of the
clip vector c and its KCGA-attended vector a. q.z is the fused score the video would
get if that clip were its key clip, so a video's true fused score is q.z of its
key clip, and every video in the true top-k owns a clip whose q.z is at least
the k-th best score. (Indexing clip vectors alone misses videos ranked high by
their frame-scale score: in trained models a clip and its attended vector are
nearly orthogonal.)

Search is three steps:

1. faiss returns the `refine` best clips by approximate q.z (IVF-PQ fast scan by
   default: 4-bit codes, 48 bytes per clip);
2. those clips are re-scored, which picks the `candidates` best distinct videos.
   `search.refine_codes` says with what: `arrays` gathers their rows from the stored
   arrays (exact q.z, with the request's alpha); `fp16`, `sq8`/`sq6`/`sq4`, `rabitq<b>` or
   `pq<M>` let faiss re-score them from a second, finer copy of z it holds in RAM (an
   IndexRefine: fewer bytes touched, no Python per hit; z at the index's alpha);
3. the candidates are re-ranked by the exact fused score (max over all K clips).

Every returned score is exact; only the candidate set is approximate, and its
recall against the exact engine is measured by the benchmark, not assumed.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm import tqdm

from prvr.config import ANN_INDEX_TYPES, REFINE_CODES, SearchConfig
from prvr.checkpoint import sha256_file
from prvr.errors import SearchIndexError
from prvr.model import fuse
from prvr.search.exact import SearchResult, as_queries, empty_result
from prvr.search.index import RowPrefetcher, VideoIndex, advise_random
from prvr.search.screen import _view

__all__ = ["FaissSearch", "make_faiss_index", "train_and_add", "build_faiss_into", "ann_params",
           "rerank", "best_videos", "distinct_videos", "fused_rows", "stored_ann_fits", "read_faiss",
           "MAP_ABOVE_BYTES"]


# Stored faiss files above this size are opened memory-mapped (IO_FLAG_MMAP_IFC): their flat
# codes (re-score codes, flat / HNSW storage, plain IVF lists) stay in the page cache, shared by
# every worker serving the same index, and are read from disk as queries first touch them; the
# fast-scan lists are always copied into RAM. Read into RAM whole, faiss took more than twice the
# file's size while loading (an unrecorded observation: the 7.9 GB million-video sq4 file was
# killed for memory). IO_FLAG_MMAP on top of it fails for plain IVF lists ("mmap only supported
# for File objects"), and its OnDiskInvertedLists cannot be cloned.
MAP_ABOVE_BYTES = 1 << 30


def read_faiss(path: str | Path, mapped: bool) -> Any:
    """A stored faiss index, its flat codes memory-mapped when `mapped` (see MAP_ABOVE_BYTES)."""
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0)


def ann_params(cfg: SearchConfig, n_vectors: int, alpha: float) -> dict[str, Any]:
    """The parameters an index is built with (nlist clamped so each list gets >= 39 points)."""
    if cfg.index_type not in ANN_INDEX_TYPES:
        raise SearchIndexError(f"search.index_type must be one of {ANN_INDEX_TYPES}, got {cfg.index_type!r}")
    nlist = max(1, min(cfg.nlist, n_vectors // 39))
    return {"index_type": cfg.index_type, "nlist": nlist, "nprobe": cfg.nprobe, "hnsw_m": cfg.hnsw_m,
            "ef_search": cfg.ef_search, "pq_m": cfg.pq_m, "metric": "inner_product",
            "vectors": "fused", "alpha": float(alpha), "refine_codes": cfg.refine_codes}


def stored_ann_fits(stored: dict[str, Any] | None, cfg: SearchConfig) -> bool:
    """Whether an index manifest's faiss entry is of the type `cfg` asks for, over fused vectors
    (its re-score codes are checked separately: they can be swapped without a rebuild)."""
    return bool(stored) and stored.get("index_type") == cfg.index_type and stored.get("vectors") == "fused"


def make_faiss_index(dim: int, params: dict[str, Any]) -> Any:
    """The index `params` describe; with refine codes, wrapped in an IndexRefine whose second copy
    of z (in RAM) re-scores the hits instead of the stored arrays."""
    base = _make_base_index(dim, params)
    store = _make_refine_store(dim, params.get("refine_codes", "arrays"))
    return base if store is None else faiss.IndexRefine(base, store)


def _make_refine_store(dim: int, codes: str) -> Any:
    """The in-RAM copy of z that re-scores the hits, by bytes per clip (H = the vector size):
    fp16 (2H, ~exact), sq8 (H), sq6 (3H/4), sq4 (H/2), rabitq<b> (RaBitQ: a random rotation, then
    b bits per dimension + 20 bytes; an unbiased inner-product estimate), pq<M> (M); None = the
    arrays. Error on q.z of 384-d unit z (std, 100k videos): pq96 0.012, rabitq3 0.0075 (164 bytes),
    sq4 0.0066 (192), rabitq4 0.0043 (212): docs/serving.md, A million videos."""
    if not REFINE_CODES.fullmatch(str(codes)):
        raise SearchIndexError(f"search.refine_codes must be arrays, fp16, sq8, sq6, sq4, rabitq<b> or pq<M>, "
                               f"got {codes!r}")
    ip = faiss.METRIC_INNER_PRODUCT
    if codes == "arrays":
        return None
    if codes in _sq_types():
        return faiss.IndexScalarQuantizer(dim, _sq_types()[codes], ip)
    if codes.startswith("rabitq"):
        store = faiss.IndexRaBitQ(dim, ip, int(codes[6:]))
        store.qb = 0                         # the query in fp32: no query quantisation error
        return store
    m = int(codes[2:])
    if dim % m:
        raise SearchIndexError(f"search.refine_codes={codes}: {m} must divide the vector size {dim}")
    return faiss.IndexPQ(dim, m, 8, ip)


def _sq_types() -> dict[str, int]:
    """Scalar-quantizer re-score codes by name (faiss is imported lazily)."""
    sq = faiss.ScalarQuantizer
    return {"fp16": sq.QT_fp16, "sq8": sq.QT_8bit, "sq6": sq.QT_6bit, "sq4": sq.QT_4bit}


def _base(index: Any) -> Any:
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def _codes_of(index: Any) -> str:
    """The re-score codes a faiss index carries: `arrays` when it is not an IndexRefine."""
    if not isinstance(index, faiss.IndexRefine):
        return "arrays"
    store = faiss.downcast_index(index.refine_index)
    if isinstance(store, faiss.IndexPQ):
        return f"pq{store.pq.M}"
    if isinstance(store, faiss.IndexScalarQuantizer):
        return next((name for name, qtype in _sq_types().items() if qtype == store.sq.qtype), "other")
    if isinstance(store, faiss.IndexRaBitQ):
        return f"rabitq{store.rabitq.nb_bits}"
    return "other"


def _make_base_index(dim: int, params: dict[str, Any]) -> Any:
    kind, ip = params["index_type"], faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], ip)
        index.hnsw.efConstruction = max(40, params["hnsw_m"] * 2)
        return index
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        return faiss.IndexIVFFlat(quantizer, dim, params["nlist"], ip)
    if dim % params["pq_m"]:
        raise SearchIndexError(f"search.pq_m={params['pq_m']} must divide the vector size {dim}")
    if kind == "ivfpqfs":       # 4-bit codes scanned with SIMD lookup tables
        return faiss.IndexIVFPQFastScan(quantizer, dim, params["nlist"], params["pq_m"], 4, ip)
    return faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], 8, ip)


def _set_search_params(index: Any, params: dict[str, Any]) -> None:
    if params["index_type"] == "hnsw":
        _base(index).hnsw.efSearch = params["ef_search"]
    elif params["index_type"] in ("ivf", "ivfpq", "ivfpqfs"):
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]


def fused_rows(clips: np.ndarray, attended: np.ndarray, alpha: float, lo: int, hi: int) -> np.ndarray:
    """fuse(c, a, alpha) of flat rows lo:hi of (R, H) arrays (fp16/mmap): float32 (n, H)."""
    c = torch.from_numpy(np.array(clips[lo:hi])).float()       # copies: mmaps are read-only
    a = torch.from_numpy(np.array(attended[lo:hi])).float()
    return fuse(c, a, alpha).numpy()


def train_and_add(clips: np.ndarray, attended: np.ndarray, params: dict[str, Any], chunk: int = 1 << 17,
                  train_size: int = 1 << 17, seed: int = 0, progress: bool = False) -> Any:
    """Build a faiss index over the fused vectors of clips/attended (N, K, H), read in chunks."""
    index = _fill(make_faiss_index(clips.shape[2], params), clips, attended, params, chunk, train_size,
                  seed, progress)
    _set_search_params(index, params)
    return index


def _fill(index: Any, clips: np.ndarray, attended: np.ndarray, params: dict[str, Any], chunk: int = 1 << 17,
          train_size: int = 1 << 17, seed: int = 0, progress: bool = False) -> Any:
    """Train `index` (when it needs it) on a sample of the fused vectors, then add them all."""
    N, K, H = clips.shape
    fc, fa = clips.reshape(N * K, H), attended.reshape(N * K, H)
    alpha = params["alpha"]
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        n = min(len(fc), max(train_size, params["nlist"] * 39))
        rows = np.sort(rng.choice(len(fc), n, replace=False))
        index.train(fused_rows(fc[rows], fa[rows], alpha, 0, len(rows)))
    lists = _coarse_lists(index)
    # fast scan packs its codes in blocks and takes no given lists: fill an IVF-PQ twin (same
    # quantizer and codebooks), then convert it; the result searches exactly like index.add's
    target = _ivfpq_twin(index) if isinstance(index, faiss.IndexIVFPQFastScan) and lists else index
    with tqdm(total=len(fc), desc=f"faiss {params['index_type']}", unit="clip", disable=not progress) as bar:
        for i in range(0, len(fc), chunk):
            x = fused_rows(fc, fa, alpha, i, i + chunk)
            if lists is None:
                index.add(x)
            else:                      # the inverted lists' numbers, found by torch (kept alive)
                where = np.ascontiguousarray(lists(x), np.int64)
                target.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(where))
            bar.update(min(chunk, len(fc) - i))
    return index if target is index else faiss.IndexIVFPQFastScan(target)


def _ivfpq_twin(fast: Any) -> Any:
    """An empty IndexIVFPQ with `fast`'s (trained) coarse quantizer and product quantizer."""
    twin = faiss.IndexIVFPQ(faiss.clone_index(fast.quantizer), fast.d, fast.nlist, fast.pq.M,
                            fast.pq.nbits, fast.metric_type)
    twin.pq, twin.by_residual, twin.is_trained = fast.pq, fast.by_residual, True
    twin.use_precomputed_table = 0
    return twin


def _coarse_lists(index: Any) -> Any:
    """For an IVF index with a flat coarse quantizer: x -> the list of each row (int64), its
    nearest centroid by the quantizer's metric, from one torch matrix product. faiss's own
    assignment was about 3.5x slower here and took nearly all of a large fast-scan build;
    `add_core` then only encodes. None for other indexes (they add as usual)."""
    other_fast_scan = isinstance(index, faiss.IndexIVFFastScan) and not isinstance(index, faiss.IndexIVFPQFastScan)
    if not isinstance(index, faiss.IndexIVF) or other_fast_scan:        # no IVF-PQ twin for those
        return None
    quantizer = faiss.downcast_index(index.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal != index.nlist:
        return None
    centroids = torch.from_numpy(quantizer.reconstruct_n(0, quantizer.ntotal))            # (nlist, H)
    if quantizer.metric_type == faiss.METRIC_INNER_PRODUCT:
        bias = torch.zeros(len(centroids))
    elif quantizer.metric_type == faiss.METRIC_L2:       # argmin |x - c|^2 = argmax x.c - |c|^2 / 2
        bias = -0.5 * (centroids * centroids).sum(1)
    else:
        return None
    return lambda x: torch.addmm(bias, torch.from_numpy(x), centroids.T).argmax(1).numpy()


def build_faiss_into(folder: str | Path, cfg: SearchConfig) -> dict[str, Any]:
    """Add `faiss.index` to an index folder (not yet swapped in) and record it in the manifest."""
    folder = Path(folder)
    clips = np.load(folder / "clips.npy", mmap_mode="r")
    attended = np.load(folder / "attended.npy", mmap_mode="r")
    manifest = json.loads((folder / "manifest.json").read_text())
    params = ann_params(cfg, clips.shape[0] * clips.shape[1], manifest["alpha"])
    t0 = time.perf_counter()
    index = train_and_add(clips, attended, params, progress=True)
    faiss.write_index(index, str(folder / "faiss.index"))
    manifest["ann"] = {**params, "file": "faiss.index", "ntotal": int(index.ntotal),
                       "bytes": (folder / "faiss.index").stat().st_size,
                       "sha256": sha256_file(folder / "faiss.index"),
                       "build_seconds": round(time.perf_counter() - t0, 3)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest["ann"]


DOT_ROWS = 4096      # rows gathered and converted at a time: their fp32 copy stays in cache


def _gather(arr: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """float32 rows of a flat (R, H) array (fp16/fp32, maybe memory-mapped); rows sorted by caller.
    torch's index_select copies rows in parallel: ~4x faster than numpy's fancy indexing here;
    fp16 rows are copied as int16 (the same bytes: index_select's fp16 copy was several times
    slower) and converted after."""
    a = np.asarray(arr)
    half = a.dtype == np.float16
    view = _view(a.view(np.int16) if half else a)
    got = view.index_select(0, torch.from_numpy(np.asarray(rows, np.int64)))
    return (got.view(torch.float16) if half else got).float()


def _dots(arr: np.ndarray, rows: np.ndarray, q: torch.Tensor) -> np.ndarray:
    """q . arr[rows] for a flat (R, H) array and one query (H,): float32 (len(rows),).

    fp32 arrays go to faiss, which reads each row once and writes only the dot products (one
    query, 2,179 videos: 2.5x faster than gathering the rows first once the caches are cold);
    fp16 rows are gathered and converted to fp32 DOT_ROWS at a time (the re-rank of thousands
    of candidates: one fp32 copy of all their rows was several times slower)."""
    rows = np.asarray(rows, np.int64)
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        out = np.empty(len(rows), np.float32)
        for i in range(0, len(rows), DOT_ROWS):
            out[i:i + DOT_ROWS] = (_gather(arr, rows[i:i + DOT_ROWS]) @ q).numpy()
        return out
    x = np.ascontiguousarray(q.numpy(), np.float32)
    out = np.empty(len(rows), np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(np.asarray(arr)),
                                     faiss.swig_ptr(rows), arr.shape[1], 1, len(rows))
    return out


def _first_distinct(videos: np.ndarray, need: int) -> np.ndarray:
    """The first `need` distinct values of `videos`, in order (a dict keeps insertion order:
    cheaper than np.unique's sort for the ~1,000 hits of one query)."""
    return np.fromiter(itertools.islice(dict.fromkeys(videos.tolist()), need), np.int64)


def distinct_videos(labels: np.ndarray, K: int, need: int) -> list[np.ndarray]:
    """Per row of clip hits (Q, n) (-1 = none), the first `need` distinct videos in rank order."""
    return [_first_distinct(row[row >= 0] // K, need) for row in labels]


def best_videos(index: VideoIndex, q: torch.Tensor, labels: np.ndarray, need: int,
                alpha: float) -> list[np.ndarray]:
    """Per query, the `need` best distinct videos among its ANN clip hits (Q, L) (-1 = none),
    ranked by the exact q.z of each hit (z recomputed from the stored arrays with `alpha`)."""
    N, K, H = index.clips.shape
    fc, fa = index.clips.reshape(N * K, H), index.attended.reshape(N * K, H)
    out = []
    for i, row in enumerate(labels):
        rows = np.sort(row[row >= 0])                                          # sequential reads
        z = fuse(_dots(fc, rows, q[i]), _dots(fa, rows, q[i]), alpha)  # (L,)
        out.append(_first_distinct(rows[np.argsort(-z, kind="stable")] // K, need))
    return out


def rerank(index: VideoIndex, q: torch.Tensor, cands: list[np.ndarray], k: int,
           alpha: float, read_ahead: bool = False) -> SearchResult:
    """Exact fused scores of each query's candidate videos (all K clips + the key's attended).
    numpy, not torch: a few dozen values per query, where torch's per-op overhead dominates.
    `read_ahead` asks for memory-mapped rows ahead, for all queries at once: every candidate's K
    clip rows, then every key clip's attended row (a corpus larger than RAM then waits for its disk
    reads side by side instead of one page fault after another)."""
    N, K, H = index.clips.shape
    fc, fa = index.clips.reshape(N * K, H), index.attended.reshape(N * K, H)
    cands = [np.sort(c) for c in cands]                                        # sequential reads
    ahead_c, ahead_a = (RowPrefetcher.of(fc), RowPrefetcher.of(fa)) if read_ahead else (None, None)
    if ahead_c is not None:
        for cand in cands:
            ahead_c(cand * K, K)
    every = [_dots(fc, (c[:, None] * K + np.arange(K)).reshape(-1), q[i]).reshape(len(c), K) if len(c)
             else np.zeros((0, K), np.float32) for i, c in enumerate(cands)]  # (C, K) per query
    keys = [e.argmax(1) for e in every]                                        # (C,) first best clip
    if ahead_a is not None:
        for cand, key in zip(cands, keys):
            ahead_a(cand * K + key)
    video_idx, key_clip = np.full((len(q), k), -1, np.int64), np.zeros((len(q), k), np.int64)
    fused, clip, frame = (np.full((len(q), k), -np.inf, np.float32) for _ in range(3))
    for i, (cand, key) in enumerate(zip(cands, keys)):
        if len(cand) == 0:
            continue
        sc = every[i][np.arange(len(cand)), key]                               # (C,)
        fs = _dots(fa, cand * K + key, q[i])                                   # (C,)
        f = fuse(sc, fs, alpha)
        o = np.argsort(-f, kind="stable")[:k]
        n = len(o)
        video_idx[i, :n], fused[i, :n], clip[i, :n], frame[i, :n], key_clip[i, :n] = \
            cand[o], f[o], sc[o], fs[o], key[o]
    return SearchResult(*(torch.from_numpy(a) for a in (video_idx, fused, clip, frame, key_clip)))


class FaissSearch:
    """ANN candidates from faiss over fused clip vectors + exact re-ranking; same interface as
    ExactSearch.

    Uses `faiss.index` from the index folder when it was built with `cfg`'s index type
    (else builds one in memory: slow for big corpora; build it with `prvr index build --ann`).
    `cfg.refine_codes` wins over the codes the stored file carries: those are freed (the base
    index is kept as a copy) and the asked ones built in memory (seconds for a TVR-sized corpus).
    `cfg.read_ahead`: read the candidates' rows of memory-mapped arrays ahead, all at once (`rerank`)."""

    def __init__(self, index: VideoIndex, cfg: SearchConfig, faiss_index: Any = None):
        self.index, self.cfg = index, cfg
        self.N, self.K = index.count, index.num_clips
        self.params = ann_params(cfg, self.N * self.K, index.alpha)
        stored = (index.manifest or {}).get("ann")
        if faiss_index is None and index.path is not None and stored_ann_fits(stored, cfg):
            f = index.path / stored["file"]
            if not f.is_file() or f.stat().st_size != stored.get("bytes"):
                raise SearchIndexError(f"faiss index {f} is missing or truncated")
            faiss_index = read_faiss(f, stored["bytes"] > MAP_ABOVE_BYTES)
            self.params.update({k: stored[k] for k in ("nlist", "hnsw_m", "pq_m", "alpha") if k in stored})
        if faiss_index is None:
            faiss_index = train_and_add(index.clips, index.attended, self.params)
        if faiss_index.ntotal != self.N * self.K:
            raise SearchIndexError(f"faiss index holds {faiss_index.ntotal} vectors, the video index "
                                   f"{self.N * self.K} clips: rebuild it")
        self.faiss = self._with_refine_codes(faiss_index, cfg.refine_codes)
        self.params["refine_codes"] = _codes_of(self.faiss)
        _set_search_params(self.faiss, self.params)
        if isinstance(self.faiss, faiss.IndexRefine):
            self.faiss.k_factor = 1.0               # re-score exactly the hits asked for
        for arr in (index.clips, index.attended):   # re-ranking reads scattered rows: no readahead
            advise_random(arr)

    def _with_refine_codes(self, faiss_index: Any, codes: str) -> Any:
        """`faiss_index` re-scoring its hits with `codes` (its base alone for `arrays`); codes it
        carries but the config does not ask for are freed with it."""
        if _codes_of(faiss_index) == codes:
            return faiss_index
        base = _base(faiss_index)
        if base is not faiss_index:                  # a copy of the base: the old codes are freed
            base = faiss.clone_index(base)
        store = _make_refine_store(base.d, codes)
        if store is None:
            return base
        return faiss.IndexRefine(base, _fill(store, self.index.clips, self.index.attended, self.params))

    @torch.no_grad()
    def search(self, queries: torch.Tensor | np.ndarray, top_k: int = 10, alpha: float | None = None,
               candidates: int | None = None, refine: int | None = None) -> SearchResult:
        q = as_queries(queries)                                                # (Q, H)
        alpha = self.index.alpha if alpha is None else float(alpha)
        k = max(1, min(int(top_k), self.N))
        if len(q) == 0:                                  # nothing to rank
            return empty_result(0, k)
        need = min(self.N, max(k, candidates or self.cfg.candidates))
        total = self.N * self.K
        n = min(total, max(refine or self.cfg.refine, 2 * need))
        in_faiss = self.params["refine_codes"] != "arrays"           # an IndexRefine re-scores
        qn = np.ascontiguousarray(q.numpy())
        cands: list[np.ndarray] = [np.zeros(0, np.int64)] * len(q)
        todo = np.arange(len(q))
        while len(todo):
            if self.params["index_type"] == "hnsw":
                _base(self.faiss).hnsw.efSearch = max(self.params["ef_search"], n)
            _, labels = self.faiss.search(qn[todo], n)                         # (q, n) clip rows
            if in_faiss:                           # faiss re-scored and sorted all n hits
                found = distinct_videos(labels, self.K, need)
            else:                                  # exact q.z of the n hits from the arrays
                found = best_videos(self.index, q[todo], labels, need, alpha)
            short = []
            for j, i in enumerate(todo):
                cands[i] = found[j]
                if len(found[j]) < need and n < total and (labels[j] >= 0).all():
                    short.append(i)                                            # too few videos: widen
            todo, n = np.array(short, dtype=np.int64), min(total, n * 4)
        return rerank(self.index, q, cands, k, alpha, self.cfg.read_ahead)
