"""Cluster options of the prvr pipeline, applied when it is compiled (kfp + kfp-kubernetes).

``prvr pipeline compile [options]`` (prvr/cli/pipeline.py) parses its arguments with
:func:`parse`; ``pipelines/prvr_pipeline.py`` applies the result to each task with
:func:`apply`. What each option emits into the compiled YAML:

==========================================  ===========  =========================================
option                                      tasks        compiled YAML
==========================================  ===========  =========================================
``--pvc NAME:MOUNT_PATH`` (repeatable)      all          platforms.kubernetes ... pvcMount
``--s3-secret NAME``                        all          ... secretAsEnv (AWS_ACCESS_KEY_ID,
                                                         AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL
                                                         optional)
``--resources TASK=CPU_REQ,CPU_LIM,``       TASK         container.resources (an empty field is
``MEM_REQ,MEM_LIM`` (repeatable)                         left unset)
``--gpus N`` (default 1)                    train        container.resources.accelerator
                                                         (nvidia.com/gpu, N); N=0: none at all
``--train-image IMAGE``                     train        container.image (default: the CUDA tag
                                                         ``<image>-cu128``; with --gpus 0, the
                                                         component image)
``--node-selector KEY=VALUE`` (repeatable)  train        ... nodeSelector.labels
``--toleration KEY=VALUE:EFFECT`` (rep.)    train        ... tolerations (operator Equal;
                                                         ``KEY:EFFECT`` = operator Exists)
``--train-retries N`` (default 2),          train        root.dag.tasks.train.retryPolicy
``--retry-backoff DURATION`` (default 60s)
``--pushgateway URL``                       all          container.env PRVR_PUSHGATEWAY (stages push
                                                         their run metrics and last-success time)
==========================================  ===========  =========================================

Environment defaults (read at compile time): ``PRVR_IMAGE`` (every component's image,
components/common.py), ``PRVR_TRAIN_IMAGE`` (the train image) and ``PRVR_TRAIN_GPUS``
(``--gpus``). kfp.local (tests, ``prvr demo``) ignores the Kubernetes settings and the
images; it honours the retry policy.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

from kfp import kubernetes
from kfp.dsl import PipelineTask

from components.common import CUDA_IMAGE, DEFAULT_IMAGE, GPU_RESOURCE, IMAGE
from prvr.monitoring import GATEWAY_ENV

__all__ = ["TASKS", "S3_SECRET_KEYS", "Resources", "ClusterOptions", "parse", "apply", "is_default",
           "DEFAULT_RETRIES", "DEFAULT_BACKOFF"]

TASKS = ("preprocess", "train", "evaluate", "register")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")      # secret key = env variable name
S3_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL",)                             # boto3 reads it (MinIO, Ceph...)
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF = "60s"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")               # DNS-1123 (PVC, Secret)
_DURATION = re.compile(r"^[0-9]+(\.[0-9]+)?s$")
_GATEWAY = re.compile(r"^(https?://)?[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$")   # host[:port] or a URL


@dataclass(frozen=True)
class Resources:
    """CPU and memory requests and limits of one task; "" leaves one unset."""
    cpu_request: str = ""
    cpu_limit: str = ""
    memory_request: str = ""
    memory_limit: str = ""


@dataclass(frozen=True)
class ClusterOptions:
    """Everything compile-time about where and how the tasks run. The defaults are the
    committed pipelines/prvr.yaml: one GPU and the CUDA image for train, two retries."""
    pvcs: tuple[tuple[str, str], ...] = ()                    # (claim name, mount path)
    s3_secret: str | None = None
    gpus: int = 1
    train_image: str | None = None                            # None: CUDA_IMAGE, or IMAGE when gpus == 0
    node_selectors: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[str, str, str], ...] = ()        # (key, value or "", effect)
    resources: Mapping[str, Resources] = field(default_factory=dict)
    train_retries: int = DEFAULT_RETRIES
    retry_backoff: str = DEFAULT_BACKOFF
    pushgateway: str | None = None                            # PRVR_PUSHGATEWAY of every task

    @property
    def image_for_train(self) -> str:
        return self.train_image or (CUDA_IMAGE if self.gpus > 0 else IMAGE)


# ----------------------------------------------------------------------------- parsing
def _pvc(text: str) -> tuple[str, str]:
    name, sep, path = text.partition(":")
    if not sep or not _NAME.match(name) or not path.startswith("/"):
        raise ValueError(f"--pvc {text!r}: expected NAME:MOUNT_PATH (a claim name, an absolute path)")
    return name, path


def _key_value(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{what} {text!r}: expected KEY=VALUE")
    return key, value


def _toleration(text: str) -> tuple[str, str, str]:
    head, sep, effect = text.rpartition(":")
    if not sep or effect not in EFFECTS:
        raise ValueError(f"--toleration {text!r}: expected KEY=VALUE:EFFECT or KEY:EFFECT, EFFECT one of "
                         + ", ".join(EFFECTS))
    key, _, value = head.partition("=")
    if not key:
        raise ValueError(f"--toleration {text!r}: the taint key is empty")
    return key, value, effect


def _resources(text: str) -> tuple[str, Resources]:
    task, sep, values = text.partition("=")
    fields = values.split(",")
    if not sep or task not in TASKS or len(fields) != 4 or not any(fields):
        raise ValueError(f"--resources {text!r}: expected TASK=CPU_REQUEST,CPU_LIMIT,MEMORY_REQUEST,"
                         f"MEMORY_LIMIT with TASK one of {', '.join(TASKS)} (e.g. train=4,8,16Gi,32Gi; "
                         "an empty field is left unset)")
    return task, Resources(*(f.strip() for f in fields))


def _count(value: int | str | None, default: int, what: str) -> int:
    number = default if value in (None, "") else int(value)
    if number < 0:
        raise ValueError(f"{what} must be >= 0, got {number}")
    return number


def parse(pvc: list[str] = (), s3_secret: str | None = None, gpus: int | None = None,
          train_image: str | None = None, node_selector: list[str] = (), toleration: list[str] = (),
          resources: list[str] = (), train_retries: int | None = None, retry_backoff: str | None = None,
          pushgateway: str | None = None, environ: Mapping[str, str] = os.environ) -> ClusterOptions:
    """Options from command-line strings; None takes the environment's or the built-in default.
    Raises ValueError naming the option and the value."""
    if s3_secret is not None and not _NAME.match(s3_secret):
        raise ValueError(f"--s3-secret {s3_secret!r}: not a Kubernetes Secret name")
    backoff = retry_backoff or DEFAULT_BACKOFF
    if not _DURATION.match(backoff):
        raise ValueError(f"--retry-backoff {backoff!r}: expected seconds like 60s")
    if pushgateway is not None and not _GATEWAY.match(pushgateway):
        raise ValueError(f"--pushgateway {pushgateway!r}: expected HOST:PORT or http(s)://HOST:PORT")
    by_task = dict(_resources(r) for r in resources)
    if len(by_task) != len(resources):
        raise ValueError("--resources: give each task once")
    return ClusterOptions(
        pvcs=tuple(_pvc(p) for p in pvc), s3_secret=s3_secret,
        gpus=_count(gpus, _count(environ.get("PRVR_TRAIN_GPUS"), 1, "PRVR_TRAIN_GPUS"), "--gpus"),
        train_image=train_image or environ.get("PRVR_TRAIN_IMAGE") or None,
        node_selectors=tuple(_key_value(s, "--node-selector") for s in node_selector),
        tolerations=tuple(_toleration(t) for t in toleration), resources=by_task,
        train_retries=_count(train_retries, DEFAULT_RETRIES, "--train-retries"), retry_backoff=backoff,
        pushgateway=pushgateway)


def is_default(opts: ClusterOptions) -> bool:
    """True when these options and the images compile the committed pipelines/prvr.yaml."""
    return opts == ClusterOptions() and IMAGE == DEFAULT_IMAGE


# ----------------------------------------------------------------------------- applying
def _apply_everywhere(task: PipelineTask, name: str, opts: ClusterOptions) -> None:
    for claim, path in opts.pvcs:
        kubernetes.mount_pvc(task, pvc_name=claim, mount_path=path)
    if opts.s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=opts.s3_secret,
                                     secret_key_to_env={k: k for k in S3_SECRET_KEYS})
        kubernetes.use_secret_as_env(task, secret_name=opts.s3_secret,
                                     secret_key_to_env={k: k for k in S3_OPTIONAL_KEYS}, optional=True)
    if opts.pushgateway:
        task.set_env_variable(GATEWAY_ENV, opts.pushgateway)
    res = opts.resources.get(name)
    if res:
        for setter, value in ((task.set_cpu_request, res.cpu_request), (task.set_cpu_limit, res.cpu_limit),
                              (task.set_memory_request, res.memory_request),
                              (task.set_memory_limit, res.memory_limit)):
            if value:
                setter(value)


def _apply_train(task: PipelineTask, opts: ClusterOptions) -> None:
    task.set_container_image(opts.image_for_train)
    if opts.gpus > 0:        # 0: no accelerator block at all (a count of 0 still asks for the type)
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(opts.gpus)
    for key, value in opts.node_selectors:
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for key, value, effect in opts.tolerations:
        kubernetes.add_toleration(task, key=key, operator="Equal" if value else "Exists",
                                  value=value or None, effect=effect)
    if opts.train_retries > 0:
        task.set_retry(num_retries=opts.train_retries, backoff_duration=opts.retry_backoff)


def apply(task: PipelineTask, name: str, opts: ClusterOptions) -> PipelineTask:
    """Set the task's display name and its share of the options (train gets the GPU ones)."""
    task.set_display_name(name)
    _apply_everywhere(task, name, opts)
    if name == "train":
        _apply_train(task, opts)
    return task
