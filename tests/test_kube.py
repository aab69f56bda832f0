"""PyTorchJob spec: generated YAML loads and carries what the Training Operator needs."""
from __future__ import annotations

import argparse

import pytest
import yaml

from prvr.cli.kube import register_cli
from prvr.kube import pytorchjob_spec


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prvr")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_a_valid_pytorchjob(tmp_path):
    out = tmp_path / "job.yaml"
    rc = run_cli(["kube", "pytorchjob", "--image", "ghcr.io/org/prvr:1.0", "--nodes", "3",
                  "--procs-per-node", "4", "--name", "prvr-tvr", "--namespace", "ml", "--out", str(out),
                  "--", "--params", "params.yaml", "--set", "train.lr=5e-5"])
    assert rc == 0
    job = yaml.safe_load(out.read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"] == {"name": "prvr-tvr", "namespace": "ml", "labels": {"app": "prvr"}}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    for spec in replicas.values():
        assert spec["restartPolicy"] == "OnFailure"
        [c] = spec["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and c["image"] == "ghcr.io/org/prvr:1.0"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
        cmd = c["command"]
        assert cmd[:3] == ["torchrun", "--nnodes=3", "--nproc-per-node=4"]
        assert "--node-rank=$(RANK)" in cmd and "--master-addr=$(MASTER_ADDR)" in cmd
        i = cmd.index("-m")
        assert cmd[i + 1:] == ["prvr.cli", "train-worker", "--params", "params.yaml", "--set", "train.lr=5e-5"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_single_node_cpu():
    job = pytorchjob_spec("img", nodes=1, procs_per_node=2, train_args=[], gpus_per_proc=0)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master"]
    [c] = replicas["Master"]["template"]["spec"]["containers"]
    assert "resources" not in c and c["command"][-3:] == ["-m", "prvr.cli", "train-worker"]
    assert yaml.safe_load(yaml.safe_dump(job)) == job


def test_gpus_per_proc_multiplies():
    job = pytorchjob_spec("img", nodes=2, procs_per_node=4, train_args=["--x"], gpus_per_proc=2)
    c = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8


@pytest.mark.parametrize("kwargs,match", [
    ({"nodes": 0}, "nodes"), ({"procs_per_node": 0}, "procs_per_node"), ({"gpus_per_proc": -1}, "gpus"),
    ({"name": "Bad_Name"}, "DNS-1123"), ({"image": ""}, "image"),
])
def test_rejects_bad_arguments(kwargs, match):
    args = {"image": "img", "nodes": 1, "procs_per_node": 1, "train_args": [], **kwargs}
    with pytest.raises(ValueError, match=match):
        pytorchjob_spec(**args)


def test_cli_stdout(capsys):
    assert run_cli(["kube", "pytorchjob", "--image", "img"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
