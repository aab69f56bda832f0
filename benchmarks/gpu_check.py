"""GPU check on a CUDA machine: training with AMP, evaluation, scoring and NCCL data-parallel.

Run by benchmarks/gpu_check.sh. On the tvr-like preset (3072-d video features):
  1. 2 epochs of training with train.device=cuda and train.amp=true (s per epoch, videos/s);
  2. evaluation of the best checkpoint on the test split on the GPU (seconds, SumR);
  3. scoring on the GPU: every query of a batch of 50 against V synthetic videos of 32 clips
     (prvr.model.score, the full matrix), ms per query, at 2,179 / 100,000 videos;
  4. torchrun with NCCL, one process per visible GPU, 1 epoch: it must finish.
Writes results/gpu-check.json through benchmarks/results.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import results as result_files
from prvr.config import load_config
from prvr.evaluate import evaluate
from prvr.model import score
from prvr.train import train

HERE = Path(__file__).resolve().parent


def _prvr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "prvr.cli", *args], check=True)


def scoring_ms(videos: int, clips: int = 32, hidden: int = 384, batch: int = 50, reps: int = 5) -> float:
    """Median ms per query of the full fused-score matrix of `batch` queries on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    c = torch.randn(videos, clips, hidden, device="cuda", generator=gen, dtype=torch.float16)
    a = torch.randn(videos, clips, hidden, device="cuda", generator=gen, dtype=torch.float16)
    q = torch.randn(batch, hidden, device="cuda", generator=gen)
    score(q, c, a, 0.7)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        score(q, c, a, 0.7)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000 / batch)
    return sorted(times)[len(times) // 2]


def torchrun_ok(data: Path, out: Path, sets: list[str]) -> dict[str, float | int]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    n = torch.cuda.device_count()
    t0 = time.perf_counter()
    res = subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(n), "-m", "prvr.cli",
                          "train-worker", "--data", str(data), "--out", str(out), "--no-progress",
                          *[f"--set={s}" for s in sets + ["train.epochs=1"]]],
                         capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
    return {"processes": n, "returncode": res.returncode, "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/prvr_gpu_check")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    data = work / "tvr-like"
    if not (data / "synth.json").is_file():
        _prvr("synth", "--out", str(work), "--collection", "tvr-like", "--preset", "tvr-like")
        _prvr("encode-text", "--data", str(data))
    sets = ["train.device=cuda", "train.amp=true", f"train.epochs={args.epochs}"]
    cfg = load_config(None, sets)
    t0 = time.perf_counter()
    summary = train(cfg, data, work / "run", resume=False, progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = evaluate(cfg, data, work / "run" / "model.pt", "test")
    eval_s = time.perf_counter() - t0
    figures = {"gpu": torch.cuda.get_device_name(0), "train_s": train_s,
               "videos_per_s": [h["videos_per_s"] for h in summary["history"]],
               "best_val_sumr": summary["best_sumr"], "eval_s": eval_s,
               "test_sumr": metrics["fused"]["sumr"],
               "scoring_ms_per_query": {v: scoring_ms(v) for v in (2179, 100000)},
               "torchrun_nccl": torchrun_ok(data, work / "ddp", sets)}
    rows = [f"| training, {args.epochs} epochs, AMP | {train_s:.0f} s; "
            f"{max(figures['videos_per_s']):.0f} videos/s; best val SumR {summary['best_sumr']:.1f} |",
            f"| evaluation, test split | {eval_s:.1f} s; SumR {metrics['fused']['sumr']:.1f} |"]
    rows += [f"| full score matrix, batch 50, {v:,} videos | {ms:.3f} ms per query |"
             for v, ms in figures["scoring_ms_per_query"].items()]
    rows.append(f"| torchrun NCCL, {figures['torchrun_nccl']['processes']} process(es), 1 epoch | "
                f"exit {figures['torchrun_nccl']['returncode']} |")
    markdown = f"**GPU check ({figures['gpu']})**\n\n| what | figure |\n|---|---|\n" + "\n".join(rows)
    print(markdown)
    print(json.dumps(figures, indent=2))
    print(f"wrote {result_files.write('gpu-check', figures, markdown)}")
    return 0 if figures["torchrun_nccl"]["returncode"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
