"""Retrieval at scale over a precomputed video index (MS-SL++ needs only K clip and
K attended vectors per video, so exact search is a few matrix products).

Usage::

    path = build_index("runs/train/model.pt", "data/synth", "test", "index/", cfg)
    index = VideoIndex.load(path, expect_model_version=version)
    engine = make_engine(index, cfg.search)          # exact | faiss | milvus
    res = engine.search(query_vectors, top_k=10)     # SearchResult (Q, k) tensors
"""
from __future__ import annotations

from typing import Any

from prvr.config import SearchConfig
from prvr.errors import SearchIndexError
from prvr.search.exact import ExactSearch, SearchResult
from prvr.search.index import VideoIndex, build_index, build_index_from_embeddings

__all__ = ["VideoIndex", "build_index", "build_index_from_embeddings", "ExactSearch", "FaissSearch",
           "MilvusSearch", "SearchResult", "make_engine", "register_cli"]

BACKENDS = ("exact", "faiss", "milvus")


def make_engine(index: VideoIndex, search_cfg: SearchConfig, **kwargs: Any) -> Any:
    """The engine named by search.backend; all have `.search(queries, top_k, alpha) -> SearchResult`."""
    backend = search_cfg.backend
    if backend == "exact":
        return ExactSearch(index, **kwargs)
    if backend == "faiss":
        from prvr.search.ann import FaissSearch
        return FaissSearch(index, search_cfg, **kwargs)
    if backend == "milvus":
        from prvr.search.milvus import MilvusSearch
        return MilvusSearch(index, search_cfg, **kwargs)
    raise SearchIndexError(f"search.backend must be one of {BACKENDS}, got {backend!r}")


def __getattr__(name: str) -> Any:          # lazy: faiss/pymilvus load only when used
    if name == "FaissSearch":
        from prvr.search.ann import FaissSearch
        return FaissSearch
    if name == "MilvusSearch":
        from prvr.search.milvus import MilvusSearch
        return MilvusSearch
    raise AttributeError(name)


def register_cli(subparsers: Any) -> None:
    from prvr.search.cli import register_cli as _register
    _register(subparsers)
