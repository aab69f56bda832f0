"""Readers for the public PRVR feature release (TextData + FeatureData BigFile).

The release is read as users have it on disk, with no conversion step. Every
format problem becomes a :class:`prvr.errors.DataError` naming the file and the
first offending ids, because a user fixes files, not tracebacks.

Usage::

    coll = Collection("data/tvr")
    stats = coll.check()                      # validate everything, get statistics
    feats = coll.video_features(coll.videos("train")[0])   # float32 (T, D)
"""
from __future__ import annotations

import ast
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prvr.errors import DataError
from prvr.metrics import mv_bin_labels

__all__ = [
    "SPLITS", "BigFile", "Caption", "Moment", "VideoInfo", "Collection", "video_id_of",
    "default_text_feature_file", "caption_file_name", "parse_video2frames", "mv_bins",
    "format_stats",
]

SPLITS = ("train", "val", "test")
MAX_SHOWN = 5                      # offending ids quoted in an error message
CHECK_CHUNK_BYTES = 64 << 20       # NaN/Inf scan reads feature.bin in chunks of this size
FEATURE_DTYPE = np.dtype("<f4")    # the release is raw little-endian float32 rows


def _shown(items: Iterable[Any]) -> str:
    items = list(items)
    head = ", ".join(repr(x) for x in items[:MAX_SHOWN])
    more = f" (and {len(items) - MAX_SHOWN} more)" if len(items) > MAX_SHOWN else ""
    return head + more


def video_id_of(cap_id: str) -> str:
    """The release's convention: a cap_id is ``<video_id>#enc#<k>``."""
    return cap_id.split("#", 1)[0]


def default_text_feature_file(collection: str) -> str:
    return f"roberta_{collection}_query_feat.hdf5"


def caption_file_name(collection: str, split: str) -> str:
    return f"{collection}{split}.caption.txt"


class Caption(NamedTuple):
    cap_id: str
    video_id: str
    text: str


class VideoInfo(BaseModel):
    """One line of the optional ``videos.jsonl`` beside a collection: what a person sees of a
    video (title, length, link). Unknown fields, non-finite lengths and links other than
    http(s) are refused: the file is user input that ends up in answers and on a web page."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    video_id: str = Field(min_length=1, max_length=256)
    title: str | None = Field(default=None, max_length=500)
    duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    url: str | None = Field(default=None, max_length=2048)

    @field_validator("duration_s", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value


def read_video_info(path: Path) -> dict[str, VideoInfo]:
    """video_id -> VideoInfo from a videos.jsonl file; DataError with file:line on a bad line."""
    out: dict[str, VideoInfo] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            info = VideoInfo.model_validate(json.loads(line))
        except (ValueError, RecursionError) as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in exc.errors()) \
                if isinstance(exc, ValidationError) else f"not JSON ({type(exc).__name__})"
            raise DataError(f"{path}:{lineno}: not a video record ({why}); expected "
                            '{"video_id", "title"?, "duration_s"?, "url"?}') from None
        if info.video_id in out:
            raise DataError(f"{path}:{lineno}: video {info.video_id!r} is listed twice")
        out[info.video_id] = info
    return out


class Moment(NamedTuple):
    """A query's moment. Our moments.jsonl counts frames (end exclusive); TVR-style
    lines keep seconds, with the video duration in ``num_frames``. The ratio is unit-free."""
    start: float
    end: float
    num_frames: float

    @property
    def ratio(self) -> float:
        if self.num_frames <= 0:
            return 0.0
        return min(1.0, max(0.0, (self.end - self.start) / self.num_frames))


def mv_bins(ratios: Iterable[float], bin_width: float = 0.2) -> dict[str, int]:
    """Count M/V ratios per bin, with the same labels and edges as the metrics' mv_bins."""
    labels = mv_bin_labels(bin_width)
    counts = dict.fromkeys(labels, 0)
    for r in ratios:
        counts[labels[min(int(math.floor(r / bin_width + 1e-9)), len(labels) - 1)]] += 1
    return counts


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


class BigFile:
    """One FeatureData/<feature> folder: rows of float32 behind a read-only np.memmap.

    The file is never loaded whole and never seeked per frame: a video's rows are
    gathered with one slice (contiguous rows, the usual case) or one fancy index.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(f"feature folder not found: {self.folder}")
        bin_path = _require(self.folder / "feature.bin", "feature file")
        id_path = _require(self.folder / "id.txt", "row id file")
        shape_path = _require(self.folder / "shape.txt", "shape file")
        parts = shape_path.read_text().split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise DataError(f"{shape_path}: expected 'N D' (two integers), got {' '.join(parts)!r}")
        n, d = int(parts[0]), int(parts[1])
        if n == 0 or d == 0:
            raise DataError(f"{shape_path}: empty feature matrix ({n} x {d})")
        self.ids: list[str] = id_path.read_text().split()
        if len(self.ids) != n:
            raise DataError(f"{id_path} lists {len(self.ids)} ids but {shape_path} says {n} rows")
        expected = n * d * FEATURE_DTYPE.itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            raise DataError(f"{bin_path} holds {actual} bytes but {shape_path} ({n} x {d} float32) "
                            f"needs {expected}")
        self.index: dict[str, int] = {rid: i for i, rid in enumerate(self.ids)}
        if len(self.index) != n:
            seen: set[str] = set()
            dups = [r for r in self.ids if r in seen or seen.add(r)]
            raise DataError(f"{id_path}: duplicate row ids {_shown(dict.fromkeys(dups))}")
        self.num_rows, self.dim = n, d
        self.path = bin_path
        self.data = np.memmap(bin_path, dtype=FEATURE_DTYPE, mode="r", shape=(n, d))

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``ids``; a DataError names those missing from id.txt."""
        try:
            return np.fromiter((self.index[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError:
            missing = [i for i in ids if i not in self.index]
            raise DataError(f"{self.folder / 'id.txt'} lacks row ids {_shown(missing)}") from None

    def read(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (n, dim) copy of ``rows`` (in the given order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.dim), np.float32)
        if rows.min() < 0 or rows.max() >= self.num_rows:
            raise DataError(f"{self.path}: row numbers outside 0..{self.num_rows - 1}")
        start = int(rows[0])
        if np.array_equal(rows, np.arange(start, start + rows.size)):
            out = self.data[start:start + rows.size]
        else:
            out = self.data[rows]
        return np.array(out, dtype=np.float32)

    def nonfinite_rows(self, limit: int = MAX_SHOWN) -> list[int]:
        """Rows holding NaN/Inf (the first ``limit``), scanning through the memmap in chunks."""
        step = max(1, CHECK_CHUNK_BYTES // (self.dim * FEATURE_DTYPE.itemsize))
        bad: list[int] = []
        for lo in range(0, self.num_rows, step):
            chunk = np.asarray(self.data[lo:lo + step])
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                bad.extend((lo + np.flatnonzero(~finite)).tolist())
                if len(bad) >= limit:
                    break
        return bad[:limit]


def parse_video2frames(path: Path) -> dict[str, list[str]]:
    """Parse video2frames.txt as a Python literal, never executing it.

    A JSON fast path handles the common quoting (no double quotes or backslashes:
    swapping quotes then gives the same value); anything else goes through
    ast.literal_eval. Neither runs code. TVR's file parses in 0.3 s this way
    instead of 7 s.
    """
    text = _require(path, "video2frames file").read_text()
    value: Any = None
    if '"' not in text and "\\" not in text:
        try:
            value = json.loads(text.replace("'", '"'))
        except ValueError:
            value = None
    if value is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise DataError(f"{path} is not a Python dict literal of video id -> list of frame "
                            f"ids ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} must hold a dict literal, got {type(value).__name__}")
    bad = [k for k, v in value.items()
           if not isinstance(k, str) or not isinstance(v, list) or not all(isinstance(f, str) for f in v)]
    if bad:
        raise DataError(f"{path}: entries must map str -> list of str; bad entries for {_shown(bad)}")
    return value


@dataclass(frozen=True)
class _TextFile:
    """An open HDF5 handle tied to the process that opened it (h5py handles do not survive fork)."""
    pid: int
    handle: Any


class Collection:
    """A collection folder ``<root>/<coll>`` in the public release layout.

    Everything is read lazily, so building one is cheap and ``encode-text`` can use
    the captions before any feature exists.
    """

    def __init__(self, path: str | Path, video_feature: str | None = None,
                 text_feature_file: str | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"collection folder not found: {self.path}")
        self.name = self.path.name
        self.text_path = self.path / "TextData"
        self.text_feature_path = self.text_path / (text_feature_file or default_text_feature_file(self.name))
        self.moments_path = self.path / "moments.jsonl"
        self.video_info_path = self.path / "videos.jsonl"
        self._video_feature = video_feature
        self._captions: dict[str, list[Caption]] = {}
        self._text: _TextFile | None = None

    # ---- video features -------------------------------------------------------------
    @cached_property
    def feature_folder(self) -> Path:
        root = self.path / "FeatureData"
        if not root.is_dir():
            raise DataError(f"feature folder not found: {root}")
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        if self._video_feature is not None:
            if self._video_feature not in present:
                raise DataError(f"video feature {self._video_feature!r} not found in {root}; "
                                f"present: {present or 'none'}")
            return root / self._video_feature
        if len(present) != 1:
            raise DataError(f"{root} holds {len(present)} feature folders {present}; choose one with "
                            "--video-feature (data.video_feature)" if present else
                            f"{root} holds no feature folder")
        return root / present[0]

    @cached_property
    def bigfile(self) -> BigFile:
        return BigFile(self.feature_folder)

    @cached_property
    def video2frames(self) -> dict[str, list[str]]:
        return parse_video2frames(self.feature_folder / "video2frames.txt")

    @property
    def video_dim(self) -> int:
        return self.bigfile.dim

    def video_rows(self, video_id: str) -> np.ndarray:
        frames = self.video2frames.get(video_id)
        v2f = self.feature_folder / "video2frames.txt"
        if frames is None:
            raise DataError(f"{v2f} has no video {video_id!r}")
        if not frames:
            raise DataError(f"{v2f} lists no frames for video {video_id!r}")
        try:
            return self.bigfile.rows_of(frames)
        except DataError as exc:
            raise DataError(f"video {video_id!r}: {exc}") from None

    def video_features(self, video_id: str) -> np.ndarray:
        """float32 (T, D) frame features of one video, in time order."""
        feats = self.bigfile.read(self.video_rows(video_id))
        if not np.isfinite(feats).all():
            frames = self.video2frames[video_id]
            bad = [frames[i] for i in np.flatnonzero(~np.isfinite(feats).all(axis=1))]
            raise DataError(f"{self.bigfile.path}: NaN/Inf in video {video_id!r}, frames {_shown(bad)}")
        return feats

    # ---- captions ---------------------------------------------------------------------
    def caption_path(self, split: str) -> Path:
        return self.text_path / caption_file_name(self.name, split)

    def available_splits(self) -> list[str]:
        return [s for s in SPLITS if self.caption_path(s).is_file()]

    def captions(self, split: str) -> list[Caption]:
        """Parsed ``<cap_id> <text>`` lines; DataError with file:line on the first bad one."""
        if split not in self._captions:
            self._captions[split] = self._read_captions(split)
        return self._captions[split]

    def _read_captions(self, split: str) -> list[Caption]:
        path = self.caption_path(split)
        if not path.is_file():
            raise DataError(f"caption file for split {split!r} not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc})") from None
        out: list[Caption] = []
        seen: dict[str, int] = {}
        for lineno, line in enumerate(lines, 1):
            parts = line.strip().split(None, 1)
            where = f"{path}:{lineno}"
            if not parts:
                raise DataError(f"{where}: empty line (expected '<cap_id> <query text>')")
            if len(parts) < 2:
                raise DataError(f"{where}: no query text after cap_id {parts[0]!r}")
            cap_id, text = parts[0], parts[1].strip()
            video_id = video_id_of(cap_id)
            if not video_id:
                raise DataError(f"{where}: cap_id {cap_id!r} has no video id before '#'")
            if cap_id in seen:
                raise DataError(f"{where}: cap_id {cap_id!r} repeats line {seen[cap_id]}")
            seen[cap_id] = lineno
            out.append(Caption(cap_id, video_id, text))
        if not out:
            raise DataError(f"split {split!r} is empty: {path} holds no captions")
        return out

    def videos(self, split: str) -> list[str]:
        """Unique video ids of a split, in first-seen order."""
        return list(dict.fromkeys(c.video_id for c in self.captions(split)))

    def all_videos(self) -> list[str]:
        """Every video of the feature folder (video2frames.txt, in file order), captioned or not:
        the whole library a service searches."""
        return list(self.video2frames)

    # ---- text features ----------------------------------------------------------------
    @property
    def has_text_features(self) -> bool:
        return self.text_feature_path.is_file()

    def _text_file(self) -> Any:

        if self._text is None or self._text.pid != os.getpid():
            if not self.has_text_features:
                raise DataError(f"text feature file not found: {self.text_feature_path} "
                                "(run `prvr encode-text`)")
            try:
                self._text = _TextFile(os.getpid(), h5py.File(self.text_feature_path, "r"))
            except OSError as exc:
                raise DataError(f"{self.text_feature_path} is not a readable HDF5 file ({exc})") from None
        return self._text.handle

    @cached_property
    def text_dim(self) -> int | None:
        if not self.has_text_features:
            return None
        f = self._text_file()
        for key in f:
            shape = getattr(f[key], "shape", ())
            if len(shape) != 2:
                raise DataError(f"{self.text_feature_path}: {key!r} has shape {shape}, expected (tokens, dim)")
            return int(shape[1])
        raise DataError(f"{self.text_feature_path} holds no datasets")

    @property
    def text_encoder(self) -> str | None:
        """The encoder name ``encode_collection`` stored in the file (None for the release's files)."""
        if not self.has_text_features:
            return None
        value = self._text_file().attrs.get("encoder")
        return value.decode() if isinstance(value, bytes) else value

    def text_features(self, cap_ids: Sequence[str]) -> list[np.ndarray]:
        """float32 (L_i, Dt) token features per cap_id."""
        f = self._text_file()
        missing = [c for c in cap_ids if c not in f]
        if missing:
            raise DataError(f"{self.text_feature_path} lacks cap_ids {_shown(missing)}")
        dim = self.text_dim
        out = []
        for c in cap_ids:
            arr = np.asarray(f[c][()], dtype=np.float32)
            if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0:
                raise DataError(f"{self.text_feature_path}: {c!r} has shape {arr.shape}, "
                                f"expected (tokens >= 1, {dim})")
            out.append(arr)
        return out

    # ---- video metadata ---------------------------------------------------------------
    @cached_property
    def video_info(self) -> dict[str, VideoInfo]:
        """video_id -> title, duration and link from videos.jsonl ({} when the file is absent);
        a listed video the features do not hold is a DataError."""
        if not self.video_info_path.is_file():
            return {}
        info = read_video_info(self.video_info_path)
        unknown = [v for v in info if v not in self.video2frames]
        if unknown:
            raise DataError(f"{self.video_info_path} lists videos the features do not hold: "
                            f"{_shown(unknown)}")
        return info

    # ---- moments ----------------------------------------------------------------------
    def moments(self) -> dict[str, Moment]:
        """cap_id -> Moment from moments.jsonl ({} when the file is absent)."""
        return self._moments

    def mv_ratio(self, cap_id: str) -> float | None:
        m = self._moments.get(cap_id)
        return None if m is None else m.ratio

    @cached_property
    def _moments(self) -> dict[str, Moment]:
        path = self.moments_path
        if not path.is_file():
            return {}
        out: dict[str, Moment] = {}
        by_text: dict[tuple[str, str], Moment] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
                if "ts" in rec:     # TVR annotation style, seconds
                    s, e = (float(x) for x in rec["ts"])
                    moment = Moment(s, e, float(rec["duration"]))
                    key = str(rec["cap_id"] if "cap_id" in rec else rec["desc_id"])
                    if "vid_name" in rec and "desc" in rec:
                        by_text[(str(rec["vid_name"]), " ".join(str(rec["desc"]).split()))] = moment
                else:
                    moment = Moment(int(rec["start"]), int(rec["end"]), int(rec["num_frames"]))
                    key = str(rec["cap_id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{where}: not a moment record ({type(exc).__name__}: {exc}); expected "
                                '{"cap_id","start","end","num_frames"} or TVR {"desc_id","vid_name",'
                                '"ts","duration"}') from None
            if not all(math.isfinite(x) for x in moment) or moment.num_frames <= 0 or moment.end < moment.start:
                raise DataError(f"{where}: moment {tuple(moment)} needs finite start <= end and a positive "
                                "video length")
            out[key] = moment
        if by_text:     # TVR desc_ids are not cap_ids: match on (video, query text)
            for split in self.available_splits():
                for c in self.captions(split):
                    m = by_text.get((c.video_id, " ".join(c.text.split())))
                    if m is not None:
                        out.setdefault(c.cap_id, m)
        return out

    # ---- validation -------------------------------------------------------------------
    def check(self, splits: Sequence[str] = SPLITS) -> dict[str, Any]:
        """Validate the collection end to end and return its statistics.

        Raises DataError on the first problem; splits other than train may be absent
        (noted in ``missing_splits``).
        """
        present = [s for s in splits if self.caption_path(s).is_file()]
        missing = [s for s in splits if s not in present]
        if "train" in missing:
            raise DataError(f"caption file for split 'train' not found: {self.caption_path('train')}")
        if not present:
            raise DataError(f"no caption files in {self.text_path} for splits {list(splits)}")
        captions = {s: self.captions(s) for s in present}
        self._check_unique_across(captions)
        bf = self.bigfile
        v2f = self.video2frames
        v2f_path = self.feature_folder / "video2frames.txt"
        all_videos = list(dict.fromkeys(c.video_id for s in present for c in captions[s]))
        no_entry = [v for v in all_videos if v not in v2f]
        if no_entry:
            raise DataError(f"{v2f_path} has no frames for videos {_shown(no_entry)} used by captions")
        empty = [v for v in all_videos if not v2f[v]]
        if empty:
            raise DataError(f"{v2f_path} lists no frames for videos {_shown(empty)}")
        bad_frames = {v: [f for f in v2f[v] if f not in bf.index] for v in all_videos}
        bad_frames = {v: fr for v, fr in bad_frames.items() if fr}
        if bad_frames:
            first = next(iter(bad_frames.values()))
            raise DataError(f"{bf.folder / 'id.txt'} lacks the frames of videos {_shown(bad_frames)} "
                            f"(e.g. {_shown(first)})")
        bad_rows = bf.nonfinite_rows()
        if bad_rows:
            raise DataError(f"{bf.path}: NaN/Inf in rows {_shown(bf.ids[r] for r in bad_rows)}")
        text_dim = self._check_text_features([c.cap_id for s in present for c in captions[s]])
        moments = self._moments
        stats: dict[str, Any] = {
            "collection": self.name,
            "path": str(self.path),
            "video_feature": self.feature_folder.name,
            "video_dim": bf.dim,
            "feature_rows": bf.num_rows,
            "text_feature_file": str(self.text_feature_path) if self.has_text_features else None,
            "text_dim": text_dim,
            "text_encoder": self.text_encoder,
            "missing_splits": missing,
            "moments_known": len(moments),
            "videos_described": len(self.video_info),
            "splits": {},
        }
        for s in present:
            vids = self.videos(s)
            lengths = np.array([len(v2f[v]) for v in vids])
            entry: dict[str, Any] = {
                "videos": len(vids),
                "queries": len(captions[s]),
                "frames_per_video": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 2),
                                     "median": float(np.median(lengths)), "max": int(lengths.max())},
            }
            ratios = [moments[c.cap_id].ratio for c in captions[s] if c.cap_id in moments]
            if ratios:
                entry["queries_with_moments"] = len(ratios)
                entry["mv_ratio_bins"] = mv_bins(ratios)
            stats["splits"][s] = entry
        return stats

    def _check_unique_across(self, captions: dict[str, list[Caption]]) -> None:
        owner: dict[str, str] = {}
        clash = []
        for split, caps in captions.items():
            for c in caps:
                if c.cap_id in owner:
                    clash.append(c.cap_id)
                owner.setdefault(c.cap_id, split)
        if clash:
            raise DataError(f"cap_ids appear in more than one split under {self.text_path}: {_shown(clash)}")

    def _check_text_features(self, cap_ids: list[str]) -> int | None:
        if not self.has_text_features:
            return None
        f = self._text_file()
        missing = [c for c in cap_ids if c not in f]
        if missing:
            raise DataError(f"{self.text_feature_path} lacks cap_ids {_shown(missing)}")
        dim = self.text_dim
        bad_shape, bad_values = [], []
        for c in cap_ids:
            arr = f[c][()]
            if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != dim:
                bad_shape.append(c)
            elif not np.isfinite(arr).all():
                bad_values.append(c)
        if bad_shape:
            raise DataError(f"{self.text_feature_path}: cap_ids {_shown(bad_shape)} are not "
                            f"(tokens >= 1, {dim}) arrays")
        if bad_values:
            raise DataError(f"{self.text_feature_path}: NaN/Inf in cap_ids {_shown(bad_values)}")
        return dim


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text summary of ``Collection.check`` for terminals and logs."""
    lines = [
        f"collection     {stats['collection']}  ({stats['path']})",
        f"video feature  {stats['video_feature']}: {stats['feature_rows']} rows x {stats['video_dim']}",
        "text features  " + (f"{stats['text_feature_file']}: dim {stats['text_dim']}"
                             + (f", encoder {stats['text_encoder']}" if stats["text_encoder"] else "")
                             if stats["text_feature_file"] else "missing (run `prvr encode-text`)"),
        f"moments        {stats['moments_known'] or 'unknown'}",
        "",
        f"{'split':<6} {'videos':>7} {'queries':>8} {'frames/video min':>17} {'mean':>7} {'median':>7} {'max':>6}",
    ]
    for split, e in stats["splits"].items():
        fr = e["frames_per_video"]
        lines.append(f"{split:<6} {e['videos']:>7} {e['queries']:>8} {fr['min']:>17} {fr['mean']:>7.1f} "
                     f"{fr['median']:>7.1f} {fr['max']:>6}")
    for split in stats["missing_splits"]:
        lines.append(f"{split:<6} {'(no caption file)':>24}")
    with_bins = {s: e["mv_ratio_bins"] for s, e in stats["splits"].items() if "mv_ratio_bins" in e}
    if with_bins:
        keys = list(next(iter(with_bins.values())))
        lines += ["", "M/V ratio " + " ".join(f"{k:>8}" for k in keys)]
        for split, bins in with_bins.items():
            lines.append(f"{split:<9} " + " ".join(f"{bins[k]:>8}" for k in keys))
    return "\n".join(lines)
