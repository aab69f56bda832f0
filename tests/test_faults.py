"""Faults on real processes and a real file system: a SIGKILL at chosen moments of
`prvr index build`, and a disk that fills up between two training epochs.

A kill at a chosen moment: the build runs in a child Python whose audit hook
(`sys.addaudithook`) SIGKILLs its own process when the build opens, swaps or cleans up a
file of its temp folder, so each moment is hit every time rather than by luck of timing.
A full disk: a tmpfs of a few MB (needs root to mount; skipped, with the reason, without).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prvr.search.build as build_mod
from prvr.checkpoint import read_checkpoint, save_checkpoint
from prvr.config import load_config
from prvr.encoding import QueryEncoder
from prvr.errors import CheckpointError
from prvr.indexing import build_index
from prvr.search import VideoIndex, make_engine
from prvr.train import train

pytestmark = pytest.mark.integration

QUERIES = ["a person walks", "someone opens a door", "a dog runs"]

# Runs `prvr <args>` and SIGKILLs itself at the first audit event `event` whose arguments
# mention `needle` (and, for "open", a write mode). argv: event needle exchange(0|1) args...
KILLER = r"""
import os, signal, sys
event, needle, exchange = sys.argv[1:4]

def hook(name, args):
    if name != event or needle not in repr(args):
        return
    if name == "open" and "w" not in str(args[1]):
        return
    os.kill(os.getpid(), signal.SIGKILL)

if exchange == "0":                 # the two-rename swap of systems without renameat2
    import prvr.checkpoint
    prvr.checkpoint._exchange = lambda a, b: False
sys.addaudithook(hook)
from prvr.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _build_killed(event: str, needle: str, args: list[str], exchange: bool = True) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, event, needle, "1" if exchange else "0", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"never reached {event} {needle}: {proc.stderr[-2000:]}"


def _answers(index: VideoIndex, queries: torch.Tensor) -> tuple[np.ndarray, ...]:
    res = make_engine(index, load_config(None, []).search).search(queries, 5)
    return res.video_idx, res.key_clip, res.fused


@pytest.fixture(scope="module")
def queries(trained: dict) -> torch.Tensor:
    return QueryEncoder.from_checkpoint(trained["root"] / "run" / "model.pt").encode_texts(QUERIES)


@pytest.fixture
def built(trained: dict, tiny_encoded: Path, queries: torch.Tensor, tmp_path: Path) -> dict:
    """An index ('old') of the test split in a folder of its own, and its answers to QUERIES."""
    ckpt = trained["root"] / "run" / "model.pt"
    out = tmp_path / "serve" / "idx"
    build_index(ckpt, tiny_encoded, "test", out, load_config(None, []), model_version="old", progress=False)
    args = ["index", "build", "--checkpoint", str(ckpt), "--data", str(tiny_encoded), "--split", "test",
            "--out", str(out), "--model-version", "new"]
    return {"ckpt": ckpt, "out": out, "args": args, "answers": _answers(VideoIndex.load(out), queries)}


def _same_answers(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("event, needle, survivor", [
    ("open", "attended.npy", "old"),          # mid-write: clips.npy written, attended.npy just created
    ("prvr.atomic_dir.swap", ".tmp-", "old"),  # every file written, about to swap
    ("shutil.rmtree", ".tmp-", "new"),         # swapped; the previous version not yet removed
])
def test_sigkill_during_index_build_leaves_a_whole_index(built, tiny_encoded, queries, event, needle,
                                                         survivor):
    out = built["out"]
    _build_killed(event, needle, built["args"])
    index = VideoIndex.load(out, verify=True)
    assert index.model_version == survivor
    _same_answers(_answers(index, queries), built["answers"])   # same checkpoint, same data
    names = sorted(p.name for p in out.parent.iterdir())
    assert [n for n in names if not n.startswith(".")] == ["idx"]
    debris = [n for n in names if n.startswith(".")]
    assert len(debris) == 1 and debris[0].startswith(".idx.tmp-"), names   # hidden, named as temp
    build_index(built["ckpt"], tiny_encoded, "test", out, load_config(None, []), model_version="next",
                progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["idx"]          # the dead writer's debris went
    assert VideoIndex.load(out, verify=True).model_version == "next"


def test_sigkill_between_the_two_renames_is_repaired_by_the_next_build(built, tiny_encoded, queries,
                                                                       monkeypatch):
    """Without renameat2 the swap is out -> backup, temp -> out: a kill in between leaves no `idx`;
    the next build puts the backup back first, so even a failing one leaves the old index."""
    out = built["out"]
    _build_killed("os.rename", ".tmp-", built["args"], exchange=False)
    names = sorted(p.name for p in out.parent.iterdir())
    assert "idx" not in names and any(n.startswith(".idx.old-") for n in names), names

    def boom(*a, **k):
        raise RuntimeError("encoder crashed")
    monkeypatch.setattr(build_mod, "write_manifest", boom)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        build_index(built["ckpt"], tiny_encoded, "test", out, load_config(None, []), progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["idx"]
    index = VideoIndex.load(out, verify=True)
    assert index.model_version == "old"
    _same_answers(_answers(index, queries), built["answers"])


# --------------------------------------------------------------------------- #
# A full disk while training writes its checkpoints
# --------------------------------------------------------------------------- #
FAST = ["model.hidden_size=64", "model.num_heads=2", "model.cluster_num=8", "model.map_size=16",
        "model.max_ctx_len=32", "train.batch_size=24", "train.epochs=2", "train.patience=10",
        "train.hard_negative_start_epoch=2", "train.lr=1e-3"]
DISK = "8m"           # epoch 1's model.pt + last.pt + dvclive/ take about 1.7 MB
ROOM = 64 << 10       # what the filler leaves: less than any checkpoint of the FAST model


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of DISK bytes at tmp_path/disk, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a tmpfs, which needs root (run the suite as root to include it)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    res = subprocess.run([mount or "mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)],
                         capture_output=True, text=True, check=False) if mount else None
    if res is None or res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {disk}: {res.stderr.strip() if res else 'no mount command'}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """Take all the free space of `disk` but `leave` bytes."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))
    return filler


def _epoch(path: Path) -> int:
    ckpt = torch.load(path, weights_only=True)
    return ckpt["state"]["epoch"] if "state" in ckpt else ckpt["epoch"]


def test_full_disk_stops_training_with_a_clear_error_and_keeps_the_last_checkpoints(
        small_disk, tiny_encoded):
    run = small_disk / "run"
    fillers = []

    def disk_fills_up(epoch: int, improved: bool) -> None:
        if epoch == 1:
            fillers.append(_fill(small_disk, ROOM))

    with pytest.raises(CheckpointError) as err:
        train(load_config(None, FAST), tiny_encoded, run, progress=False, on_epoch=disk_fills_up)
    assert fillers, "epoch 1 never finished: the disk is too small for the test"
    msg = str(err.value)
    assert msg.startswith(f"cannot write checkpoint {run}/") and "no space left on device" in msg, msg
    assert _epoch(run / "last.pt") == 1 and _epoch(run / "model.pt") == 1
    assert not [p.name for p in run.rglob("*") if ".tmp" in p.name], "temp files left behind"

    # the command line says the same in one line (exit 2), resuming on the still-full disk
    cli = subprocess.run([sys.executable, "-m", "prvr.cli", "train-worker", "--data", str(tiny_encoded),
                          "--out", str(run), "--no-progress", *[f"--set={s}" for s in FAST]],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr[-2000:]
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write checkpoint {run}/") and "no space left on device" in last
    assert "Traceback" not in cli.stderr
    assert _epoch(run / "last.pt") == 1

    # nothing but the failed epoch's time was lost: with space again, the run resumes after epoch 1
    before = torch.load(run / "last.pt", weights_only=True)["state"]["history"]
    fillers[0].unlink()
    result = train(load_config(None, FAST), tiny_encoded, run, progress=False)
    assert [r["epoch"] for r in result["history"]] == [1, 2] and result["history"][0] == before[0]
    assert _epoch(run / "last.pt") == 2
    assert not [p.name for p in run.rglob("*") if ".tmp" in p.name]


def test_a_killed_writers_temp_checkpoint_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".last.pt.tmp{dead}"           # what a SIGKILL inside torch.save's write leaves
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "last.pt", {"state_dict": {}, "config": {}, "epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert read_checkpoint(tmp_path / "last.pt")["epoch"] == 3
