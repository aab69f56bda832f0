"""`prvr train-worker`: one process of a training run, as torchrun and the PyTorchJob start it.

`prvr train` (a stage) prepares the run folder and pushes metrics once; with `--nproc N` it
starts N of these workers through torchrun, which train together (DDP over gloo or NCCL)."""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch.distributed as dist

from prvr.cli.common import add_config_args, config_from_args
from prvr.stages import checkpoint_sync
from prvr.train import train


def _cmd_worker(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:     # rank 0 mirrors each epoch to train.checkpoint_uri when set (prvr.stages.train_step runs us)
        result = train(cfg, args.data, args.out, resume=not args.no_resume, progress=not args.no_progress,
                       on_epoch=checkpoint_sync(cfg, args.out))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best val SumR {result['best_sumr']:.1f} at epoch {result['best_epoch']} "
              f"({result['epochs']} epochs) -> {result['checkpoint']}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("train-worker", help="one training process (torchrun -m prvr.cli train-worker)",
                              description="Train in this process, resuming from OUT/last.pt; under torchrun "
                                          "each rank runs one. Use `prvr train` for a whole run.")
    p.add_argument("--data", required=True, help="collection folder ROOT/COLL")
    p.add_argument("--out", required=True, help="run folder: model.pt (best), last.pt, dvclive/")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_cmd_worker)
