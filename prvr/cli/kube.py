"""`prvr kube pytorchjob`: a Kubeflow PyTorchJob for data-parallel training."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from prvr.kube import pytorchjob_spec

def _cmd_pytorchjob(args: argparse.Namespace) -> int:
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    spec = pytorchjob_spec(args.image, args.nodes, args.procs_per_node, train_args,
                           gpus_per_proc=args.gpus_per_proc, name=args.name, namespace=args.namespace)
    text = yaml.safe_dump(spec, sort_keys=False)
    if args.out in (None, "-"):
        sys.stdout.write(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(args.out)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`prvr kube pytorchjob ... -- <train args>`."""
    parser = subparsers.add_parser("kube", help="generate Kubernetes specs for distributed training")
    sub = parser.add_subparsers(dest="kube_command", metavar="KIND")
    sub.required = True
    p = sub.add_parser("pytorchjob", help="write a Kubeflow PyTorchJob YAML running "
                                                      "torchrun -m prvr.cli train-worker")
    p.add_argument("--image", required=True, help="container image with the prvr package installed")
    p.add_argument("--nodes", type=int, default=1, help="pods (Master + nodes-1 Workers)")
    p.add_argument("--procs-per-node", type=int, default=1, help="torchrun processes per pod")
    p.add_argument("--gpus-per-proc", type=int, default=1, help="GPUs per process (0 = CPU only)")
    p.add_argument("--name", default="prvr-train", help="PyTorchJob name (DNS-1123 label)")
    p.add_argument("--namespace", default="default", help="Kubernetes namespace")
    p.add_argument("--out", default="-", help="output YAML file ('-' = stdout)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="arguments for `prvr train-worker` (--data, --out, --params, --set ...), after '--'")
    p.set_defaults(func=_cmd_pytorchjob)
