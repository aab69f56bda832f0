"""The video index: what retrieval needs from each video, in flat arrays on disk.

MS-SL++ scores a (query, video) pair from only the video's K clip vectors and the
K KCGA-attended vectors (one per possible key clip), so a corpus is two
(N, K, H) arrays plus spans and ids. Arrays are ``.npy`` files, memory-mapped on
load so a corpus larger than RAM still opens instantly; ``manifest.json`` ties
them to the model that produced them (a query encoded by another model would
be silently wrong, so a version mismatch is refused).

Usage::

    index = VideoIndex.load("runs/register/index", expect_model_version="v0003")
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pydantic import ValidationError

from prvr.checkpoint import sha256_file
from prvr.collection import VideoInfo
from prvr.errors import SearchIndexError

__all__ = ["VideoIndex", "advise_random", "RowPrefetcher", "INDEX_FORMAT", "ARRAY_FILES", "DTYPES"]

INDEX_FORMAT = "prvr-video-index/1"
ARRAY_FILES = ("clips", "attended", "spans", "num_frames")
VIDEO_INFO_FILE = "videos.json"    # optional: title, duration_s, url per video (videos.jsonl)
DTYPES = {"float32": np.float32, "float16": np.float16}


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
    info: list[dict[str, Any] | None] | None = None   # per video: title, duration_s, url

    def describe(self, i: int) -> dict[str, Any]:
        """What the corpus's videos.jsonl said about video i ({} when nothing)."""
        return (self.info[i] or {}) if self.info is not None else {}

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
        """The alpha of the model that built the index (its faiss vectors use it too)."""
        return float(self.manifest["alpha"])

    @property
    def model_version(self) -> str | None:
        return self.manifest.get("model_version")

    def moment(self, video_idx: np.ndarray, key_clip: np.ndarray) -> np.ndarray:
        """Frame span [start, end) of each result's key clip: (...,) x2 -> (..., 2)."""
        return np.asarray(self.spans[np.asarray(video_idx), np.asarray(key_clip)])

    @classmethod
    def from_arrays(cls, clips: np.ndarray, attended: np.ndarray, spans: np.ndarray | None = None,
                    num_frames: np.ndarray | None = None, video_ids: list[str] | None = None,
                    *, alpha: float) -> "VideoIndex":
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
                   manifest, path, _load_info(path, manifest, N))


def _mapping(arr: np.ndarray) -> Any:
    """The mmap object behind a (view of a) np.memmap, or None."""
    base = arr
    while base is not None and getattr(base, "_mmap", None) is None:
        base = getattr(base, "base", None)
    return getattr(base, "_mmap", None)


def advise_random(arr: np.ndarray) -> bool:
    """madvise(MADV_RANDOM) on the file mapping behind a (view of a) np.memmap: scattered row
    reads then fault in one page each instead of a readahead window (measured at 1M videos:
    a 32 x 384 fp16 re-rank read hundreds of MB per query with readahead)."""
    mm = _mapping(arr)
    if mm is None or not hasattr(mmap, "MADV_RANDOM"):
        return False
    mm.madvise(mmap.MADV_RANDOM)
    return True


class RowPrefetcher:
    """Asks the kernel to read rows of a memory-mapped 2-D array ahead (MADV_WILLNEED), all at
    once: a corpus larger than RAM then waits for its scattered rows' disk reads together, queued
    side by side, instead of one page fault after another. `RowPrefetcher.of(arr)` is None for an
    array in RAM (nothing to read ahead)."""

    def __init__(self, mm: Any, offset: int, row_bytes: int):
        self.mm, self.offset, self.row_bytes = mm, offset, row_bytes

    @classmethod
    def of(cls, arr: np.ndarray) -> "RowPrefetcher | None":
        mm = _mapping(arr)
        if mm is None or arr.ndim != 2 or not arr.flags.c_contiguous or not hasattr(mmap, "MADV_WILLNEED"):
            return None
        start = np.frombuffer(mm, np.uint8).__array_interface__["data"][0]   # the mapping's address
        return cls(mm, arr.__array_interface__["data"][0] - start, arr.strides[0])

    def __call__(self, rows: np.ndarray, count: int = 1) -> None:
        """Read ahead rows r .. r + count - 1 for every r in `rows`."""
        size, page = self.row_bytes * count, mmap.PAGESIZE
        for r in np.asarray(rows, np.int64).tolist():
            s = self.offset + r * self.row_bytes
            a = s - s % page
            self.mm.madvise(mmap.MADV_WILLNEED, a, s + size - a)


def _load_info(path: Path, manifest: dict[str, Any], count: int) -> list[dict[str, Any] | None] | None:
    """The index's videos.json, always hashed (it is small), then checked entry by entry: it
    ends up in answers and on a web page."""
    meta = manifest.get("video_info")
    if not meta:
        return None
    f = path / VIDEO_INFO_FILE
    if not f.is_file() or sha256_file(f) != meta.get("sha256"):
        raise SearchIndexError(f"video descriptions {f} are missing or fail their sha256 check")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(info, list) or len(info) != count:
            raise ValueError(f"expected a list of {count} entries")
        return [None if i is None else VideoInfo.model_validate({"video_id": "-", **i}).model_dump(
            exclude={"video_id"}, exclude_none=True) for i in info]
    except (ValueError, TypeError, RecursionError, ValidationError) as exc:
        raise SearchIndexError(f"video descriptions {f} are not valid ({type(exc).__name__})") from None
