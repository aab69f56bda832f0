"""The video index: what retrieval needs from each video, in flat arrays on disk.

MS-SL++ scores a (query, video) pair from only the video's K clip vectors and the
K KCGA-attended vectors (one per possible key clip), so a corpus is two
(N, K, H) arrays plus spans and ids. Arrays are ``.npy`` files, memory-mapped on
load so a corpus larger than RAM still opens instantly; ``manifest.json`` ties
them to the model that produced them (a query encoded by another model would
be silently wrong, so a version mismatch is refused).

Usage::

    path = build_index("runs/train/model.pt", "data/synth", "test", "index/", cfg)
    index = VideoIndex.load(path, expect_model_version=None)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prvr.config import Config, SearchConfig
from prvr.errors import CheckpointError, SearchIndexError

__all__ = ["VideoIndex", "build_index", "build_index_from_embeddings", "atomic_dir",
           "write_manifest", "units_to_frames_int32", "INDEX_FORMAT", "ARRAY_FILES", "sha256_file"]

INDEX_FORMAT = "prvr-video-index/1"
ARRAY_FILES = ("clips", "attended", "spans", "num_frames")
DTYPES = {"float32": np.float32, "float16": np.float16}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class VideoIndex:
    """A corpus ready to search: L2-normalised clips/attended (N, K, H), frame spans, ids."""
    clips: np.ndarray          # (N, K, H) float32 | float16, L2-normalised rows
    attended: np.ndarray       # (N, K, H) same dtype
    spans: np.ndarray          # (N, K, 2) int32 frame spans [start, end)
    num_frames: np.ndarray     # (N,) int32
    video_ids: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def count(self) -> int:
        return int(self.clips.shape[0])

    @property
    def num_clips(self) -> int:
        return int(self.clips.shape[1])

    @property
    def dim(self) -> int:
        return int(self.clips.shape[2])

    @property
    def alpha(self) -> float:
        return float(self.manifest.get("alpha", 0.7))

    @property
    def model_version(self) -> str | None:
        return self.manifest.get("model_version")

    def moment(self, video_idx: np.ndarray, key_clip: np.ndarray) -> np.ndarray:
        """Frame span [start, end) of each result's key clip: (...,) x2 -> (..., 2)."""
        return np.asarray(self.spans[np.asarray(video_idx), np.asarray(key_clip)])

    @classmethod
    def from_arrays(cls, clips: np.ndarray, attended: np.ndarray, spans: np.ndarray | None = None,
                    num_frames: np.ndarray | None = None, video_ids: list[str] | None = None,
                    alpha: float = 0.7) -> "VideoIndex":
        """An in-memory index (benchmarks, tests): arrays are used as given (already normalised)."""
        N, K, _ = clips.shape
        if spans is None:
            spans = np.zeros((N, K, 2), np.int32)
        if num_frames is None:
            num_frames = np.zeros(N, np.int32)
        ids = video_ids if video_ids is not None else [str(i) for i in range(N)]
        return cls(clips, attended, spans, num_frames, ids,
                   {"format": INDEX_FORMAT, "count": N, "num_clips": K, "hidden": clips.shape[2],
                    "dtype": str(clips.dtype), "alpha": alpha})

    @classmethod
    def load(cls, path: str | Path, expect_model_version: str | None = None, mmap: bool = True,
             verify: bool = False) -> "VideoIndex":
        """Open an index, refusing a foreign model version or a missing/truncated/corrupt file.

        Size and shape checks are always done (cheap); `verify=True` also hashes
        every array against the manifest (slow for GB-sized corpora)."""
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise SearchIndexError(f"no video index at {path} (manifest.json missing)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise SearchIndexError(f"{mpath} is not readable JSON ({exc})") from None
        if manifest.get("format") != INDEX_FORMAT:
            raise SearchIndexError(f"{mpath}: format {manifest.get('format')!r}, expected {INDEX_FORMAT!r}")
        if expect_model_version is not None and manifest.get("model_version") != expect_model_version:
            raise SearchIndexError(
                f"video index {path} was built by model version {manifest.get('model_version')!r}, "
                f"but {expect_model_version!r} is serving: rebuild it with `prvr index build`")
        N, K, H = manifest["count"], manifest["num_clips"], manifest["hidden"]
        shapes = {"clips": (N, K, H), "attended": (N, K, H), "spans": (N, K, 2), "num_frames": (N,)}
        arrays = {}
        for name in ARRAY_FILES:
            f = path / f"{name}.npy"
            meta = manifest["files"].get(f"{name}.npy", {})
            if not f.is_file():
                raise SearchIndexError(f"video index file missing: {f}")
            if f.stat().st_size != meta.get("bytes"):
                raise SearchIndexError(f"video index file {f} has {f.stat().st_size} bytes, the manifest "
                                       f"says {meta.get('bytes')}: truncated or replaced")
            if verify and sha256_file(f) != meta.get("sha256"):
                raise SearchIndexError(f"video index file {f} fails its sha256 check: corrupt")
            try:
                arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise SearchIndexError(f"video index file {f} is not a readable .npy ({exc})") from None
            if arr.shape != shapes[name] or str(arr.dtype) != meta.get("dtype"):
                raise SearchIndexError(f"video index file {f}: shape {arr.shape} {arr.dtype}, the manifest "
                                       f"says {shapes[name]} {meta.get('dtype')}")
            arrays[name] = arr
        ann = manifest.get("ann")
        if ann and verify:
            f = path / ann["file"]
            if not f.is_file() or sha256_file(f) != ann.get("sha256"):
                raise SearchIndexError(f"faiss index {f} is missing or fails its sha256 check")
        try:
            ids = json.loads((path / "video_ids.json").read_text())
        except (OSError, ValueError) as exc:
            raise SearchIndexError(f"{path / 'video_ids.json'} missing or unreadable ({exc})") from None
        if len(ids) != N:
            raise SearchIndexError(f"{path / 'video_ids.json'} lists {len(ids)} ids for {N} videos")
        return cls(arrays["clips"], arrays["attended"], arrays["spans"], arrays["num_frames"], ids,
                   manifest, path)


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
class atomic_dir:
    """Context manager: yields a temp dir next to `out`, swapped in on success only.

    A crash or exception before the swap leaves the previous `out` untouched (the
    temp dir is removed on exceptions; a killed process leaves `out.tmp-*`)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        backup = None
        if self.out.exists():
            backup = self.out.with_name(f"{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, backup)
        os.replace(self.tmp, self.out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


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
                                out_dir: str | Path, *, model_version: str, map_size: int = 32,
                                alpha: float = 0.7, dtype: str = "float32", fps: float | None = None,
                                checkpoint_sha256: str | None = None, text_encoder: str | None = None,
                                ann: SearchConfig | None = None) -> Path:
    """Write an index from `VideoEmbeddings` (clips/attended (N,K,H), unit spans (N,K,2)).

    Vectors are L2-normalised in fp32 before the cast to `dtype`; unit spans become
    frame spans. `ann` (a SearchConfig) also builds the faiss index inside."""
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
        meta = {"model_version": model_version, "checkpoint_sha256": checkpoint_sha256,
                "text_encoder": text_encoder, "map_size": map_size, "alpha": alpha, "fps": fps,
                "ann": None}
        write_manifest(tmp, meta)
        if ann is not None:
            from prvr.search.ann import build_faiss_into
            build_faiss_into(tmp, ann)
    return out_dir


def advise_random(arr: np.ndarray) -> bool:
    """madvise(MADV_RANDOM) on the file mapping behind a (view of a) np.memmap: scattered row
    reads then fault in one page each instead of a readahead window (measured at 1M videos:
    a 32 x 384 fp16 re-rank read hundreds of MB per query with readahead)."""
    import mmap
    base = arr
    while base is not None and getattr(base, "_mmap", None) is None:
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_RANDOM"):
        return False
    mm.madvise(mmap.MADV_RANDOM)
    return True


def units_to_frames_int32(spans: np.ndarray, num_frames: np.ndarray, map_size: int) -> np.ndarray:
    from prvr.dataset import units_to_frames
    if num_frames.size and (num_frames <= 0).all():    # frame counts unknown: keep unit spans
        return spans.astype(np.int32)
    return units_to_frames(spans, num_frames, map_size).astype(np.int32)


def build_index(checkpoint: str | Path, data_path: str | Path, split: str, out_dir: str | Path,
                cfg: Config, model_version: str | None = None, batch_size: int = 64,
                progress: bool = True, ann_type: str | None = None) -> Path:
    """Encode a split's videos with a checkpoint and write (atomically) its index.

    `model_version` defaults to the checkpoint's sha256 (what a registry version
    resolves to); `ann_type` ('flat'|'ivf'|'hnsw'|'ivfpq') also builds a faiss index."""
    from tqdm import tqdm

    from prvr.data import Collection
    from prvr.evaluate import encode_corpus, load_model, resolve_device
    from prvr.model import VideoEmbeddings
    from prvr.sources import VideoSource

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
    ann = dataclasses.replace(cfg.search, index_type=ann_type) if ann_type is not None else None
    return build_index_from_embeddings(
        emb, torch.cat(frames).numpy(), video_ids, out_dir, model_version=model_version or ckpt_sha,
        map_size=ckpt_cfg.model.map_size, alpha=cfg.model.alpha, dtype=cfg.search.dtype,
        fps=cfg.serve.fps, checkpoint_sha256=ckpt_sha, text_encoder=ckpt.get("text_encoder"),
        ann=ann)
