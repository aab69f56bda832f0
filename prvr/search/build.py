"""Writing a video index folder: normalised arrays, frame spans, ids and a manifest, swapped in
atomically (a reader never sees half an index), plus the faiss index when asked for.

Usage::

    build_index_from_embeddings(emb, num_frames, ids, "index/", model_version="v0003",
                                map_size=32, alpha=0.7)
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prvr.checkpoint import atomic_dir, sha256_file
from prvr.config import SearchConfig
from prvr.errors import SearchIndexError
from prvr.search.ann import build_faiss_into
from prvr.search.index import ARRAY_FILES, DTYPES, INDEX_FORMAT, VIDEO_INFO_FILE
from prvr.views import units_to_frames

__all__ = ["build_index_from_embeddings", "write_manifest", "units_to_frames_int32"]


def _normalise(x: torch.Tensor | np.ndarray) -> np.ndarray:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return torch.nn.functional.normalize(t, dim=-1).numpy()


def write_manifest(folder: Path, meta: dict[str, Any], hash_files: bool = True) -> dict[str, Any]:
    """Describe every array file of `folder` (bytes, shape, dtype, sha256) plus `meta`."""
    files = {}
    for name in ARRAY_FILES:
        f = folder / f"{name}.npy"
        arr = np.load(f, mmap_mode="r")
        files[f.name] = {"bytes": f.stat().st_size, "shape": list(arr.shape), "dtype": str(arr.dtype),
                         "sha256": sha256_file(f) if hash_files else None}
    clips = files["clips.npy"]["shape"]
    manifest = {"format": INDEX_FORMAT, "count": clips[0], "num_clips": clips[1], "hidden": clips[2],
                "dtype": files["clips.npy"]["dtype"], "files": files,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def build_index_from_embeddings(emb: Any, num_frames: np.ndarray | torch.Tensor, video_ids: list[str],
                                out_dir: str | Path, *, model_version: str, map_size: int,
                                alpha: float, dtype: str = "float32", fps: float | None = None,
                                checkpoint_sha256: str | None = None, text_encoder: str | None = None,
                                ann: SearchConfig | None = None, meta: dict[str, Any] | None = None,
                                video_info: list[dict[str, Any] | None] | None = None) -> Path:
    """Write an index from `VideoEmbeddings` (clips/attended (N,K,H), unit spans (N,K,2)).

    Vectors are L2-normalised in fp32 before the cast to `dtype`; unit spans become
    frame spans. `ann` (a SearchConfig) also builds the faiss index inside; `meta` adds
    entries to the manifest (e.g. corpus, corpus_size, data_version); `video_info` (one entry
    per video: title, duration_s, url, or None) goes to videos.json, hashed in the manifest."""
    if dtype not in DTYPES:
        raise SearchIndexError(f"search.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    nf = np.asarray(num_frames, dtype=np.int64)
    if len(video_ids) != emb.clips.shape[0] or len(nf) != emb.clips.shape[0]:
        raise SearchIndexError(f"{emb.clips.shape[0]} videos but {len(video_ids)} ids / {len(nf)} frame counts")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "clips.npy", _normalise(emb.clips).astype(DTYPES[dtype]))
        np.save(tmp / "attended.npy", _normalise(emb.attended).astype(DTYPES[dtype]))
        np.save(tmp / "spans.npy", units_to_frames_int32(np.asarray(emb.spans), nf, map_size))
        np.save(tmp / "num_frames.npy", nf.astype(np.int32))
        (tmp / "video_ids.json").write_text(json.dumps(list(video_ids)))
        info_meta = None
        if video_info is not None and any(i is not None for i in video_info):
            if len(video_info) != len(video_ids):
                raise SearchIndexError(f"{len(video_info)} video descriptions for {len(video_ids)} videos")
            (tmp / VIDEO_INFO_FILE).write_text(json.dumps(list(video_info)))
            info_meta = {"file": VIDEO_INFO_FILE, "sha256": sha256_file(tmp / VIDEO_INFO_FILE),
                         "described": sum(i is not None for i in video_info)}
        write_manifest(tmp, {**(meta or {}), "video_info": info_meta, "model_version": model_version,
                             "checkpoint_sha256": checkpoint_sha256, "text_encoder": text_encoder,
                             "map_size": map_size, "alpha": alpha, "fps": fps, "ann": None})
        if ann is not None:
            build_faiss_into(tmp, ann)
    return out_dir


def units_to_frames_int32(spans: np.ndarray, num_frames: np.ndarray, map_size: int) -> np.ndarray:
    if num_frames.size and (num_frames <= 0).all():    # frame counts unknown: keep unit spans
        return spans.astype(np.int32)
    return units_to_frames(spans, num_frames, map_size).astype(np.int32)
