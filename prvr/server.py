"""The local TorchServe process: started from a working directory (logs, key_file.json and the
PID file stay there) with the ports and settings of serving/config.properties, optionally
overridden, and the logging of serving/log4j2.xml; `prvr serve`, `prvr serve-registry`, the
demo and the tests use it.

Usage::

    with TorchServe("runs/serve", "model_store", models={"prvr": mar.name}) as ts:
        print(ts.infer({"query": "a man opens the fridge"}).json())
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import requests

from prvr.archive import DEFAULT_CONFIG, LOG_CONFIG
from prvr.errors import PrvrError

__all__ = ["TorchServe", "read_properties", "write_properties", "free_port"]

_PATH_KEYS = ("metrics_config", "model_store")


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
    ``log_config``: TorchServe's log4j2 file (None: the one inside TorchServe's jar).
    ``drop_env``: variables of this process that TorchServe and its workers must not see.
    """

    def __init__(self, workdir: str | Path, model_store: str | Path, models: Mapping[str, str] | None = None,
                 config: str | Path = DEFAULT_CONFIG, overrides: Mapping[str, Any] | None = None,
                 free_ports: bool = False, log_config: str | Path | None = LOG_CONFIG,
                 drop_env: Iterable[str] = ()):
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.models = dict(models or {})
        self.config = Path(config).resolve()
        self.log_config = Path(log_config).resolve() if log_config else None
        self.drop_env = tuple(drop_env)
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
        env = {k: v for k, v in os.environ.items() if k not in self.drop_env}
        env.update(TEMP=str(self.tmp), TMPDIR=str(self.tmp), LOG_LOCATION=str(self.workdir / "logs"),
                   METRICS_LOCATION=str(self.workdir / "logs"))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _cmd(self, *args: str) -> list[str]:
        exe = Path(sys.executable).parent / "torchserve"
        return [str(exe) if exe.exists() else (shutil.which("torchserve") or "torchserve"), *args]

    def _start_command(self) -> list[str]:
        """Create the working folders, write the effective config.properties; the start command."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.model_store.mkdir(parents=True, exist_ok=True)
        write_properties(self.workdir / "config.properties", self.props)
        cmd = self._cmd("--start", "--ncs", "--model-store", str(self.model_store),
                        "--ts-config", str(self.workdir / "config.properties"))
        if self.log_config:
            cmd += ["--log-config", str(self.log_config)]
        if self.models:
            cmd += ["--models", *[f"{name}={mar}" for name, mar in self.models.items()]]
        return cmd

    def start(self, foreground: bool = False, wait: float | None = 120.0) -> "TorchServe":
        cmd = self._start_command()
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

    def run(self, wait: float = 600.0, on_ready: Callable[["TorchServe"], None] | None = None) -> int:
        """TorchServe in the foreground of this process (a container's main command): start it,
        wait until every model has a READY worker, call ``on_ready``, then block until TorchServe
        exits. SIGTERM or SIGINT stop it through ``torchserve --stop`` (signalling the launcher
        would leave the Java process running) and return 0; a TorchServe that dies or never gets
        ready raises PrvrError."""
        def interrupt(signum: int, frame: Any) -> None:
            for sig in previous:                    # a second signal must not cut the stop short
                signal.signal(sig, signal.SIG_IGN)
            raise KeyboardInterrupt(signal.Signals(signum).name)

        cmd = self._start_command()
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.launcher = subprocess.Popen(cmd + ["--foreground"], cwd=self.workdir, env=self.env)
            self.wait_ready(wait)
            if on_ready is not None:
                on_ready(self)
            code = self.launcher.wait()
            self.launcher = None
            return code
        except KeyboardInterrupt:
            self.stop()
            return 0
        except BaseException:
            self.stop()
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
    @property
    def token_auth(self) -> bool:
        """TorchServe's token authorisation (on unless disable_token_authorization=true)."""
        return self.props.get("disable_token_authorization", "false").strip().lower() != "true"

    def keys(self) -> dict[str, str]:
        """{"inference": key, "management": key} from key_file.json (token authorisation)."""
        path = self.workdir / "key_file.json"
        data = json.loads(path.read_text())
        return {kind: data[kind]["key"] for kind in ("inference", "management") if kind in data}

    def headers(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[kind]}"} if self.token_auth else {}

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every model given at start answers through the management API with a READY worker."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.launcher is not None and self.launcher.poll() not in (None, 0):
                raise PrvrError(f"torchserve exited ({self.launcher.returncode}); see {self.workdir}/logs")
            try:
                if (self.workdir / "key_file.json").is_file() or not self.token_auth:
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
        http = session or requests
        headers = dict(self.headers("inference"), **{"Content-Type": content_type})
        payload = data if data is not None else json.dumps(body).encode()
        return http.post(f"{self.inference_url}/predictions/{model}", data=payload, headers=headers,
                         timeout=timeout)

    def manage(self, method: str, path: str, timeout: float = 120.0, **params: Any):
        return requests.request(method, f"{self.management_url}{path}", params=params or None,
                                headers=self.headers("management"), timeout=timeout)
