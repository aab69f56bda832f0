"""Where one training batch goes: prvr's train_batch split into its parts, for this checkout
and (--before) another checkout of prvr, side by side in one run.

The data and weights are official_compare.py's (synthetic TVR-like views, 3072-d video,
768-d text, 128 videos per batch with all their queries), each checkout's own generator
(benchmarks/official_compare.py in that checkout); each checkout runs in its own fresh
process with one torch thread, one after the other. A part's time is
the wall time inside that function, summed over a batch (nested parts are included in
their callers: k-medoids and the span distances are inside "encode videos").

    git worktree add /tmp/prvr-before <commit>
    python benchmarks/train_profile.py --before /tmp/prvr-before --name train-profile
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
PARTS = {  # label -> (module, attribute path)
    "encode queries": ("prvr.model", "PRVRModel.encode_queries"),
    "encode videos": ("prvr.model", "PRVRModel.encode_videos"),
    "span distances": ("prvr.model", "PRVRModel.span_distances"),
    "k-medoids": ("prvr.model", "kmedoids"),
    "key clip attention": ("prvr.model", "PRVRModel.key_clip_attention"),
    "training scores": ("prvr.train", "training_scores"),
    "loss": ("prvr.train", "compute_loss"),
    "backward": ("torch", "Tensor.backward"),
}


def _instrument(spent: dict[str, float]) -> None:
    """Wrap each part so its wall time accumulates into `spent`."""
    import importlib

    for label, (module, path) in PARTS.items():
        owner = importlib.import_module(module)
        *outer, name = path.split(".")
        for attr in outer:
            owner = getattr(owner, attr)
        inner = getattr(owner, name)

        def wrapped(*a, _inner=inner, _label=label, **kw):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                spent[_label] += time.perf_counter() - t0

        setattr(owner, name, wrapped)


def worker(out: Path, batches: int) -> None:
    """In this process's prvr (PYTHONPATH): `batches` batches, each part's seconds per batch."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path.cwd() / "benchmarks"))      # the profiled checkout's own copy
    import official_compare as oc

    args = SimpleNamespace(seed=2018, queries_per_video=oc.PRESETS["tvr-like"].queries[1], batch_size=128,
                           train_batches=batches, official=None)
    data = oc.make_split(128 * batches, 0, args)
    spent = {label: 0.0 for label in PARTS}
    _instrument(spent)
    rows, train_batch = [], oc.train_batch

    def timed_batch(*a, **kw):
        for label in spent:
            spent[label] = 0.0
        t0 = time.perf_counter()
        result = train_batch(*a, **kw)
        rows.append({"batch": time.perf_counter() - t0, **spent})
        return result

    oc.train_batch = timed_batch
    oc.train_prvr(data, args)
    import prvr

    out.write_text(json.dumps({"rows": rows, "prvr": str(Path(prvr.__file__).resolve().parent)}))


def commit_of(tree: Path) -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def _part(median: dict[str, float], label: str) -> float:
    if label == "clip and frame encoders":     # what encode videos does besides the named parts
        return median["encode videos"] - median["span distances"] - median["k-medoids"] - median["key clip attention"]
    return median[label]


def markdown(figures: dict) -> str:
    sides = list(figures["sides"])
    head = ["| part of one 128-video batch, s (median of the timed batches) | "
            + " | ".join(f"{s} (`{figures['sides'][s]['commit'][:10]}`)" for s in sides) + " |",
            "|---|" + "---|" * len(sides)]
    rows = []
    for label in ["batch", *PARTS, "clip and frame encoders"]:
        name = "whole batch (train_batch)" if label == "batch" else label
        rows.append(f"| {name} | " + " | ".join(f"{_part(figures['sides'][s]['median_s'], label):.3f}"
                                               for s in sides) + " |")
    note = ("\n\nOne torch thread per process; warm-up batch left out. Nested parts count in their callers "
            "(span distances and k-medoids are inside encode videos).")
    return "\n".join(head + rows) + note


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="another prvr checkout to profile side by side (e.g. a git worktree)")
    p.add_argument("--batches", type=int, default=4, help="batches per side, the first one a warm-up")
    p.add_argument("--name", help="write results/NAME.json through benchmarks/results.py")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batches < 2:
        p.error("--batches must be >= 2 (the first is a warm-up)")
    if args.worker:
        worker(Path(args.worker), args.batches)
        return 0
    sys.path.insert(0, str(HERE))
    import results

    started = results.meta(argv)
    trees = {"this checkout": HERE.parent}
    if args.before:
        before = Path(args.before).resolve()
        if not (before / "prvr" / "model.py").is_file():
            p.error(f"--before {before}: no prvr/model.py there")
        trees = {"before": before, **trees}
    sides = {}
    with tempfile.TemporaryDirectory(prefix="prvr-train-profile-") as tmp:
        for label, tree in trees.items():
            out = Path(tmp) / f"{len(sides)}.json"
            env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            subprocess.run([sys.executable, __file__, "--worker", str(out), "--batches", str(args.batches)],
                           check=True, env=env, cwd=tree)
            got = json.loads(out.read_text())
            timed = got["rows"][1:]
            sides[label] = {"tree": str(tree), "commit": commit_of(tree), "imported_prvr": got["prvr"],
                            "batches": got["rows"],
                            "median_s": {k: statistics.median(r[k] for r in timed) for k in timed[0]}}
    figures = {"sides": sides, "videos_per_batch": 128, "threads": 1}
    md = markdown(figures)
    print(md)
    if args.name:
        print(results.write(args.name, figures, md, argv, started=started))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
