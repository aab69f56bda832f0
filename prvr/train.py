"""Training: batches of videos with all their queries, triplet + infoNCE at two scales.

Every epoch ends with a complete, atomically written ``last.pt`` (model,
optimizer, step, early-stopping state); a run killed at any moment and started
again resumes from the last complete epoch and ends where an uninterrupted run
would, because every epoch's randomness is seeded from (seed, epoch).
The best epoch by validation SumR of the fused score is kept as ``model.pt``.

Usage::

    result = train(load_config(), "data/synth", "runs/train")   # -> {"best_sumr": ..., ...}
    torchrun --nproc-per-node 2 -m prvr.train --data data/synth --out runs/train
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from prvr.config import Config
from prvr.data import Collection
from prvr.dataset import collate_queries
from prvr.errors import DataError
from prvr.evaluate import evaluate_model, resolve_device, write_json_atomic
from prvr.model import PRVRModel
from prvr.sources import TextSource, VideoSource

__all__ = ["train", "triplet_loss", "infonce_loss", "compute_loss", "build_optimizer",
           "lr_at", "save_checkpoint"]


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def triplet_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float, hard: bool,
                 pool: int, generator: torch.Generator) -> torch.Tensor:
    """Hinge ranking loss in both directions on cosine scores (Q, V).

    Query->video: one negative video per query; video->query: one negative
    query per video against the mean of its own queries. Negatives are drawn
    uniformly from all others, or (hard) from the `pool` highest-scoring ones.
    """
    Q, V = scores.shape
    rows = torch.arange(Q, device=scores.device)
    own = F.one_hot(labels, V).bool()                                     # (Q, V)

    def sample(neg_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # neg_scores (R, C) with invalid entries masked; pick one valid column per row
        n_valid = valid.sum(1)
        limit = n_valid.clamp(max=pool) if hard else n_valid
        masked = neg_scores.detach().masked_fill(~valid, float("-inf"))
        order = masked.argsort(1, descending=True)                        # valid ones first
        pick = (torch.rand(len(neg_scores), generator=generator).to(scores.device)
                * limit).long().clamp(max=neg_scores.shape[1] - 1)
        return neg_scores.gather(1, order.gather(1, pick[:, None])).squeeze(1)

    pos_t2v = scores[rows, labels]                                        # (Q,)
    neg_t2v = sample(scores, ~own)
    t2v = (margin + neg_t2v - pos_t2v).clamp_min(0).mean()
    s_v = scores.T                                                        # (V, Q)
    own_v = own.T
    pos_v2t = (s_v * own_v).sum(1) / own_v.sum(1).clamp_min(1)            # (V,)
    neg_v2t = sample(s_v, ~own_v)
    v2t = (margin + neg_v2t - pos_v2t).clamp_min(0).mean()
    return t2v + v2t


def infonce_loss(raw: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """InfoNCE on raw dot products (Q, V): text->video, and video->text with all own queries positive."""
    V = raw.shape[1]
    own = F.one_hot(labels, V).bool()
    t2v = torch.logsumexp(raw, 1) - raw.gather(1, labels[:, None]).squeeze(1)
    pos = torch.logsumexp(raw.masked_fill(~own, float("-inf")), 0)        # (V,)
    v2t = torch.logsumexp(raw, 0) - pos
    return t2v.mean() + v2t.mean()


def compute_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, cfg: Config, hard: bool,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    t = cfg.train
    parts = {
        "trip_clip": triplet_loss(out["clip"], labels, t.margin, hard, t.hard_pool_size, generator),
        "trip_frame": triplet_loss(out["frame"], labels, t.margin, hard, t.hard_pool_size, generator),
        "nce_clip": infonce_loss(out["clip_raw"], labels),
        "nce_frame": infonce_loss(out["frame_raw"], labels),
    }
    weights = {"trip_clip": t.w_trip_clip, "trip_frame": t.w_trip_frame,
               "nce_clip": t.w_nce_clip, "nce_frame": t.w_nce_frame}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


# --------------------------------------------------------------------------- #
# Optimisation
# --------------------------------------------------------------------------- #
def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay, none on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    t = cfg.train
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=tuple(t.betas), eps=t.eps)


def lr_at(step: int, total_steps: int, cfg: Config) -> float:
    """Linear warm-up over warmup_frac of the steps, then linear decay to zero."""
    warm = max(1, int(cfg.train.warmup_frac * total_steps))
    if step < warm:
        return cfg.train.lr * (step + 1) / warm
    return cfg.train.lr * max(0.0, (total_steps - step) / max(1, total_steps - warm))


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #
def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temp file + rename: a kill never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=True)


# --------------------------------------------------------------------------- #
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------- #
def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def _broadcast_flag(value: int, world: int) -> int:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.broadcast(t, 0)
    return int(t.item())


# --------------------------------------------------------------------------- #
# The training loop
# --------------------------------------------------------------------------- #
def _splits(collection: Collection, seed: int) -> tuple[list[str], list[str], list]:
    """Train videos, validation videos and validation captions.

    Without a val caption file, a fixed 10% of the training videos is held out."""
    train_videos = collection.videos("train")
    if "val" in collection.available_splits():
        return train_videos, collection.videos("val"), collection.captions("val")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(train_videos, size=max(1, len(train_videos) // 10), replace=False).tolist())
    if len(held) == len(train_videos):
        raise DataError(f"{collection.path}: no val split and too few training videos to hold some out")
    print(f"{collection.path}: no val split; validating on {len(held)} held-out training videos",
          file=sys.stderr)
    return ([v for v in train_videos if v not in held], [v for v in train_videos if v in held],
            [c for c in collection.captions("train") if c.video_id in held])


def train(cfg: Config, data_path: str | Path, out_dir: str | Path, resume: bool = True,
          progress: bool = True) -> dict[str, Any]:
    """Train one model; returns the best validation metrics and where the checkpoint is.

    Deterministic algorithms are switched on for the run (restored after): with several
    CPU threads, the accumulating index/scatter backward passes otherwise differ in the
    last bits from run to run."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg, data_path, out_dir, resume, progress)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(cfg: Config, data_path: str | Path, out_dir: str | Path, resume: bool,
           progress: bool) -> dict[str, Any]:
    out_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    rank, world = _init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    collection = Collection(data_path, cfg.data.video_feature, cfg.data.text_feature_file)
    texts = TextSource(collection, cfg)
    cfg.model.video_dim, cfg.model.text_dim = collection.video_dim, texts.dim
    train_videos, val_videos, val_captions = _splits(collection, cfg.train.seed)
    queries_of: dict[str, list[str]] = {}
    for c in collection.captions("train"):
        queries_of.setdefault(c.video_id, []).append(c.cap_id)
    videos = VideoSource(collection, cfg, train_videos)
    val_source = VideoSource(collection, cfg, val_videos)

    torch.manual_seed(cfg.train.seed)
    model = PRVRModel(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train_videos) / cfg.train.batch_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    state = {"epoch": 0, "step": 0, "best_sumr": -1.0, "best_epoch": 0, "bad_epochs": 0,
             "lr_scale": 1.0, "restarts": 0, "history": []}
    last_path, best_path = out_dir / "last.pt", out_dir / "model.pt"
    saved = _load_state(last_path, device) if resume else None
    if saved is not None:
        if saved["config"]["model"] != cfg.to_dict()["model"]:
            raise DataError(f"{last_path} was written with other model settings; "
                            "use a new --out folder or delete it")
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(saved["state"])
        if is_main:
            print(f"resuming from {last_path} after epoch {state['epoch']}", file=sys.stderr)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    live = None
    if is_main:
        from dvclive import Live
        live = Live(str(out_dir / "dvclive"), resume=saved is not None, save_dvc_exp=False,
                    dvcyaml=None, report=None)
    amp = cfg.train.amp and device.type == "cuda"
    stopped_early = False

    while state["epoch"] < cfg.train.epochs and state["bad_epochs"] < cfg.train.patience:
        epoch = state["epoch"] + 1
        snapshot = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                    _clone_opt_state(optimizer.state_dict()), dict(state))
        torch.manual_seed(cfg.train.seed * 1000 + epoch * 7 + state["restarts"])
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch)
        order = [train_videos[i] for i in torch.randperm(len(train_videos), generator=gen).tolist()]
        hard = epoch >= cfg.train.hard_negative_start_epoch
        net.train()
        t0, seen_videos, seen_queries, loss_sum, batches = time.time(), 0, 0, 0.0, 0
        bar = tqdm(range(0, len(order), cfg.train.batch_size), desc=f"epoch {epoch}",
                   disable=not (progress and is_main), leave=False, file=sys.stderr)
        for start in bar:
            batch_videos = order[start:start + cfg.train.batch_size][rank::world]
            if not batch_videos:
                continue
            cap_ids = [c for v in batch_videos for c in queries_of[v]]
            labels = torch.tensor([i for i, v in enumerate(batch_videos) for _ in queries_of[v]],
                                  device=device)
            vb = videos.batch(batch_videos).to(device)
            tokens, tmask = collate_queries(texts.get(cap_ids), cfg.model.max_desc_len)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["step"], total_steps, cfg) * state["lr_scale"]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(tokens.to(device), tmask.to(device), vb.units, vb.frames, vb.frame_mask)
                loss, parts = compute_loss({k: v.float() for k, v in out.items()}, labels, cfg, hard, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            state["step"] += 1
            batches += 1
            loss_sum += loss.item()
            seen_videos += len(batch_videos)
            seen_queries += len(cap_ids)
            rate = seen_videos / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / batches:.4f}", videos_per_s=f"{rate:.1f}")
        elapsed = time.time() - t0

        decision = 0  # 0 continue, 1 collapsed: redo the epoch at a lower lr
        if is_main:
            val = evaluate_model(model, collection, texts, val_captions, val_videos, cfg, device,
                                 val_source)
            collapsed = (val["query_spread"] > cfg.train.collapse_cosine
                         and state["restarts"] < cfg.train.max_collapse_restarts)
            decision = 1 if collapsed else 0
        decision = _broadcast_flag(decision, world)
        if decision == 1:
            model.load_state_dict(snapshot[0])
            optimizer.load_state_dict(snapshot[1])
            restarts = state["restarts"] + 1
            state = dict(snapshot[2])
            state["restarts"] = restarts
            state["lr_scale"] *= cfg.train.collapse_lr_factor
            if is_main:
                print(f"epoch {epoch}: query embeddings collapsed (mean pairwise cosine "
                      f"{val['query_spread']:.4f} > {cfg.train.collapse_cosine}); redoing it at "
                      f"lr x {state['lr_scale']:.3g}", file=sys.stderr)
            continue

        state["epoch"] = epoch
        if is_main:
            sumr = val["fused"]["sumr"]
            record = {"epoch": epoch, "loss": loss_sum / max(batches, 1), "val_sumr": sumr,
                      "val_r1": val["fused"]["r1"], "query_spread": val["query_spread"],
                      "videos_per_s": seen_videos * world / max(elapsed, 1e-9),
                      "queries_per_s": seen_queries * world / max(elapsed, 1e-9),
                      "lr_scale": state["lr_scale"]}
            state["history"].append(record)
            if sumr > state["best_sumr"]:
                state.update(best_sumr=sumr, best_epoch=epoch, bad_epochs=0)
                save_checkpoint(best_path, {"state_dict": model.state_dict(), "config": cfg.to_dict(),
                                            "epoch": epoch, "metrics": _plain(val),
                                            "text_encoder": texts.encoder_name})
            else:
                state["bad_epochs"] += 1
            save_checkpoint(last_path, {"state_dict": model.state_dict(),
                                        "optimizer": optimizer.state_dict(),
                                        "config": cfg.to_dict(), "state": state})
            live.log_metric("train/loss", record["loss"])
            for k in ("r1", "r5", "r10", "r100", "sumr"):
                live.log_metric(f"val/{k}", val["fused"][k])
            live.log_metric("val/clip_sumr", val["clip"]["sumr"])
            live.log_metric("val/frame_sumr", val["frame"]["sumr"])
            live.log_metric("val/query_spread", val["query_spread"])
            live.log_metric("train/videos_per_s", record["videos_per_s"])
            live.next_step()
            print(f"epoch {epoch}: loss {record['loss']:.4f}  val SumR {sumr:.1f}  "
                  f"R@1 {val['fused']['r1']:.1f}  spread {val['query_spread']:.3f}  "
                  f"{record['videos_per_s']:.1f} videos/s", file=sys.stderr)
        state = _broadcast_state(state, world)
    stopped_early = state["bad_epochs"] >= cfg.train.patience
    result = {"best_sumr": state["best_sumr"], "best_epoch": state["best_epoch"],
              "epochs": state["epoch"], "stopped_early": stopped_early,
              "collapse_restarts": state["restarts"], "checkpoint": str(best_path),
              "history": state["history"]}
    if is_main:
        live.end()
        write_json_atomic(out_dir / "train_summary.json", result)
    if world > 1:
        dist.barrier()
    return result


def _clone_opt_state(sd: dict[str, Any]) -> dict[str, Any]:
    return {"state": {k: {n: (t.detach().clone() if torch.is_tensor(t) else t) for n, t in v.items()}
                      for k, v in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


def _broadcast_state(state: dict[str, Any], world: int) -> dict[str, Any]:
    """Rank 0 decides early stopping; others follow its counters."""
    if world == 1:
        return state
    box = [state]
    dist.broadcast_object_list(box, 0)
    return box[0]


def _plain(obj: Any) -> Any:
    """Metrics as plain Python values (checkpoints load with weights_only=True)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def _add_args(p: argparse.ArgumentParser) -> None:
    from prvr.cli import add_config_args
    p.add_argument("--data", required=True, help="collection folder ROOT/COLL")
    p.add_argument("--out", required=True, help="run folder: model.pt (best), last.pt, dvclive/")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)


def _cli(args: argparse.Namespace) -> int:
    from prvr.cli import config_from_args
    cfg = config_from_args(args)
    result = train(cfg, args.data, args.out, resume=not args.no_resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best val SumR {result['best_sumr']:.1f} at epoch {result['best_epoch']} "
              f"({result['epochs']} epochs) -> {result['checkpoint']}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a model (resumes from OUT/last.pt)",
                              description="Train MS-SL++ (or model.variant) on a collection. "
                                          "Run under torchrun for data-parallel training.")
    _add_args(p)
    p.set_defaults(func=_cli)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m prvr.train` (used by torchrun and the PyTorchJob)."""
    from prvr.errors import PrvrError
    p = argparse.ArgumentParser(prog="python -m prvr.train", description="Train a prvr model.")
    _add_args(p)
    args = p.parse_args(argv)
    try:
        return _cli(args)
    except PrvrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
