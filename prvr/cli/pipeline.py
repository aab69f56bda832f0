"""`prvr pipeline compile`: the Kubeflow pipeline YAML, with the cluster options of
pipelines/options.py (PVCs, S3 secret, GPUs, node selector, tolerations, resources, retries).

A thin shell: the pipeline and its options live in the source checkout's pipelines/ folder,
loaded by path (prvr never imports pipelines/ at module level)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from prvr.errors import PrvrError

CHECKOUT = Path(__file__).resolve().parents[2]
PIPELINE_FILE = CHECKOUT / "pipelines" / "prvr_pipeline.py"
COMMITTED_YAML = CHECKOUT / "pipelines" / "prvr.yaml"


def load_pipeline_module() -> ModuleType:
    """pipelines/prvr_pipeline.py of the source checkout this package runs from."""
    if not PIPELINE_FILE.is_file():
        raise PrvrError(f"compiling needs the source checkout ({PIPELINE_FILE} is missing)")
    root = str(CHECKOUT)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.prvr_pipeline")


def _cmd_compile(args: argparse.Namespace) -> int:
    module = load_pipeline_module()
    try:
        opts = module.options.parse(
            pvc=args.pvc, s3_secret=args.s3_secret, gpus=args.gpus, train_image=args.train_image,
            node_selector=args.node_selector, toleration=args.toleration, resources=args.resources,
            train_retries=args.train_retries, retry_backoff=args.retry_backoff, pushgateway=args.pushgateway)
    except ValueError as exc:
        raise PrvrError(str(exc)) from None
    out = Path(args.out)
    if out.resolve() == COMMITTED_YAML and not module.options.is_default(opts):
        raise PrvrError(f"{COMMITTED_YAML} is the committed default compile; write these options "
                        "(or PRVR_IMAGE / PRVR_TRAIN_IMAGE / PRVR_TRAIN_GPUS) elsewhere with --out FILE")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(module.compile_pipeline(out, opts))
    return 0


def register_cli(subparsers: Any) -> None:
    """`prvr pipeline compile [--out FILE] [options]`."""
    parser = subparsers.add_parser("pipeline", help="compile the Kubeflow pipeline for a cluster")
    sub = parser.add_subparsers(dest="pipeline_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("compile", help="write the pipeline spec YAML with cluster options",
                       description="Compile pipelines/prvr_pipeline.py. Without options this is the committed "
                                   "pipelines/prvr.yaml; see docs/pipeline.md for what each option emits.")
    p.add_argument("--out", default=str(COMMITTED_YAML),
                   help="output YAML (default: pipelines/prvr.yaml, only for the default options)")
    p.add_argument("--pvc", action="append", default=[], metavar="NAME:MOUNT_PATH",
                   help="mount this PersistentVolumeClaim in every task (repeatable)")
    p.add_argument("--s3-secret", default=None, metavar="NAME",
                   help="Secret whose AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and optional "
                        "AWS_ENDPOINT_URL) keys become every task's environment")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="nvidia.com/gpu limit of train (default: PRVR_TRAIN_GPUS, else 1; 0 = none)")
    p.add_argument("--train-image", default=None, metavar="IMAGE",
                   help="train's image (default: PRVR_TRAIN_IMAGE, else the CUDA tag <image>-cu128; "
                        "with --gpus 0 the component image)")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="node label the train pod needs (repeatable)")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY=VALUE:EFFECT",
                   help="taint the train pod tolerates; KEY:EFFECT tolerates any value (repeatable)")
    p.add_argument("--resources", action="append", default=[],
                   metavar="TASK=CPU_REQ,CPU_LIM,MEM_REQ,MEM_LIM",
                   help="CPU/memory requests and limits of one task, e.g. train=4,8,16Gi,32Gi "
                        "(an empty field is left unset; repeatable)")
    p.add_argument("--train-retries", type=int, default=None, metavar="N",
                   help="retries of a failed train pod (default: 2; 0 = none)")
    p.add_argument("--retry-backoff", default=None, metavar="DURATION",
                   help="wait before the first retry, doubling after (default: 60s)")
    p.add_argument("--pushgateway", default=None, metavar="URL",
                   help="Prometheus Pushgateway (HOST:PORT or URL) every task pushes its run metrics to "
                        "(PRVR_PUSHGATEWAY; deploy/prometheus/alerts.yaml watches the last success)")
    p.set_defaults(func=_cmd_compile)
