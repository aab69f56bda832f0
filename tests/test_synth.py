"""The synthetic collection: public layout, determinism, TVR-like moments, dilution by mean pooling."""
from __future__ import annotations

import ast
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

import prvr.cli
import prvr.synth as synth
from prvr.collection import Collection
from prvr.errors import DataError

FILES = ["TextData/tinytrain.caption.txt", "TextData/tinyval.caption.txt", "TextData/tinytest.caption.txt",
         "FeatureData/synth_feat/feature.bin", "FeatureData/synth_feat/id.txt",
         "FeatureData/synth_feat/shape.txt", "FeatureData/synth_feat/video2frames.txt", "moments.jsonl",
         "videos.jsonl"]


def test_layout_round_trip(tiny_collection):
    coll = Collection(tiny_collection)
    stats = coll.check()
    sizes = synth.PRESETS["tiny"].videos
    assert {s: e["videos"] for s, e in stats["splits"].items()} == sizes
    assert stats["missing_splits"] == [] and stats["video_dim"] == 64 and stats["text_dim"] is None
    for split, entry in stats["splits"].items():
        assert 3 * entry["videos"] <= entry["queries"] <= 5 * entry["videos"]
        assert entry["queries_with_moments"] == entry["queries"]
        assert 20 <= entry["frames_per_video"]["min"] and entry["frames_per_video"]["max"] <= 120
    assert sorted(p.relative_to(tiny_collection).as_posix() for p in tiny_collection.rglob("*") if p.is_file()) \
        == sorted(FILES + ["synth.json"])
    v2f = ast.literal_eval((tiny_collection / "FeatureData/synth_feat/video2frames.txt").read_text())
    vid = coll.videos("test")[0]
    assert v2f[vid] == [f"{vid}_{i}" for i in range(len(v2f[vid]))]
    for cap in coll.captions("train")[:20]:
        m = coll.moments()[cap.cap_id]
        assert 0 <= m.start < m.end <= m.num_frames == len(v2f[cap.video_id])
        assert cap.text[0].isupper() and cap.text.endswith(".")
    info = coll.video_info
    assert list(info) == list(v2f)
    assert all(i.duration_s == len(v2f[v]) * synth.FRAME_SECONDS and i.title and i.url is None
               for v, i in info.items())


def test_deterministic_bytes(tmp_path):
    t0 = time.perf_counter()
    a = synth.synthesize(tmp_path / "a", "tiny", "tiny", seed=7)
    assert time.perf_counter() - t0 < 2.0
    b = synth.synthesize(tmp_path / "b", "tiny", "tiny", seed=7)
    c = synth.synthesize(tmp_path / "c", "tiny", "tiny", seed=8)
    for rel in FILES:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / FILES[3]).read_bytes() != (c / FILES[3]).read_bytes()


def test_moments_spread_like_tvr(tiny_collection):
    ratios = np.array([m.ratio for m in Collection(tiny_collection).moments().values()])
    assert np.mean(ratios < 0.2) > 0.4          # many short moments
    assert np.mean(ratios >= 0.4) > 0.05        # and some long ones


def test_replaces_only_its_own_folders(tmp_path):
    path = synth.synthesize(tmp_path, "tiny", "tiny")
    stale = path / "TextData/roberta_tiny_query_feat.hdf5"
    stale.write_bytes(b"old")
    synth.synthesize(tmp_path, "tiny", "tiny", seed=3)
    assert not stale.exists()                   # stale text features never sit beside new captions
    (tmp_path / "tvr").mkdir()
    with pytest.raises(DataError, match="not written by"):
        synth.synthesize(tmp_path, "tvr", "tiny")
    with pytest.raises(DataError, match="unknown synth preset"):
        synth.synthesize(tmp_path, "x", "huge")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tvr"]   # no temp folders left


def _spans(units: np.ndarray) -> np.ndarray:
    cs = np.vstack([np.zeros((1, units.shape[1])), np.cumsum(units, 0)])
    n = len(units)
    return np.stack([(cs[e] - cs[s]) / (e - s) for s in range(n) for e in range(s + 1, n + 1)])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_short_moments_need_clip_matching(tmp_path, monkeypatch):
    """With the ideal query vector, clip-level max matching finds short moments that mean pooling misses."""
    events = []
    sentence = synth._sentence
    monkeypatch.setattr(synth, "_sentence", lambda event, rng: events.append(event) or sentence(event, rng))
    coll = Collection(synth.synthesize(tmp_path, "tiny", "tiny", seed=2018))
    world = synth._World(np.random.default_rng(2018), 64, synth.PRESETS["tiny"].noise_std)
    query_event = dict(zip([c.cap_id for s in ("train", "val", "test") for c in coll.captions(s)], events))
    caps, videos = coll.captions("test"), coll.videos("test")
    q = _unit(np.stack([np.tanh(world.code(query_event[c.cap_id]) @ world.w1 + world.b1) @ world.w2
                        for c in caps]))
    feats = [coll.video_features(v) for v in videos]
    mean_scores = q @ _unit(np.stack([f.mean(0) for f in feats])).T
    clip_scores = np.stack([(q @ _unit(_spans(np.stack([u.mean(0) for u in np.array_split(f, 16)]))).T).max(1)
                            for f in feats], 1)
    truth = np.array([videos.index(c.video_id) for c in caps])
    short = np.array([coll.mv_ratio(c.cap_id) < 0.2 for c in caps])

    def r1(scores: np.ndarray) -> float:
        return float(np.mean(scores.argmax(1)[short] == truth[short]))

    assert r1(clip_scores) > 0.8 and r1(mean_scores) < 0.5 * r1(clip_scores)


def test_cli_synth(tmp_path, monkeypatch, capsys):
    assert prvr.cli.main(["synth", "--preset", "tiny", "--seed", "5", "--out", str(tmp_path),
                          "--collection", "demo"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "demo"
    assert Collection(tmp_path / "demo").check()["splits"]["train"]["videos"] == 80


def test_hard_preset_has_shorter_moments_in_longer_videos(tmp_path, monkeypatch):
    """The hard preset's knobs at a small size: moments shorter relative to their videos, longer
    videos."""
    small = {"train": 60, "val": 10, "test": 30}
    monkeypatch.setitem(synth.PRESETS, "hard-small",
                        dataclasses.replace(synth.PRESETS["hard"], videos=small, video_dim=16))
    monkeypatch.setitem(synth.PRESETS, "tiny-small",
                        dataclasses.replace(synth.PRESETS["tiny"], videos=small, video_dim=16))
    stats = {}
    for name in ("hard-small", "tiny-small"):
        coll = Collection(synth.synthesize(tmp_path, name, name, seed=3))
        caps = [c for s in ("train", "val", "test") for c in coll.captions(s)]
        ratios = np.array([coll.mv_ratio(c.cap_id) for c in caps])
        frames = np.array([len(f) for f in coll.video2frames.values()])
        stats[name] = (np.mean(ratios < 0.1), np.median(frames))
    assert stats["hard-small"][0] > 0.6 > stats["tiny-small"][0]
    assert stats["hard-small"][1] > 2 * stats["tiny-small"][1]
