"""The `prvr` console script: one subcommand per stage, each a thin shell over a function."""
from __future__ import annotations

import argparse
import importlib
import sys

from prvr.config import Config, ConfigError, load_config
from prvr.errors import PrvrError

# Modules that contribute subcommands through register_cli(subparsers).
COMMAND_MODULES = (
    "prvr.demo", "prvr.synth", "prvr.text", "prvr.data", "prvr.train", "prvr.evaluate",
    "prvr.search", "prvr.registry", "prvr.stages", "prvr.packaging", "prvr.kube",
)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--params and --set, shared by every stage that reads hyperparameters."""
    parser.add_argument("--params", default=None,
                        help="params.yaml to read (default: ./params.yaml, else the repository's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one hyperparameter, e.g. --set train.lr=1e-4 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prvr", description="Partially Relevant Video Retrieval with MS-SL++: data, training, "
                                 "evaluation, registry, search and serving.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (PrvrError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
