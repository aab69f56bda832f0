"""A registration killed with SIGKILL mid-upload, with real processes: a child process runs
the promotion gate (``Registry.register_if_better``) with a large model file against a
file:// registry or a moto S3 server on 127.0.0.1, and is killed once the first file of the
new version is stored (S3: once the model's multipart upload has a part). Production must
still resolve and pull a complete, verified version; the half-pushed version must be
neither listed nor promotable; the next registration must work.

Each test prints one JSON line (``pytest -s``): what the kill left behind.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

from prvr.errors import RegistryError
from prvr.registry import Registry

try:
    from helpers.servers import AWS_TEST_ENV, MotoS3, aws_test_env
except ImportError:  # tests/ imported as a package
    from tests.helpers.servers import AWS_TEST_ENV, MotoS3, aws_test_env

NAME = "prvr-test"
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

# The child: the registry's own code path, 5 MiB parts one at a time (a slow, long upload).
WORKER = textwrap.dedent("""
    import sys
    from prvr.config import default_config
    from prvr.registry import Registry
    uri, endpoint, metrics_file, model_file = sys.argv[1:5]
    settings = default_config().registry.replace(multipart_threshold_mb=5, multipart_chunk_mb=5, max_concurrency=1)
    reg = Registry(uri, endpoint_url=endpoint or None, settings=settings)
    print(reg.register_if_better("prvr-test", {"metrics.json": metrics_file, "model.pt": model_file},
                                 {"sumr": 200.0}), flush=True)
""")


@pytest.fixture(scope="module")
def moto():
    server = MotoS3()
    yield server
    server.stop()


def write_file(path: Path, size: int, tag: str) -> Path:
    with open(path, "wb") as f:
        for i in range(0, size, MIB):
            f.write((f"{tag}:{i:012d}".encode() * (MIB // 8))[:min(MIB, size - i)])
    return path


def model(tmp_path: Path, tag: str, size: int) -> dict[str, Path]:
    d = tmp_path / f"model-{tag}"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"sumr": 100.0, "tag": tag}))
    return {"metrics.json": d / "metrics.json", "model.pt": write_file(d / "model.pt", size, tag)}


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 120.0) -> float:
    """SIGKILL ``proc`` as soon as ``ready()``; returns seconds from start to kill."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the registration ended (rc {proc.returncode}) before the kill point:\n{log.read_text()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"no kill point within {timeout} s:\n{log.read_text()}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    return round(time.monotonic() - t0, 2)


def start_worker(uri: str, endpoint: str | None, files: dict[str, Path], log: Path) -> subprocess.Popen:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **AWS_TEST_ENV}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", WORKER, uri, endpoint or "", str(files["metrics.json"]),
                                 str(files["model.pt"])], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def check_after_kill(reg: Registry, v1: str, v1_files: dict[str, Path], before: dict, tmp_path: Path) -> None:
    """Production untouched and pullable, the killed version invisible, the next one fine."""
    assert reg._store.get(f"models/{NAME}/v0002/manifest.json") is None     # killed before its manifest
    assert reg.pointer(NAME) == before
    assert reg.versions(NAME) == [v1] and [r["version"] for r in reg.list(NAME)] == [v1]
    with pytest.raises(RegistryError, match="no complete version v0002"):
        reg.promote(NAME, "v0002")
    with pytest.raises(RegistryError, match="no complete version v0002"):
        reg.pull(NAME, "v0002", dest=tmp_path / "half")
    out = reg.pull(NAME, dest=tmp_path / "production")                          # sha256-verified
    assert json.loads((out / "manifest.json").read_text())["version"] == v1
    assert all((out / rel).read_bytes() == src.read_bytes() for rel, src in v1_files.items())

    d = reg.register_if_better(NAME, model(tmp_path, "3", 6 * MIB), {"sumr": 300.0})
    assert d["promoted"] and d["version"] == "v0003"                          # v0002 stays burnt
    assert reg.versions(NAME) == [v1, "v0003"] and reg.pointer(NAME)["previous"] == [v1]


@pytest.mark.integration
def test_sigkill_mid_registration_file(tmp_path):
    root = tmp_path / "registry"
    reg = Registry(f"file://{root}")
    v1_files = model(tmp_path, "1", 1 * MIB)
    v1 = reg.register_if_better(NAME, v1_files, {"sumr": 100.0})["version"]
    before = reg.pointer(NAME)
    folder = root / "models" / NAME / "v0002"
    log = tmp_path / "worker.log"
    proc = start_worker(f"file://{root}", None, model(tmp_path, "2", 128 * MIB), log)
    # metrics.json is stored first, then 128 MiB of model.pt are copied and both re-hashed.
    seconds = kill_when(proc, lambda: (folder / "metrics.json").is_file(), log)

    left = {p.name: p.stat().st_size for p in folder.iterdir()}
    print(json.dumps({"backend": "file", "killed_after_s": seconds, "left_in_v0002": left}))
    assert "manifest.json" not in left and ".claim" in left
    check_after_kill(reg, v1, v1_files, before, tmp_path)


@pytest.mark.integration
def test_sigkill_mid_multipart_upload_s3(moto, tmp_path, monkeypatch):
    aws_test_env(monkeypatch)
    bucket = moto.new_bucket()
    uri, client = f"s3://{bucket}/reg", moto.client()
    reg = Registry(uri, endpoint_url=moto.endpoint)
    v1_files = model(tmp_path, "1", 1 * MIB)
    v1 = reg.register_if_better(NAME, v1_files, {"sumr": 100.0})["version"]
    before = reg.pointer(NAME)
    key = f"reg/models/{NAME}/v0002/model.pt"

    def a_part_is_stored() -> bool:
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])
        return any(client.list_parts(Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts")
                   for u in uploads)

    log = tmp_path / "worker.log"
    proc = start_worker(uri, moto.endpoint, model(tmp_path, "2", 25 * MIB), log)     # 5 parts of 5 MiB
    seconds = kill_when(proc, a_part_is_stored, log)

    objects = {o["Key"].rsplit("/", 1)[1]: o["Size"] for o in client.list_objects_v2(
        Bucket=bucket, Prefix=f"reg/models/{NAME}/v0002/").get("Contents", [])}
    [upload] = client.list_multipart_uploads(Bucket=bucket, Prefix=key)["Uploads"]    # never completed
    parts = client.list_parts(Bucket=bucket, Key=key, UploadId=upload["UploadId"])["Parts"]
    print(json.dumps({"backend": "s3", "killed_after_s": seconds, "objects_in_v0002": objects,
                      "unfinished_multipart_parts": len(parts), "unfinished_bytes": sum(p["Size"] for p in parts)}))
    assert set(objects) == {".claim", "metrics.json"}                  # model.pt never became an object
    assert 1 <= len(parts) < 5
    check_after_kill(reg, v1, v1_files, before, tmp_path)
