"""Retrieval at scale over a precomputed video index (MS-SL++ needs only K clip and
K attended vectors per video, so exact search is a few matrix products).

Model-free: engines see arrays and query vectors, never a checkpoint (`prvr.indexing`
encodes a corpus into an index; `prvr.encoding` encodes queries).

Usage::

    index = VideoIndex.load(path, expect_model_version=version)
    engine = make_engine(index, cfg.search)          # exact | faiss | milvus
    res = engine.search(query_vectors, top_k=10)     # SearchResult (Q, k) tensors
"""
from __future__ import annotations

from typing import Any

from prvr.config import SearchConfig
from prvr.errors import SearchIndexError
from prvr.search.ann import FaissSearch
from prvr.search.build import build_index_from_embeddings
from prvr.search.exact import ExactSearch, SearchResult
from prvr.search.index import VideoIndex
from prvr.search.milvus import MilvusSearch

__all__ = ["VideoIndex", "build_index_from_embeddings", "ExactSearch", "FaissSearch", "MilvusSearch",
           "SearchResult", "make_engine", "BACKENDS"]

BACKENDS = ("exact", "faiss", "milvus")


def make_engine(index: VideoIndex, search_cfg: SearchConfig, **kwargs: Any) -> Any:
    """The engine named by search.backend; all have `.search(queries, top_k, alpha) -> SearchResult`."""
    engines = {"exact": lambda: ExactSearch(index, **{"precision": search_cfg.screen,
                                                      "fused": search_cfg.fused_screen,
                                                      "threads": search_cfg.screen_threads or None, **kwargs}),
               "faiss": lambda: FaissSearch(index, search_cfg, **kwargs),
               "milvus": lambda: MilvusSearch(index, search_cfg, **kwargs)}
    if search_cfg.backend not in engines:
        raise SearchIndexError(f"search.backend must be one of {BACKENDS}, got {search_cfg.backend!r}")
    return engines[search_cfg.backend]()
