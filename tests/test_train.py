"""Training: losses on hand-worked cases, one step, determinism, resume after SIGKILL, torchrun DDP."""
from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prvr.config import load_config
from prvr.model import PRVRModel, training_scores
from prvr.train import Encoders, infonce_loss, lr_at, setup, train, train_batch, triplet_loss

# A small model keeps the tests fast; the code path is the full MS-SL++ one.
FAST = ["model.hidden_size=64", "model.num_heads=2", "model.cluster_num=8", "model.map_size=16",
        "model.max_ctx_len=32", "train.batch_size=24", "train.epochs=3", "train.patience=10",
        "train.hard_negative_start_epoch=2", "train.lr=1e-3"]


WORKER = [sys.executable, "-m", "prvr.cli", "train-worker"]  # what torchrun and the stage start


def _fast_cfg(*extra: str):
    return load_config(None, FAST + list(extra))


def test_triplet_loss_hand_worked():
    scores = torch.tensor([[0.9, 0.1], [0.3, 0.2], [0.0, 0.5]])  # queries 0,1 -> video 0; 2 -> 1
    labels = torch.tensor([0, 0, 1])
    gen = torch.Generator().manual_seed(0)
    # t2v: one negative per query (only one other video): hinge(0.2 + neg - pos)
    t2v = (max(0, 0.2 + 0.1 - 0.9) + max(0, 0.2 + 0.2 - 0.3) + max(0, 0.2 + 0.0 - 0.5)) / 3
    # v2t with hard pool 1: video 0 pos = mean(0.9, 0.3) = 0.6, hardest neg query score 0.0
    # video 1 pos = 0.5, hardest neg = max(0.1, 0.2) = 0.2
    v2t = (max(0, 0.2 + 0.0 - 0.6) + max(0, 0.2 + 0.2 - 0.5)) / 2
    got = triplet_loss(scores, labels, margin=0.2, hard=True, pool=1, generator=gen)
    assert float(got) == pytest.approx(t2v + v2t, abs=1e-6)


def test_infonce_loss_hand_worked():
    raw = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1])
    lse = torch.logsumexp
    t2v = ((lse(raw[0], 0) - 2.0) + (lse(raw[1], 0) - 1.0) + (lse(raw[2], 0) - 3.0)) / 3
    v2t = ((lse(raw[:, 0], 0) - lse(torch.tensor([2.0, 1.0]), 0)) + (lse(raw[:, 1], 0) - 3.0)) / 2
    assert float(infonce_loss(raw, labels)) == pytest.approx(float(t2v + v2t), abs=1e-6)


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(None, ["train.lr=1.0", "train.warmup_frac=0.1"])
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.02


def test_training_scores_from_embeddings_equal_the_model_forward():
    """train_batch scores the embeddings of Encoders (gathered from every rank under torchrun):
    the same bits as the model's forward."""
    cfg = _fast_cfg().model
    cfg.video_dim, cfg.text_dim = 12, 16
    torch.manual_seed(0)
    model = PRVRModel(cfg).eval()
    tokens, tmask = torch.randn(5, 7, 16), torch.rand(5, 7) > 0.3
    tmask[:, 0] = True
    units, frames = torch.randn(3, cfg.map_size, 12), torch.randn(3, 9, 12)
    fmask = torch.arange(9)[None, :] < torch.tensor([9, 4, 6])[:, None]
    want = model(tokens, tmask, units, frames, fmask)
    q, v = Encoders(model)(tokens, tmask, units, frames, fmask)
    got = training_scores(q, v.clips, v.attended)
    assert set(got) == {"clip", "frame", "clip_raw", "frame_raw"}
    for k, t in got.items():
        assert torch.equal(t, want[k]), k


def _one_step(data: Path, out: Path):
    """A fresh run (seeded model) after one train_batch on its first training batch."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as train() runs it
    try:
        run = setup(_fast_cfg(), data, out, resume=False)
        before = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        videos = run.train_videos[:run.cfg.train.batch_size]
        loss, n_queries = train_batch(run, videos, hard=True, gen=torch.Generator().manual_seed(0))
    finally:
        torch.use_deterministic_algorithms(previous)
    run.live.end()
    return run, before, videos, loss, n_queries


def test_train_batch_steps_once_and_repeats_from_the_seed(tiny_encoded, tmp_path):
    a, before, videos, loss, n_queries = _one_step(tiny_encoded, tmp_path / "a")
    assert math.isfinite(loss) and loss > 0
    assert n_queries == sum(len(a.queries_of[v]) for v in videos) > len(videos)
    assert a.state["step"] == 1
    assert a.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(0, a.total_steps, a.cfg))
    after = a.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after), "no weight changed"
    b, _, _, loss_b, _ = _one_step(tiny_encoded, tmp_path / "b")
    assert loss_b == loss
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, after[k]), k


def _learning(history: list[dict]) -> list[dict]:
    """Per-epoch records without wall-clock throughput (which differs run to run)."""
    return [{k: v for k, v in h.items() if not k.endswith("_per_s")} for h in history]


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_training_is_deterministic_and_checkpoint_self_contained(tiny_encoded, tmp_path, text_encoder):
    cfg = _fast_cfg("train.epochs=2")
    a = train(cfg, tiny_encoded, tmp_path / "a", progress=False)
    b = train(_fast_cfg("train.epochs=2"), tiny_encoded, tmp_path / "b", progress=False)
    assert _learning(a["history"]) == _learning(b["history"])
    sa, sb = _state(tmp_path / "a" / "model.pt"), _state(tmp_path / "b" / "model.pt")
    for k in sa["state_dict"]:
        assert torch.equal(sa["state_dict"][k], sb["state_dict"][k]), k
    assert sa["config"]["model"]["video_dim"] == 64 and sa["text_encoder"] == text_encoder.name
    assert (tmp_path / "a" / "dvclive" / "metrics.json").is_file()
    assert (tmp_path / "a" / "dvclive" / "plots" / "metrics" / "val" / "sumr.tsv").is_file()


def test_resume_after_sigkill_ends_where_uninterrupted_run_ends(tiny_encoded, tmp_path):
    args = (["--data", str(tiny_encoded), "--no-progress"] + [f"--set={s}" for s in FAST]
            + ["--set=train.epochs=6"])
    full = tmp_path / "full"
    subprocess.run([*WORKER, "--out", str(full), *args], check=True,
                   capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*WORKER, "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and time.time() < deadline:  # epoch 1 complete
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # somewhere after epoch 1: inside epoch 2 or later
    proc.wait(timeout=30)
    epoch_at_kill = _state(killed / "last.pt")["state"]["epoch"]
    assert epoch_at_kill < 6, "the run finished before it could be killed; test proves nothing"
    subprocess.run([*WORKER, "--out", str(killed), *args], check=True,
                   capture_output=True, timeout=600)
    a, b = _state(full / "last.pt"), _state(killed / "last.pt")
    assert a["state"]["epoch"] == b["state"]["epoch"] == 6
    assert _learning(a["state"]["history"]) == _learning(b["state"]["history"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_torchrun_two_processes_gloo_only_rank0_writes(tiny_encoded, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "prvr.cli",
                          "train-worker",
                          "--data", str(tiny_encoded), "--out", str(out), "--no-progress",
                          *[f"--set={s}" for s in FAST], "--set=train.epochs=1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["dvclive", "last.pt", "model.pt",
                                                      "train_summary.json"]
    assert res.stdout.count("best val SumR") == 1  # only rank 0 reports
    assert _state(out / "last.pt")["state"]["epoch"] == 1


def test_collapse_is_detected_and_epoch_redone_at_lower_lr(tiny_encoded, tmp_path):
    # A threshold below any real spread forces the watchdog to fire: the epoch is redone
    # at lr * factor until the restart budget is spent, then training goes on.
    res = train(_fast_cfg("train.epochs=1", "train.collapse_cosine=-1.0",
                          "train.max_collapse_restarts=2", "train.collapse_lr_factor=0.5"),
                tiny_encoded, tmp_path / "c", progress=False)
    assert res["collapse_restarts"] == 2
    assert res["history"][0]["lr_scale"] == pytest.approx(0.25)


def test_a_real_collapse_is_detected_and_the_epoch_redone_at_lower_lr(tiny_encoded, tmp_path, capsys):
    # At lr 3 one epoch drives all queries to one direction (mean pairwise cosine 0.9994 on
    # this data); redone at lr 3 x 0.01 they stay spread (0.66).
    res = train(_fast_cfg("train.epochs=1", "train.lr=3.0", "train.collapse_cosine=0.99",
                          "train.max_collapse_restarts=2", "train.collapse_lr_factor=0.01"),
                tiny_encoded, tmp_path / "c", progress=False)
    seen = re.findall(r"collapsed \(mean pairwise cosine ([0-9.]+) > 0\.99\)", capsys.readouterr().err)
    assert len(seen) == 1 and float(seen[0]) > 0.99      # measured on the model, not forced
    assert res["collapse_restarts"] == 1
    assert res["history"][0]["lr_scale"] == pytest.approx(0.01)
    assert res["history"][0]["query_spread"] < 0.99


def test_resume_refuses_other_model_settings(tiny_encoded, tmp_path):
    from prvr.errors import DataError
    train(_fast_cfg("train.epochs=1"), tiny_encoded, tmp_path / "r", progress=False)
    with pytest.raises(DataError, match="other model settings"):
        train(_fast_cfg("train.epochs=2", "model.hidden_size=32"), tiny_encoded, tmp_path / "r",
              progress=False)
