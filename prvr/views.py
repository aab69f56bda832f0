"""From a collection on disk to model-ready tensors: the two video views and token batches.

One place turns frames into the clip view (map_size units) and the frame view
(at most max_ctx_len), so training, evaluation, indexing and serving agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prvr.config import ModelConfig

__all__ = ["unit_boundaries", "clip_view", "frame_view", "units_to_frames", "VideoBatch",
           "collate_videos", "video_views", "collate_queries", "l2_normalize"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def unit_boundaries(num_frames: int, units: int) -> np.ndarray:
    """Frame index where each of `units` equal parts starts, plus the end: (units + 1,).

    As the original average_to_fixed_length: rounded, and a unit with no frame of
    its own repeats the frame at its start (short videos)."""
    idx = np.round(np.arange(units + 1) / units * num_frames).astype(np.int64)
    idx[:-1] = np.minimum(idx[:-1], num_frames - 1)
    idx[-1] = num_frames
    return idx


def _pool_to(frames: np.ndarray, units: int) -> np.ndarray:
    """Mean-pool frames (T, D) into `units` consecutive bins (units, D) with cumulative sums."""
    T = frames.shape[0]
    b = unit_boundaries(T, units)
    csum = np.concatenate([np.zeros((1, frames.shape[1]), np.float64), np.cumsum(frames, 0, np.float64)])
    start, end = b[:-1], np.maximum(b[1:], b[:-1] + 1)
    end = np.minimum(end, T)
    start = np.minimum(start, end - 1)
    return ((csum[end] - csum[start]) / (end - start)[:, None]).astype(np.float32)


def clip_view(frames: np.ndarray, map_size: int) -> np.ndarray:
    """(T, D) -> (map_size, D) L2-normalised units."""
    return l2_normalize(_pool_to(frames, map_size))


def frame_view(frames: np.ndarray, max_len: int) -> np.ndarray:
    """(T, D) -> (min(T, max_len), D) L2-normalised frames (mean-pooled when longer)."""
    if frames.shape[0] > max_len:
        frames = _pool_to(frames, max_len)
    return l2_normalize(frames.astype(np.float32))


def units_to_frames(spans: np.ndarray, num_frames: np.ndarray | int, map_size: int) -> np.ndarray:
    """Clip-unit spans (..., 2) [start, end) -> frame spans [start, end) of the original video."""
    spans = np.asarray(spans)
    num_frames = np.asarray(num_frames)
    ratio = num_frames.reshape(num_frames.shape + (1,) * (spans.ndim - 1 - num_frames.ndim)) / map_size
    start = np.minimum(np.round(spans[..., 0] * ratio), np.maximum(num_frames.reshape(ratio.shape) - 1, 0))
    end = np.maximum(np.round(spans[..., 1] * ratio), start + 1)
    return np.stack([start, end], -1).astype(np.int64)


@dataclass
class VideoBatch:
    units: torch.Tensor       # (V, U, Dv)
    frames: torch.Tensor      # (V, T, Dv) zero-padded
    frame_mask: torch.Tensor  # (V, T) bool
    num_frames: torch.Tensor  # (V,) frames in the original video

    def to(self, device: torch.device | str) -> "VideoBatch":
        return VideoBatch(self.units.to(device), self.frames.to(device),
                          self.frame_mask.to(device), self.num_frames.to(device))


def video_views(frames: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Raw frames (T, D) -> (clip units, frame view, T)."""
    return clip_view(frames, cfg.map_size), frame_view(frames, cfg.max_ctx_len), frames.shape[0]


def collate_videos(views: list[tuple[np.ndarray, np.ndarray, int]]) -> VideoBatch:
    """Per-video (units, frame view, num_frames) -> padded tensors of both views."""
    units = np.stack([v[0] for v in views])
    T = max(v[1].shape[0] for v in views)
    frames = np.zeros((len(views), T, units.shape[-1]), np.float32)
    mask = np.zeros((len(views), T), bool)
    for i, (_, f, _) in enumerate(views):
        frames[i, : len(f)] = f
        mask[i, : len(f)] = True
    return VideoBatch(torch.from_numpy(units), torch.from_numpy(frames), torch.from_numpy(mask),
                      torch.tensor([v[2] for v in views]))


def collate_queries(token_feats: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token features (L_i, Dt) -> padded (Q, L, Dt) and mask (Q, L), truncated to max_len."""
    feats = [np.asarray(t, np.float32)[:max_len] for t in token_feats]
    L = max(max(len(t) for t in feats), 1)
    out = np.zeros((len(feats), L, feats[0].shape[1]), np.float32)
    mask = np.zeros((len(feats), L), bool)
    for i, t in enumerate(feats):
        out[i, : len(t)] = t
        mask[i, : len(t)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)
