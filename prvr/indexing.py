"""Indexing: a checkpoint's model encodes a corpus into a video index folder for search.

The alpha recorded in the index (and used for its faiss vectors) is the checkpoint's:
the model owns it; a request may still ask for another.

Usage::

    path = build_index("runs/train/model.pt", "data/synth", "all", "index/", cfg)   # or "test", or a list file
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from prvr.checkpoint import resolve_device, sha256_file
from prvr.collection import SPLITS, Collection
from prvr.config import Config
from prvr.encoding import VideoSource, encode_corpus, load_model
from prvr.errors import CheckpointError, SearchIndexError
from prvr.model import VideoEmbeddings
from prvr.search import build_index_from_embeddings

__all__ = ["build_index", "corpus_videos", "ALL_VIDEOS"]

ALL_VIDEOS = "all"            # every video in FeatureData
_SHOWN = 5                    # unknown ids quoted in an error message


def _read_video_list(collection: Collection, path: Path) -> list[str]:
    """Video ids of a list file (one per line; blank lines and # comments skipped), each known
    to the collection's video2frames.txt; a SearchIndexError names the unknown ones."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SearchIndexError(f"cannot read the video list {path}: {exc}") from None
    ids = list(dict.fromkeys(s for s in (line.strip() for line in lines) if s and not s.startswith("#")))
    known = collection.video2frames
    unknown = [v for v in ids if v not in known]
    if unknown:
        more = f" (and {len(unknown) - _SHOWN} more)" if len(unknown) > _SHOWN else ""
        raise SearchIndexError(f"{path}: {len(unknown)} video id(s) not in "
                               f"{collection.feature_folder / 'video2frames.txt'}: "
                               f"{', '.join(map(repr, unknown[:_SHOWN]))}{more}")
    return ids


def corpus_videos(collection: Collection, videos: str) -> tuple[list[str], str]:
    """(video ids, the corpus as the manifest records it) for ``videos``: ``all`` (every video
    in FeatureData, no captions needed), a split name, or a file of video ids."""
    if videos == ALL_VIDEOS:
        ids, spec = collection.all_videos(), ALL_VIDEOS
    elif videos in SPLITS:
        ids, spec = collection.videos(videos), videos
    else:
        path = Path(videos).expanduser()
        if not path.is_file():
            raise SearchIndexError(f"videos {videos!r}: expected {ALL_VIDEOS}, a split ({', '.join(SPLITS)}) "
                                   "or a file of video ids (no such file)")
        ids, spec = _read_video_list(collection, path), str(path.resolve())
    if not ids:
        raise SearchIndexError(f"corpus {spec!r} of {collection.path} has no videos")
    return ids, spec


def build_index(checkpoint: str | Path, data_path: str | Path, videos: str, out_dir: str | Path,
                cfg: Config, model_version: str | None = None, batch_size: int = 64,
                progress: bool = True, ann_type: str | None = None, data_version: str | None = None) -> Path:
    """Encode a corpus's videos with a checkpoint and write (atomically) its index.

    `videos` is ``all`` (every video in FeatureData), a split name or a file of video ids
    (see `corpus_videos`); the manifest records it (``corpus``), ``corpus_size`` and
    ``data_version`` (the dataset's, when known). `model_version` defaults to the
    checkpoint's sha256 (what a registry version resolves to); `ann_type`
    ('flat'|'ivf'|'hnsw'|'ivfpq'|'ivfpqfs') also builds a faiss index."""
    device = resolve_device(cfg.train.device)
    model, ckpt_cfg, ckpt = load_model(checkpoint, device)
    ckpt_sha = sha256_file(checkpoint)
    collection = Collection(data_path, cfg.data.video_feature, cfg.data.text_feature_file)
    if collection.video_dim != ckpt_cfg.model.video_dim:
        raise CheckpointError(f"video features of {collection.path} are {collection.video_dim}-d, "
                              f"the checkpoint {checkpoint} expects {ckpt_cfg.model.video_dim}-d")
    video_ids, corpus = corpus_videos(collection, videos)
    source = VideoSource(collection, ckpt_cfg, video_ids)
    parts, frames = [], []
    label = corpus if corpus == ALL_VIDEOS or corpus in SPLITS else Path(corpus).name
    for i in tqdm(range(0, len(video_ids), batch_size), desc=f"index {label}", unit="batch",
                  disable=not progress):
        emb, nf = encode_corpus(model, source, video_ids[i:i + batch_size], device, batch_size)
        parts.append(emb)
        frames.append(nf)
    emb = VideoEmbeddings(*(torch.cat([getattr(p, f) for p in parts]) for f in VideoEmbeddings._fields))
    ann = cfg.search.replace(index_type=ann_type) if ann_type is not None else None
    return build_index_from_embeddings(
        emb, torch.cat(frames).numpy(), video_ids, out_dir, model_version=model_version or ckpt_sha,
        map_size=ckpt_cfg.model.map_size, alpha=ckpt_cfg.model.alpha, dtype=cfg.search.dtype,
        fps=cfg.serve.fps, checkpoint_sha256=ckpt_sha, text_encoder=ckpt.get("text_encoder"),
        ann=ann, meta={"corpus": corpus, "corpus_size": len(video_ids), "data_version": data_version},
        video_info=[_described(collection, v) for v in video_ids])


def _described(collection: Collection, video_id: str) -> dict[str, Any] | None:
    """The videos.jsonl entry of a video without its id (None when not described)."""
    info = collection.video_info.get(video_id)
    return None if info is None else info.model_dump(exclude={"video_id"}, exclude_none=True)
