"""Cluster wiring of the Kubeflow pipeline: the compile options of pipelines/options.py land on
exactly the task(s) they name in the compiled IR YAML (pipeline spec + platforms.kubernetes),
and train.checkpoint_uri lets a run whose pod died resume in a fresh run folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prvr import stages
from prvr.cli.app import main as prvr_main
from prvr.config import load_config

try:
    from helpers.servers import MotoS3, aws_test_env
except ImportError:  # tests/ imported as a package
    from tests.helpers.servers import MotoS3, aws_test_env

REPO = Path(__file__).resolve().parent.parent
PIPELINE_YAML = REPO / "pipelines" / "prvr.yaml"
COMPILE_ENV = ("PRVR_IMAGE", "PRVR_TRAIN_IMAGE", "PRVR_TRAIN_GPUS")
EXECUTORS = {"exec-resolve", "exec-preprocess", "exec-train", "exec-evaluate", "exec-register"}

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from components.common import IMAGE  # noqa: E402
from pipelines import options  # noqa: E402
from pipelines.prvr_pipeline import compile_pipeline  # noqa: E402


def _load(path: Path) -> dict:
    """The pipeline spec, plus ``platforms`` from the second YAML document kfp writes when a
    task has Kubernetes settings (the platform spec)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) in (1, 2) and (len(docs) == 1 or set(docs[1]) == {"platforms"}), [list(d) for d in docs]
    return {k: v for d in docs for k, v in d.items()}


def _compile(tmp_path: Path, **raw) -> dict:
    return _load(compile_pipeline(tmp_path / "p.yaml", options.parse(environ={}, **raw)))


def _kube(spec: dict) -> dict:
    """platforms.kubernetes executors: {exec-<task>: {pvcMount, secretAsEnv, nodeSelector, ...}}."""
    return spec.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})


def _containers(spec: dict) -> dict:
    return {name: e["container"] for name, e in spec["deploymentSpec"]["executors"].items()}


# ----------------------------------------------------------------------------- defaults
def test_default_compile_through_the_cli_is_the_committed_yaml(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in COMPILE_ENV}
    out = tmp_path / "default.yaml"
    proc = subprocess.run([sys.executable, "-m", "prvr.cli", "pipeline", "compile", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(PIPELINE_YAML.read_text()), \
        "pipelines/prvr.yaml is stale: run `prvr pipeline compile`"


def test_defaults_one_gpu_cuda_image_two_retries_nothing_kubernetes(tmp_path: Path) -> None:
    spec = _compile(tmp_path)
    assert "platforms" not in spec
    containers = _containers(spec)
    assert containers["exec-train"]["image"] == f"{IMAGE}-cu128"
    gpu = containers["exec-train"]["resources"]["accelerator"]
    assert (gpu["resourceType"], gpu["resourceCount"]) == ("nvidia.com/gpu", "1")
    assert all("resources" not in c for name, c in containers.items() if name != "exec-train")
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"] == {"maxRetryCount": 2, "backoffDuration": "60s",
                                             "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}
    assert [t for t in tasks if "retryPolicy" in tasks[t]] == ["train"]


# ----------------------------------------------------------------------------- every task
def test_pvcs_are_mounted_in_every_task(tmp_path: Path) -> None:
    kube = _kube(_compile(tmp_path, pvc=["tvr-data:/mnt/data", "prvr-runs:/mnt/runs"]))
    assert set(kube) == EXECUTORS
    for executor in kube.values():
        assert set(executor) == {"pvcMount"}
        assert [(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"])
                for m in executor["pvcMount"]] == [("tvr-data", "/mnt/data"), ("prvr-runs", "/mnt/runs")]


def test_s3_secret_becomes_every_tasks_environment(tmp_path: Path) -> None:
    kube = _kube(_compile(tmp_path, s3_secret="prvr-s3"))
    assert set(kube) == EXECUTORS
    for executor in kube.values():
        assert set(executor) == {"secretAsEnv"}
        required, optional = executor["secretAsEnv"]
        assert required["secretName"] == optional["secretName"] == "prvr-s3"
        assert {(m["secretKey"], m["envVar"]) for m in required["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")}
        assert required["optional"] is False and optional["optional"] is True
        assert optional["keyToEnv"] == [{"secretKey": "AWS_ENDPOINT_URL", "envVar": "AWS_ENDPOINT_URL"}]


def test_resources_land_on_the_named_task_only(tmp_path: Path) -> None:
    containers = _containers(_compile(tmp_path, resources=["train=4,8,16Gi,32Gi", "evaluate=1,,4Gi,"]))
    train = containers["exec-train"]["resources"]
    assert (train["resourceCpuRequest"], train["resourceCpuLimit"]) == ("4", "8")
    assert (train["resourceMemoryRequest"], train["resourceMemoryLimit"]) == ("16Gi", "32Gi")
    ev = containers["exec-evaluate"]["resources"]
    assert ev == {"cpuRequest": 1.0, "resourceCpuRequest": "1", "memoryRequest": pytest.approx(4.294967296),
                  "resourceMemoryRequest": "4Gi"}
    assert "resources" not in containers["exec-preprocess"] and "resources" not in containers["exec-register"]


# ----------------------------------------------------------------------------- train only
@pytest.mark.parametrize("gpus, accelerator, image", [
    (0, (None, None), IMAGE),                            # no CUDA build without a GPU
    (2, ("nvidia.com/gpu", "2"), f"{IMAGE}-cu128")])
def test_gpus_on_train_only_and_zero_means_no_accelerator(tmp_path: Path, gpus: int, accelerator, image) -> None:
    spec = _compile(tmp_path, gpus=gpus)
    containers = _containers(spec)
    gpu = containers["exec-train"].get("resources", {}).get("accelerator", {})
    assert (gpu.get("resourceType"), gpu.get("resourceCount")) == accelerator, gpu
    assert ("accelerator" in (tmp_path / "p.yaml").read_text()) == (gpus > 0)
    assert containers["exec-train"]["image"] == image
    assert all("resources" not in c for name, c in containers.items() if name != "exec-train")
    assert "platforms" not in spec


def test_node_selector_tolerations_image_and_retries_on_train_only(tmp_path: Path) -> None:
    spec = _compile(tmp_path, node_selector=["nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3"],
                    toleration=["nvidia.com/gpu=present:NoSchedule", "dedicated:NoExecute"],
                    train_image="registry.example.com/prvr:dev-cu128", train_retries=5, retry_backoff="30s")
    kube = _kube(spec)
    assert set(kube) == {"exec-train"}
    assert kube["exec-train"]["nodeSelector"] == {"labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    assert kube["exec-train"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}]
    images = {name: c["image"] for name, c in _containers(spec).items()}
    assert images.pop("exec-train") == "registry.example.com/prvr:dev-cu128"
    assert set(images.values()) == {IMAGE}
    policy = spec["root"]["dag"]["tasks"]["train"]["retryPolicy"]
    assert (policy["maxRetryCount"], policy["backoffDuration"]) == (5, "30s")


def test_zero_retries_sets_no_retry_policy(tmp_path: Path) -> None:
    tasks = _compile(tmp_path, train_retries=0)["root"]["dag"]["tasks"]
    assert not any("retryPolicy" in t for t in tasks.values())


def test_environment_defaults() -> None:
    opts = options.parse(environ={"PRVR_TRAIN_GPUS": "4", "PRVR_TRAIN_IMAGE": "my/prvr:cu"})
    assert (opts.gpus, opts.image_for_train) == (4, "my/prvr:cu")
    assert options.parse(gpus=0, environ={"PRVR_TRAIN_GPUS": "4"}).gpus == 0
    assert options.parse(environ={}) == options.ClusterOptions() and options.is_default(options.ClusterOptions())


@pytest.mark.parametrize("raw, message", [
    ({"pvc": ["data"]}, "--pvc 'data'"),
    ({"pvc": ["data:relative"]}, "NAME:MOUNT_PATH"),
    ({"s3_secret": "Bad_Name"}, "--s3-secret"),
    ({"gpus": -1}, "--gpus must be >= 0"),
    ({"node_selector": ["novalue"]}, "KEY=VALUE"),
    ({"toleration": ["k=v:Sometimes"]}, "EFFECT one of"),
    ({"resources": ["train=1,2,3"]}, "TASK=CPU_REQUEST"),
    ({"resources": ["trian=1,2,3Gi,4Gi"]}, "TASK one of"),
    ({"resources": ["train=1,,,", "train=2,,,"]}, "each task once"),
    ({"retry_backoff": "1m"}, "--retry-backoff"),
])
def test_bad_options_name_the_option(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        options.parse(environ={}, **raw)


def test_cli_errors_and_refuses_options_into_the_committed_yaml(tmp_path: Path, capsys) -> None:
    assert prvr_main(["pipeline", "compile", "--out", str(tmp_path / "x.yaml"), "--pvc", "nopath"]) == 2
    assert "--pvc 'nopath'" in capsys.readouterr().err
    before = PIPELINE_YAML.read_bytes()
    assert prvr_main(["pipeline", "compile", "--gpus", "0"]) == 2
    assert "committed default compile" in capsys.readouterr().err
    assert PIPELINE_YAML.read_bytes() == before
    out = tmp_path / "sub" / "cluster.yaml"
    assert prvr_main(["pipeline", "compile", "--out", str(out), "--pvc", "d:/mnt/d", "--s3-secret", "s",
                      "--gpus", "2", "--node-selector", "a=b", "--toleration", "k=v:NoSchedule",
                      "--resources", "register=,,1Gi,2Gi", "--train-retries", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    spec = _load(out)
    assert set(_kube(spec)) == EXECUTORS and _kube(spec)["exec-train"]["nodeSelector"]["labels"] == {"a": "b"}
    assert _containers(spec)["exec-register"]["resources"]["resourceMemoryLimit"] == "2Gi"
    assert spec["root"]["dag"]["tasks"]["train"]["retryPolicy"]["maxRetryCount"] == 1


# ----------------------------------------------------------------------------- checkpoint_uri
# A small model: a tiny-preset epoch takes seconds on 2 CPU cores (as tests/test_train.py).
FAST = ["model.hidden_size=64", "model.num_heads=2", "model.cluster_num=8", "model.map_size=16",
        "model.max_ctx_len=32", "train.batch_size=24", "train.epochs=3", "train.patience=10",
        "train.hard_negative_start_epoch=2", "train.lr=1e-3"]


class PodDied(Exception):
    """Stands for the pod going away right after an epoch was mirrored."""


def _learning(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.endswith("_per_s")} for h in history]


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tiny_encoded: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("full")
    return stages.train_step(tiny_encoded, out, load_config(None, FAST)), out


@pytest.fixture(scope="module")
def moto():
    server = MotoS3()
    yield server
    server.stop()


def _die_after_epoch_1(monkeypatch) -> None:
    real = stages.checkpoint_sync

    def sync_then_die(cfg, out_dir):
        hook = real(cfg, out_dir)

        def on_epoch(epoch: int, improved: bool) -> None:
            hook(epoch, improved)
            if epoch == 1:
                raise PodDied
        return on_epoch
    monkeypatch.setattr(stages, "checkpoint_sync", sync_then_die)


def _resume_ends_like_the_uninterrupted_run(tiny_encoded: Path, tmp_path: Path, uri: str, uninterrupted,
                                            monkeypatch, capsys, read_last) -> None:
    cfg = load_config(None, FAST + [f"train.checkpoint_uri={uri}"])
    with monkeypatch.context() as m:
        _die_after_epoch_1(m)
        with pytest.raises(PodDied):
            stages.train_step(tiny_encoded, tmp_path / "pod-1", cfg, keep_last=False)
    assert read_last()["state"]["epoch"] == 1
    capsys.readouterr()
    cfg = load_config(None, FAST + [f"train.checkpoint_uri={uri}"])      # the retried pod's
    result = stages.train_step(tiny_encoded, tmp_path / "pod-2", cfg, keep_last=False)
    assert f"resume files copied from {uri}" in capsys.readouterr().err
    full, full_dir = uninterrupted
    assert result["epochs"] == full["epochs"] == 3 and result["best_epoch"] == full["best_epoch"]
    assert _learning(result["history"]) == _learning(full["history"])
    a, b = _state(full_dir / "model.pt"), _state(tmp_path / "pod-2" / "model.pt")
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k])
                                             for k in a["state_dict"])
    last, full_last = read_last(), _state(full_dir / "last.pt")          # the mirror ends current
    assert last["state"]["epoch"] == 3
    assert all(torch.equal(last["state_dict"][k], full_last["state_dict"][k]) for k in last["state_dict"])
    assert not (tmp_path / "pod-2" / "last.pt").exists()                  # keep_last=False, as in KFP


@pytest.mark.integration
def test_checkpoint_uri_folder_resumes_a_fresh_run_folder(tiny_encoded, tmp_path, uninterrupted,
                                                          monkeypatch, capsys) -> None:
    mirror = tmp_path / "volume" / "ckpt"
    _resume_ends_like_the_uninterrupted_run(tiny_encoded, tmp_path, str(mirror), uninterrupted, monkeypatch,
                                            capsys, lambda: _state(mirror / "last.pt"))
    assert sorted(p.name for p in mirror.iterdir()) == ["last.pt", "model.pt", "resume.json"]


@pytest.mark.integration
def test_checkpoint_uri_s3_resumes_a_fresh_run_folder(tiny_encoded, tmp_path, uninterrupted, moto,
                                                      monkeypatch, capsys) -> None:
    aws_test_env(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)      # what the --s3-secret's optional key sets
    bucket = moto.new_bucket()

    def read_last() -> dict:
        path = tmp_path / "downloaded-last.pt"
        moto.client().download_file(bucket, "ckpt/run-1/last.pt", str(path))
        return _state(path)
    _resume_ends_like_the_uninterrupted_run(tiny_encoded, tmp_path, f"s3://{bucket}/ckpt/run-1", uninterrupted,
                                            monkeypatch, capsys, read_last)
    keys = sorted(o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["ckpt/run-1/last.pt", "ckpt/run-1/model.pt", "ckpt/run-1/resume.json"]


def test_checkpoint_uri_of_other_settings_starts_over_and_is_replaced(tiny_encoded, tmp_path, capsys) -> None:
    mirror = tmp_path / "ckpt"
    one = FAST + ["train.epochs=1", f"train.checkpoint_uri={mirror}"]
    stages.train_step(tiny_encoded, tmp_path / "a", load_config(None, one))
    assert _state(mirror / "last.pt")["state"]["epoch"] == 1
    capsys.readouterr()
    stages.train_step(tiny_encoded, tmp_path / "b", load_config(None, one + ["train.lr=5e-4"]))
    err = capsys.readouterr().err
    assert "resume files copied" in err and "other settings or data; starting over" in err
    assert _state(mirror / "last.pt")["config"]["train"]["lr"] == 5e-4


def test_checkpoint_sync_without_uri_is_none_and_upload_failures_do_not_stop_training(tmp_path, capsys) -> None:
    assert stages.checkpoint_sync(load_config(None, FAST), tmp_path) is None
    cfg = load_config(None, FAST + [f"train.checkpoint_uri={tmp_path / 'ckpt'}"])
    hook = stages.checkpoint_sync(cfg, tmp_path / "run")           # the run folder has no files yet
    hook(1, True)
    assert "epoch 1: checkpoint not mirrored" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"last")
    (tmp_path / "run" / "model.pt").write_bytes(b"best")
    hook(2, False)                                                 # model.pt of epoch 1 still owed
    assert (tmp_path / "ckpt" / "model.pt").read_bytes() == b"best"
    assert (tmp_path / "ckpt" / "last.pt").read_bytes() == b"last"
