"""TorchServe archives and the local TorchServe process.

``build_archive`` bundles a checkpoint, its precomputed video index and the
serving settings into ``<model_name>-<version>.mar`` (torch-model-archiver):

    model.pt              the checkpoint (serialized file)
    handler.py            serving/handler.py (thin; logic in prvr.serving)
    index/                the video index (prvr.search.build_index output)
    serve.json            model version, text encoder, serve + search settings
    model-config.yaml     TorchServe batch size / delay / workers / timeout

``TorchServe`` starts and stops a real server from a working directory (logs,
key_file.json and the PID file stay there) with the ports and settings of
serving/config.properties, optionally overridden; ``prvr serve`` and the tests use it.

Usage::

    mar = build_archive("runs/train/model.pt", "runs/index", "model_store", "v0003")
    with TorchServe("runs/serve", "model_store", models={"prvr": mar.name}) as ts:
        print(ts.infer({"query": "a man opens the fridge"}).json())

CLI: ``prvr package --version V`` (from the registry) or ``--checkpoint --index``;
``prvr serve [--foreground] [--stop]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from prvr.config import Config
from prvr.errors import CheckpointError, PrvrError, SearchIndexError

__all__ = ["build_archive", "TorchServe", "read_properties", "write_properties", "free_port",
           "HANDLER", "DEFAULT_CONFIG", "SERVING", "register_cli"]

_SOURCE_SERVING = Path(__file__).resolve().parent.parent / "serving"
# A source checkout has serving/ next to prvr/; the container image keeps it in /app/serving.
SERVING = _SOURCE_SERVING if _SOURCE_SERVING.is_dir() else Path.cwd() / "serving"
HANDLER = SERVING / "handler.py"
DEFAULT_CONFIG = SERVING / "config.properties"
_PATH_KEYS = ("metrics_config", "model_store")


# --------------------------------------------------------------------------- #
# Archive
# --------------------------------------------------------------------------- #
def _check_inputs(checkpoint: Path, index_dir: Path, version: str) -> tuple[dict, dict]:
    import torch

    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types
        raise CheckpointError(f"{checkpoint} is not a readable prvr checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{checkpoint} lacks 'state_dict'/'config': not a prvr checkpoint")
    if not index_dir.is_dir():
        raise SearchIndexError(f"video index folder not found: {index_dir} (build it with prvr.search)")
    from prvr.search import VideoIndex
    from prvr.serving import check_index

    manifest = dict(VideoIndex.load(index_dir).manifest or {})
    check_index(manifest, index_dir, checkpoint, ckpt, version)
    return ckpt, manifest


def _with_faiss_index(index_dir: Path, cfg: Config, manifest: dict) -> None:
    """Build the faiss index `cfg.search` asks for into the archive's copy of the video index
    when it lacks it, so workers load it instead of training one at start-up."""
    from prvr.search.ann import build_faiss_into, stored_ann_fits

    stored = manifest.get("ann")
    if not (stored_ann_fits(stored, cfg.search) and stored.get("refine_codes", "arrays") == cfg.search.refine_codes):
        build_faiss_into(index_dir, cfg.search)


def build_archive(checkpoint: str | Path, index_dir: str | Path, out_dir: str | Path, version: str,
                  model_name: str = "prvr", cfg: Config | None = None) -> Path:
    """Write ``out_dir/<model_name>-<version>.mar``; returns its path (replaced atomically)."""
    checkpoint, index_dir, out_dir = Path(checkpoint), Path(index_dir), Path(out_dir)
    cfg = cfg or Config()
    ckpt, index_manifest = _check_inputs(checkpoint, index_dir, version)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{model_name}-{version}.mar"
    with tempfile.TemporaryDirectory(prefix="prvr-package-") as tmp:
        tmp = Path(tmp)
        bundle = tmp / "bundle"
        shutil.copytree(index_dir, bundle / "index")
        if cfg.search.backend == "faiss":
            _with_faiss_index(bundle / "index", cfg, index_manifest)
        serve = {
            "format": 1, "model_name": model_name, "model_version": version,
            "checkpoint": "model.pt", "index": "index",
            "text_encoder": ckpt.get("text_encoder") or index_manifest.get("text_encoder"),
            "registry_model": cfg.registry.model_name,
            "serve": cfg.to_dict()["serve"], "search": cfg.to_dict()["search"],
        }
        (bundle / "serve.json").write_text(json.dumps(serve, indent=2) + "\n")
        (tmp / "model-config.yaml").write_text(
            f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: {cfg.serve.batch_size}\n"
            f"maxBatchDelay: {cfg.serve.max_batch_delay_ms}\nresponseTimeout: 60\n")
        (tmp / "weights").mkdir()
        weights = tmp / "weights" / "model.pt"
        shutil.copyfile(checkpoint, weights)
        export = tmp / "export"
        export.mkdir()
        # The archiver stages files in $TMPDIR/<model_name>: a private TMPDIR keeps
        # concurrent builds apart.
        env = dict(os.environ, TMPDIR=str(tmp))
        cmd = [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", model_name,
               "--version", version, "--serialized-file", str(weights), "--handler", str(HANDLER),
               "--extra-files", str(bundle), "--config-file", str(tmp / "model-config.yaml"),
               "--export-path", str(export), "--archive-format", "default", "--force"]
        if not Path(cmd[0]).exists():
            cmd[0] = shutil.which("torch-model-archiver") or cmd[0]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        built = export / f"{model_name}.mar"
        if proc.returncode != 0 or not built.is_file():
            raise PrvrError(f"torch-model-archiver failed ({proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        staged = out_dir / f".{final.name}.tmp-{os.getpid()}"
        shutil.move(str(built), staged)
        os.replace(staged, final)
    return final


# --------------------------------------------------------------------------- #
# TorchServe process
# --------------------------------------------------------------------------- #
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_properties(path: str | Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_properties(path: str | Path, props: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/")[0])


class TorchServe:
    """A TorchServe started from ``workdir`` (logs/, key_file.json, PID file, metrics log there).

    ``overrides`` replace config.properties entries; ``free_ports=True`` moves every
    port (REST and gRPC) to free loopback ports so tests never clash with a running server.
    """

    def __init__(self, workdir: str | Path, model_store: str | Path, models: Mapping[str, str] | None = None,
                 config: str | Path = DEFAULT_CONFIG, overrides: Mapping[str, Any] | None = None,
                 free_ports: bool = False):
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.models = dict(models or {})
        self.config = Path(config).resolve()
        props = read_properties(self.config)
        for key in _PATH_KEYS:
            if key in props and not Path(props[key]).is_absolute():
                props[key] = str((self.config.parent / props[key]).resolve())
        props["model_store"] = str(self.model_store)
        if free_ports:
            props.update(inference_address=f"http://127.0.0.1:{free_port()}",
                         management_address=f"http://127.0.0.1:{free_port()}",
                         metrics_address=f"http://127.0.0.1:{free_port()}",
                         grpc_inference_port=free_port(), grpc_management_port=free_port(),
                         initial_worker_port=free_port())
        props.update({k: str(v) for k, v in (overrides or {}).items()})
        self.props = props
        host = lambda a: a.replace("0.0.0.0", "127.0.0.1")  # noqa: E731 - where to connect
        self.inference_url = host(props.get("inference_address", "http://127.0.0.1:8080"))
        self.management_url = host(props.get("management_address", "http://127.0.0.1:8081"))
        self.metrics_url = host(props.get("metrics_address", "http://127.0.0.1:8082"))
        self.tmp = self.workdir / "tmp"
        self.launcher: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TEMP=str(self.tmp), TMPDIR=str(self.tmp), LOG_LOCATION=str(self.workdir / "logs"),
                   METRICS_LOCATION=str(self.workdir / "logs"))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _cmd(self, *args: str) -> list[str]:
        exe = Path(sys.executable).parent / "torchserve"
        return [str(exe) if exe.exists() else (shutil.which("torchserve") or "torchserve"), *args]

    def start(self, foreground: bool = False, wait: float | None = 120.0) -> "TorchServe":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.model_store.mkdir(parents=True, exist_ok=True)
        write_properties(self.workdir / "config.properties", self.props)
        cmd = self._cmd("--start", "--ncs", "--model-store", str(self.model_store),
                        "--ts-config", str(self.workdir / "config.properties"))
        if self.models:
            cmd += ["--models", *[f"{name}={mar}" for name, mar in self.models.items()]]
        if foreground:
            # SIGTERM/Ctrl-C to a --foreground launcher would leave the Java process running:
            # stop it through `torchserve --stop` instead.
            proc = subprocess.Popen(cmd + ["--foreground"], cwd=self.workdir, env=self.env)
            try:
                return proc.wait()  # type: ignore[return-value]
            except KeyboardInterrupt:
                self.stop()
                return 130  # type: ignore[return-value]
        log = open(self.workdir / "launcher.log", "ab")
        self.launcher = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            try:
                self.wait_ready(wait)
            except Exception:
                self.stop()
                raise
        return self

    def stop(self, timeout: float = 90.0) -> None:
        """``torchserve --stop --foreground``: returns once the Java process has exited."""
        subprocess.run(self._cmd("--stop", "--foreground"), cwd=self.workdir, env=self.env,
                       capture_output=True, timeout=timeout)
        if self.launcher is not None:
            try:
                self.launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.launcher.send_signal(signal.SIGKILL)
            self.launcher = None

    def __enter__(self) -> "TorchServe":
        return self.start() if self.launcher is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- keys and calls --------------------------------------------------------
    def keys(self) -> dict[str, str]:
        """{"inference": key, "management": key} from key_file.json (token authorisation)."""
        path = self.workdir / "key_file.json"
        data = json.loads(path.read_text())
        return {kind: data[kind]["key"] for kind in ("inference", "management") if kind in data}

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"}

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every model given at start answers through the management API with a READY worker."""
        import requests

        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.launcher is not None and self.launcher.poll() not in (None, 0):
                raise PrvrError(f"torchserve exited ({self.launcher.returncode}); see {self.workdir}/logs")
            try:
                if (self.workdir / "key_file.json").is_file():
                    h = self.headers("management")
                    if not self.models:
                        requests.get(f"{self.management_url}/models", headers=h, timeout=2).raise_for_status()
                        return
                    ready = 0
                    for name in self.models:
                        r = requests.get(f"{self.management_url}/models/{name}", headers=h, timeout=2)
                        if r.ok and any(w.get("status") == "READY" for m in r.json() for w in m.get("workers", [])):
                            ready += 1
                        last = r.text[:300]
                    if ready == len(self.models):
                        return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            time.sleep(0.25)
        raise PrvrError(f"TorchServe in {self.workdir} not ready within {timeout:.0f} s: {last}")

    def infer(self, body: Any = None, model: str = "prvr", data: bytes | None = None,
              content_type: str = "application/json", timeout: float = 30.0, session: Any = None):
        import requests

        http = session or requests
        headers = dict(self.headers("inference"), **{"Content-Type": content_type})
        payload = data if data is not None else json.dumps(body).encode()
        return http.post(f"{self.inference_url}/predictions/{model}", data=payload, headers=headers,
                         timeout=timeout)

    def manage(self, method: str, path: str, timeout: float = 120.0, **params: Any):
        import requests

        return requests.request(method, f"{self.management_url}{path}", params=params or None,
                                headers=self.headers("management"), timeout=timeout)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
def _cmd_package(args: argparse.Namespace) -> int:
    from prvr.cli import config_from_args
    from prvr.registry import Registry

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
            from prvr.search import build_index
            index = build_index(checkpoint, args.data, args.split or cfg.eval.split,
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
    from prvr.cli import add_config_args

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
    p.add_argument("--split", default=None, help="split whose videos form the corpus (default: eval.split)")
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
