"""Training: batches of videos with all their queries, triplet + infoNCE at two scales.

Every epoch ends with a complete, atomically written ``last.pt`` (model,
optimizer, step, early-stopping state); a run killed at any moment and started
again resumes from the last complete epoch and ends where an uninterrupted run
would, because every epoch's randomness is seeded from (seed, epoch).
The best epoch by validation SumR of the fused score is kept as ``model.pt``.

Data-parallel (torchrun) training computes the one-process loss: every rank takes part in
every step, encodes its contiguous share of the global batch (a rank left without videos
encodes a stand-in whose rows are dropped), gathers all ranks' embeddings and computes the
whole batch's loss, negatives drawn from the same generator; see `train_batch`.

Usage::

    result = train(load_config(), "data/synth", "runs/train")   # -> {"best_sumr": ..., ...}
    torchrun --nproc-per-node 2 -m prvr.cli train-worker --data data/synth --out runs/train
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dvclive import Live
from tqdm import tqdm

from prvr.checkpoint import resolve_device, save_checkpoint, write_json_atomic
from prvr.collection import Collection
from prvr.config import Config
from prvr.encoding import TextSource, VideoSource
from prvr.errors import DataError
from prvr.evaluate import evaluate_model
from prvr.model import PRVRModel, VideoEmbeddings, training_scores
from prvr.views import collate_queries

__all__ = ["train", "triplet_loss", "infonce_loss", "compute_loss", "build_optimizer",
           "lr_at", "setup", "train_batch", "end_epoch", "Encoders", "Step", "Run", "EpochStats"]


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
# What a run holds
# --------------------------------------------------------------------------- #
class Encoders(torch.nn.Module):
    """The model's two encoders in one forward: what DDP wraps, so gradients sync through it
    while the scores are computed from the embeddings of every rank."""

    def __init__(self, model: PRVRModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor, units: torch.Tensor,
                frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, VideoEmbeddings]:
        q = self.model.encode_queries(tokens, token_mask)                 # (Q, H)
        return q, self.model.encode_videos(units, frames, frame_mask)     # clips/attended (V, K, H)


@dataclass
class Step:
    """What one optimisation step needs; a benchmark can build one directly and time the real step."""
    cfg: Config
    device: torch.device
    texts: TextSource
    videos: VideoSource                  # views of the training videos
    queries_of: dict[str, list[str]]     # training video -> its cap_ids
    model: PRVRModel
    net: torch.nn.Module                 # Encoders(model) or its DDP wrapper; a bare model is wrapped
    optimizer: torch.optim.Optimizer
    total_steps: int                     # for the lr schedule
    state: dict[str, Any]                # train_batch reads "step", "lr_scale"; advances "step"
    amp: bool                            # bfloat16 autocast (CUDA only)
    rank: int = 0                        # this process among `world` (torchrun)
    world: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.net, PRVRModel):   # one process (benchmarks build a Step so)
            self.net = Encoders(self.net)


@dataclass(kw_only=True)
class Run(Step):
    """A whole run: a Step plus data splits, output paths and logging (set up once)."""
    collection: Collection
    train_videos: list[str]
    val_videos: list[str]
    val_captions: list
    val_source: VideoSource
    out_dir: Path
    live: Any                            # dvclive.Live on rank 0, else None
    on_epoch: Callable[[int, bool], None] | None = None   # rank 0, after last.pt: (epoch, new best?)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "model.pt"


@dataclass
class EpochStats:
    """One epoch's totals over whole (global) batches: the logged loss and throughput come from these."""
    loss_sum: float = 0.0
    batches: int = 0
    videos: int = 0
    queries: int = 0
    t0: float = field(default_factory=time.time)
    elapsed: float = 0.0

    def add(self, loss: float, videos: int, queries: int) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.videos += videos
        self.queries += queries

    def rate(self) -> float:
        return self.videos / max(time.time() - self.t0, 1e-9)

    def stop(self) -> None:
        self.elapsed = time.time() - self.t0


def _new_state() -> dict[str, Any]:
    """Counters saved in last.pt: everything besides weights that a resumed run must continue from."""
    return {"epoch": 0, "step": 0, "best_sumr": -1.0, "best_epoch": 0, "bad_epochs": 0,
            "lr_scale": 1.0, "restarts": 0, "history": []}


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #
def _load_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def _restore(run: Run) -> bool:
    """Continue from last.pt if there is one: weights, optimizer and counters; False if none."""
    saved = _load_state(run.last_path, run.device)
    if saved is None:
        return False
    if saved["config"]["model"] != run.cfg.to_dict()["model"]:
        raise DataError(f"{run.last_path} was written with other model settings; "
                        "use a new --out folder or delete it")
    run.model.load_state_dict(saved["state_dict"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.state.update(saved["state"])
    if run.is_main:
        print(f"resuming from {run.last_path} after epoch {run.state['epoch']}", file=sys.stderr)
    return True


def _snapshot(run: Run) -> tuple[dict, dict, dict]:
    """Weights, optimizer and counters before an epoch: a collapsed epoch is redone from here."""
    return ({k: v.detach().clone() for k, v in run.model.state_dict().items()},
            _clone_opt_state(run.optimizer.state_dict()), dict(run.state))


def _clone_opt_state(sd: dict[str, Any]) -> dict[str, Any]:
    return {"state": {k: {n: (t.detach().clone() if torch.is_tensor(t) else t) for n, t in v.items()}
                      for k, v in sd["state"].items()},
            "param_groups": [dict(g) for g in sd["param_groups"]]}


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
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------- #
def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def _devices(cfg: Config) -> tuple[torch.device, int, int]:
    """This process's device, rank and world size; under torchrun each rank gets its own GPU."""
    device = resolve_device(cfg.train.device)
    rank, world = _init_distributed(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, rank, world


def _broadcast_flag(value: int, world: int) -> int:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.broadcast(t, 0)
    return int(t.item())


def _broadcast_state(state: dict[str, Any], world: int) -> dict[str, Any]:
    """Rank 0 decides early stopping; others follow its counters."""
    if world == 1:
        return state
    box = [state]
    dist.broadcast_object_list(box, 0)
    return box[0]


# --------------------------------------------------------------------------- #
# Set-up
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


def setup(cfg: Config, data_path: str | Path, out_dir: str | Path, resume: bool = True) -> Run:
    """Data, model, optimizer and counters of a run, restored from OUT/last.pt when resuming.

    The model is built right after torch.manual_seed(seed), so its initial weights depend on
    the seed alone. Sets cfg.model.video_dim/text_dim from the collection."""
    out_dir = Path(out_dir)
    device, rank, world = _devices(cfg)
    if rank == 0:
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
    run = Run(cfg=cfg, device=device, texts=texts, videos=videos, queries_of=queries_of,
              model=model, net=Encoders(model), optimizer=build_optimizer(model, cfg),
              total_steps=math.ceil(len(train_videos) / cfg.train.batch_size) * cfg.train.epochs,
              state=_new_state(), amp=cfg.train.amp and device.type == "cuda", rank=rank,
              world=world, collection=collection, train_videos=train_videos,
              val_videos=val_videos, val_captions=val_captions, val_source=val_source,
              out_dir=out_dir, live=None)
    resumed = resume and _restore(run)
    if world > 1:   # buffers are fixed tables built from the config: no per-step broadcast
        run.net = torch.nn.parallel.DistributedDataParallel(
            run.net, device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False)
    if run.is_main:
        run.live = Live(str(out_dir / "dvclive"), resume=resumed, save_dvc_exp=False,
                        dvcyaml=None, report=None)
    return run


# --------------------------------------------------------------------------- #
# One step, one epoch's end
# --------------------------------------------------------------------------- #
def train_batch(step: Step, batch_videos: list[str], hard: bool,
                gen: torch.Generator) -> tuple[float, int]:
    """One optimisation step on these videos and all their queries: (loss, number of queries).

    Under torchrun every rank passes the same (global) batch and encodes only its share;
    the loss is then the one-process loss of the whole batch on every rank (`_gather`).
    `gen` also draws the loss's negatives, so runs repeat only if it is used in the same order."""
    cfg, device, state = step.cfg, step.device, step.state
    shares = _shares(batch_videos, step.world)
    encoded = [share or batch_videos[:1] for share in shares]  # an empty share: a stand-in, dropped
    mine = encoded[step.rank]
    cap_ids = [c for v in mine for c in step.queries_of[v]]
    labels = torch.tensor([i for i, v in enumerate(batch_videos) for _ in step.queries_of[v]],
                          device=device)
    vb = step.videos.batch(mine).to(device)
    tokens, tmask = collate_queries(step.texts.get(cap_ids), cfg.model.max_desc_len)
    for group in step.optimizer.param_groups:
        group["lr"] = lr_at(state["step"], step.total_steps, cfg) * state["lr_scale"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=step.amp):
        q, v = step.net(tokens.to(device), tmask.to(device), vb.units, vb.frames, vb.frame_mask)
        clips, attended = v.clips, v.attended
        if step.world > 1:
            sizes = [_sizes(share, step.queries_of) for share in shares]
            padded = [_sizes(share, step.queries_of) for share in encoded]
            q, clips, attended = _gather(q, clips, attended, sizes, padded)
        out = training_scores(q, clips, attended)
        loss, _ = compute_loss({k: v.float() for k, v in out.items()}, labels, cfg, hard, gen)
    step.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(step.model.parameters(), cfg.train.grad_clip)
    step.optimizer.step()
    state["step"] += 1
    return loss.item(), len(labels)


def _shares(videos: list[str], world: int) -> list[list[str]]:
    """Contiguous, near-equal shares of a batch, one per rank, in batch order (empty when
    the batch has fewer videos than ranks)."""
    size, extra = divmod(len(videos), world)
    starts = [r * size + min(r, extra) for r in range(world + 1)]
    return [videos[starts[r]:starts[r + 1]] for r in range(world)]


def _sizes(videos: list[str], queries_of: dict[str, list[str]]) -> tuple[int, int]:
    """(queries, videos) of a share."""
    return sum(len(queries_of[v]) for v in videos), len(videos)


class _AllGather(torch.autograd.Function):
    """Every rank's (n,) tensor stacked (world, n); the gradient goes back to its rank.

    Every rank computes the same loss from the same gathered tensor, so the sum over ranks
    of d loss / d(this rank's part), what a reduce-scatter would deliver, is world times the
    local one: no communication is needed, and DDP's average over ranks of the parameter
    gradients then equals the gradient of the one-process loss."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad[dist.get_rank()] * dist.get_world_size()


def _gather(q: torch.Tensor, clips: torch.Tensor, attended: torch.Tensor,
            sizes: list[tuple[int, int]],
            padded: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All ranks' query (Q, H) and video (V, K, H) embeddings in batch order, in one all-gather.

    Shares differ in size, so each rank pads its part to the largest encoded one (`padded`,
    known to every rank) and the first `sizes[r]` rows of rank r's part are kept."""
    max_q, max_v = max(p[0] for p in padded), max(p[1] for p in padded)
    world, (_, K, H) = len(sizes), clips.shape
    video = torch.stack([clips.float(), attended.float()])                 # (2, V, K, H)
    flat = torch.cat([F.pad(q.float(), (0, 0, 0, max_q - len(q))).flatten(),
                      F.pad(video, (0, 0, 0, 0, 0, max_v - video.shape[1])).flatten()])
    parts = _AllGather.apply(flat)                                         # (world, n)
    qs, vs = parts.split([max_q * H, 2 * max_v * K * H], 1)
    qs, vs = qs.reshape(world, max_q, H), vs.reshape(world, 2, max_v, K, H)
    q_all = torch.cat([qs[r, :n_q] for r, (n_q, _) in enumerate(sizes)])   # (Q, H)
    v_all = torch.cat([vs[r, :, :n_v] for r, (_, n_v) in enumerate(sizes)], 1)  # (2, V, K, H)
    return q_all, v_all[0], v_all[1]


def end_epoch(run: Run, epoch: int, snapshot: tuple[dict, dict, dict], stats: EpochStats) -> None:
    """Validate on rank 0; redo the epoch if query embeddings collapsed, else record and save it.

    Every rank follows rank 0's decision and counters, so all leave the loop together."""
    val = None
    decision = 0  # 0 continue, 1 collapsed: redo the epoch at a lower lr
    if run.is_main:
        val = evaluate_model(run.model, run.collection, run.texts, run.val_captions, run.val_videos,
                             run.cfg, run.device, run.val_source)
        collapsed = (val["query_spread"] > run.cfg.train.collapse_cosine
                     and run.state["restarts"] < run.cfg.train.max_collapse_restarts)
        decision = 1 if collapsed else 0
    if _broadcast_flag(decision, run.world) == 1:
        _rollback(run, snapshot, epoch, val)
        return
    run.state["epoch"] = epoch
    if run.is_main:
        _record_epoch(run, epoch, val, stats)
    run.state = _broadcast_state(run.state, run.world)


def _rollback(run: Run, snapshot: tuple[dict, dict, dict], epoch: int, val: dict | None) -> None:
    """Back to before the epoch, one restart spent and the lr scaled down."""
    weights, opt_state, state = snapshot
    run.model.load_state_dict(weights)
    run.optimizer.load_state_dict(opt_state)
    restarts = run.state["restarts"] + 1
    run.state = dict(state)
    run.state["restarts"] = restarts
    run.state["lr_scale"] *= run.cfg.train.collapse_lr_factor
    if run.is_main:
        print(f"epoch {epoch}: query embeddings collapsed (mean pairwise cosine "
              f"{val['query_spread']:.4f} > {run.cfg.train.collapse_cosine}); redoing it at "
              f"lr x {run.state['lr_scale']:.3g}", file=sys.stderr)


def _record_epoch(run: Run, epoch: int, val: dict, stats: EpochStats) -> None:
    """Rank 0: history, model.pt if best so far, last.pt always, dvclive and the epoch line."""
    state, cfg = run.state, run.cfg
    sumr = val["fused"]["sumr"]
    record = {"epoch": epoch, "loss": stats.loss_sum / max(stats.batches, 1), "val_sumr": sumr,
              "val_r1": val["fused"]["r1"], "query_spread": val["query_spread"],
              "videos_per_s": stats.videos / max(stats.elapsed, 1e-9),
              "queries_per_s": stats.queries / max(stats.elapsed, 1e-9),
              "lr_scale": state["lr_scale"]}
    state["history"].append(record)
    if sumr > state["best_sumr"]:
        state.update(best_sumr=sumr, best_epoch=epoch, bad_epochs=0)
        save_checkpoint(run.best_path, {"state_dict": run.model.state_dict(), "config": cfg.to_dict(),
                                        "epoch": epoch, "metrics": _plain(val),
                                        "text_encoder": run.texts.encoder_name})
    else:
        state["bad_epochs"] += 1
    save_checkpoint(run.last_path, {"state_dict": run.model.state_dict(),
                                    "optimizer": run.optimizer.state_dict(),
                                    "config": cfg.to_dict(), "state": state})
    _log_metrics(run.live, record, val)
    if run.on_epoch is not None:          # e.g. copy the checkpoints off the pod (train.checkpoint_uri)
        run.on_epoch(epoch, state["best_epoch"] == epoch)
    print(f"epoch {epoch}: loss {record['loss']:.4f}  val SumR {sumr:.1f}  "
          f"R@1 {val['fused']['r1']:.1f}  spread {val['query_spread']:.3f}  "
          f"{record['videos_per_s']:.1f} videos/s", file=sys.stderr)


def _log_metrics(live: Any, record: dict[str, Any], val: dict) -> None:
    live.log_metric("train/loss", record["loss"])
    for k in ("r1", "r5", "r10", "r100", "sumr"):
        live.log_metric(f"val/{k}", val["fused"][k])
    live.log_metric("val/clip_sumr", val["clip"]["sumr"])
    live.log_metric("val/frame_sumr", val["frame"]["sumr"])
    live.log_metric("val/query_spread", val["query_spread"])
    live.log_metric("train/videos_per_s", record["videos_per_s"])
    live.next_step()


def _finish(run: Run) -> dict[str, Any]:
    """The run's summary, also written as train_summary.json by rank 0; waits for every rank."""
    state = run.state
    result = {"best_sumr": state["best_sumr"], "best_epoch": state["best_epoch"],
              "epochs": state["epoch"], "stopped_early": state["bad_epochs"] >= run.cfg.train.patience,
              "collapse_restarts": state["restarts"], "checkpoint": str(run.best_path),
              "history": state["history"]}
    if run.is_main:
        run.live.end()
        write_json_atomic(run.out_dir / "train_summary.json", result)
    if run.world > 1:
        dist.barrier()
    return result


# --------------------------------------------------------------------------- #
# The training loop
# --------------------------------------------------------------------------- #
def train(cfg: Config, data_path: str | Path, out_dir: str | Path, resume: bool = True,
          progress: bool = True, on_epoch: Callable[[int, bool], None] | None = None) -> dict[str, Any]:
    """Train one model; returns the best validation metrics and where the checkpoint is.

    ``on_epoch(epoch, improved)`` runs on rank 0 after each recorded epoch's last.pt (and,
    when ``improved``, model.pt) is written.

    Deterministic algorithms are switched on for the run (restored after): with several
    CPU threads, the accumulating index/scatter backward passes otherwise differ in the
    last bits from run to run."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg, data_path, out_dir, resume, progress, on_epoch)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(cfg: Config, data_path: str | Path, out_dir: str | Path, resume: bool,
           progress: bool, on_epoch: Callable[[int, bool], None] | None = None) -> dict[str, Any]:
    run, t = setup(cfg, data_path, out_dir, resume), cfg.train
    run.on_epoch = on_epoch
    while run.state["epoch"] < t.epochs and run.state["bad_epochs"] < t.patience:
        epoch = run.state["epoch"] + 1
        snapshot = _snapshot(run)
        # every epoch's randomness comes from (seed, epoch[, restarts]): what makes resume exact;
        # each rank its own dropout masks, the same order and negatives (gen) on every rank
        torch.manual_seed(t.seed * 1000 + epoch * 7 + run.state["restarts"] + (run.rank << 32))
        gen = torch.Generator().manual_seed(t.seed * 1000 + epoch)  # the order, then loss negatives
        order = [run.train_videos[i]
                 for i in torch.randperm(len(run.train_videos), generator=gen).tolist()]
        hard = epoch >= t.hard_negative_start_epoch
        run.net.train()
        stats = EpochStats()
        bar = tqdm(range(0, len(order), t.batch_size), desc=f"epoch {epoch}",
                   disable=not (progress and run.is_main), leave=False, file=sys.stderr)
        for start in bar:   # every rank takes every step, however few videos the batch has
            batch_videos = order[start:start + t.batch_size]
            loss, n_queries = train_batch(run, batch_videos, hard, gen)
            stats.add(loss, len(batch_videos), n_queries)
            bar.set_postfix(loss=f"{stats.loss_sum / stats.batches:.4f}",
                            videos_per_s=f"{stats.rate():.1f}")
        stats.stop()
        end_epoch(run, epoch, snapshot, stats)
    return _finish(run)
