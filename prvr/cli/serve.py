"""`prvr package` (a TorchServe archive) and `prvr serve` (start or stop TorchServe)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prvr.cli.common import add_config_args, config_from_args
from prvr.errors import PrvrError
from prvr.indexing import build_index
from prvr.archive import DEFAULT_CONFIG, build_archive
from prvr.server import TorchServe
from prvr.registry import Registry

def _cmd_package(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    if args.checkpoint:
        if not args.index:
            raise PrvrError("--checkpoint needs --index DIR (the prvr.search index of that checkpoint)")
        if not args.version:
            raise PrvrError("--checkpoint needs --version (the model version the archive serves)")
        checkpoint, index, version = Path(args.checkpoint), Path(args.index), args.version
    else:
        reg = Registry(args.registry or cfg.registry.uri, endpoint_url=cfg.registry.endpoint_url)
        name = cfg.registry.model_name
        version = args.version or reg.production(name)
        if not version:
            raise PrvrError(f"registry {reg.uri} has no production version of {name}: run `make demo` "
                            "(or `prvr registry promote`), or pass --version / --checkpoint")
        pulled = reg.pull(name, version, Path(args.work) / name / version)
        checkpoint = pulled / "model.pt"
        index = Path(args.index) if args.index else pulled / "index"
        if not index.is_dir():
            if not args.data:
                raise PrvrError(f"registry version {version} has no index/ folder: pass --index DIR or "
                                "--data ROOT/COLL to build one")
            index = build_index(checkpoint, args.data, args.videos or cfg.serve.corpus,
                                Path(args.work) / name / f"{version}-index", cfg, model_version=version)
    mar = build_archive(checkpoint, index, args.out, version, args.model_name, cfg)
    print(mar)
    return 0


def _server_from_args(args: argparse.Namespace) -> TorchServe:
    models = {}
    if args.mar:
        models[args.model_name] = Path(args.mar).name
    elif not args.stop:
        store = Path(args.model_store)
        mars = sorted(store.glob(f"{args.model_name}-*.mar"), key=lambda p: p.stat().st_mtime)
        if not mars:
            raise PrvrError(f"no {args.model_name}-*.mar in {store}: run `prvr package` first")
        models[args.model_name] = mars[-1].name
    overrides = dict(s.split("=", 1) for s in args.ts_set)
    return TorchServe(args.workdir, args.model_store, models, args.config, overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    server = _server_from_args(args)
    if args.stop:
        server.stop()
        print("TorchServe stopped")
        return 0
    if args.foreground:
        print(f"TorchServe: inference {server.inference_url}, management {server.management_url}, "
              f"metrics {server.metrics_url}/metrics; keys in {server.workdir}/key_file.json")
        return int(server.start(foreground=True) or 0)  # type: ignore[arg-type]
    server.start(wait=args.wait)
    print(f"TorchServe ready: {server.inference_url}/predictions/{args.model_name} "
          f"(key: {server.workdir}/key_file.json); stop with `prvr serve --stop`")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("package", help="build a TorchServe archive (.mar) of a model version",
                              description="Bundle checkpoint + video index + serving settings into "
                                          "<model-name>-<version>.mar for TorchServe.")
    p.add_argument("--version", default=None,
                   help="registry version to package (default: production); with --checkpoint, the "
                        "version label of the archive")
    p.add_argument("--registry", default=None, help="registry URI (default: registry.uri)")
    p.add_argument("--checkpoint", default=None, help="package this model.pt instead of a registry version")
    p.add_argument("--index", default=None, help="video index folder built by prvr.search for the checkpoint")
    p.add_argument("--data", default=None, help="collection ROOT/COLL to build the index when none is given")
    p.add_argument("--videos", "--split", dest="videos", default=None, metavar="all|SPLIT|FILE",
                   help="the corpus of an index built from --data: all, a split or a file of video ids "
                        "(default: serve.corpus)")
    p.add_argument("--out", default="model_store", help="folder for the .mar (default: model_store)")
    p.add_argument("--work", default="runs/package", help="where registry files are pulled (default: runs/package)")
    p.add_argument("--model-name", default="prvr", help="TorchServe model name (default: prvr)")
    add_config_args(p)
    p.set_defaults(func=_cmd_package)

    s = subparsers.add_parser("serve", help="start (or stop) TorchServe with the packaged model",
                              description="Start TorchServe from --workdir with serving/config.properties; "
                                          "logs and key_file.json (the API tokens) land there.")
    s.add_argument("--model-store", default="model_store", help="folder holding the .mar files")
    s.add_argument("--mar", default=None, help="archive to load (default: newest <model-name>-*.mar)")
    s.add_argument("--model-name", default="prvr", help="TorchServe model name (default: prvr)")
    s.add_argument("--config", default=str(DEFAULT_CONFIG), help="TorchServe config.properties")
    s.add_argument("--workdir", default="runs/serve", help="working directory (default: runs/serve)")
    s.add_argument("--ts-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config.properties entry, e.g. --ts-set inference_address=http://127.0.0.1:9080")
    s.add_argument("--foreground", action="store_true", help="stay in the foreground until stopped")
    s.add_argument("--stop", action="store_true", help="stop the TorchServe started from --workdir")
    s.add_argument("--wait", type=float, default=180.0, help="seconds to wait for the model to be ready")
    s.set_defaults(func=_cmd_serve)
