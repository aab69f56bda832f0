"""Data-parallel training under torchrun (gloo, CPU): every rank takes every step, ranks keep
identical weights, and the step is the one-process step of the same global batch.

One 3-rank torchrun run and one plain single-process run of tests/helpers/ddp_worker.py,
which drives the real prvr.train code and records what each rank saw and held."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

WORKER = Path(__file__).parent / "helpers" / "ddp_worker.py"
# dropout off: dropout masks are drawn per rank, the one difference by design (docs/architecture.md).
# 80 training videos in batches of 26: 26, 26, 26, then 2 videos for 3 ranks.
SETTINGS = ["model.hidden_size=64", "model.num_heads=2", "model.cluster_num=8", "model.map_size=16",
            "model.max_ctx_len=32", "model.dropout=0.0", "train.batch_size=26", "train.epochs=1",
            "train.lr=1e-3"]
RANKS = 3


def _run_worker(data: Path, out: Path, nproc: int) -> Path:
    probe = out / "probe"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(WORKER), str(data), str(out), str(probe), *SETTINGS]
    if nproc > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        assert torchrun, "torchrun is installed with torch"
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return probe


@pytest.fixture(scope="module")
def runs(tiny_encoded: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    probes = {n: _run_worker(tiny_encoded, root / f"p{n}", n) for n in (1, RANKS)}
    return {n: {"steps": [json.loads((p / f"rank{r}.json").read_text()) for r in range(n)],
                "tensors": torch.load(p / "tensors0.pt", weights_only=True)}
            for n, p in probes.items()}


def _assert_grads_close(got: dict, want: dict) -> None:
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_every_rank_takes_every_step_including_a_batch_smaller_than_the_ranks(runs):
    steps = runs[RANKS]["steps"]
    assert [[s["videos"] for s in rank] for rank in steps] == [[26, 26, 26, 2]] * RANKS
    assert steps[0][-1]["videos"] < RANKS          # the case that used to hang in DDP


def test_ranks_hold_identical_weights_after_every_step(runs):
    digests = [[s["digest"] for s in rank] for rank in runs[RANKS]["steps"]]
    assert digests[1] == digests[0] and digests[2] == digests[0]
    assert len(set(digests[0])) == len(digests[0]), "some step left the weights unchanged"


def test_three_ranks_take_the_one_process_step(runs):
    one, three = runs[1]["tensors"], runs[RANKS]["tensors"]
    # a batch of 2 videos: shares 1, 1 and none (that rank's stand-in must add nothing)
    assert three["two_videos"]["loss"] == pytest.approx(one["two_videos"]["loss"], rel=1e-6)
    _assert_grads_close(three["two_videos"]["grads"], one["two_videos"]["grads"])
    # the loop's first batch of 26 (shares 9, 9, 8), from the same initial weights
    first = [s[0]["loss"] for s in (runs[1]["steps"][0], runs[RANKS]["steps"][0])]
    assert first[1] == pytest.approx(first[0], rel=1e-6)
    _assert_grads_close(three["first_grads"], one["first_grads"])
    for name, w in one["weights"][0].items():
        torch.testing.assert_close(three["weights"][0][name], w, rtol=0, atol=1e-5)
