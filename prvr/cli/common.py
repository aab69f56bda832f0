"""Arguments every command that reads settings shares: --params FILE and --set KEY=VALUE."""
from __future__ import annotations

import argparse

from prvr.config import Config, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--params and --set, shared by every command that reads settings."""
    parser.add_argument("--params", default=None,
                        help="params.yaml to read over the packaged defaults (default: ./params.yaml if any)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=1e-4 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.overrides)
