"""Versioned data sources for preprocess (prvr.remote_data): ``dvc://<repo-url>@<rev>#<path>``
and ``s3://<bucket>/<prefix>/<collection>``.

A git + DVC repository in tmp holds a synthetic collection tagged v1 and another tagged v2,
pushed to a DVC remote (a local folder, and a moto S3 server on 127.0.0.1); its workspace copy
and its DVC cache are deleted, so the data can only come from the remote. Sources are read
through ``file://`` URLs (DVC clones them like any git URL).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.servers import MotoS3
from kfp.dsl import Dataset
from test_dvc_remote import dvc_env, init_repo, run, run_dvc
from test_pipeline import FAST, PIPELINE_YAML

from prvr import remote_data, stages
from prvr.config import load_config
from prvr.errors import DataError
from prvr.synth import synthesize

pytestmark = pytest.mark.integration

COLL = "synth"
SEEDS = {"v1": 11, "v2": 12}                 # the synthetic collection at each tag
STATS_KEYS = ("feature_rows", "splits")      # statistics that differ between the two


class FakeEncoder:
    """Deterministic stand-in for the MiniLM encoder: (L, 8) features per sentence."""
    name, max_tokens, dim = "fake-encoder:1", 30, 8

    def encode(self, sentences, batch_size=128):
        return [np.full((min(len(s.split()), 30), 8), len(s) / 100.0, np.float32) for s in sentences]


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """This process's environment for DVC, git and boto3: isolated configs, moto's fake credentials."""
    values = dvc_env(tmp_path_factory.mktemp("env"))
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("AWS_", "DVC_", "PRVR_")):
                mp.delenv(key)
        for key, value in values.items():
            if key.startswith(("AWS_", "DVC_", "GIT_")):
                mp.setenv(key, value)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")      # never ask an instance metadata service
        yield values


@pytest.fixture(scope="module")
def moto(env):
    server = MotoS3()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cfg():
    return load_config()


def build_repo(root: Path, env: dict, remote: str, endpoint: str | None = None) -> Path:
    """data/synth at v1 and at v2 (tags), pushed to ``remote``; no workspace copy, no cache."""
    repo = init_repo(root / "repo", env)
    run_dvc(["remote", "add", "-d", "store", remote], repo, env)
    if endpoint:
        run_dvc(["remote", "modify", "store", "endpointurl", endpoint], repo, env)
    for tag, seed in SEEDS.items():
        synthesize(repo / "data", COLL, preset="tiny", seed=seed)
        run_dvc(["add", "-q", f"data/{COLL}"], repo, env)
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-qm", f"data {tag}"], repo, env)
        run(["git", "tag", tag], repo, env)
        run_dvc(["push", "-q"], repo, env)
    shutil.rmtree(repo / "data" / COLL)
    shutil.rmtree(repo / ".dvc" / "cache")
    return repo


@pytest.fixture(scope="module")
def dir_repo(tmp_path_factory, env) -> Path:
    root = tmp_path_factory.mktemp("dvc-dir")
    return build_repo(root, env, str(root / "remote"))


@pytest.fixture(scope="module")
def s3_repo(tmp_path_factory, env, moto) -> Path:
    bucket = moto.new_bucket()
    return build_repo(tmp_path_factory.mktemp("dvc-s3"), env, f"s3://{bucket}/dvc", moto.endpoint)


def dvc_source(repo: Path, rev: str, path: str = f"data/{COLL}") -> str:
    return f"dvc://file://{repo}@{rev}#{path}"


def expected_version(repo: Path, env: dict, tag: str) -> str:
    """dvc:<the tag's commit>:<md5 of data/synth in its .dvc file>."""
    commit = run(["git", "rev-parse", f"{tag}^{{commit}}"], repo, env).strip()
    md5 = yaml.safe_load(run(["git", "show", f"{tag}:data/{COLL}.dvc"], repo, env))["outs"][0]["md5"]
    return f"dvc:{commit}:{md5}"


def synth_bytes(tmp: Path, seed: int) -> bytes:
    """feature.bin of the collection a tag holds, generated again."""
    path = synthesize(tmp, COLL, preset="tiny", seed=seed)
    return (path / "FeatureData" / "synth_feat" / "feature.bin").read_bytes()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------- parsing
def test_source_forms_parse_and_malformed_ones_name_the_source(cfg) -> None:
    assert remote_data.parse_dvc("dvc://git@host:org/repo@v1#data/tvr") == ("git@host:org/repo", "v1", "data/tvr")
    assert remote_data.parse_dvc("dvc://https://h.example/r.git@feature/x#/c/tvr/") == \
        ("https://h.example/r.git", "feature/x", "c/tvr")
    assert remote_data.parse_dvc("dvc://file:///abs/repo@0123abc#tvr") == ("file:///abs/repo", "0123abc", "tvr")
    assert remote_data.parse_s3("s3://bucket/datasets/tvr/") == ("bucket", "datasets/tvr/")
    assert stages.parse_source("dvc://file:///r@v1#d", cfg) == ("dvc", None, None, None)
    assert stages.parse_source("s3://b/tvr", cfg) == ("s3", None, None, None)
    for bad, what in [("dvc://git@host:org/repo#data", "@<rev>"), ("dvc://file:///r#data", "@<rev>"),
                      ("dvc://file:///r@v1", "#<path>"), ("dvc://file:///r@v1#", "#<path>"),
                      ("s3://bucket", "collection"), ("s3://bucket/", "collection")]:
        with pytest.raises(DataError, match=re.escape(what)) as err:
            stages.parse_source(bad, cfg)
        assert repr(bad) in str(err.value)


# ------------------------------------------------------------------------------- dvc://
@pytest.mark.parametrize("remote", ["dir", "s3"])
def test_dvc_revisions_give_their_data_and_version(remote, request, env, cfg, tmp_path) -> None:
    repo = request.getfixturevalue(f"{remote}_repo")
    records = {}
    for tag, seed in SEEDS.items():
        source = dvc_source(repo, tag)
        rec = records[tag] = stages.preprocess(source, tmp_path / tag, cfg, encoder=FakeEncoder())
        assert rec["source"] == source and rec["data_version"] == expected_version(repo, env, tag)
        assert rec["path"] == COLL and rec["collection"] == COLL
        # the bytes of that tag, from the remote (the repository has neither workspace copy nor cache)
        feature = tmp_path / tag / COLL / "FeatureData" / "synth_feat" / "feature.bin"
        assert feature.read_bytes() == synth_bytes(tmp_path / f"again-{tag}", seed)
        assert json.loads((tmp_path / tag / stages.DATASET_JSON).read_text()) == rec
        assert listing(tmp_path / tag)[:2] == ["dataset.json", COLL]
    v1, v2 = records["v1"], records["v2"]
    assert v1["data_version"] != v2["data_version"] and v1["fingerprint"] != v2["fingerprint"]
    assert [v1["stats"][k] for k in STATS_KEYS] != [v2["stats"][k] for k in STATS_KEYS]
    assert not (repo / "data" / COLL).exists() and not (repo / ".dvc" / "cache").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []     # no temp folder left
    assert stages.dataset_metadata(v1)["data_version"] == v1["data_version"]


def test_resolve_agrees_with_preprocess_without_downloading(dir_repo, env, cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    remote = dir_repo.parent / "remote"
    hidden = remote.rename(dir_repo.parent / "remote-hidden")   # resolving needs git, not the DVC remote
    try:
        resolved = {tag: stages.resolve_source(dvc_source(dir_repo, tag), cfg) for tag in SEEDS}
        sha = run(["git", "rev-parse", "v1^{commit}"], dir_repo, env).strip()
        by_sha = stages.resolve_source(dvc_source(dir_repo, sha), cfg)
    finally:
        hidden.rename(remote)
    assert not list(tmp_path.rglob("feature.bin")) and listing(tmp_path) == []
    for tag in SEEDS:
        assert resolved[tag] == {"source": dvc_source(dir_repo, tag), "kind": "dvc",
                                 "data_version": expected_version(dir_repo, env, tag)}
    assert by_sha["data_version"] == resolved["v1"]["data_version"]
    record = stages.preprocess(dvc_source(dir_repo, "v2"), tmp_path / "ds", cfg, encoder=FakeEncoder(),
                               expected_version=resolved["v2"]["data_version"])
    assert record["data_version"] == resolved["v2"]["data_version"]
    # a folder inside a tracked one has no .dvc entry: md5 over its files' hashes, per revision
    inner = {tag: remote_data.resolve_remote(dvc_source(dir_repo, tag, f"data/{COLL}/FeatureData"))
             for tag in SEEDS}
    assert inner["v1"]["data_version"] != inner["v2"]["data_version"]
    assert re.fullmatch(r"dvc:[0-9a-f]{40}:[0-9a-f]{32}", inner["v1"]["data_version"])
    assert remote_data.resolve_remote(dvc_source(dir_repo, "v1", f"data/{COLL}/FeatureData")) == inner["v1"]


def test_dvc_errors_name_the_source_and_leave_the_output_alone(dir_repo, cfg, tmp_path) -> None:
    work = tmp_path / "work"
    out = work / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("untouched\n")
    bad_sources = {
        dvc_source(dir_repo, "v9"): "v9",                                   # no such revision
        dvc_source(dir_repo, "v1", "data/nope"): "data/nope",               # no such path
        dvc_source(dir_repo, "v1", "data/synth.dvc"): "not a collection folder",
        f"dvc://file://{tmp_path}/no-repo@v1#data/{COLL}": "no-repo",       # no repository
    }
    for source, words in bad_sources.items():
        for call in (lambda: stages.preprocess(source, out, cfg, encoder=FakeEncoder()),
                     lambda: stages.resolve_source(source, cfg)):
            with pytest.raises(DataError) as err:
                call()
            assert repr(source) in str(err.value) and words in str(err.value)
    assert listing(work) == ["out", "out/keep.txt"]
    # a version that moved since it was resolved: refused before any download
    with pytest.raises(DataError, match="data changed"):
        stages.preprocess(dvc_source(dir_repo, "v2"), out, cfg, encoder=FakeEncoder(),
                          expected_version="dvc:" + "0" * 40 + ":0123")
    assert listing(work) == ["out", "out/keep.txt"]
    # the DVC remote gone: the download fails, nothing is left behind
    remote = dir_repo.parent / "remote"
    hidden = remote.rename(dir_repo.parent / "remote-hidden")
    try:
        with pytest.raises(DataError, match=re.escape(repr(dvc_source(dir_repo, "v1")))):
            stages.preprocess(dvc_source(dir_repo, "v1"), work / "new", cfg, encoder=FakeEncoder())
    finally:
        hidden.rename(remote)
    assert listing(work) == ["out", "out/keep.txt"]


def test_a_folder_prvr_did_not_download_is_never_replaced(dir_repo, cfg, tmp_path) -> None:
    mine = tmp_path / "out" / COLL
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    with pytest.raises(DataError, match="not downloaded by prvr"):
        stages.preprocess(dvc_source(dir_repo, "v1"), tmp_path / "out", cfg, encoder=FakeEncoder())
    assert listing(tmp_path / "out") == [COLL, f"{COLL}/notes.txt"]
    # an earlier download is replaced whole by the next one
    first = stages.preprocess(dvc_source(dir_repo, "v1"), tmp_path / "ds", cfg, encoder=FakeEncoder())
    second = stages.preprocess(dvc_source(dir_repo, "v2"), tmp_path / "ds", cfg, encoder=FakeEncoder())
    assert first["data_version"] != second["data_version"]
    marker = json.loads((tmp_path / "ds" / COLL / remote_data.MARKER).read_text())
    assert marker == {"source": dvc_source(dir_repo, "v2"), "data_version": second["data_version"]}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------- s3://
def upload_collection(client, bucket: str, prefix: str, folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")


@pytest.fixture
def s3_source(moto, tmp_path, monkeypatch) -> tuple[str, str]:
    """(s3://BUCKET/datasets/synth holding a tiny collection, BUCKET); PRVR_DATA_ENDPOINT_URL set."""
    monkeypatch.setenv(remote_data.ENDPOINT_ENV, moto.endpoint)
    bucket = moto.new_bucket()
    upload_collection(moto.client(), bucket, f"datasets/{COLL}",
                      synthesize(tmp_path / "upload", COLL, preset="tiny", seed=SEEDS["v1"]))
    return f"s3://{bucket}/datasets/{COLL}", bucket


def test_s3_source_downloads_and_versions_by_etag(s3_source, moto, cfg, tmp_path) -> None:
    source, bucket = s3_source
    resolved = stages.resolve_source(source, cfg)
    assert resolved["kind"] == "s3" and re.fullmatch(r"s3:[0-9a-f]{64}", resolved["data_version"])
    assert {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("feature.bin")} == {"upload"}
    first = stages.preprocess(source, tmp_path / "ds1", cfg, encoder=FakeEncoder(),
                              expected_version=resolved["data_version"])
    assert first["data_version"] == resolved["data_version"] and first["source"] == source
    assert (tmp_path / "ds1" / COLL / "FeatureData" / "synth_feat" / "feature.bin").read_bytes() == \
        synth_bytes(tmp_path / "again", SEEDS["v1"])
    assert stages.resolve_source(source, cfg) == resolved               # same objects, same version
    # one object replaced: a new version, and preprocess sees the new bytes
    key = f"datasets/{COLL}/FeatureData/synth_feat/feature.bin"
    doubled = (np.frombuffer(moto.client().get_object(Bucket=bucket, Key=key)["Body"].read(), "<f4") * 2)
    moto.client().put_object(Bucket=bucket, Key=key, Body=doubled.astype("<f4").tobytes())
    changed = stages.resolve_source(source, cfg)
    assert changed["data_version"] != resolved["data_version"]
    second = stages.preprocess(source, tmp_path / "ds2", cfg, encoder=FakeEncoder())
    assert second["data_version"] == changed["data_version"] and second["fingerprint"] != first["fingerprint"]


def test_s3_endpoint_from_boto3s_own_environment(s3_source, moto, cfg, monkeypatch) -> None:
    source, _ = s3_source
    version = stages.resolve_source(source, cfg)["data_version"]
    monkeypatch.delenv(remote_data.ENDPOINT_ENV)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto.endpoint)
    assert stages.resolve_source(source, cfg)["data_version"] == version


def test_s3_errors_name_the_source_and_leave_the_output_alone(s3_source, cfg, tmp_path, monkeypatch) -> None:
    source, bucket = s3_source
    out = tmp_path / "work" / "out"
    cases = {f"s3://no-such-bucket-prvr/datasets/{COLL}": "bucket does not exist",
             f"s3://{bucket}/elsewhere/{COLL}": "no objects under"}
    for bad, words in cases.items():
        for call in (lambda: stages.preprocess(bad, out, cfg, encoder=FakeEncoder()),
                     lambda: stages.resolve_source(bad, cfg)):
            with pytest.raises(DataError) as err:
                call()
            assert repr(bad) in str(err.value) and words in str(err.value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(DataError, match="no AWS credentials") as err:
        stages.preprocess(source, out, cfg, encoder=FakeEncoder())
    assert repr(source) in str(err.value)
    assert listing(tmp_path / "work") == []


# ------------------------------------------------------------------------------- Kubeflow
def test_compiled_pipeline_resolves_uncached_and_keys_preprocess_on_the_version() -> None:
    spec = yaml.safe_load(PIPELINE_YAML.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["resolve"]["cachingOptions"].get("enableCache") is not True
    assert tasks["preprocess"]["cachingOptions"].get("enableCache") is True
    params = tasks["preprocess"]["inputs"]["parameters"]
    for name in ("source", "data_version"):
        assert params[name]["taskOutputParameter"] == {"producerTask": "resolve", "outputParameterKey": name}


def test_components_resolve_then_preprocess(dir_repo, tmp_path) -> None:
    from components import preprocess, resolve

    base = stages.pipeline_params(stages.stage_config(None, []))
    source = dvc_source(dir_repo, "v1")
    out = resolve.python_func(source=source, base_params=base, params_overrides=[])
    assert out.source == source and out.data_version == stages.resolve_source(source, load_config())["data_version"]
    with pytest.raises(DataError, match="data changed"):
        preprocess.python_func(source=source, base_params=base, params_overrides=[],
                               dataset=Dataset(uri=str(tmp_path / "stale")), data_version="s3:" + "0" * 64)
    assert not (tmp_path / "stale").exists()
    dataset = Dataset(uri=str(tmp_path / "dataset"))
    preprocess.python_func(source=source, base_params=base, params_overrides=[], dataset=dataset,
                           data_version=out.data_version)
    assert dataset.metadata["data_version"] == out.data_version and dataset.metadata["test_videos"] == 30


@pytest.mark.slow
def test_whole_pipeline_from_two_dvc_revisions(dir_repo, tmp_path) -> None:
    import kfp.local

    from pipelines.prvr_pipeline import prvr_pipeline

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    uri = f"file://{tmp_path / 'registry'}"
    datasets, decisions = {}, {}
    for tag in SEEDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # "custom base image" / "accelerator has no effect locally"
            task = prvr_pipeline(source=dvc_source(dir_repo, tag), epochs=1, registry_uri=uri,
                                 params_overrides=FAST)
        datasets[tag] = json.loads((Path(task.outputs["dataset"].path) / "dataset.json").read_text())
        decisions[tag] = json.loads((Path(task.outputs["decision"].path) / "decision.json").read_text())
        assert datasets[tag]["data_version"] == stages.resolve_source(dvc_source(dir_repo, tag),
                                                                      load_config())["data_version"]
    assert datasets["v1"]["data_version"] != datasets["v2"]["data_version"]
    assert datasets["v1"]["fingerprint"] != datasets["v2"]["fingerprint"]
    assert decisions["v1"]["promoted"] and decisions["v1"]["version"] == "v0001"
    assert decisions["v1"]["data_version"] != decisions["v2"]["data_version"]
