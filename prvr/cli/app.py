"""The `prvr` console script: one subcommand group per module of prvr.cli, each a thin shell."""
from __future__ import annotations

import argparse
import sys

import prvr.cli.data as data
import prvr.cli.demo as demo
import prvr.cli.index as index
import prvr.cli.kube as kube
import prvr.cli.pipeline as pipeline
import prvr.cli.registry as registry
import prvr.cli.serve as serve
import prvr.cli.stage as stage
import prvr.cli.train as train
import prvr.cli.ui as ui
from prvr.config import ConfigError
from prvr.errors import PrvrError

GROUPS = (demo, data, stage, train, index, registry, serve, ui, kube, pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prvr", description="Partially Relevant Video Retrieval with MS-SL++: data, training, "
                                 "evaluation, registry, search and serving.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for group in GROUPS:
        group.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (PrvrError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
