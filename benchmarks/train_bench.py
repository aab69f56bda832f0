"""Training and evaluation throughput of each model variant on one collection.

Prints a table and (with --out) writes every figure as JSON. Side by side in the
same run, at equal iterations: the k-medoids update step written as the original code
writes it (a member-masked [B, K, N, N] tensor per iteration; a re-implementation, not the
official code: benchmarks/official_compare.py runs that) against prvr's k-medoids.

The timed step is prvr.train.train_batch itself, on the CPU (a full run's lr schedule,
cfg.train.grad_clip, hard negatives throughout). Output from before it used train_batch
came from a drifted copy of the step (grad clip 1.0, constant lr): not strictly comparable.

    python benchmarks/train_bench.py --data data/tvr-like --batches 4 --out bench_train.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from prvr.config import load_config
from prvr.collection import Collection
from prvr.encoding import encode_corpus, encode_query_texts
from prvr.evaluate import rank_split
from prvr.model import PRVRModel, kmedoids
from prvr.encoding import TextSource, VideoSource
from prvr.train import Step, build_optimizer, train_batch

VARIANTS = ("ms-sl++", "ms-sl", "mean-pool")


@torch.no_grad()
def bknn_update_kmedoids(dist: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """`iters` updates written as the original code writes them: a [B, K, N, N] member-masked
    distance tensor per iteration (plain distances, no KKZ seeding: only the timing counts)."""
    B, N, _ = dist.shape
    medoids = torch.arange(k).expand(B, k).clone()  # fixed iteration count below: init irrelevant
    for _ in range(iters):
        assign = dist.gather(2, medoids[:, None, :].expand(B, N, k)).argmin(-1)           # (B, N)
        member = torch.nn.functional.one_hot(assign, k).permute(0, 2, 1).float()          # (B, K, N)
        cost = (dist[:, None] * member[:, :, None, :]).sum(-1)                             # (B, K, N, N) -> (B, K, N)
        cost = cost.masked_fill(member == 0, float("inf"))
        medoids = cost.argmin(-1)
    return medoids


def time_training(variant: str, data: Path, batches: int, batch_size: int) -> dict:
    cfg = load_config(None, [f"model.variant={variant}", f"train.batch_size={batch_size}"])
    coll = Collection(data, cfg.data.video_feature, cfg.data.text_feature_file)
    texts = TextSource(coll, cfg)
    cfg.model.video_dim, cfg.model.text_dim = coll.video_dim, texts.dim
    videos = coll.videos("train")[: batches * batch_size]
    queries_of: dict[str, list[str]] = {}
    for c in coll.captions("train"):
        queries_of.setdefault(c.video_id, []).append(c.cap_id)
    torch.manual_seed(0)
    model = PRVRModel(cfg.model)
    # the production step, on the CPU; the lr follows a full run's schedule on this collection
    step = Step(cfg=cfg, device=torch.device("cpu"), texts=texts,
                videos=VideoSource(coll, cfg, videos), queries_of=queries_of, model=model,
                net=model, optimizer=build_optimizer(model, cfg),
                total_steps=math.ceil(len(coll.videos("train")) / batch_size) * cfg.train.epochs,
                state={"step": 0, "lr_scale": 1.0}, amp=False)
    gen = torch.Generator().manual_seed(0)
    seen_v = seen_q = 0
    elapsed = 0.0
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)   # as prvr.train.train runs its steps
    try:
        for i in range(0, len(videos), batch_size):
            vids = videos[i:i + batch_size]
            t0 = time.perf_counter()   # data loading included: it is part of a training step
            _, n_queries = train_batch(step, vids, hard=True, gen=gen)
            elapsed += time.perf_counter() - t0
            seen_v += len(vids)
            seen_q += n_queries
    finally:
        torch.use_deterministic_algorithms(previous)
    # evaluation: encode the test corpus and rank every test query against it
    model.eval()
    test_videos, test_caps = coll.videos("test"), coll.captions("test")
    t0 = time.perf_counter()
    emb, _ = encode_corpus(model, VideoSource(coll, cfg, test_videos), test_videos, torch.device("cpu"))
    t_videos = time.perf_counter() - t0
    qv = encode_query_texts(model, texts, [c.cap_id for c in test_caps], torch.device("cpu"))
    t_queries = time.perf_counter() - t0 - t_videos
    index = {v: j for j, v in enumerate(test_videos)}
    truth = np.array([index[c.video_id] for c in test_caps])
    t1 = time.perf_counter()
    rank_split(qv, emb, truth, cfg.model.alpha)
    t_rank = time.perf_counter() - t1
    total_eval = time.perf_counter() - t0
    return {"variant": variant, "train_videos_per_s": seen_v / elapsed,
            "train_queries_per_s": seen_q / elapsed, "train_s_per_batch": elapsed / math.ceil(len(videos) / batch_size),
            "eval_queries_per_s": len(test_caps) / total_eval, "eval_total_s": total_eval,
            "eval_encode_videos_s": t_videos, "eval_encode_queries_s": t_queries, "eval_rank_s": t_rank,
            "test_videos": len(test_videos), "test_queries": len(test_caps),
            "clips_per_video": int(emb.clips.shape[1])}


def time_clustering(batch: int, k: int, iters: int) -> dict:
    """Both run exactly `iters` updates (prvr's with tol -1: no video stops early); prvr's
    figure includes its KKZ seeding, the other none."""
    torch.manual_seed(0)
    x = torch.randn(batch, 528, 640)
    dist = torch.cdist(x, x)
    t0 = time.perf_counter()
    bknn_update_kmedoids(dist, k, iters)
    t_bknn = time.perf_counter() - t0
    t0 = time.perf_counter()
    kmedoids(dist, x.norm(dim=-1), k, iters=iters, tol=-1.0)
    t_ours = time.perf_counter() - t0
    return {"batch": batch, "k": k, "iterations_each": iters, "bknn_update_reimplemented_s": t_bknn,
            "prvr_kmedoids_s": t_ours, "speedup_equal_iterations_vs_bknn_reimplementation": t_bknn / t_ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="collection folder (e.g. the tvr-like preset)")
    p.add_argument("--batches", type=int, default=4, help="training batches timed per variant")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cluster-batch", type=int, default=32, help="videos in the clustering comparison")
    p.add_argument("--cluster-iters", type=int, default=10)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [time_training(v, Path(args.data), args.batches, args.batch_size)
            for v in args.variants.split(",")]
    cluster = time_clustering(args.cluster_batch, 32, args.cluster_iters)
    print(f"{'variant':<10}{'videos/s':>10}{'queries/s':>11}{'s/batch':>9}{'eval q/s':>10}"
          f"{'eval s':>8}{'clips/video':>12}")
    for r in rows:
        print(f"{r['variant']:<10}{r['train_videos_per_s']:>10.1f}{r['train_queries_per_s']:>11.1f}"
              f"{r['train_s_per_batch']:>9.2f}{r['eval_queries_per_s']:>10.1f}{r['eval_total_s']:>8.1f}"
              f"{r['clips_per_video']:>12}")
    print(f"k-medoids on {cluster['batch']} videos x 528 spans, K={cluster['k']}, "
          f"{cluster['iterations_each']} iterations each: [B, K, N, N] update re-implemented "
          f"{cluster['bknn_update_reimplemented_s']:.2f} s, prvr {cluster['prvr_kmedoids_s']:.3f} s "
          f"({cluster['speedup_equal_iterations_vs_bknn_reimplementation']:.0f}x); the official code: "
          f"benchmarks/official_compare.py")
    if args.out:
        Path(args.out).write_text(json.dumps({"variants": rows, "clustering": cluster}, indent=2))


if __name__ == "__main__":
    main()
