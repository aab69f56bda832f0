"""Real servers on 127.0.0.1 for integration tests.

``MotoS3``: moto's ThreadedMotoServer (S3 API, in this process). Moto keeps its
backend state in process-global objects, so ``stop()`` then ``restart()`` on the
same port brings back the same buckets and objects: a registry test can kill the
endpoint mid-upload and inspect what survived.

``Pushgateway``: the Debian ``prometheus-pushgateway`` binary on a free port.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

__all__ = ["MotoS3", "Pushgateway", "free_port", "aws_test_env", "PUSHGATEWAY_BIN", "pushgateway_available",
           "make_moto_conditional_puts_atomic"]

PUSHGATEWAY_BIN = os.environ.get("PRVR_PUSHGATEWAY_BIN") or shutil.which("prometheus-pushgateway") \
    or "/usr/bin/prometheus-pushgateway"

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
}


def aws_test_env(monkeypatch) -> None:
    """Fake credentials so boto3 never reads ~/.aws or reaches AWS."""
    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)


def stop_process(proc: subprocess.Popen, log=None, timeout: float = 10.0) -> None:
    """Terminate, then kill after `timeout` s; close its log file."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if log is not None:
        log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s: {last}")


_ATOMIC_LOCK = threading.Lock()


def make_moto_conditional_puts_atomic() -> None:
    """moto 5.2 checks If-None-Match/If-Match and then writes, without a lock, while its
    threaded server handles requests in parallel; real S3 makes the check and the write
    one atomic step. Serialise moto's PutObject so concurrency tests see S3's semantics."""
    from moto.s3.responses import S3Response

    original = S3Response.put_object
    if getattr(original, "_prvr_atomic", False):
        return

    def put_object(self, *args, **kwargs):
        with _ATOMIC_LOCK:
            return original(self, *args, **kwargs)

    put_object._prvr_atomic = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


class MotoS3:
    """A moto S3 server; ``endpoint`` is http://127.0.0.1:PORT."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        make_moto_conditional_puts_atomic()
        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.running = True

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"prvr-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def restart(self) -> None:
        """A new server on the same port; moto's in-process state survives."""
        self.stop()
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.running = True
        _wait_http(self.endpoint + "/moto-api/")


class Pushgateway:
    """A real Pushgateway process on a free port; ``address`` is 127.0.0.1:PORT."""

    def __init__(self, binary: str = PUSHGATEWAY_BIN) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([binary, f"--web.listen-address={self.address}", "--persistence.file="],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        try:
            _wait_http(self.url + "/-/ready")
        except RuntimeError:
            self.stop()
            self._log.seek(0)
            raise RuntimeError(f"pushgateway did not start: {self._log.read().decode(errors='replace')[-2000:]}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        stop_process(self.proc, self._log)


def pushgateway_available() -> bool:
    return Path(PUSHGATEWAY_BIN).is_file() and os.access(PUSHGATEWAY_BIN, os.X_OK)
