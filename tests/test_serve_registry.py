"""`prvr serve-registry`, the serving container's command, against a real S3 (moto on 127.0.0.1)
holding a small model: it serves the production version (not the newest), only once the model
answers; SIGTERM stops TorchServe; a missing production pointer or a corrupt object ends it
with a clear error and exit 2 before TorchServe starts. The TorchServe it runs logs one line
per request (serving/log4j2.xml)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from helpers.servers import AWS_TEST_ENV, MotoS3, free_port
from prvr.config import default_config
from prvr.registry import Registry
from test_serving import serving_artifacts

pytestmark = pytest.mark.integration
NAME = default_config().registry.model_name
PRVR = str(Path(sys.executable).parent / "prvr")


@pytest.fixture(scope="module")
def s3(tmp_path_factory, text_encoder):
    """moto S3 with three registries: production v0001 of two versions, no production, a corrupt one."""
    art = serving_artifacts(tmp_path_factory.getbasetemp() / "serving-artifacts", text_encoder)
    server = MotoS3()
    env = dict(AWS_TEST_ENV, AWS_ENDPOINT_URL=server.endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        files = {"model.pt": art.checkpoint, "index": art.index}
        uris = {}
        for kind in ("good", "unpromoted", "corrupt"):
            bucket = server.new_bucket()
            uris[kind] = f"s3://{bucket}/models"
            reg = Registry(uris[kind])
            first = reg.register(NAME, files, {"sumr": 1.0})
            reg.register(NAME, files, {"sumr": 0.5})                 # v0002: newer, never promoted
            if kind != "unpromoted":
                reg.promote(NAME, first)
            if kind == "corrupt":
                server.client().put_object(Bucket=bucket, Key=f"models/models/{NAME}/{first}/model.pt",
                                           Body=b"not the checkpoint")
        yield server, env, uris
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _ports() -> list[str]:
    return [f"--ts-set=inference_address=http://127.0.0.1:{free_port()}",
            f"--ts-set=management_address=http://127.0.0.1:{free_port()}",
            f"--ts-set=metrics_address=http://127.0.0.1:{free_port()}",
            f"--ts-set=grpc_inference_port={free_port()}", f"--ts-set=grpc_management_port={free_port()}",
            f"--ts-set=initial_worker_port={free_port()}", "--ts-set=disable_token_authorization=true"]


def _command(workdir: Path, ports: list[str]) -> list[str]:
    """The Deployment's command (deploy/base/deployment.yaml) with free loopback ports."""
    return [PRVR, "serve-registry", f"--workdir={workdir / 'run'}", f"--model-store={workdir / 'model_store'}",
            *ports]


def _env(env: dict, uri: str) -> dict:
    out = dict(os.environ, **env, PRVR_REGISTRY_URI=uri)
    out.pop("PRVR_REGISTRY_VERSION", None)
    return out


def _lines(folder: Path) -> dict[str, int]:
    return {p.name: len(p.read_text(errors="replace").splitlines()) for p in sorted(folder.glob("*.log"))}


@pytest.mark.slow        # a registry pull, an archive and a TorchServe start: 1-2 minutes on 2 cores
def test_serves_the_production_version_once_it_answers(s3, tmp_path):
    _, env, uris = s3
    ports = _ports()
    url = ports[0].split("=", 2)[2]
    out = open(tmp_path / "stdout.log", "wb")
    proc = subprocess.Popen(_command(tmp_path, ports), env=_env(env, uris["good"]), stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 420
        while b"serving prvr v0001" not in (tmp_path / "stdout.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "stdout.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "stdout.log").read_text()[-3000:]
            time.sleep(0.5)
        r = requests.post(f"{url}/predictions/prvr", json={"query": "a man opens the fridge", "top_k": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == "v0001"
        assert [m.name for m in (tmp_path / "model_store").iterdir()] == ["prvr-v0001.mar"]

        # one log line per request at the default level: its access line (file and stdout)
        logs = tmp_path / "run" / "logs"
        time.sleep(1)
        before, stdout_before = _lines(logs), _lines(tmp_path)["stdout.log"]
        n = 20
        for i in range(n):
            body = {"query": f"a man opens the fridge {i}"} if i % 2 else {"query": ""}
            assert requests.post(f"{url}/predictions/prvr", json=body, timeout=60).status_code in (200, 400)
        time.sleep(2)
        after, stdout_after = _lines(logs), _lines(tmp_path)["stdout.log"]
        per_file = {name: after[name] - before.get(name, 0) for name in after}
        print(f"log lines for {n} requests: {per_file}, stdout {stdout_after - stdout_before}")
        assert per_file["access_log.log"] == n
        # nothing per request in ts_log, model_log or the metrics logs (2: room for a periodic line)
        assert sum(v for name, v in per_file.items() if name != "access_log.log") <= 2, per_file
        assert n <= stdout_after - stdout_before <= n + 2            # the access lines, once each

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/ping", timeout=5)                  # TorchServe is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop", "--foreground"],
                           env=dict(os.environ, TEMP=str(tmp_path / "run" / "tmp")), capture_output=True,
                           timeout=120)
        out.close()


@pytest.mark.parametrize("kind,message", [
    ("unpromoted", f"has no production version of {NAME}"),
    ("corrupt", "model.pt is corrupted"),
])
def test_a_bad_registry_fails_before_torchserve_starts(s3, tmp_path, kind, message):
    _, env, uris = s3
    proc = subprocess.run(_command(tmp_path, _ports()), env=_env(env, uris[kind]), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: registry s3://" in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    run = tmp_path / "run"
    assert not (run / "config.properties").exists() and not (run / "logs").exists()   # TorchServe never started
    assert not (tmp_path / "model_store").exists() or not any((tmp_path / "model_store").iterdir())
