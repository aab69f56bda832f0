"""Evaluation: every query of a split against every video of it, in bounded memory.

Returns a metrics dict (fused, clip-only, frame-only) and optionally writes it as
JSON; callers log it. Videos are encoded as for the serving index and ranked with
`ExactSearch.truth_ranks` (fp32 `prvr.model.score` over the same arrays).

Usage::

    metrics = evaluate(cfg, "data/synth", "runs/train/model.pt", split="test", out="metrics.json")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from prvr.checkpoint import resolve_device, write_json_atomic
from prvr.collection import Collection
from prvr.config import Config
from prvr.encoding import (TextSource, VideoSource, check_compatible, encode_corpus, encode_query_texts,
                           load_model)
from prvr.metrics import metrics_from_ranks
from prvr.model import PRVRModel, VideoEmbeddings
from prvr.search import ExactSearch, VideoIndex

__all__ = ["evaluate", "rank_split", "evaluate_model", "query_spread"]


def rank_split(queries: torch.Tensor, videos: VideoEmbeddings, truth: np.ndarray, alpha: float,
               query_chunk: int = 2048, video_chunk: int = 4096) -> dict[str, np.ndarray]:
    """1-based rank of each query's true video under the fused, clip and frame scores.

    `ExactSearch.truth_ranks` over an in-memory index of the corpus: fp32 `score`, a
    (query_chunk, V) block of scores at a time. `score` normalises each block itself,
    so the corpus is not copied to normalise it first."""
    index = VideoIndex.from_arrays(videos.clips.float().numpy(), videos.attended.float().numpy(),
                                   alpha=alpha)
    engine = ExactSearch(index, video_chunk=video_chunk, precision="fp32")
    return engine.truth_ranks(queries, truth, alpha, query_chunk)


def query_spread(queries: torch.Tensor, sample: int = 2000) -> float:
    """Mean pairwise cosine of query embeddings: near 1 means they collapsed to one vector."""
    q = torch.nn.functional.normalize(queries[:sample].float(), dim=-1)
    n = len(q)
    if n < 2:
        return 0.0
    sims = q @ q.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def evaluate_model(model: PRVRModel, collection: Collection, texts: TextSource,
                   captions: list, video_ids: list[str], cfg: Config, device: torch.device,
                   videos: VideoSource | None = None) -> dict[str, Any]:
    """Metrics of queries against a corpus for a model in memory (training's validation and evaluate)."""
    model.eval()
    videos = videos or VideoSource(collection, cfg, video_ids)
    emb, _ = encode_corpus(model, videos, video_ids, device)
    qv = encode_query_texts(model, texts, [c.cap_id for c in captions], device)
    index = {v: i for i, v in enumerate(video_ids)}
    truth = np.array([index[c.video_id] for c in captions])
    ranks = rank_split(qv, emb, truth, cfg.model.alpha, cfg.eval.query_chunk, cfg.eval.video_chunk)
    ratios = [collection.mv_ratio(c.cap_id) for c in captions]
    if all(r is None for r in ratios):
        ratios = None
    result: dict[str, Any] = {kind: metrics_from_ranks(r, ratios, cfg.eval.mv_bin_width)
                              for kind, r in ranks.items()}
    result.update(num_queries=len(captions), num_videos=len(video_ids),
                  query_spread=query_spread(qv), variant=cfg.model.variant, alpha=cfg.model.alpha)
    return result


def evaluate(cfg: Config, data_path: str | Path, checkpoint: str | Path, split: str | None = None,
             out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on a split. Model settings, alpha included, come from the
    checkpoint; `cfg` supplies only the data, eval and device settings."""
    device = resolve_device(cfg.train.device)
    model, ckpt_cfg, ckpt = load_model(checkpoint, device)
    ckpt_cfg.data, ckpt_cfg.eval = cfg.data, cfg.eval
    collection = Collection(data_path, cfg.data.video_feature, cfg.data.text_feature_file)
    texts = TextSource(collection, ckpt_cfg)
    check_compatible(ckpt, collection, texts)
    split = split or cfg.eval.split
    metrics = evaluate_model(model, collection, texts, collection.captions(split),
                             collection.videos(split), ckpt_cfg, device)
    metrics.update(split=split, checkpoint=str(checkpoint), epoch=ckpt.get("epoch"))
    if out:
        write_json_atomic(out, metrics)
    return metrics
