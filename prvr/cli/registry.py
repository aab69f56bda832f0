"""`prvr registry list|show|promote|rollback|pull`."""
from __future__ import annotations

import argparse
import json
from typing import Any

from prvr.cli.common import add_config_args, config_from_args
from prvr.registry import _UNSET, Registry

def _registry_from_args(args: argparse.Namespace) -> tuple[Registry, str]:
    cfg = config_from_args(args).registry
    uri = args.uri or cfg.uri
    endpoint = args.endpoint_url or cfg.endpoint_url
    return Registry(uri, endpoint_url=endpoint, settings=cfg), args.name or cfg.model_name


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cmd_list(args: argparse.Namespace) -> int:
    reg, name = _registry_from_args(args)
    rows = reg.list(name)
    if args.json:
        _print(rows)
        return 0
    if not rows:
        print(f"no versions of {name} in {reg.uri}")
        return 0
    print(f"{'':1} {'version':8} {'created':25} {'sumr':>8}  {'decision':14}  data_version")
    for r in rows:
        sumr = f"{r['sumr']:.2f}" if r["sumr"] is not None else "-"
        print(f"{'*' if r['production'] else ' '} {r['version']:8} {r['created'] or '-':25} {sumr:>8}  "
              f"{r['decision'] or '-':14}  {r['data_version'] or '-'}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    reg, name = _registry_from_args(args)
    _print(reg.show(name, args.version))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    reg, name = _registry_from_args(args)
    expected = _UNSET if args.expect is None else (None if args.expect.lower() == "none" else args.expect)
    _print(reg.promote(name, args.version, expected_current=expected))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    reg, name = _registry_from_args(args)
    _print(reg.rollback(name))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    reg, name = _registry_from_args(args)
    print(reg.pull(name, args.version, args.dest))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`prvr registry list|show|promote|rollback|pull`."""
    parser = subparsers.add_parser("registry", help="inspect and move model versions in the registry")
    sub = parser.add_subparsers(dest="registry_command", metavar="ACTION")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_config_args(p)
        p.add_argument("--uri", default=None, help="file://PATH or s3://BUCKET/PREFIX (default: registry.uri)")
        p.add_argument("--endpoint-url", default=None,
                       help="S3 endpoint, e.g. http://127.0.0.1:9000 (default: registry.endpoint_url)")
        p.add_argument("--name", default=None, help="model name (default: registry.model_name)")
        return p

    p = common(sub.add_parser("list", help="list complete versions and the promotion gate's decision on each; "
                                           "* marks production"))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_list)
    p = common(sub.add_parser("show", help="print a version's manifest, the gate's full decision included "
                                           "(default: production)"))
    p.add_argument("--version", default=None, help="version id, e.g. v0003 (default: production)")
    p.set_defaults(func=_cmd_show)
    p = common(sub.add_parser("promote", help="point production at a version (compare-and-swap)"))
    p.add_argument("--version", required=True, help="version id to promote, e.g. v0003")
    p.add_argument("--expect", default=None,
                   help="refuse unless production currently is this version ('none' = no production)")
    p.set_defaults(func=_cmd_promote)
    p = common(sub.add_parser("rollback", help="point production back at the previous production version"))
    p.set_defaults(func=_cmd_rollback)
    p = common(sub.add_parser("pull", help="download a version's files, verifying sha256"))
    p.add_argument("--version", default=None, help="version id (default: production)")
    p.add_argument("--dest", default=None, help="destination folder (default: ./<name>/<version>)")
    p.set_defaults(func=_cmd_pull)
