"""Encoding: a checkpoint's model turned into query and video vectors, with its inputs.

- ``load_model``: a model rebuilt from its checkpoint file alone.
- ``TextSource`` / ``VideoSource``: token features per caption (the collection's HDF5, e.g.
  the release's RoBERTa features, else the text encoder over the caption text) and
  model-ready video views (cached in memory for small corpora).
- ``encode_corpus`` / ``encode_query_texts``: whole corpora and caption sets in batches.
- ``QueryEncoder``: typed text at query time, refused when the text encoder is not the one
  the model was trained with (its vectors would be silently wrong).

Usage::

    model, cfg, ckpt = load_model("runs/train/model.pt")
    queries = QueryEncoder.from_checkpoint("runs/train/model.pt").encode_texts(["a man cooks"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from prvr.checkpoint import read_checkpoint
from prvr.collection import Collection
from prvr.config import Config
from prvr.errors import CheckpointError, DataError
from prvr.model import PRVRModel, VideoEmbeddings
from prvr.text import TextEncoder, encoder_identifier
from prvr.views import VideoBatch, collate_queries, collate_videos, video_views

__all__ = ["load_model", "TextSource", "VideoSource", "encode_corpus", "encode_query_texts",
           "encode_token_features", "check_compatible", "check_text_encoder", "QueryEncoder",
           "hdf5_encoder_name", "is_precomputed", "precomputed_message", "PRECOMPUTED_PREFIX"]

CACHE_LIMIT_BYTES = 2 << 30
PRECOMPUTED_PREFIX = "hdf5:"      # the text encoder of a model trained on precomputed HDF5 features


def hdf5_encoder_name(collection: Collection) -> str:
    """What a model trained on ``collection``'s HDF5 records as its text encoder: the encoder
    ``encode_collection`` stored in the file, else ``hdf5:<file>`` (precomputed features, e.g.
    the release's RoBERTa, with no encoder to type queries with)."""
    return collection.text_encoder or f"{PRECOMPUTED_PREFIX}{collection.text_feature_path.name}"


def is_precomputed(text_encoder: str | None) -> bool:
    """Whether a recorded text encoder is precomputed HDF5 features (no encoder to load)."""
    return bool(text_encoder) and text_encoder.startswith(PRECOMPUTED_PREFIX)


def precomputed_message(text_encoder: str, text_dim: int) -> str:
    """Why a model trained on precomputed text features cannot encode typed text, and the way out."""
    return (f"this model was trained on precomputed text features ({text_encoder}) and has no text "
            f"encoder for typed queries: send 'token_features' (L x {text_dim} numbers, the same "
            f"features), or retrain it with `text.source: encoder` (text.encoder over the captions) "
            f"to query it with typed text")


class TextSource:
    """Token features per cap_id: from HDF5, or encoded once from caption text.

    ``text.source`` chooses: ``auto`` the HDF5 when present, else ``text.encoder``; ``hdf5``
    the HDF5 only (a DataError without one); ``encoder`` always ``text.encoder``'s features
    (an HDF5 it wrote itself is read, any other is ignored and the captions are encoded)."""

    def __init__(self, collection: Collection, cfg: Config):
        self.collection = collection
        self.encoder = None
        self._cache: dict[str, np.ndarray] = {}
        source = cfg.text.source
        if source == "hdf5" and not collection.has_text_features:
            raise DataError(f"text.source is hdf5 but the text feature file {collection.text_feature_path} "
                            "is missing: set text.source to auto or encoder to encode the captions")
        if collection.has_text_features and (source != "encoder" or collection.text_encoder == encoder_identifier(
                cfg.text.encoder, cfg.text.precision, cfg.text.quantize)):
            self.dim = collection.text_dim
            self.encoder_name = hdf5_encoder_name(collection)
            return
        self.encoder = TextEncoder.from_config(cfg)
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[PRVRModel, Config, dict]:
    """Rebuild a model from its checkpoint file alone (weights_only: no pickled code runs)."""
    ckpt = read_checkpoint(path, device)
    cfg = Config.from_dict(ckpt["config"])
    model = PRVRModel(cfg.model).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg, ckpt


@torch.no_grad()
def encode_corpus(model: PRVRModel, videos: VideoSource, video_ids: list[str],
                  device: torch.device, batch_size: int = 64) -> tuple[VideoEmbeddings, torch.Tensor]:
    """Video embeddings of a whole corpus on the CPU, plus each video's frame count."""
    clips, spans, attended, nframes = [], [], [], []
    for i in range(0, len(video_ids), batch_size):
        b = videos.batch(video_ids[i:i + batch_size]).to(device)
        emb = model.encode_videos(b.units, b.frames, b.frame_mask)
        clips.append(emb.clips.float().cpu())
        spans.append(emb.spans.cpu())
        attended.append(emb.attended.float().cpu())
        nframes.append(b.num_frames.cpu())
    return (VideoEmbeddings(torch.cat(clips), torch.cat(spans), torch.cat(attended)),
            torch.cat(nframes))


@torch.no_grad()
def encode_token_features(model: PRVRModel, feats: Sequence[np.ndarray],
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Token features, one (L_i, Dt) array per query -> float32 query vectors (Q, H) on the CPU:
    the one query path of evaluation, serving and `prvr index search`."""
    tokens, mask = collate_queries(list(feats), model.cfg.max_desc_len)
    return model.encode_queries(tokens.to(device), mask.to(device)).float().cpu()


def encode_query_texts(model: PRVRModel, texts: TextSource, cap_ids: list[str],
                       device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Query vectors (Q, H) of captions by id, in batches."""
    return torch.cat([encode_token_features(model, texts.get(cap_ids[i:i + batch_size]), device)
                      for i in range(0, len(cap_ids), batch_size)])


def check_compatible(ckpt: dict, collection: Collection, texts: TextSource) -> None:
    """Refuse data whose dims or text encoder differ from what the model was trained on."""
    mc = ckpt["config"]["model"]
    if collection.video_dim != mc["video_dim"]:
        raise CheckpointError(f"video features of {collection.path} are {collection.video_dim}-d, "
                              f"the checkpoint expects {mc['video_dim']}-d")
    if texts.dim != mc["text_dim"]:
        raise CheckpointError(f"text features of {collection.path} are {texts.dim}-d, "
                              f"the checkpoint expects {mc['text_dim']}-d")
    trained_with = ckpt.get("text_encoder")
    if trained_with and texts.encoder_name != trained_with:
        raise CheckpointError(f"text features come from {texts.encoder_name!r}, the checkpoint was "
                              f"trained on {trained_with!r}")


def check_text_encoder(encoder: Any, trained_with: str | None, text_dim: int) -> None:
    """Refuse a text encoder other than the one the model was trained with, or of another size."""
    if is_precomputed(trained_with):
        raise CheckpointError(precomputed_message(trained_with, text_dim))
    if trained_with and encoder.name != trained_with:
        raise CheckpointError(f"text encoder {encoder.name!r} differs from {trained_with!r}, the one "
                              f"the model was trained with; typed queries would be encoded wrongly")
    if encoder.dim != text_dim:
        raise CheckpointError(f"text encoder {encoder.name!r} gives {encoder.dim}-d tokens, the model "
                              f"expects {text_dim}-d")


class QueryEncoder:
    """A model's query side: typed text through its own text encoder, or token features."""

    def __init__(self, model: PRVRModel, encoder: Any, trained_with: str | None):
        if encoder is not None:
            check_text_encoder(encoder, trained_with, model.cfg.text_dim)
        self.model, self.encoder, self.trained_with = model, encoder, trained_with

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "QueryEncoder":
        model, cfg, ckpt = load_model(path)
        return cls(model, TextEncoder.from_config(cfg), ckpt.get("text_encoder"))

    @torch.inference_mode()
    def encode_features(self, feats: Sequence[np.ndarray]) -> torch.Tensor:
        """Token features, one (L_i, Dt) array per query -> query vectors (Q, H)."""
        return encode_token_features(self.model, feats)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentences -> query vectors (Q, H)."""
        if self.encoder is None:
            raise CheckpointError("this model has no text encoder loaded: send token features")
        return self.encode_features(self.encoder.encode(list(texts), batch_size=max(len(texts), 1)))
