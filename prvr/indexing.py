"""Indexing: a checkpoint's model encodes a corpus into a video index folder for search.

The alpha recorded in the index (and used for its faiss vectors) is the checkpoint's:
the model owns it; a request may still ask for another.

Usage::

    path = build_index("runs/train/model.pt", "data/synth", "test", "index/", cfg)
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from prvr.checkpoint import resolve_device, sha256_file
from prvr.collection import Collection
from prvr.config import Config
from prvr.encoding import VideoSource, encode_corpus, load_model
from prvr.errors import CheckpointError, SearchIndexError
from prvr.model import VideoEmbeddings
from prvr.search import build_index_from_embeddings

__all__ = ["build_index"]


def build_index(checkpoint: str | Path, data_path: str | Path, split: str, out_dir: str | Path,
                cfg: Config, model_version: str | None = None, batch_size: int = 64,
                progress: bool = True, ann_type: str | None = None) -> Path:
    """Encode a split's videos with a checkpoint and write (atomically) its index.

    `model_version` defaults to the checkpoint's sha256 (what a registry version
    resolves to); `ann_type` ('flat'|'ivf'|'hnsw'|'ivfpq') also builds a faiss index."""
    device = resolve_device(cfg.train.device)
    model, ckpt_cfg, ckpt = load_model(checkpoint, device)
    ckpt_sha = sha256_file(checkpoint)
    collection = Collection(data_path, cfg.data.video_feature, cfg.data.text_feature_file)
    if collection.video_dim != ckpt_cfg.model.video_dim:
        raise CheckpointError(f"video features of {collection.path} are {collection.video_dim}-d, "
                              f"the checkpoint {checkpoint} expects {ckpt_cfg.model.video_dim}-d")
    video_ids = collection.videos(split)
    if not video_ids:
        raise SearchIndexError(f"split {split!r} of {collection.path} has no videos")
    videos = VideoSource(collection, ckpt_cfg, video_ids)
    parts, frames = [], []
    for i in tqdm(range(0, len(video_ids), batch_size), desc=f"index {split}", unit="batch",
                  disable=not progress):
        emb, nf = encode_corpus(model, videos, video_ids[i:i + batch_size], device, batch_size)
        parts.append(emb)
        frames.append(nf)
    emb = VideoEmbeddings(*(torch.cat([getattr(p, f) for p in parts]) for f in VideoEmbeddings._fields))
    ann = cfg.search.replace(index_type=ann_type) if ann_type is not None else None
    return build_index_from_embeddings(
        emb, torch.cat(frames).numpy(), video_ids, out_dir, model_version=model_version or ckpt_sha,
        map_size=ckpt_cfg.model.map_size, alpha=ckpt_cfg.model.alpha, dtype=cfg.search.dtype,
        fps=cfg.serve.fps, checkpoint_sha256=ckpt_sha, text_encoder=ckpt.get("text_encoder"),
        ann=ann)
