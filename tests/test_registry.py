"""Model registry against both backends: file:// and a real moto S3 server on 127.0.0.1."""
from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prvr.checkpoint import sha256_file
from prvr.cli.registry import register_cli
from prvr.config import RegistryConfig, default_config
from prvr.errors import RegistryError
from prvr.registry import Registry, resolve_metric

try:
    from helpers.servers import MotoS3, aws_test_env, free_port
except ImportError:  # tests/ imported as a package
    from tests.helpers.servers import MotoS3, aws_test_env, free_port

NAME = "prvr-test"
MIB = 1 << 20


def small_parts(**changes) -> RegistryConfig:
    """Registry settings that send anything from 5 MiB (S3's smallest part) in 5 MiB parts."""
    return default_config().registry.replace(multipart_threshold_mb=5, multipart_chunk_mb=5, **changes)


@pytest.fixture(scope="module")
def moto():
    server = MotoS3()
    yield server
    server.stop()


class Backend:
    """One registry backend plus the test-only ways to damage it."""

    def __init__(self, kind: str, uri: str, moto: MotoS3 | None = None, root: Path | None = None,
                 bucket: str | None = None, prefix: str = ""):
        self.kind, self.uri, self.moto, self.root, self.bucket, self.prefix = kind, uri, moto, root, bucket, prefix

    @property
    def endpoint(self) -> str | None:
        return self.moto.endpoint if self.moto else None

    def registry(self, settings: RegistryConfig | None = None) -> Registry:
        return Registry(self.uri, endpoint_url=self.endpoint, settings=settings)

    def overwrite(self, key: str, data: bytes) -> None:
        """Replace a stored object behind the registry's back (bit rot, a bad actor)."""
        if self.moto:
            self.moto.client().put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        else:
            (self.root / key).write_bytes(data)

    def read(self, key: str) -> bytes:
        if self.moto:
            return self.moto.client().get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        return (self.root / key).read_bytes()

    def fail_after_first_upload(self, reg: Registry) -> None:
        """S3: stop the server once the first file is stored. file: the disk fills up."""
        store = reg._store
        original = store.upload
        calls = []

        def upload(*args, **kwargs):
            if calls:
                if not self.moto:
                    raise OSError(28, "No space left on device")
            calls.append(args[0])
            original(*args, **kwargs)
            if self.moto:
                self.moto.stop()

        store.upload = upload

    def recover(self) -> None:
        if self.moto:
            self.moto.restart()


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def backend(request, tmp_path, monkeypatch):
    aws_test_env(monkeypatch)
    if request.param == "file":
        root = tmp_path / "registry"
        return Backend("file", f"file://{root}", root=root)
    server = request.getfixturevalue("moto")
    if not server.running:
        server.restart()
    bucket = server.new_bucket()
    return Backend("s3", f"s3://{bucket}/team/prvr", moto=server, bucket=bucket, prefix="team/prvr/")


def make_model(tmp_path: Path, tag: str = "a") -> dict[str, Path]:
    """A checkpoint plus a two-file index folder (nested), distinct per tag."""
    d = tmp_path / f"model-{tag}"
    (d / "index" / "shard").mkdir(parents=True, exist_ok=True)
    (d / "model.pt").write_bytes(f"weights-{tag}".encode() * 1000)
    (d / "index" / "clips.npy").write_bytes(f"clips-{tag}".encode() * 300)
    (d / "index" / "shard" / "ids.json").write_text(json.dumps([tag, "v1", "v2"]))
    return {"model.pt": d / "model.pt", "index": d / "index"}


def metrics(sumr: float) -> dict:
    return {"fused": {"r1": sumr / 4, "sumr": sumr}, "clip": {"sumr": sumr - 1}}


# ----------------------------------------------------------------------------- basics
def test_round_trip_with_checksums(backend, tmp_path):
    reg = backend.registry()
    files = make_model(tmp_path)
    v = reg.register(NAME, files, metrics(150.0), {"train": {"lr": 5e-5}}, data_version="md5:abc",
                     git_commit="0" * 40)
    assert v == "v0001"
    m = reg.show(NAME, v)
    assert (m["name"], m["version"], m["data_version"], m["git_commit"]) == (NAME, v, "md5:abc", "0" * 40)
    assert m["metrics"]["fused"]["sumr"] == 150.0 and m["params"] == {"train": {"lr": 5e-5}}
    assert m["created"].endswith("+00:00")
    assert set(m["files"]) == {"model.pt", "index/clips.npy", "index/shard/ids.json"}
    assert m["files"]["model.pt"] == {"sha256": sha256_file(files["model.pt"]),
                                      "size": files["model.pt"].stat().st_size}
    assert reg.versions(NAME) == ["v0001"] and reg.production(NAME) is None
    [row] = reg.list(NAME)
    assert row["version"] == "v0001" and row["sumr"] == 150.0 and row["production"] is False

    out = reg.pull(NAME, v, dest=tmp_path / "pulled")
    assert (out / "model.pt").read_bytes() == files["model.pt"].read_bytes()
    assert (out / "index" / "shard" / "ids.json").read_text() == (files["index"] / "shard" / "ids.json").read_text()
    assert json.loads((out / "manifest.json").read_text())["version"] == v
    assert not list(out.rglob(".tmp-*"))
    (out / "model.pt").write_bytes(b"stale")                   # into an existing folder: files replaced,
    (out / "notes.txt").write_text("mine")                     # other files left alone
    assert reg.pull(NAME, v, dest=out) == out and (out / "model.pt").read_bytes() == files["model.pt"].read_bytes()
    assert (out / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".tmp-*"))
    only = reg.pull(NAME, v, dest=tmp_path / "only", files=["model.pt"])
    assert sorted(p.name for p in only.rglob("*") if p.is_file()) == ["manifest.json", "model.pt"]
    with pytest.raises(RegistryError, match="has no weights.bin"):
        reg.pull(NAME, v, dest=tmp_path / "none", files=["weights.bin"])


def test_register_a_directory_and_production_defaults(backend, tmp_path):
    reg = backend.registry()
    files = make_model(tmp_path)
    v = reg.register(NAME, files["index"], metrics(1.0), {})
    assert set(reg.show(NAME, v)["files"]) == {"clips.npy", "shard/ids.json"}
    with pytest.raises(RegistryError, match="no production version"):
        reg.show(NAME)
    reg.promote(NAME, v)
    assert reg.show(NAME)["version"] == v
    assert (reg.pull(NAME, dest=tmp_path / "p") / "clips.npy").exists()


def test_incomplete_version_is_ignored_and_never_reused(backend, tmp_path):
    reg = backend.registry()
    reg._store.put_new(f"models/{NAME}/v0001/.claim", b"{}")            # a crashed upload's claim
    reg._store.put(f"models/{NAME}/v0001/model.pt", b"half")
    assert reg.versions(NAME) == [] and reg.list(NAME) == []
    with pytest.raises(RegistryError, match="no complete version v0001"):
        reg.show(NAME, "v0001")
    with pytest.raises(RegistryError, match="no complete version"):
        reg.promote(NAME, "v0001")
    assert reg.register(NAME, make_model(tmp_path), metrics(1.0), {}) == "v0002"


def test_corrupted_file_is_refused_on_pull(backend, tmp_path):
    reg = backend.registry()
    v = reg.register(NAME, make_model(tmp_path), metrics(1.0), {})
    backend.overwrite(f"models/{NAME}/{v}/model.pt", b"evil bytes")
    dest = tmp_path / "pulled"
    with pytest.raises(RegistryError, match="model.pt is corrupted"):
        reg.pull(NAME, v, dest=dest)
    assert not (dest / "model.pt").exists()


def test_truncated_object_fails_the_pull_and_leaves_the_destination_as_it_was(backend, tmp_path):
    """The LAST file of the manifest is cut short: the files before it arrived intact, yet none
    of them reaches dest; a dest holding another version keeps it whole."""
    reg = backend.registry()
    v1 = reg.register(NAME, make_model(tmp_path, "1"), metrics(1.0), {})
    v2 = reg.register(NAME, make_model(tmp_path, "2"), metrics(2.0), {})
    last = list(reg.show(NAME, v2)["files"])[-1]
    key = f"models/{NAME}/{v2}/{last}"
    backend.overwrite(key, backend.read(key)[:-7])

    fresh = tmp_path / "fresh"
    with pytest.raises(RegistryError, match=f"{key} is corrupted: .* the manifest says"):
        reg.pull(NAME, v2, dest=fresh)
    assert not fresh.exists()

    kept = reg.pull(NAME, v1, dest=tmp_path / "current")
    before = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    with pytest.raises(RegistryError, match=f"{last} is corrupted"):
        reg.pull(NAME, v2, dest=kept)
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before
    assert json.loads((kept / "manifest.json").read_text())["version"] == v1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


@pytest.mark.parametrize("evil", ["../outside.txt", "/tmp/abs.txt", "index/../../x", "a//b", "manifest.json"])
def test_tampered_manifest_paths_are_refused_before_anything_is_written(backend, tmp_path, evil):
    reg = backend.registry()
    v = reg.register(NAME, make_model(tmp_path), metrics(1.0), {})
    key = f"models/{NAME}/{v}/manifest.json"
    manifest = json.loads(backend.read(key))
    manifest["files"][evil] = dict(manifest["files"]["model.pt"])
    backend.overwrite(key, json.dumps(manifest).encode())
    dest = tmp_path / "deep" / "pulled"
    with pytest.raises(RegistryError, match="not a clean relative path"):
        reg.pull(NAME, v, dest=dest)
    assert not dest.exists() and not (tmp_path / "deep" / "outside.txt").exists()


def test_upload_verification_catches_a_bad_store(backend, tmp_path):
    """If the bytes the store keeps differ from the local file, no manifest is written."""
    reg = backend.registry()
    store = reg._store
    original = store.upload

    def lossy_upload(key, src, *hashes):
        bad = tmp_path / "bad"
        bad.write_bytes(src.read_bytes()[:-1] + b"X")
        original(key, bad, *hashes)

    store.upload = lossy_upload
    with pytest.raises(RegistryError, match="does not match the local file"):
        reg.register(NAME, make_model(tmp_path), metrics(1.0), {})
    assert reg.versions(NAME) == []


# ----------------------------------------------------------------------------- large files (S3 multipart)
def big_file(path: Path, size: int, seed: int = 0) -> Path:
    """``size`` bytes that differ in every MiB (so a part swapped for another would show)."""
    with open(path, "wb") as f:
        for i in range(0, size, MIB):
            f.write((f"{seed}:{i:012d}".encode() * (MIB // 14 + 1))[:min(MIB, size - i)])
    return path


@pytest.mark.integration
def test_multipart_upload_and_ranged_download_round_trip(moto, tmp_path, monkeypatch):
    aws_test_env(monkeypatch)
    bucket = moto.new_bucket()
    reg = Registry(f"s3://{bucket}/m", endpoint_url=moto.endpoint, settings=small_parts(max_concurrency=3))
    big = big_file(tmp_path / "model.pt", 11 * MIB + 1234)          # parts of 5 + 5 + 1 MiB
    small = tmp_path / "metrics.json"
    small.write_text('{"sumr": 1.0}')
    v = reg.register(NAME, {"model.pt": big, "metrics.json": small}, metrics(1.0), {})
    head = moto.client().head_object(Bucket=bucket, Key=f"m/models/{NAME}/{v}/model.pt")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == big.stat().st_size
    assert "-" not in moto.client().head_object(Bucket=bucket, Key=f"m/models/{NAME}/{v}/metrics.json")["ETag"]
    assert reg.show(NAME, v)["files"]["model.pt"] == {"sha256": sha256_file(big), "size": big.stat().st_size}
    out = reg.pull(NAME, v, dest=tmp_path / "pulled")
    assert (out / "model.pt").read_bytes() == big.read_bytes()
    assert (out / "metrics.json").read_bytes() == small.read_bytes()


@pytest.mark.integration
def test_multipart_etag_check_catches_a_changed_part(moto, tmp_path, monkeypatch):
    """Same size, one byte changed in the first part: the multipart ETag computed from the
    local file no longer matches, so the version gets no manifest."""
    aws_test_env(monkeypatch)
    reg = Registry(f"s3://{moto.new_bucket()}/m", endpoint_url=moto.endpoint, settings=small_parts())
    store = reg._store
    original = store.upload

    def lossy_upload(key, src, digest):
        bad = tmp_path / "bad"
        data = bytearray(src.read_bytes())
        data[10] ^= 1
        bad.write_bytes(bytes(data))
        original(key, bad, digest)

    store.upload = lossy_upload
    with pytest.raises(RegistryError, match=r"model.pt does not match the local file \(ETag [0-9a-f]{32}-2 != "):
        reg.register(NAME, {"model.pt": big_file(tmp_path / "model.pt", 6 * MIB)}, metrics(1.0), {})
    assert reg.versions(NAME) == []


# ----------------------------------------------------------------------------- retries
class FlakyS3(ThreadingHTTPServer):
    """An S3 endpoint on 127.0.0.1 that answers the first ``failures`` requests with 503
    SlowDown (S3's throttling answer), then an empty ListObjectsV2 page; counts requests."""

    def __init__(self, failures: int):
        self.failures, self.requests = failures, 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(h):  # noqa: N805 - the handler, not the server
                self.requests += 1
                if self.requests <= self.failures:
                    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                            b"<Message>Please reduce your request rate.</Message></Error>")
                    h.send_response(503)
                else:
                    body = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                            b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><KeyCount>0</KeyCount>'
                            b"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>")
                    h.send_response(200)
                h.send_header("Content-Type", "application/xml")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)

            def log_message(h, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.integration
def test_s3_requests_are_retried_up_to_max_attempts(monkeypatch):
    """registry.max_attempts counts every try, the first included, in either retry mode."""
    aws_test_env(monkeypatch)
    server = FlakyS3(failures=2)
    try:
        reg = Registry("s3://b/p", endpoint_url=server.endpoint,
                       settings=default_config().registry.replace(max_attempts=3, retry_mode="standard"))
        assert reg.versions(NAME) == [] and server.requests == 3         # two 503s, then the answer
        server.requests = 0
        reg = Registry("s3://b/p", endpoint_url=server.endpoint,
                       settings=default_config().registry.replace(max_attempts=2, retry_mode="adaptive"))
        with pytest.raises(RegistryError, match=r"listing prvr-test failed: SlowDown.*reached max retries: 1"):
            reg.versions(NAME)
        assert server.requests == 2
    finally:
        server.shutdown()
        server.server_close()


def test_transfer_settings_are_validated():
    from prvr.config import ConfigError
    with pytest.raises(ConfigError, match="registry.multipart_chunk_mb"):
        default_config().registry.replace(multipart_chunk_mb=4)
    with pytest.raises(ConfigError, match="registry.retry_mode"):
        default_config().registry.replace(retry_mode="legacy-ish")
    with pytest.raises(ConfigError, match="registry.max_attempts"):
        default_config().registry.replace(max_attempts=0)


# ----------------------------------------------------------------------------- pointer
def test_promote_rollback_and_cas(backend, tmp_path):
    reg = backend.registry()
    v1 = reg.register(NAME, make_model(tmp_path, "1"), metrics(1.0), {})
    v2 = reg.register(NAME, make_model(tmp_path, "2"), metrics(2.0), {})
    reg.promote(NAME, v1, expected_current=None)
    with pytest.raises(RegistryError, match="expected None"):
        reg.promote(NAME, v2, expected_current=None)               # stale expectation
    p = reg.promote(NAME, v2, expected_current=v1)
    assert (p["version"], p["previous"]) == (v2, [v1])
    assert reg.production(NAME) == v2
    p = reg.rollback(NAME)
    assert (p["version"], p["previous"], p["rolled_back_from"]) == (v1, [], v2)
    with pytest.raises(RegistryError, match="no previous production"):
        reg.rollback(NAME)
    with pytest.raises(RegistryError, match="not of the form"):
        reg.promote(NAME, "latest")


def test_promotion_gate(backend, tmp_path):
    reg = backend.registry()
    d = reg.register_if_better(NAME, make_model(tmp_path, "1"), metrics(100.0), {}, source="synth:tiny")
    assert d["promoted"] and d["version"] == "v0001" and d["production"] is None
    assert d["reason"] == "promoted v0001: no production model yet" and d["outcome"] == "promoted"
    assert reg.show(NAME, "v0001")["decision"] == d and reg.show(NAME, "v0001")["source"] == "synth:tiny"

    d = reg.register_if_better(NAME, make_model(tmp_path, "2"), metrics(90.0), {})
    assert d == {**d, "promoted": False, "version": "v0002", "candidate": 90.0, "production": 100.0,
                 "production_version": "v0001", "margin": 0.0, "outcome": "not better"}
    assert d["reason"].startswith("registered v0002, not promoted: ") and "does not beat" in d["reason"]
    d = reg.register_if_better(NAME, make_model(tmp_path, "3"), metrics(100.5), {}, margin=1.0)
    assert not d["promoted"] and d["version"] == "v0003"
    assert reg.versions(NAME) == ["v0001", "v0002", "v0003"]       # every candidate is on record
    assert reg.production(NAME) == "v0001"
    assert [r["decision"] for r in reg.list(NAME)] == ["promoted", "not better", "not better"]
    assert reg.show(NAME, "v0003")["decision"]["reason"] == d["reason"]

    d = reg.register_if_better(NAME, make_model(tmp_path, "4"), metrics(120.0), {},
                               metric_key="fused.sumr", margin=1.0)
    assert d["promoted"] and d["version"] == "v0004" and (d["candidate"], d["production"]) == (120.0, 100.0)
    assert reg.pointer(NAME)["previous"] == ["v0001"]
    assert reg.show(NAME, "v0004")["decision"] == d            # "being promoted" settled to "promoted"
    with pytest.raises(RegistryError, match="no numeric 'fused.nope'"):
        reg.register_if_better(NAME, make_model(tmp_path, "5"), metrics(1.0), {}, metric_key="fused.nope")


def test_gate_compares_stored_metrics_only_on_the_same_data_and_no_promote_never_moves(backend, tmp_path):
    reg = backend.registry()
    reg.register_if_better(NAME, make_model(tmp_path, "1"), metrics(100.0), {}, data_version="md5:real")
    d = reg.register_if_better(NAME, make_model(tmp_path, "2"), metrics(500.0), {}, data_version="md5:synth")
    assert not d["promoted"] and d["outcome"] == "not comparable" and "measured on other data" in d["reason"]
    d = reg.register_if_better(NAME, make_model(tmp_path, "3"), metrics(500.0), {}, data_version="md5:real",
                               promote=False)
    assert not d["promoted"] and d["outcome"] == "held" and d["version"] == "v0003"
    assert "promotion is explicit here: prvr registry promote --version v0003" in d["reason"]
    assert "beats production v0001" in d["reason"]                  # what the gate would have said
    assert reg.production(NAME) == "v0001" and reg.show(NAME, "v0003")["decision"] == d
    # a custom judge decides; its extra fields are recorded
    d = reg.register_if_better(NAME, make_model(tmp_path, "4"), metrics(1.0), {}, data_version="md5:real",
                               judge=lambda prod: {"better": True, "production": 0.5, "reason": "judged",
                                                   "split": "test"})
    assert d["promoted"] and d["reason"] == "promoted v0004: judged" and d["split"] == "test"
    assert reg.show(NAME, "v0004")["decision"]["split"] == "test" and reg.production(NAME) == "v0004"


def test_gate_judges_again_when_production_moves_meanwhile(backend, tmp_path):
    reg = backend.registry()
    v1 = reg.register(NAME, make_model(tmp_path, "1"), metrics(100.0), {})
    v2 = reg.register(NAME, make_model(tmp_path, "2"), metrics(300.0), {})
    reg.promote(NAME, v1)
    judged = []

    def judge(prod):
        judged.append(prod)
        if prod == v1:            # someone promotes v2 while this candidate is being judged
            reg.promote(NAME, v2)
            return {"better": True, "production": 100.0, "reason": f"beats {prod}"}
        return {"better": False, "production": 300.0, "reason": f"does not beat {prod}"}

    d = reg.register_if_better(NAME, make_model(tmp_path, "3"), metrics(200.0), {}, judge=judge)
    assert judged == [v1, v2] and not d["promoted"] and d["production_version"] == v2
    assert d["reason"] == "registered v0003, not promoted: does not beat v0002"
    assert reg.production(NAME) == v2 and reg.show(NAME, "v0003")["decision"] == d


def test_resolve_metric():
    m = {"fused": {"sumr": 3.0}, "sumr": 1.0, "n": True}
    assert resolve_metric(m, "sumr") == 1.0
    assert resolve_metric({"fused": {"sumr": 3.0}}, "sumr") == 3.0
    assert resolve_metric(m, "fused.sumr") == 3.0
    assert resolve_metric(m, "clip.sumr") is None and resolve_metric(m, "n") is None


# ----------------------------------------------------------------------------- concurrency
def test_concurrent_registrations_and_promotions(backend, tmp_path):
    n = 4
    models = [make_model(tmp_path, str(i)) for i in range(n)]
    barrier = threading.Barrier(n)
    versions, errors = [None] * n, []

    def work(i: int) -> None:
        try:
            reg = backend.registry()       # one client per thread, like separate processes
            barrier.wait()
            versions[i] = reg.register(NAME, models[i], metrics(float(i)), {})
            reg.promote(NAME, versions[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(versions) == [f"v{i:04d}" for i in range(1, n + 1)]
    reg = backend.registry()
    assert reg.versions(NAME) == sorted(versions)
    pointer = reg.pointer(NAME)
    assert sorted(pointer["previous"] + [pointer["version"]]) == sorted(versions)   # no promotion lost
    for i, v in enumerate(versions):                                               # no files mixed up
        assert reg.show(NAME, v)["files"]["model.pt"]["sha256"] == sha256_file(models[i]["model.pt"])


def test_concurrent_gates_keep_the_best(backend, tmp_path):
    barrier = threading.Barrier(2)
    decisions, errors = {}, []

    def work(sumr: float) -> None:
        try:
            reg = backend.registry()
            barrier.wait()
            decisions[sumr] = reg.register_if_better(NAME, make_model(tmp_path, str(sumr)), metrics(sumr), {})
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in (100.0, 200.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    reg = backend.registry()
    assert decisions[200.0]["promoted"]
    assert reg.show(NAME)["metrics"]["fused"]["sumr"] == 200.0
    # both are on record, each manifest with its final decision (none left "being promoted")
    assert {r["version"]: r["decision"] for r in reg.list(NAME)} == {
        d["version"]: d["outcome"] for d in decisions.values()}
    assert all(reg.show(NAME, d["version"])["decision"] == d for d in decisions.values())


# ----------------------------------------------------------------------------- failures
def test_failure_mid_upload_leaves_registry_untouched(backend, tmp_path):
    reg = backend.registry()
    v1 = reg.register(NAME, make_model(tmp_path, "1"), metrics(100.0), {})
    reg.promote(NAME, v1)
    before = reg.pointer(NAME)

    broken = backend.registry()
    backend.fail_after_first_upload(broken)
    try:
        with pytest.raises(RegistryError) as info:
            broken.register_if_better(NAME, make_model(tmp_path, "2"), metrics(150.0), {})
        msg = str(info.value)
        cause = [backend.endpoint, "Could not connect"] if backend.moto else ["No space left"]
        assert all(part in msg for part in ["uploading", NAME, *cause]), msg
    finally:
        backend.recover()

    reg = backend.registry()
    assert reg.pointer(NAME) == before                 # production untouched
    assert reg.versions(NAME) == [v1]                  # the half-uploaded version is invisible
    assert (reg.pull(NAME, v1, dest=tmp_path / "p1") / "model.pt").exists()

    d = reg.register_if_better(NAME, make_model(tmp_path, "2"), metrics(150.0), {})    # retry succeeds
    assert d["promoted"] and d["version"] == "v0003"  # v0002 stays burnt: ids are never reused
    assert reg.versions(NAME) == [v1, "v0003"] and reg.pointer(NAME)["previous"] == [v1]


@pytest.mark.integration
def test_s3_errors_are_clear(moto, tmp_path, monkeypatch):
    aws_test_env(monkeypatch)
    reg = Registry("s3://no-such-bucket-prvr/x", endpoint_url=moto.endpoint)
    with pytest.raises(RegistryError, match="bucket 'no-such-bucket-prvr' does not exist"):
        reg.register(NAME, make_model(tmp_path), metrics(1.0), {})
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError, match="Could not connect"):
        Registry("s3://bucket/x", endpoint_url=dead).list(NAME)


@pytest.mark.integration
def test_moto_honours_conditional_writes(moto, monkeypatch):
    """The registry's CAS relies on S3 conditional PUTs; check this boto3 + moto pair does them."""
    from botocore.exceptions import ClientError
    aws_test_env(monkeypatch)
    c, bucket = moto.client(), moto.new_bucket()
    etag = c.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")["ETag"]
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    with pytest.raises(ClientError) as info:
        c.put_object(Bucket=bucket, Key="k", Body=b"2", IfMatch='"0123"')
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    c.put_object(Bucket=bucket, Key="k", Body=b"2", IfMatch=etag)
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"2"


@pytest.mark.parametrize("uri,match", [("ftp://x", "scheme"), ("s3://", "no bucket"), ("file://", "no folder")])
def test_bad_uris(uri, match):
    with pytest.raises(RegistryError, match=match):
        Registry(uri)


def test_bad_names_and_files(tmp_path):
    reg = Registry(f"file://{tmp_path}")
    with pytest.raises(RegistryError, match="model name"):
        reg.list("../etc")
    with pytest.raises(RegistryError, match="does not exist"):
        reg.register(NAME, {"model.pt": tmp_path / "missing.pt"}, {}, {})
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(RegistryError, match="reserved"):
        reg.register(NAME, {"manifest.json": tmp_path / "m.pt"}, {}, {})
    with pytest.raises(RegistryError, match="clean relative path"):
        reg.register(NAME, {"../m.pt": tmp_path / "m.pt"}, {}, {})


# ----------------------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prvr")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(backend, tmp_path, capsys):
    reg = backend.registry()
    v1 = reg.register(NAME, make_model(tmp_path, "1"), metrics(100.0), {})
    v2 = reg.register(NAME, make_model(tmp_path, "2"), metrics(120.0), {})
    common = ["--uri", backend.uri, "--name", NAME] + (["--endpoint-url", backend.endpoint] if backend.moto else [])
    assert run_cli(["registry", "promote", *common, "--version", v1, "--expect", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == v1
    assert run_cli(["registry", "promote", *common, "--version", v2]) == 0
    capsys.readouterr()
    assert run_cli(["registry", "list", *common]) == 0
    table = capsys.readouterr().out
    assert f"* {v2}" in table and "120.00" in table and "decision" in table
    assert run_cli(["registry", "list", *common, "--json"]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == [v1, v2]
    assert run_cli(["registry", "show", *common]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == v2
    assert run_cli(["registry", "rollback", *common]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == v1
    dest = tmp_path / "cli-pull"
    assert run_cli(["registry", "pull", *common, "--version", v2, "--dest", str(dest)]) == 0
    assert Path(capsys.readouterr().out.strip()) == dest and (dest / "model.pt").exists()
