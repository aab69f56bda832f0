"""Milvus backend: one row per (video, clip), grouped search by video.

A grouping search over the clip vectors returns each candidate video's best
clip, i.e. the clip-scale score S_c and the key clip; the row also carries the
KCGA attended vector of that clip, so the frame-scale score and the fused score
follow without another lookup. Works with Milvus Lite (a local .db file, no
server) or a Milvus server URI.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from prvr.config import SearchConfig
from prvr.errors import SearchIndexError
from prvr.model import fuse
from prvr.search.exact import SearchResult, as_queries, empty_result
from prvr.search.index import VideoIndex

__all__ = ["MilvusSearch", "MAX_GROUPS"]

MAX_GROUPS = 16384          # Milvus' topk limit


def _collection_name(index: VideoIndex) -> str:
    tag = re.sub(r"[^0-9A-Za-z_]", "_", str(index.model_version or "anon"))[:40]
    return f"prvr_{tag}_{index.count}"


class MilvusSearch:
    """Same interface as ExactSearch; rows are inserted once per (model version, corpus)."""

    def __init__(self, index: VideoIndex, cfg: SearchConfig, uri: str | None = None,
                 collection: str | None = None, rebuild: bool = False, insert_batch: int = 4096):
        try:   # pymilvus: optional and slow to import; loaded only for search.backend=milvus
            from pymilvus import DataType, MilvusClient
        except ImportError as exc:
            raise SearchIndexError(f"search.backend=milvus needs pymilvus (+ milvus-lite): {exc}") from None
        self.index, self.cfg = index, cfg
        self.N, self.K, self.H = index.count, index.num_clips, index.dim
        uri = uri or cfg.milvus_uri or (str(index.path / "milvus.db") if index.path else None)
        if uri is None:
            raise SearchIndexError("search.milvus_uri is not set and the index has no folder for milvus.db")
        if "://" not in uri:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        self.client = MilvusClient(uri)
        self.name = collection or _collection_name(index)
        c = self.client
        if rebuild and c.has_collection(self.name):
            c.drop_collection(self.name)
        if c.has_collection(self.name):
            c.load_collection(self.name)
            rows = int(c.get_collection_stats(self.name).get("row_count", 0))
            if rows == self.N * self.K:
                return
            c.drop_collection(self.name)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)      # video * K + clip
        schema.add_field("video", DataType.INT64)
        schema.add_field("clip", DataType.INT64)
        schema.add_field("start", DataType.INT32)
        schema.add_field("end", DataType.INT32)
        schema.add_field("clip_vec", DataType.FLOAT_VECTOR, dim=self.H)
        schema.add_field("att_vec", DataType.FLOAT_VECTOR, dim=self.H)
        params = c.prepare_index_params()
        params.add_index("clip_vec", index_type="FLAT", metric_type="IP")
        params.add_index("att_vec", index_type="FLAT", metric_type="IP")
        c.create_collection(self.name, schema=schema, index_params=params)
        self._insert(insert_batch)
        c.load_collection(self.name)

    def _insert(self, batch: int) -> None:
        K = self.K
        per = max(1, batch // K)
        for s in range(0, self.N, per):
            e = min(self.N, s + per)
            clips = np.asarray(self.index.clips[s:e], np.float32)              # (n, K, H)
            att = np.asarray(self.index.attended[s:e], np.float32)
            spans = np.asarray(self.index.spans[s:e])
            rows = [{"pk": v * K + k, "video": v, "clip": k, "start": int(spans[v - s, k, 0]),
                     "end": int(spans[v - s, k, 1]), "clip_vec": clips[v - s, k], "att_vec": att[v - s, k]}
                    for v in range(s, e) for k in range(K)]
            self.client.insert(self.name, rows)
        self.client.flush(self.name)

    @torch.no_grad()
    def search(self, queries: torch.Tensor | np.ndarray, top_k: int = 10, alpha: float | None = None,
               candidates: int | None = None) -> SearchResult:
        """Top `candidates` videos by S_c (grouping search), re-ranked by the fused score."""
        q = as_queries(queries)                                                # (Q, H)
        alpha = self.index.alpha if alpha is None else float(alpha)
        k = max(1, min(int(top_k), self.N))
        if len(q) == 0:                                  # nothing to rank
            return empty_result(0, k)
        limit = min(self.N, MAX_GROUPS, max(k, candidates or self.cfg.milvus_candidates))
        hits = self.client.search(self.name, data=q.numpy().tolist(), anns_field="clip_vec", limit=limit,
                                  group_by_field="video", output_fields=["video", "clip", "att_vec"],
                                  search_params={"metric_type": "IP"})
        res = empty_result(len(q), k)
        for i, row in enumerate(hits):
            if not row:
                continue
            vid = torch.tensor([h["entity"]["video"] for h in row])
            key = torch.tensor([h["entity"]["clip"] for h in row])
            sc = torch.tensor([h["distance"] for h in row], dtype=torch.float32)
            att = torch.from_numpy(np.asarray([h["entity"]["att_vec"] for h in row], np.float32))
            fs = att @ q[i]
            fused = fuse(sc, fs, alpha)
            vals, o = fused.topk(min(k, len(row)))
            n = len(o)
            res.video_idx[i, :n], res.fused[i, :n] = vid[o], vals
            res.clip[i, :n], res.frame[i, :n], res.key_clip[i, :n] = sc[o], fs[o], key[o]
        return res
