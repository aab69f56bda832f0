"""`prvr stage preprocess|train|evaluate|register` (what dvc.yaml runs) and the short `prvr train`
and `prvr evaluate`: one parser and one handler each, over the stage functions the Kubeflow
components call, so every surface fingerprints the data and pushes run metrics alike."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prvr.cli.common import add_config_args, config_from_args
from prvr.collection import format_stats
from prvr.reports import format_decision, format_table
from prvr.stages import DATASET_JSON, evaluate_step, preprocess, register_step, train_step


def _cmd_preprocess(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    source = args.source or f"synth:{cfg.synth.preset}:{cfg.synth.seed}"
    record = preprocess(source, args.out, cfg, readonly_source=args.readonly_source)
    print(format_stats(record["stats"]))
    print(f"wrote {Path(args.out) / DATASET_JSON}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    result = train_step(args.dataset, args.out, config_from_args(args), nproc=args.nproc,
                        resume=not args.no_resume, progress=not args.no_progress)
    print(f"best val SumR {result['best_sumr']:.1f} at epoch {result['best_epoch']} "
          f"({result['epochs']} epochs, {result['duration_seconds']:.0f} s) -> {result['checkpoint']}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    result = evaluate_step(args.dataset, args.model, args.out, config_from_args(args), args.metrics,
                           args.split)
    m = result["metrics"]
    print(f"{m['split']}: {m['num_queries']} queries x {m['num_videos']} videos ({m['variant']})")
    print(format_table(m))
    print(f"report: {result['html']}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    decision = register_step(args.model, args.metrics, args.dataset, cfg, args.uri, args.margin,
                             args.endpoint_url, args.out, build_index=not args.no_index, promote=args.promote)
    print(format_decision(decision))
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", "--data", dest="dataset", required=True,
                   help="dataset folder (dataset.json) or collection folder ROOT/COLL")
    p.add_argument("--out", required=True, help="run folder: model.pt, last.pt, dvclive/, train_summary.json")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) for data-parallel training through torchrun (default 1)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=_cmd_train)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", "--data", dest="dataset", required=True,
                   help="dataset folder (dataset.json) or collection folder ROOT/COLL")
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="run folder holding model.pt (or the .pt file)")
    p.add_argument("--out", default="runs/evaluate",
                   help="folder for metrics.json, plots/, report.html, report.md (default: runs/evaluate)")
    p.add_argument("--metrics", default=None, help="write the metrics JSON here instead of OUT/metrics.json")
    p.add_argument("--split", default=None, help="train | val | test (default: eval.split)")
    add_config_args(p)
    p.set_defaults(func=_cmd_evaluate)


def add_register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder holding model.pt (or the .pt file)")
    p.add_argument("--metrics", required=True, help="metrics JSON written by `prvr stage evaluate`")
    p.add_argument("--dataset", required=True, help="dataset folder (dataset.json) or collection folder")
    p.add_argument("--out", default=None, help="folder for decision.json and the index "
                                               "(default: <model folder>/../register)")
    p.add_argument("--uri", default=None, help="registry file://PATH or s3://BUCKET/PREFIX (default: registry.uri)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: registry.endpoint_url)")
    p.add_argument("--margin", type=float, default=None,
                   help="SumR the candidate must beat production by (default: registry.promotion_margin)")
    p.add_argument("--no-index", action="store_true", help="register without building the search index")
    p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=True,
                   help="promote the candidate when it beats production evaluated on the same split "
                        "(default); --no-promote registers it without ever moving production (dvc.yaml), "
                        "leaving promotion to `prvr registry promote --version vNNNN`")
    add_config_args(p)
    p.set_defaults(func=_cmd_register)


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stage", help="run one pipeline step (the same functions the Kubeflow components call)",
        description="The pipeline's steps: preprocess -> train -> evaluate -> register. dvc.yaml runs "
                    "these; the Kubeflow components call the same functions.")
    sub = parser.add_subparsers(dest="stage_command", metavar="STEP")
    sub.required = True
    p = sub.add_parser("preprocess", help="validate a collection (or synthesize one), encode its text, "
                                          "write dataset.json")
    p.add_argument("--source", default=None,
                   help="collection folder, synth:<preset>[:<seed>], dvc://<repo-url>@<rev>#<path> or "
                        "s3://<bucket>/<prefix>/<collection> (default: synth:<synth.preset>:<synth.seed>)")
    p.add_argument("--out", required=True, help="dataset folder to write (dataset.json, text features)")
    p.add_argument("--readonly-source", action="store_true",
                   help="never write into the source: put the text-feature HDF5 into --out")
    add_config_args(p)
    p.set_defaults(func=_cmd_preprocess)
    add_train_args(sub.add_parser("train", help="train a model into a run folder"))
    add_evaluate_args(sub.add_parser("evaluate", help="metrics JSON, plots and an HTML/Markdown report"))
    add_register_args(sub.add_parser("register", help="promotion gate: register the model (+ index) and "
                                                      "promote it if it beats production on the same split"))
    add_train_args(subparsers.add_parser(
        "train", help="train a model (= prvr stage train; resumes from OUT/last.pt)",
        description="Train MS-SL++ (or model.variant) on a collection or dataset folder."))
    add_evaluate_args(subparsers.add_parser(
        "evaluate", help="R@K, SumR, MedR, MnR of a checkpoint (= prvr stage evaluate)",
        description="Rank every video of a split for every query and report fused, clip-only and "
                    "frame-only metrics, with plots and an HTML/Markdown report."))
