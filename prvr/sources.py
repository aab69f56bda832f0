"""Where features come from during training and evaluation.

Token features are read from the collection's HDF5 when it exists (users'
RoBERTa features from the public release), else made by the text encoder from
the caption text. Video views are computed from the memory-mapped BigFile and
kept in memory when the corpus is small enough.
"""
from __future__ import annotations

import numpy as np

from prvr.config import Config
from prvr.data import Collection
from prvr.dataset import VideoBatch, collate_videos, video_views

__all__ = ["TextSource", "VideoSource"]

CACHE_LIMIT_BYTES = 2 << 30


class TextSource:
    """Token features per cap_id: from HDF5, or encoded once from caption text."""

    def __init__(self, collection: Collection, cfg: Config):
        self.collection = collection
        self.encoder = None
        self._cache: dict[str, np.ndarray] = {}
        if collection.has_text_features:
            self.dim = collection.text_dim
            self.encoder_name = collection.text_encoder or f"hdf5:{collection.text_feature_path.name}"
        else:
            from prvr.text import TextEncoder
            self.encoder = TextEncoder.from_config(cfg.text)
            self.dim = self.encoder.dim
            self.encoder_name = self.encoder.name
            self._batch = cfg.text.batch_size
            self._texts = {c.cap_id: c.text for s in collection.available_splits()
                           for c in collection.captions(s)}

    def get(self, cap_ids: list[str]) -> list[np.ndarray]:
        if self.encoder is None:
            return self.collection.text_features(cap_ids)
        missing = [c for c in cap_ids if c not in self._cache]
        if missing:
            feats = self.encoder.encode([self._texts[c] for c in missing], batch_size=self._batch)
            self._cache.update(zip(missing, feats))
        return [self._cache[c] for c in cap_ids]


class VideoSource:
    """Model-ready video views by video id, cached in memory for small corpora."""

    def __init__(self, collection: Collection, cfg: Config, video_ids: list[str]):
        self.collection = collection
        self.cfg = cfg.model
        view_rows = cfg.model.map_size + cfg.model.max_ctx_len
        self.cache_enabled = len(video_ids) * view_rows * collection.video_dim * 4 <= CACHE_LIMIT_BYTES
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def _views(self, video_id: str) -> tuple[np.ndarray, np.ndarray, int]:
        hit = self._cache.get(video_id)
        if hit is not None:
            return hit
        views = video_views(self.collection.video_features(video_id), self.cfg)
        if self.cache_enabled:
            self._cache[video_id] = views
        return views

    def batch(self, video_ids: list[str]) -> VideoBatch:
        return collate_videos([self._views(v) for v in video_ids])
