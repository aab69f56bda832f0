"""Shared settings of the prvr Kubeflow components, fixed when the pipeline is compiled.

IMAGE is the container every component runs in: the ``components`` target of the
project's Dockerfile, which holds the installed ``prvr`` package (lightweight
components ship only their function's source; everything they import must be in
the image)::

    docker build --target components -t ghcr.io/prvr/prvr:0.1.0 .
    docker push ghcr.io/prvr/prvr:0.1.0

Use another image by setting PRVR_IMAGE when compiling, e.g.
``PRVR_IMAGE=registry.example.com/prvr:0.1.0 prvr pipeline compile --out prvr.yaml``.
The train task runs in CUDA_IMAGE, IMAGE's CUDA tag (``-cu128``: the Dockerfile's
``components-cuda`` target) unless told otherwise (``--train-image`` / PRVR_TRAIN_IMAGE);
that and the other cluster settings (GPUs, volumes, secrets, retries) are compile options:
pipelines/options.py.
"""
from __future__ import annotations

import os

from prvr.config import load_config
from prvr.stages import pipeline_params

DEFAULT_IMAGE = "ghcr.io/prvr/prvr:0.1.0"
IMAGE = os.environ.get("PRVR_IMAGE", DEFAULT_IMAGE)
CUDA_IMAGE = f"{IMAGE}-cu128"
GPU_RESOURCE = "nvidia.com/gpu"

# params.yaml as the pipeline's defaults: the compiled YAML carries this snapshot, so a
# run does not depend on a params.yaml inside the image.
# Pipeline parameters cannot hold null: null settings are left out and take the typed
# config's default (None for every optional field) when a stage rebuilds the config.
DEFAULT_CONFIG = load_config()
DEFAULT_PARAMS: dict = pipeline_params(DEFAULT_CONFIG)
