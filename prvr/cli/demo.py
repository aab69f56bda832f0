"""`prvr demo`: the whole loop on synthetic data."""
from __future__ import annotations

import argparse
import time
from typing import Any

from prvr.cli.common import add_config_args, config_from_args
from prvr.demo import (DEMO_EPOCHS, print_answers, print_summary, print_ui_hint, run_pipeline, run_stages,
                       serve_and_query)


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    t0 = time.time()
    if args.no_pipeline:
        result = run_stages(cfg, args.preset, args.epochs, args.out or "runs/demo", args.registry)
    else:
        result = run_pipeline(cfg, args.preset, args.epochs, args.out or "runs/kfp", args.registry,
                              args.overrides)
    print_summary(result, time.time() - t0)
    if not args.no_serve:
        print_answers(serve_and_query(cfg, result, args.registry))
        print_ui_hint()
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="run the whole training pipeline locally on synthetic data",
                              description="Synthesize a collection, encode its queries, train, evaluate and "
                                          "register through the Kubeflow pipeline run locally "
                                          "(kfp SubprocessRunner), then print the results.")
    p.add_argument("--preset", default="small", choices=("tiny", "small", "tvr-like"),
                   help="synthetic collection size (default: small)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                   help=f"training epochs (default: {DEMO_EPOCHS}, a few minutes on 2 CPU cores)")
    p.add_argument("--no-pipeline", action="store_true",
                   help="call the stage functions directly instead of running the Kubeflow pipeline")
    p.add_argument("--no-serve", action="store_true",
                   help="skip the last step (package the production model, query it through TorchServe)")
    p.add_argument("--out", default=None,
                   help="pipeline root (default: runs/kfp) or, with --no-pipeline, run folder (runs/demo)")
    p.add_argument("--registry", default="file://registry",
                   help="model registry URI (default: file://registry)")
    add_config_args(p)
    p.set_defaults(func=_cmd_demo)
