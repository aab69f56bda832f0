"""`prvr ui`: the search page in front of a running TorchServe (or one it starts with --serve)."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from prvr.archive import DEFAULT_CONFIG
from prvr.cli.common import add_config_args, config_from_args
from prvr.client import Client
from prvr.errors import PrvrError
from prvr.server import TorchServe, read_properties
from prvr.ui import DEFAULT_HOST, DEFAULT_PORT, create_app, serve_ui


def _inference_url(workdir: Path) -> str:
    """The inference address of the TorchServe started from ``workdir`` (its effective
    config.properties), else of serving/config.properties."""
    props = workdir / "config.properties"
    address = read_properties(props if props.is_file() else DEFAULT_CONFIG).get(
        "inference_address", "http://127.0.0.1:8080")
    return address.replace("0.0.0.0", "127.0.0.1")


def _cmd_ui(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    workdir = Path(args.workdir)
    with contextlib.ExitStack() as stack:
        if args.serve:
            mar = Path(args.serve)
            if not mar.is_file():
                raise PrvrError(f"--serve {mar}: no such archive (build one with `prvr package`)")
            server = TorchServe(workdir, mar.parent, {args.model_name: mar.name})
            print(f"starting TorchServe with {mar.name} (logs in {workdir}/logs) ...", flush=True)
            stack.enter_context(server)
        url = args.url or _inference_url(workdir)
        key_file = Path(args.key_file or workdir / "key_file.json")
        client = Client(url, key_file=key_file, model=args.model_name, timeout=args.timeout,
                        retries=args.retries)      # reads the key now: a missing file is named here
        print(f"prvr ui: http://{args.host}:{args.port}/  (API {client.endpoint}; Ctrl-C stops"
              f"{' both' if args.serve else ''})", flush=True)
        serve_ui(create_app(client, top_k=cfg.serve.top_k), args.host, args.port)
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("ui", help="a search page in the browser, in front of TorchServe",
                              description="Serve one HTML page that searches the running TorchServe "
                                          "through prvr.client; the API key stays in this process.")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--workdir", default="runs/serve",
                   help="TorchServe's working directory: key_file.json and its config.properties "
                        "(default: runs/serve, as `prvr serve`)")
    p.add_argument("--url", default=None,
                   help="TorchServe inference address (default: the one of --workdir's config.properties)")
    p.add_argument("--key-file", default=None, help="key_file.json (default: WORKDIR/key_file.json)")
    p.add_argument("--model-name", default="prvr", help="TorchServe model name (default: prvr)")
    p.add_argument("--serve", default=None, metavar="MAR",
                   help="start TorchServe with this archive from --workdir first, stop it on exit")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default: 30)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries of refused connections and 503s (default: 3)")
    add_config_args(p)
    p.set_defaults(func=_cmd_ui)
