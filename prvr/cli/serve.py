"""`prvr package` (a TorchServe archive), `prvr serve` (start or stop TorchServe),
`prvr serve-registry` (a container's command: the registry's production version on TorchServe,
in the foreground) and `prvr serve-kserve` (the same model on KServe's model server)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

from prvr.cli.common import add_config_args, config_from_args
from prvr.config import Config
from prvr.errors import PrvrError
from prvr.indexing import build_index
from prvr.archive import DEFAULT_CONFIG, build_archive
from prvr.server import TorchServe
from prvr.registry import Registry

# Read by `serve-registry` and `serve-kserve` (and by a TorchServe worker: Retriever.from_model_dir).
REGISTRY_ENV = ("PRVR_REGISTRY_URI", "PRVR_REGISTRY_VERSION", "PRVR_REGISTRY_MODEL", "PRVR_REGISTRY_ENDPOINT_URL")

def _cmd_package(args: argparse.Namespace) -> int:

    cfg = config_from_args(args)
    if args.checkpoint:
        if not args.index:
            raise PrvrError("--checkpoint needs --index DIR (the prvr.search index of that checkpoint)")
        if not args.version:
            raise PrvrError("--checkpoint needs --version (the model version the archive serves)")
        checkpoint, index, version = Path(args.checkpoint), Path(args.index), args.version
    else:
        reg = Registry(args.registry or cfg.registry.uri, endpoint_url=cfg.registry.endpoint_url, settings=cfg.registry)
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


def _pull_version(args: argparse.Namespace, cfg: Config, dest: Path) -> tuple[Path, Path, str]:
    """Checkpoint, index and version of the model to serve, pulled (sha256-verified) into
    ``dest``: from --registry or PRVR_REGISTRY_URI (else registry.uri), --version or
    PRVR_REGISTRY_VERSION (else the production version). Raises PrvrError, naming the registry,
    when there is no such version or a file differs from its manifest."""
    uri = args.registry or os.environ.get("PRVR_REGISTRY_URI") or cfg.registry.uri
    endpoint = os.environ.get("PRVR_REGISTRY_ENDPOINT_URL") or cfg.registry.endpoint_url
    reg = Registry(uri, endpoint_url=endpoint, settings=cfg.registry)
    name = os.environ.get("PRVR_REGISTRY_MODEL") or cfg.registry.model_name
    version = args.version or os.environ.get("PRVR_REGISTRY_VERSION") or reg.production(name)
    if not version:
        raise PrvrError(f"registry {uri} has no production version of {name}: promote one (`prvr registry "
                        "promote`) or name one with PRVR_REGISTRY_VERSION / --version")
    print(f"pulling {name} {version} from {uri} ...", flush=True)
    pulled = reg.pull(name, version, dest / name / version)
    if not (pulled / "index").is_dir():
        raise PrvrError(f"registry {uri}: {name} {version} has no index/ folder (the register stage stores "
                        "one); package it with `prvr package --index DIR` instead")
    return pulled / "model.pt", pulled / "index", version


def _cmd_serve_registry(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    checkpoint, index, version = _pull_version(args, cfg, Path(args.workdir) / "registry")
    mar = build_archive(checkpoint, index, args.model_store, version, args.model_name, cfg)
    overrides = dict(s.split("=", 1) for s in args.ts_set)
    # The archive holds the pulled files: its worker must not pull the registry again.
    server = TorchServe(args.workdir, args.model_store, {args.model_name: mar.name}, args.config, overrides,
                        drop_env=REGISTRY_ENV)

    def answers(ts: TorchServe) -> None:
        """Ready only once the model answers a query (200, or 422 for a model without a text encoder)."""
        r = ts.infer({"query": "is the model answering", "top_k": 1}, model=args.model_name, timeout=60)
        if r.status_code not in (200, 422) or r.json().get("model_version", version) != version:
            raise PrvrError(f"TorchServe answered {r.status_code} {r.text[:300]}; see {ts.workdir}/logs")
        print(f"serving {args.model_name} {version}: {ts.inference_url}/predictions/{args.model_name}", flush=True)

    return server.run(wait=args.wait, on_ready=answers)


def _cmd_serve_kserve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    workdir = Path(args.workdir)
    if args.archive:
        mar = Path(args.archive)
        if not zipfile.is_zipfile(mar):
            raise PrvrError(f"--archive {mar}: not a model archive (build one with `prvr package`)")
        model_dir = workdir / "archive" / mar.stem
        with zipfile.ZipFile(mar) as z:        # extractall keeps every member inside model_dir
            z.extractall(model_dir)
        spec: dict[str, Any] = {"model_dir": str(model_dir.resolve())}
    else:
        checkpoint, index, version = _pull_version(args, cfg, workdir / "registry")
        spec = {"checkpoint": str(checkpoint.resolve()), "index": str(index.resolve()), "version": version,
                "serve": cfg.to_dict()["serve"], "search": cfg.to_dict()["search"]}
    spec.update(model_name=args.model_name, port=args.port)
    print(f"KServe model server: model {args.model_name} on port {args.port} (v1 and v2)", flush=True)
    # KServe parses the command line when it is imported: it gets a process of its own.
    os.execv(sys.executable, [sys.executable, "-m", "prvr.kserve_app", json.dumps(spec)])
    return 0  # not reached


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
              f"metrics {server.metrics_url}/metrics; keys in {server.workdir}/key_file.json", flush=True)
        return server.run(wait=args.wait, on_ready=lambda ts: print("TorchServe ready", flush=True))
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
    _register_container_commands(subparsers)


def _register_container_commands(subparsers: Any) -> None:
    """`serve-registry` and `serve-kserve`: what the serving images run (deploy/)."""
    r = subparsers.add_parser(
        "serve-registry", help="pull the registry's production version and serve it with TorchServe (foreground)",
        description="The serving container's command: pull the version PRVR_REGISTRY_URI names (its production "
                    "version, or PRVR_REGISTRY_VERSION; sha256-verified), build its archive into --model-store "
                    "and run TorchServe in the foreground, serving it as --model-name. It prints "
                    "'serving NAME VERSION' once the model answers a query; SIGTERM stops TorchServe cleanly. "
                    "A missing version or a corrupt file exits 2 before TorchServe starts.")
    r.add_argument("--registry", default=None, help="registry URI (default: $PRVR_REGISTRY_URI, else registry.uri)")
    r.add_argument("--version", default=None,
                   help="version to serve (default: $PRVR_REGISTRY_VERSION, else the production version)")
    r.add_argument("--model-store", default="model_store", help="folder for the archive (default: model_store)")
    r.add_argument("--model-name", default="prvr", help="TorchServe model name (default: prvr)")
    r.add_argument("--config", default=str(DEFAULT_CONFIG), help="TorchServe config.properties")
    r.add_argument("--workdir", default="runs/serve", help="working directory (default: runs/serve)")
    r.add_argument("--ts-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config.properties entry (repeatable)")
    r.add_argument("--wait", type=float, default=600.0,
                   help="seconds to wait for the model to be ready (default: 600)")
    add_config_args(r)
    r.set_defaults(func=_cmd_serve_registry)

    k = subparsers.add_parser(
        "serve-kserve", help="serve a model version with KServe's Python model server (v1 and v2 protocols)",
        description="prvr's retrieval core on KServe's model server: POST /v1/models/NAME:predict "
                    '{"instances": [<request>]} or /v2/models/NAME/infer (input "request", BYTES holding the '
                    "request's JSON). The model: --archive (a .mar of `prvr package`), else the registry version "
                    "of --registry / $PRVR_REGISTRY_URI (production, or --version / $PRVR_REGISTRY_VERSION).")
    k.add_argument("--archive", default=None, help="serve this archive (.mar) instead of a registry version")
    k.add_argument("--registry", default=None, help="registry URI (default: $PRVR_REGISTRY_URI, else registry.uri)")
    k.add_argument("--version", default=None,
                   help="version to serve (default: $PRVR_REGISTRY_VERSION, else the production version)")
    k.add_argument("--model-name", default="prvr", help="model name in the URLs (default: prvr)")
    k.add_argument("--port", type=int, default=8080, help="HTTP port (default: 8080, KServe's)")
    k.add_argument("--workdir", default="runs/kserve",
                   help="where registry files are pulled or the archive unpacked (default: runs/kserve)")
    add_config_args(k)
    k.set_defaults(func=_cmd_serve_kserve)
