"""Approximate candidate retrieval with faiss, then exact MS-SL++ re-ranking.

faiss indexes the N*K clip vectors (inner product = cosine: rows are unit
vectors). A query's nearest clips name candidate videos (each video by its best
clip: the clip-scale score). The frame-scale score is not predicted by the clip
vectors (in trained models a clip and its attended vector are nearly orthogonal,
while a video's K attended vectors are close to each other), so a second, small
index over each video's mean attended vector adds the videos whose frame score
is high. The union is re-scored exactly from the stored clips/attended arrays:
every returned score is exact and only the candidate set is approximate (recall
is measured by the benchmark, not assumed).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prvr.config import SearchConfig
from prvr.errors import SearchIndexError
from prvr.search.exact import SearchResult, as_queries, empty_result
from prvr.search.index import VideoIndex, sha256_file

__all__ = ["FaissSearch", "make_faiss_index", "train_and_add", "build_faiss_into", "ann_params",
           "rerank", "distinct_videos", "video_centroids", "centroid_index"]

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")


def ann_params(cfg: SearchConfig, n_vectors: int) -> dict[str, Any]:
    """The parameters an index is built with (nlist clamped so each list gets >= 39 points)."""
    if cfg.index_type not in INDEX_TYPES:
        raise SearchIndexError(f"search.index_type must be one of {INDEX_TYPES}, got {cfg.index_type!r}")
    nlist = max(1, min(cfg.nlist, n_vectors // 39))
    return {"index_type": cfg.index_type, "nlist": nlist, "nprobe": cfg.nprobe, "hnsw_m": cfg.hnsw_m,
            "ef_search": cfg.ef_search, "pq_m": cfg.pq_m, "metric": "inner_product"}


def make_faiss_index(dim: int, params: dict[str, Any]) -> Any:
    import faiss
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
    return faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["pq_m"], 8, ip)


def _set_search_params(index: Any, params: dict[str, Any]) -> None:
    import faiss
    if params["index_type"] == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif params["index_type"] in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]


def train_and_add(clips: np.ndarray, params: dict[str, Any], chunk: int = 1 << 17,
                  train_size: int = 1 << 17, seed: int = 0) -> Any:
    """Build a faiss index over the rows of clips (N, K, H) (fp16/mmap read in chunks)."""
    N, K, H = clips.shape
    flat = clips.reshape(N * K, H)
    index = make_faiss_index(H, params)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        n = min(len(flat), max(train_size, params["nlist"] * 39))
        rows = np.sort(rng.choice(len(flat), n, replace=False))
        index.train(np.ascontiguousarray(flat[rows], np.float32))
    for i in range(0, len(flat), chunk):
        index.add(np.ascontiguousarray(flat[i:i + chunk], np.float32))
    _set_search_params(index, params)
    return index


def build_faiss_into(folder: str | Path, cfg: SearchConfig) -> dict[str, Any]:
    """Add `faiss.index` to an index folder (not yet swapped in) and record it in the manifest."""
    import faiss
    folder = Path(folder)
    clips = np.load(folder / "clips.npy", mmap_mode="r")
    params = ann_params(cfg, clips.shape[0] * clips.shape[1])
    t0 = time.perf_counter()
    index = train_and_add(clips, params)
    faiss.write_index(index, str(folder / "faiss.index"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["ann"] = {**params, "file": "faiss.index", "ntotal": int(index.ntotal),
                       "bytes": (folder / "faiss.index").stat().st_size,
                       "sha256": sha256_file(folder / "faiss.index"),
                       "build_seconds": round(time.perf_counter() - t0, 3)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest["ann"]


def video_centroids(attended: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """Unit mean attended vector of each video: (N, K, H) -> float32 (N, H), read in chunks."""
    N, _, H = attended.shape
    out = np.empty((N, H), np.float32)
    for i in range(0, N, chunk):
        m = np.asarray(attended[i:i + chunk], np.float32).mean(1)
        out[i:i + chunk] = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    return out


def centroid_index(attended: np.ndarray) -> Any:
    """Exact inner-product index over the N video centroids, stored as fp16 (N x H x 2 bytes)."""
    import faiss
    H = attended.shape[-1]
    index = faiss.IndexScalarQuantizer(H, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.train(np.zeros((1, H), np.float32))
    index.add(video_centroids(attended))
    return index


def distinct_videos(labels: np.ndarray, K: int, need: int) -> list[np.ndarray]:
    """Per row of clip labels (Q, n) (-1 = none), the first `need` distinct videos in rank order."""
    out = []
    for row in labels:
        vids = row[row >= 0] // K
        _, first = np.unique(vids, return_index=True)
        out.append(vids[np.sort(first)][:need])
    return out


def rerank(index: VideoIndex, q: torch.Tensor, cands: list[np.ndarray], k: int,
           alpha: float) -> SearchResult:
    """Exact fused scores of each query's candidate videos (all K clips + the key's attended)."""
    res = empty_result(len(q), k)
    for i, cand in enumerate(cands):
        if len(cand) == 0:
            continue
        cand = np.sort(cand)                                                   # sequential reads
        c = torch.from_numpy(np.asarray(index.clips[cand], np.float32))        # (C, K, H) (a copy)
        sc, key = (c @ q[i]).max(-1)                                           # (C,)
        a = torch.from_numpy(np.asarray(index.attended[cand, key.numpy()], np.float32))  # (C, H)
        fs = a @ q[i]
        fused = alpha * sc + (1 - alpha) * fs
        vals, o = fused.topk(min(k, len(cand)))
        n = len(o)
        res.video_idx[i, :n] = torch.from_numpy(cand)[o]
        res.fused[i, :n], res.clip[i, :n], res.frame[i, :n], res.key_clip[i, :n] = vals, sc[o], fs[o], key[o]
    return res


class FaissSearch:
    """ANN candidates from faiss over clip vectors + exact re-ranking; same interface as ExactSearch.

    Uses `faiss.index` from the index folder when its parameters match `cfg`
    (else builds one in memory: slow for big corpora; build it with `prvr index build --ann`)."""

    def __init__(self, index: VideoIndex, cfg: SearchConfig, faiss_index: Any = None):
        import faiss
        self.index, self.cfg = index, cfg
        self.N, self.K = index.count, index.num_clips
        self.params = ann_params(cfg, self.N * self.K)
        stored = (index.manifest or {}).get("ann")
        if faiss_index is None and stored and index.path is not None \
                and stored.get("index_type") == cfg.index_type:
            f = index.path / stored["file"]
            if not f.is_file() or f.stat().st_size != stored.get("bytes"):
                raise SearchIndexError(f"faiss index {f} is missing or truncated")
            faiss_index = faiss.read_index(str(f), faiss.IO_FLAG_MMAP if stored["bytes"] > 1 << 30 else 0)
            self.params.update({k: stored[k] for k in ("nlist", "hnsw_m", "pq_m") if k in stored})
        if faiss_index is None:
            faiss_index = train_and_add(index.clips, self.params)
        if faiss_index.ntotal != self.N * self.K:
            raise SearchIndexError(f"faiss index holds {faiss_index.ntotal} vectors, the video index "
                                   f"{self.N * self.K} clips: rebuild it")
        _set_search_params(faiss_index, self.params)
        self.faiss = faiss_index
        self.frame_candidates = cfg.frame_candidates
        self.centroids = centroid_index(index.attended) if self.frame_candidates > 0 else None

    @torch.no_grad()
    def search(self, queries: torch.Tensor | np.ndarray, top_k: int = 10, alpha: float | None = None,
               candidates: int | None = None) -> SearchResult:
        q = as_queries(queries)                                                # (Q, H)
        alpha = self.index.alpha if alpha is None else float(alpha)
        k = max(1, min(int(top_k), self.N))
        need = min(self.N, max(k, candidates or self.cfg.candidates))
        total = self.N * self.K
        n = min(total, need * 2)
        qn = np.ascontiguousarray(q.numpy())
        cands: list[np.ndarray] = [np.zeros(0, np.int64)] * len(q)
        todo = np.arange(len(q))
        while len(todo):
            if self.params["index_type"] == "hnsw":
                self.faiss.hnsw.efSearch = max(self.params["ef_search"], n)
            _, labels = self.faiss.search(qn[todo], n)                         # (q, n) clip rows
            found = distinct_videos(labels, self.K, need)
            short = []
            for j, i in enumerate(todo):
                cands[i] = found[j]
                if len(found[j]) < need and n < total and (labels[j] >= 0).all():
                    short.append(i)
            todo, n = np.array(short, dtype=np.int64), min(total, n * 4)
        if self.centroids is not None:
            _, by_frame = self.centroids.search(qn, min(self.N, self.frame_candidates))  # (Q, f)
            cands = [np.union1d(c, f[f >= 0]) for c, f in zip(cands, by_frame)]
        return rerank(self.index, q, cands, k, alpha)
