"""Kubeflow Training Operator PyTorchJob spec for multi-node training.

The operator (kubeflow.org/v1) starts one Master pod and ``nodes - 1`` Worker pods
and injects MASTER_ADDR, MASTER_PORT, WORLD_SIZE (pods) and RANK (pod index:
master 0, workers 1..) into the container named "pytorch". Each pod runs torchrun
with explicit ``--nnodes/--nproc-per-node`` and takes its node rank and rendezvous
address from those variables through Kubernetes' ``$(VAR)`` expansion, so the spec
works with operator versions that do and do not set the PET_* variables.

Usage::

    spec = pytorchjob_spec("registry/prvr:1.0", nodes=2, procs_per_node=4,
                           train_args=["--params", "params.yaml"])
    yaml.safe_dump(spec)
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["pytorchjob_spec", "CONTAINER_NAME", "DEFAULT_PORT"]

CONTAINER_NAME = "pytorch"       # the operator looks up this container name
PORT_NAME = "pytorchjob-port"    # ... and this port name for MASTER_PORT
DEFAULT_PORT = 23456
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def pytorchjob_spec(image: str, nodes: int, procs_per_node: int, train_args: list[str],
                    gpus_per_proc: int = 1, name: str = "prvr-train", namespace: str = "default",
                    shm_size: str = "8Gi") -> dict[str, Any]:
    """A PyTorchJob dict: Master x1 + Worker x(nodes-1), each running torchrun over
    ``prvr train-worker`` (one training process per rank) with ``train_args``."""
    if nodes < 1 or procs_per_node < 1:
        raise ValueError(f"nodes ({nodes}) and procs_per_node ({procs_per_node}) must be >= 1")
    if gpus_per_proc < 0:
        raise ValueError(f"gpus_per_proc must be >= 0, got {gpus_per_proc}")
    if not image:
        raise ValueError("an image is required")
    for label, value in (("name", name), ("namespace", namespace)):
        if len(value) > 63 or not _DNS1123.match(value):
            raise ValueError(f"{label} {value!r} must be a DNS-1123 label (lowercase letters, digits, '-')")
    command = [
        "torchrun", f"--nnodes={nodes}", f"--nproc-per-node={procs_per_node}",
        "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
        "-m", "prvr.cli", "train-worker", *train_args,
    ]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "ports": [{"name": PORT_NAME, "containerPort": DEFAULT_PORT}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        # DataLoader workers share tensors through /dev/shm; the container default (64 MiB) is too small.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if gpus_per_proc:
        gpus = gpus_per_proc * procs_per_node
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "metadata": {"labels": {"app": "prvr", "job": name}},
                "spec": {
                    "containers": [copy.deepcopy(container)],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}],
                },
            },
        }

    replicas = {"Master": replica(1)}
    if nodes > 1:
        replicas["Worker"] = replica(nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "prvr"}},
        "spec": {"pytorchReplicaSpecs": replicas},
    }
