"""Evaluation: every query of a split against every video of it, in bounded memory.

Returns a metrics dict (fused, clip-only, frame-only) and optionally writes it as
JSON and draws plots; callers log it. Uses the same encode/score path as serving.

Usage::

    metrics = evaluate(cfg, "data/synth", "runs/train/model.pt", split="test", out="metrics.json")
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prvr.config import Config
from prvr.data import Collection
from prvr.dataset import collate_queries
from prvr.errors import CheckpointError
from prvr.metrics import metrics_from_ranks
from prvr.model import PRVRModel, VideoEmbeddings
from prvr.sources import TextSource, VideoSource

__all__ = ["evaluate", "encode_corpus", "encode_query_texts", "rank_split", "load_model",
           "evaluate_model", "query_spread", "write_json_atomic", "resolve_device"]

SCORE_KINDS = ("fused", "clip", "frame")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[PRVRModel, Config, dict]:
    """Rebuild a model from its checkpoint file alone (weights_only: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path} is not a readable prvr checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} lacks 'state_dict'/'config': not a prvr checkpoint")
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
def encode_query_texts(model: PRVRModel, texts: TextSource, cap_ids: list[str],
                       device: torch.device, batch_size: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(cap_ids), batch_size):
        tokens, mask = collate_queries(texts.get(cap_ids[i:i + batch_size]), model.cfg.max_desc_len)
        out.append(model.encode_queries(tokens.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def rank_split(queries: torch.Tensor, videos: VideoEmbeddings, truth: np.ndarray, alpha: float,
               query_chunk: int = 2048, video_chunk: int = 4096) -> dict[str, np.ndarray]:
    """1-based rank of each query's true video under the fused, clip and frame scores.

    Goes through the search engine that serving uses (an in-memory index of the
    corpus); only a (query_chunk, V) block of scores exists at a time. `score`
    normalises each block itself, so the corpus is not copied to normalise it first."""
    from prvr.search import ExactSearch, VideoIndex
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


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON through a temp file + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def evaluate(cfg: Config, data_path: str | Path, checkpoint: str | Path, split: str | None = None,
             out: str | Path | None = None, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on a split; model hyperparameters come from the checkpoint.

    `cfg` supplies data/eval settings and may override model.alpha."""
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
    if plots_dir:
        from prvr.plots import plot_evaluation
        plot_evaluation(metrics, plots_dir)
    return metrics


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


def format_table(metrics: dict[str, Any]) -> str:
    """Recall table of the three scores, as printed by the CLI and the demo."""
    rows = [f"{'score':<7}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'R@100':>7}{'SumR':>8}{'MedR':>7}{'MnR':>8}"]
    for kind in SCORE_KINDS:
        m = metrics[kind]
        rows.append(f"{kind:<7}{m['r1']:>7.1f}{m['r5']:>7.1f}{m['r10']:>7.1f}{m['r100']:>7.1f}"
                    f"{m['sumr']:>8.1f}{m['medr']:>7.1f}{m['mnr']:>8.1f}")
    bins = metrics["fused"].get("mv_bins")
    if bins:
        rows.append("fused SumR by moment/video length ratio: " +
                    ", ".join(f"{b}: {v['sumr']:.1f} (n={v['n']})" for b, v in bins.items()))
    return "\n".join(rows)


def _cli(args: argparse.Namespace) -> int:
    from prvr.cli import config_from_args
    cfg = config_from_args(args)
    metrics = evaluate(cfg, args.data, args.checkpoint, args.split, args.out, args.plots)
    print(f"{metrics['split']}: {metrics['num_queries']} queries x {metrics['num_videos']} videos "
          f"({metrics['variant']}, alpha={metrics['alpha']})")
    print(format_table(metrics))
    return 0


def register_cli(subparsers: Any) -> None:
    from prvr.cli import add_config_args
    p = subparsers.add_parser("evaluate", help="score a split with a checkpoint; R@K, SumR, MedR, MnR",
                              description="Rank every video of a split for every query and report "
                                          "fused, clip-only and frame-only metrics.")
    p.add_argument("--data", required=True, help="collection folder ROOT/COLL")
    p.add_argument("--checkpoint", required=True, help="model.pt written by `prvr train`")
    p.add_argument("--split", default=None, help="train | val | test (default: eval.split)")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.add_argument("--plots", default=None, help="folder for PNG plots (recall@K, SumR per M/V bin)")
    add_config_args(p)
    p.set_defaults(func=_cli)
