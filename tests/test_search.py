"""Search engines against an independent per-pair reference, a hand-built index with known
answers, index integrity, atomic builds, CLI.

The reference (`pair_scores`) scores one (query, video) pair at a time in float64, with the
model's definition written out here, not taken from prvr: clip score = the best cosine over
the video's clips (its argmax, the first on exact ties, is the key clip); frame score = the
cosine with the key clip's attended vector; fused = alpha * clip + (1 - alpha) * frame.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prvr.config import ANN_INDEX_TYPES, ConfigError, SearchConfig, default_config, load_config
from prvr.errors import SearchIndexError
from prvr.model import VideoEmbeddings
from prvr.search import ExactSearch, VideoIndex, build_index_from_embeddings, make_engine
from prvr.search.ann import FaissSearch, ann_params, train_and_add
from prvr.search import build as build_mod
from prvr.search.exact import bf16_supported
from prvr.search import exact as exact_mod
from prvr.search.screen import (BF16_OUT_REL, FOLD, FOLD_MAX_H, FusedScreen, Int8Screen, _int8_err,
                                _prepare_queries, _quantize_rows)


def _emb(N: int, K: int = 8, H: int = 32, seed: int = 0, dup: bool = True) -> VideoEmbeddings:
    g = torch.Generator().manual_seed(seed)
    clips = F.normalize(torch.randn(N, K, H, generator=g), dim=-1)
    if dup:                                    # short videos repeat units: identical clips occur
        clips[::7, 1] = clips[::7, 0]
    att = F.normalize(clips + 0.8 * torch.randn(N, K, H, generator=g), dim=-1)
    starts = torch.randint(0, 16, (N, K, 1), generator=g)
    spans = torch.cat([starts, starts + torch.randint(1, 16, (N, K, 1), generator=g)], -1)
    return VideoEmbeddings(clips, spans, att)


def _queries(emb: VideoEmbeddings, Q: int, seed: int = 1) -> torch.Tensor:
    """Queries near some clips (realistic peaks) plus pure noise ones."""
    g = torch.Generator().manual_seed(seed)
    N, K, H = emb.clips.shape
    near = emb.clips[torch.randint(0, N, (Q // 2,), generator=g), 0] + 0.5 * torch.randn(Q // 2, H, generator=g)
    return torch.cat([near, torch.randn(Q - Q // 2, H, generator=g)])


def search_cfg(**changes) -> SearchConfig:
    """The packaged search settings with `changes` (validated together)."""
    return default_config().search.replace(**changes)


def _write(emb: VideoEmbeddings, path: Path, **kw) -> Path:
    N = emb.clips.shape[0]
    kw.setdefault("model_version", "v1")
    kw.setdefault("map_size", 32)
    kw.setdefault("alpha", 0.7)
    return build_index_from_embeddings(emb, np.full(N, 64), [f"vid{i}" for i in range(N)], path, **kw)


# ----------------------------------------------------------------------------- the reference
def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pair_scores(queries, clips, attended, as_stored: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clip, frame, key) of every (query, video) pair, (Q, N) each, one pair at a time.

    as_stored: take the video vectors as an index stores them (unit rows up to fp16 rounding,
    which the engines do not undo) instead of normalising them."""
    q = _unit(np.asarray(queries))
    c, a = (np.asarray(x, np.float64) if as_stored else _unit(np.asarray(x)) for x in (clips, attended))
    Q, N = len(q), len(c)
    clip, frame, key = np.empty((Q, N)), np.empty((Q, N)), np.empty((Q, N), np.int64)
    for i in range(Q):
        for v in range(N):
            sims = c[v] @ q[i]                            # (K,) cosines with this video's clips
            k = int(np.argmax(sims))                       # the key clip (first on exact ties)
            clip[i, v], frame[i, v], key[i, v] = sims[k], a[v, k] @ q[i], k
    return clip, frame, key


def fused_of(ref, alpha: float) -> np.ndarray:
    clip, frame, _ = ref
    return alpha * clip + (1 - alpha) * frame


def reference_ranks(fused: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1 + how many other videos score at least as high as the true one (ties: pessimistic)."""
    return np.array([1 + sum(1 for v in range(fused.shape[1]) if v != t and fused[i, v] >= fused[i, t])
                     for i, t in enumerate(truth)])


def check_against_reference(res, ref, alpha: float, k: int, tol: float = 1e-5) -> None:
    """res is the reference's top-k: its scores are those of its videos, they are the k best
    scores best first, and the videos are the reference's except among near-ties."""
    clip, frame, key = ref
    fused = fused_of(ref, alpha)
    idx = res.video_idx.numpy()
    rows = np.arange(len(fused))[:, None]
    assert idx.shape == (len(fused), k)
    np.testing.assert_allclose(res.fused.numpy(), fused[rows, idx], atol=tol)
    np.testing.assert_allclose(res.clip.numpy(), clip[rows, idx], atol=tol)
    np.testing.assert_allclose(res.frame.numpy(), frame[rows, idx], atol=tol)
    assert np.array_equal(res.key_clip.numpy(), key[rows, idx])
    ranked = -np.sort(-fused, axis=1)
    np.testing.assert_allclose(res.fused.numpy(), ranked[:, :k], atol=tol)
    padded = np.concatenate([np.full((len(fused), 1), np.inf), ranked, np.full((len(fused), 1), -np.inf)], 1)
    gap = np.minimum(padded[:, :k] - padded[:, 1:k + 1], padded[:, 1:k + 1] - padded[:, 2:k + 2])
    order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    assert (idx == order)[gap > 10 * tol].all()


def overlap(res, ref, alpha: float, k: int = 10) -> float:
    """Mean share of the reference's top-k videos that `res` found (recall@k)."""
    order = np.argsort(-fused_of(ref, alpha), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k
                          for a, b in zip(res.video_idx.numpy(), order)]))


# ----------------------------------------------------------------------------- a hand-built index
# 4 videos of K=2 clips in 3 dimensions; rows marked -> are unnormalised (the build normalises).
HAND_CLIPS = [[[1, 0, 0], [0, 1, 0]],
              [[0, 0, 1], [3, 4, 0]],               # -> [0.6, 0.8, 0]
              [[-1, 0, 0], [0, -1, 0]],
              [[0, 1, 0], [1, 0, 0]]]
HAND_ATTENDED = [[[0, 1, 0], [1, 0, 0]],
                 [[1, 0, 0], [4, 0, 3]],            # -> [0.8, 0, 0.6]
                 [[1, 0, 0], [0, 1, 0]],
                 [[0, 0, 1], [0, 2, 0]]]            # -> [0, 1, 0]
HAND_UNIT_SPANS = [[[0, 1], [2, 4]], [[1, 3], [0, 4]], [[3, 4], [0, 1]], [[0, 2], [2, 3]]]
HAND_FRAMES = [8, 12, 3, 40]                        # map_size 4: a unit is 2, 3, 0.75, 10 frames
HAND_FRAME_SPANS = [[[0, 2], [4, 8]], [[3, 9], [0, 12]], [[2, 3], [0, 1]], [[0, 20], [20, 30]]]
HAND_ALPHA = 0.5
# q1 = x: video 1 wins by its frame score though videos 0 and 3 have the better clip score;
# video 2's key clip is its second (cosine 0 > -1), whose attended vector scores 0, not its
# first's 1. q2 = (0, 3, 4) unnormalised: video 3 wins by its frame score.
HAND_QUERIES = [[1, 0, 0], [0, 3, 4]]
HAND_CLIP = [[1.0, 0.6, 0.0, 1.0], [0.6, 0.8, 0.0, 0.6]]
HAND_FRAME = [[0.0, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.8]]
HAND_KEY = [[0, 1, 1, 1], [1, 0, 0, 0]]
HAND_FUSED = [[0.5, 0.7, 0.0, 0.5], [0.3, 0.4, 0.0, 0.7]]


def _hand_index(path: Path, **kw) -> Path:
    emb = VideoEmbeddings(torch.tensor(HAND_CLIPS, dtype=torch.float32), torch.tensor(HAND_UNIT_SPANS),
                          torch.tensor(HAND_ATTENDED, dtype=torch.float32))
    return build_index_from_embeddings(emb, np.array(HAND_FRAMES), ["a", "b", "c", "d"], path,
                                       model_version="hand", map_size=4, alpha=HAND_ALPHA, **kw)


def test_a_hand_built_index_holds_the_normalised_arrays_frame_spans_and_checksums(tmp_path):
    path = _hand_index(tmp_path / "idx")
    clips, attended = np.array(HAND_CLIPS, np.float32), np.array(HAND_ATTENDED, np.float32)
    clips[1, 1], attended[1, 1], attended[3, 1] = [0.6, 0.8, 0], [0.8, 0, 0.6], [0, 1, 0]
    on_disk = {name: np.load(path / f"{name}.npy", allow_pickle=False)
               for name in ("clips", "attended", "spans", "num_frames")}
    np.testing.assert_allclose(on_disk["clips"], clips, atol=1e-7)
    np.testing.assert_allclose(on_disk["attended"], attended, atol=1e-7)
    assert on_disk["clips"].dtype == on_disk["attended"].dtype == np.float32
    assert on_disk["spans"].dtype == np.int32 and on_disk["spans"].tolist() == HAND_FRAME_SPANS
    assert on_disk["num_frames"].tolist() == HAND_FRAMES
    assert json.loads((path / "video_ids.json").read_text()) == ["a", "b", "c", "d"]
    m = json.loads((path / "manifest.json").read_text())
    assert (m["format"], m["count"], m["num_clips"], m["hidden"], m["dtype"], m["alpha"], m["map_size"],
            m["model_version"]) == ("prvr-video-index/1", 4, 2, 3, "float32", HAND_ALPHA, 4, "hand")
    for name in ("clips", "attended", "spans", "num_frames"):
        f = path / f"{name}.npy"
        assert m["files"][f.name]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest(), name
        assert m["files"][f.name]["bytes"] == f.stat().st_size
        assert m["files"][f.name]["shape"] == list(on_disk[name].shape)
    index = VideoIndex.load(path, expect_model_version="hand", verify=True)
    assert index.video_ids == ["a", "b", "c", "d"] and index.alpha == HAND_ALPHA
    assert np.array_equal(index.clips, on_disk["clips"]) and np.array_equal(index.attended, on_disk["attended"])
    assert index.moment(np.array([1, 2]), np.array([1, 0])).tolist() == [[0, 12], [2, 3]]


HAND_ENGINES = [pytest.param("exact", "fp32", id="exact-fp32"), pytest.param("exact", "bf16", id="exact-bf16"),
                pytest.param("exact", "int8", id="exact-int8"), pytest.param("faiss", "fp32", id="faiss-flat")]


def _engine(index: VideoIndex, backend: str, precision: str):
    if precision == "bf16" and not bf16_supported():
        pytest.skip("no native bf16 on this CPU")
    if backend == "exact":
        return ExactSearch(index, precision=precision)
    pytest.importorskip("faiss")
    return make_engine(index, search_cfg(backend="faiss", index_type="flat", candidates=4, refine=8))


@pytest.mark.parametrize("backend, precision", HAND_ENGINES)
def test_engines_give_the_hand_computed_answers(tmp_path, backend, precision):
    index = VideoIndex.load(_hand_index(tmp_path / "idx"))
    res = _engine(index, backend, precision).search(torch.tensor(HAND_QUERIES, dtype=torch.float32), 4)
    assert res.video_idx[0, 0] == 1 and set(res.video_idx[0, 1:3].tolist()) == {0, 3} and res.video_idx[0, 3] == 2
    assert res.video_idx[1].tolist() == [3, 1, 0, 2]
    for got, want in ((res.fused, HAND_FUSED), (res.clip, HAND_CLIP), (res.frame, HAND_FRAME)):
        np.testing.assert_allclose(got.numpy(), np.take_along_axis(np.array(want), res.video_idx.numpy(), 1),
                                   atol=1e-6)
    assert np.array_equal(res.key_clip.numpy(), np.take_along_axis(np.array(HAND_KEY), res.video_idx.numpy(), 1))
    # the moment of q1's best (video b, key clip 1: units 0-4 of 12 frames) and of q2's (d, clip 0)
    assert index.moment(res.video_idx[:, 0].numpy(), res.key_clip[:, 0].numpy()).tolist() == [[0, 12], [0, 20]]
    top1 = _engine(index, backend, precision).search(torch.tensor(HAND_QUERIES[1], dtype=torch.float32), 1)
    assert top1.video_idx.tolist() == [[3]] and top1.fused.item() == pytest.approx(0.7, abs=1e-6)
    clip_only = _engine(index, backend, precision).search(torch.tensor([HAND_QUERIES[0]]), 2, alpha=1.0)
    assert set(clip_only.video_idx[0].tolist()) == {0, 3}
    assert clip_only.fused[0].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_truth_ranks_of_the_hand_built_index_are_pessimistic_on_ties(tmp_path):
    """Ranks by hand from HAND_FUSED/CLIP/FRAME: q1's videos 0 and 3 tie at 0.5 (fused) and 1.0
    (clip), so each ranks below the other; frame scores of 0 tie three ways."""
    index = VideoIndex.load(_hand_index(tmp_path / "idx"))
    q = torch.tensor([HAND_QUERIES[0]] * 4 + [HAND_QUERIES[1]], dtype=torch.float32)
    got = ExactSearch(index, precision="fp32").truth_ranks(q, np.array([0, 1, 2, 3, 3]), query_chunk=2)
    assert got["fused"].tolist() == [3, 1, 4, 3, 1]
    assert got["clip"].tolist() == [2, 3, 4, 2, 3]
    assert got["frame"].tolist() == [4, 1, 4, 4, 1]


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_exact_search_equals_the_pair_by_pair_reference(tmp_path, precision):
    if precision == "bf16" and not bf16_supported():
        pytest.skip("no native bf16 on this CPU")
    emb = _emb(700, K=8, H=48)
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    q = _queries(emb, 40)
    ref = pair_scores(q, emb.clips, emb.attended)
    eng = ExactSearch(index, video_chunk=128, precision=precision)
    for k in (1, 10, 50):
        check_against_reference(eng.search(q, k), ref, 0.7, k)
    one = tuple(r[:1] for r in ref)
    for i in range(len(q)):                                        # few queries: gathered frame side
        check_against_reference(eng.search(q[i:i + 1], 10), tuple(r[i:i + 1] for r in ref), 0.7, 10)
    check_against_reference(eng.search(q[:3], 10), tuple(r[:3] for r in ref), 0.7, 10)
    check_against_reference(eng.search(q[0].numpy(), 5, alpha=0.3), one, 0.3, 5)    # ndarray (H,)
    if precision == "int8":                         # the single queries took the fused screen
        assert eng.stats["fused"] == len(q) + 3 and eng.stats["fused_misses"] == 0
    everything = eng.search(q, 10_000)                             # top_k clamps to N
    assert everything.video_idx.shape == (40, 700)
    assert (everything.video_idx.sort(1).values == torch.arange(700)).all()


@pytest.mark.skipif(not bf16_supported(), reason="no native bf16 on this CPU")
@pytest.mark.parametrize("queries", [1, 4])
def test_bf16_screen_stays_within_its_error_bound(tmp_path, queries):
    """The certificate rests on |screened - exact product of the bf16 inputs| <= BF16_OUT_REL |x|
    + H 2^-24, for the one-query matrix-vector product and the batched one (bf16 keeps 8
    significant bits: a bound of 2^-9 |x| fails here)."""
    emb = _emb(3000, K=8, H=384, dup=False)
    eng = ExactSearch(VideoIndex.load(_write(emb, tmp_path / "idx")), precision="bf16")
    qb = _queries(emb, queries).bfloat16()
    assert eng._screen.mv                           # one query: the bf16 matrix-vector product
    got = eng._screen.products(qb, 0, eng.N * eng.K).double()                         # (Q, N*K)
    exact = qb.double() @ eng._screen.c16.double().T
    slack = BF16_OUT_REL * exact.abs() + 384 * 2.0 ** -24 - (got - exact).abs()
    assert float(slack.min()) >= 0
    assert bool(((got - exact).abs() > 2.0 ** -9 * exact.abs() + 384 * 2.0 ** -24).any())


def _hostile_emb() -> VideoEmbeddings:
    """Rows int8 handles worst: all-zero rows, one dominant element (a coarse scale for the
    rest), norms far from 1, and plain unit rows around them."""
    emb = _emb(600, K=8, H=384, dup=False)
    clips, att = emb.clips.clone(), emb.attended.clone()
    clips[0, :3], att[1, 2:5] = 0.0, 0.0                               # zero rows
    clips[2, :, 7], att[3, :, 11] = 40.0, -40.0                        # one dominant element
    clips[4:9] *= 9.0
    att[9:14] *= 0.01                                                  # norms far from 1
    return VideoEmbeddings(clips, emb.spans, att)


@pytest.mark.parametrize("queries", [1, 4, 6])
def test_int8_screen_stays_within_its_error_bound(tmp_path, queries):
    """Every screened clip cosine is within its bound of the exact product, the frame bound is
    above the exact frame score of every clip marked near (all of them, or a random few), and
    both bounds are tight enough to prune (unit rows); for one query, a few (gathered rows)
    and more (every row of the chunk)."""
    emb = _hostile_emb()                            # the raw rows: an index stores them normalised
    (N, K, H), chunk = emb.clips.shape, 256
    screen = Int8Screen(emb.clips.reshape(-1, H).numpy(), emb.attended.reshape(-1, H).numpy(), K, chunk)
    q = F.normalize(_queries(emb, queries), dim=-1)
    state = screen.prepare(q)
    exact_c = torch.einsum("qh,nkh->qnk", q.double(), emb.clips.double())                 # (Q, N, K)
    exact_f = torch.einsum("qh,nkh->qnk", q.double(), emb.attended.double())
    g = torch.Generator().manual_seed(3)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        s, smax, err = screen.clips(state, start, end)
        assert torch.equal(smax, s.amax(-1))
        assert float((err.double()[..., None] - (s.double() - exact_c[:, start:end]).abs()).min()) >= 0
        assert float(err[:, max(0, 20 - start):].max()) < 0.02                    # unit rows: tight
        for near in (torch.ones_like(s, dtype=torch.bool), torch.rand(s.shape, generator=g) < 0.3):
            near[..., 0] = True                                     # every video keeps a clip
            ub = screen.frame_ub(state, near, start).double()                           # (Q, n)
            truth = torch.where(near, exact_f[:, start:end], float("-inf")).amax(-1)
            assert bool((ub >= truth).all())
            assert float((ub - truth)[:, max(0, 20 - start):].max()) < 0.05       # unit rows: tight


def _saturating_matmul(a_u8: np.ndarray, b_s8: np.ndarray, zero: int) -> np.ndarray:
    """(A - zero) @ B as an x86 CPU without VNNI computes it (vpmaddubsw): the u8 x s8 products
    of adjacent pairs summed in int16, saturated, then widened."""
    prod = a_u8.astype(np.int64)[:, :, None] * b_s8.astype(np.int64)[None]                # (M, H, N)
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767)
    return pairs.sum(1) - zero * b_s8.astype(np.int64).sum(0)[None]


def test_int8_value_ranges_never_saturate_an_int16_pair():
    """The stored rows use all of int8, queries 7 bits: the largest values either session gets
    are exact even where pairs are summed in int16; 8-bit queries would not be."""
    from prvr.search.screen import QUERY_MAX, QUERY_ZERO, ROW_MAX, ROW_ZERO

    rows = np.concatenate([np.full((1, 8), ROW_MAX), np.full((1, 8), -ROW_MAX)]).astype(np.int8)   # (2, H)
    query = np.concatenate([np.full((1, 8), QUERY_MAX), np.full((1, 8), -QUERY_MAX)])               # (2, H)
    exact = query.astype(np.int64) @ rows.T.astype(np.int64)
    as_a = _saturating_matmul((query + QUERY_ZERO).astype(np.uint8), np.ascontiguousarray(rows.T), QUERY_ZERO)
    rows_a = (rows.astype(np.int16) + ROW_ZERO).astype(np.uint8)
    as_b = _saturating_matmul(rows_a, np.ascontiguousarray(query.T.astype(np.int8)), ROW_ZERO)
    assert np.array_equal(as_a, exact) and np.array_equal(as_b, exact.T)
    wide = np.full((1, 8), 127)                                       # an 8-bit query, offset by 128
    assert not np.array_equal(_saturating_matmul((wide + 128).astype(np.uint8), np.ascontiguousarray(rows.T), 128),
                              wide.astype(np.int64) @ rows.T.astype(np.int64))


def test_int8_screen_refuses_a_cpu_whose_integer_products_are_not_exact(monkeypatch):
    """The check at construction runs both kinds of session on their largest values; a kernel
    that is off (as a saturating one would be) stops the screen with a message saying what to do."""
    from prvr.search import screen as screen_mod

    real = screen_mod._rows_session

    class OffByOne:
        def __init__(self, threads):
            self.session = real(threads)

        def run(self, outputs, feeds):
            return [self.session.run(outputs, feeds)[0] + 1.0]

    monkeypatch.setattr(screen_mod, "_rows_session", OffByOne)
    screen_mod._check_exact_products.cache_clear()                 # checked once per process
    rows = np.eye(16, dtype=np.float32)
    with pytest.raises(RuntimeError, match="not exact on this CPU.*set search.screen to bf16 or fp32"):
        Int8Screen(rows, rows, 8, 4)


def test_int8_screen_refuses_values_that_are_not_finite():
    rows = np.zeros((64, 16), np.float32)
    rows[0, 0] = 1.0
    bad = rows.copy()
    bad[37, 3] = np.nan
    with pytest.raises(ValueError, match="rows 0..63 hold a value that is not finite"):
        Int8Screen(bad, rows, 8, 4)
    screen = Int8Screen(rows, rows, 8, 4)
    with pytest.raises(ValueError, match="query vector holds a value that is not finite"):
        screen.prepare(torch.tensor([[float("inf")] + [0.0] * 15]))


def test_fused_screen_bounds_every_video_from_above(tmp_path):
    """The fused screen's bound of a video is above the best fused value of its clips (so
    above its exact fused score), on the rows int8 handles worst, for queries of all kinds
    and for queries aimed along the worst rows' quantization residuals, where the screening
    error uses most of the bound (so a looser-than-needed formula would not pass unseen);
    tight for unit rows."""
    emb = _hostile_emb()
    (N, K, H), chunk, alpha = emb.clips.shape, 256, 0.7
    c, a = emb.clips.reshape(-1, H).numpy(), emb.attended.reshape(-1, H).numpy()
    screen = FusedScreen(c, a, alpha, K, chunk)
    z = alpha * c.astype(np.float64) + (1 - alpha) * a.astype(np.float64)                 # (N*K, H)
    zq, zs, _, _ = _quantize_rows(c, mix=(a, alpha), group=K)
    resid = z - zs[:, None].astype(np.float64) * zq                                       # what int8 leaves
    worst = np.argsort(-np.linalg.norm(resid, axis=1))[:4]                                # rows
    aimed = F.normalize(torch.from_numpy(resid[worst] / np.linalg.norm(resid[worst], axis=1, keepdims=True)
                                         + 0.05 * z[worst] / np.linalg.norm(z[worst], axis=1, keepdims=True)
                                         ).float(), dim=-1)
    for q in (F.normalize(_queries(emb, 1), dim=-1), F.normalize(_queries(emb, 4), dim=-1), aimed):
        state = screen.prepare(q)
        ub = torch.cat([screen.bounds(state, i, min(i + chunk, N)) for i in range(0, N, chunk)], 1).double()
        err = _int8_err(state, screen.resid, screen.norm).double()                        # (Q, N)
        best_z = (q.double() @ torch.from_numpy(z).T).view(len(q), N, K).amax(-1)         # (Q, N)
        assert bool((ub >= best_z).all())
        if q is not aimed:
            assert float((ub - best_z)[:, 20:].max()) < 0.02                              # unit rows: tight
    used = (best_z - (ub - err)) / err                     # screening error at the aimed videos / bound
    assert float(used[torch.arange(4), torch.from_numpy(worst // K)].max()) > 0.5


def test_the_fused_screen_takes_few_queries_at_the_index_alpha_and_the_two_step_screen_the_rest(tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setattr(exact_mod, "FUSED_ROWS", 1400)    # re-score rows: 4 x 42 x 8 in, 200 x 8 (k=100) out
    emb = _emb(700, K=8, H=48)
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    q = _queries(emb, 6)
    ref = pair_scores(q, emb.clips, emb.attended)
    eng = ExactSearch(index, video_chunk=128)
    calls = [(q[:1], 10, 0.7, True), (q[:4], 10, 0.7, True), (q, 10, 0.7, False), (q[:1], 10, 0.3, False),
             (q[:1], 60, 0.7, True), (q[:1], 100, 0.7, False)]
    for queries, k, alpha, fused in calls:
        before = eng.stats["fused"]
        res = eng.search(queries, k, alpha=alpha)
        assert eng.stats["fused"] - before == (len(queries) if fused else 0)
        check_against_reference(res, tuple(r[:len(queries)] for r in ref), alpha, min(k, 700))
    assert eng.stats["fused_misses"] == 0                   # every fused call certified its top-k
    off = ExactSearch(index, video_chunk=128, fused=False)
    check_against_reference(off.search(q[:1], 10), tuple(r[:1] for r in ref), 0.7, 10)
    assert off.stats["fused"] == 0 and off._fused is None


def test_a_bound_the_fused_screen_cannot_certify_falls_back_to_the_two_step_screen(tmp_path, monkeypatch):
    """60 videos have a clip whose attended vector is the query (fused value 0.58) without
    being their key clip (clip score 0.4 against 0.5, frame 0): each scores 0.35, below its
    bound. One video scores 0.85 and five score 0.5 with bounds just above: the 42 best
    bounds hold the first and 41 of the 60, so the 5 are not re-scored, and only the 10th
    exact score (0.35, below the bound left out) tells that the top-10 is not certified."""
    n_decoy, n_mid, K, H, alpha = 60, 5, 4, 16, 0.7
    N = n_decoy + n_mid + 1
    g = torch.Generator().manual_seed(0)
    e = torch.eye(H)
    q = e[0]
    noise = F.normalize(torch.randn(N, K, H, generator=g) * (torch.arange(H) >= 4), dim=-1)  # orthogonal to q
    clips, attended = noise.clone(), noise.clone()
    for v, (c0, a0) in enumerate([(0.5, 0.0)] * n_decoy + [(0.5, 0.5)] * n_mid + [(0.85, 0.85)]):
        clips[v, 0] = c0 * e[0] + (1 - c0 ** 2) ** 0.5 * e[1]                        # the key clip
        attended[v, 0] = a0 * e[0] + (1 - a0 ** 2) ** 0.5 * e[2]
    clips[:n_decoy, 1] = 0.4 * e[0] + 0.84 ** 0.5 * e[2]                             # q.c = 0.4 ...
    attended[:n_decoy, 1] = e[0]                                                       # ... q.a = 1
    clips[:, 2:] *= 0.1 + 0.2 * torch.rand(N, K - 2, 1, generator=g)                  # q.c = 0, distinct rows
    clips[:, 2:] += 0.3 * torch.rand(N, 1, 1, generator=g) * e[3]
    clips = F.normalize(clips, dim=-1)
    emb = VideoEmbeddings(clips, torch.zeros(N, K, 2, dtype=torch.long) + torch.tensor([0, 1]), attended)
    eng = ExactSearch(VideoIndex.load(_write(emb, tmp_path / "idx", alpha=alpha)))
    two_step = []
    screened = eng._search_screened
    monkeypatch.setattr(eng, "_search_screened", lambda q_, k_, a_: two_step.append(len(q_)) or screened(q_, k_, a_))
    res = eng.search(q[None], 10)
    assert (eng.stats["fused"], eng.stats["fused_misses"], two_step) == (1, 1, [1])
    check_against_reference(res, pair_scores(q[None], clips, attended), alpha, 10)
    np.testing.assert_allclose(res.fused.numpy()[0], [0.85] + [0.5] * 5 + [0.35] * 4, atol=1e-5)
    assert sorted(res.video_idx[0, :6].tolist()) == list(range(n_decoy, N))


def test_the_fused_screen_re_scores_a_second_round_only_for_the_queries_the_first_leaves_uncertified(
        tmp_path, monkeypatch):
    """With a first round of k + 4 videos (FIRST_ROUND 4), some random queries need more than
    the k + 4 best bounds to certify their top-10 and some do not: the former (only) get the rest of
    the budget, every top-10 is certified and equals the reference; with a first round as
    large as the budget there is one round a query."""
    emb = _emb(400, K=8, H=48)
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    q = _queries(emb, 12)
    ref = pair_scores(q, emb.clips, emb.attended)
    for first, want_second in ((4, True), (exact_mod.ExactSearch(index).margin, False)):
        monkeypatch.setattr(exact_mod, "FIRST_ROUND", first)
        eng = exact_mod.ExactSearch(index)
        rounds: list[tuple[int, int]] = []
        rescore = eng._rescore_videos
        monkeypatch.setattr(eng, "_rescore_videos", lambda q_, c, a_, k_: rounds.append(tuple(c.shape))
                            or rescore(q_, c, a_, k_))
        seconds = []
        for i in range(len(q)):
            before = len(rounds)
            check_against_reference(eng.search(q[i:i + 1], 10), tuple(r[i:i + 1] for r in ref), 0.7, 10)
            seconds.append(len(rounds) - before == 2)
        assert eng.stats["fused"] == len(q) and eng.stats["fused_misses"] == 0
        assert rounds[0] == (1, 10 + first)
        assert any(seconds) == want_second and (not want_second or not all(seconds))
        assert set(rounds[1:]) <= {(1, 10 + first), (1, eng._budget(10) - 10 - first)}


def test_fused_rows_share_a_scale_per_video_and_queries_fold_into_one_integer_product():
    """The fused screen's int8 rows: one scale per group of K rows (so a video's largest
    screened product is its largest integer product times the scales), the residual norms
    those scales leave; a query's two 7-bit rows with s1 = FOLD s2, within 1e-3 of it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 16, generator=g).numpy() * np.repeat([0.1, 1.0, 5.0], 4)[:, None]
    q, scale, resid, norm = _quantize_rows(x, rows=5, group=4)           # chunks of 4 rows, not 5
    assert np.array_equal(scale, np.repeat(np.abs(x).reshape(3, -1).max(1) / 127, 4).astype(np.float32))
    assert np.abs(q).max() == 127 and (np.abs(q).reshape(3, -1).max(1) == 127).all()
    back = scale[:, None].astype(np.float64) * q
    assert np.all(np.linalg.norm(x - back, axis=1) <= resid) and np.all(resid <= 1.01 * np.linalg.norm(x - back, axis=1))
    with pytest.raises(ValueError, match="12 rows do not make groups of 5"):
        _quantize_rows(x, group=5)
    qs = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    st = _prepare_queries(qs, FOLD)
    pairs = st["a"].astype(np.int64).reshape(3, 2, 16) - 64
    assert np.abs(pairs).max() <= 63
    approx = st["unit"] * (FOLD * pairs[:, 0] + pairs[:, 1])
    assert np.all(np.linalg.norm(qs.numpy() - approx, axis=1) <= st["d"].numpy()) and float(st["d"].max()) < 1e-3


def test_a_hidden_size_past_the_folded_products_range_screens_in_two_steps(tmp_path, caplog):
    emb = _emb(30, K=2, H=FOLD_MAX_H + 1)
    with pytest.raises(ValueError, match=f"up to {FOLD_MAX_H} values"):
        FusedScreen(emb.clips.reshape(-1, FOLD_MAX_H + 1).numpy(), emb.attended.reshape(-1, FOLD_MAX_H + 1).numpy(),
                    0.7, 2, 16)
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    with caplog.at_level(logging.WARNING, logger="prvr.search.exact"):
        eng = ExactSearch(index)
    assert "the two-step screen serves every query" in caplog.text
    q = _queries(emb, 1)
    assert eng._fused is None
    check_against_reference(eng.search(q, 5), pair_scores(q, emb.clips, emb.attended), 0.7, 5)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_the_fused_re_score_keeps_the_first_of_repeated_clips_as_key(two_threads):
    """Videos whose clips are one clip repeated (a short video's units) with distinct attended
    vectors: every clip ties for the key, which is then the first, so each video's frame and
    fused scores are its first clip's. (A two-thread matrix product over all candidates'
    clips rounded equal rows apart for one of these queries and picked a later copy; so can
    a float64 matrix-vector product, which is why the expected scores are written out from
    the first clip here.)"""
    g = torch.Generator().manual_seed(7)
    N, K, H, alpha = 300, 3, 1000, 0.7
    clips = F.normalize(torch.randn(N, K, H, generator=g), dim=-1)
    clips[:, 1:] = clips[:, :1]
    attended = F.normalize(torch.randn(N, K, H, generator=g), dim=-1)
    eng = ExactSearch(VideoIndex.from_arrays(clips.numpy(), attended.numpy(), alpha=alpha))
    q = F.normalize(clips[:8, 0] + 0.3 * torch.randn(8, H, generator=g), dim=-1).double()
    first = alpha * q @ clips[:, 0].double().T + (1 - alpha) * q @ attended[:, 0].double().T     # (Q, N)
    for i in range(len(q)):
        res = eng.search(q[i:i + 1].float(), 10)
        assert res.key_clip.eq(0).all()
        np.testing.assert_allclose(res.fused[0].numpy(), first[i, res.video_idx[0]].numpy(), atol=1e-5)
        np.testing.assert_allclose(res.fused[0].numpy(), first[i].topk(10).values.numpy(), atol=1e-5)
    assert eng.stats["fused"] == len(q) and eng.stats["fused_misses"] == 0


def test_searching_leaves_the_record_of_shown_warnings_alone(tmp_path, monkeypatch):
    """Entering `warnings.catch_warnings()` resets Python's record of the warnings already
    shown, so a server's once-only warnings (KServe's web framework has one per request)
    would repeat on every request: after the first, no search of a memory-mapped index
    enters it, exact (fused and two-step) or faiss."""
    import warnings

    emb = _emb(300, K=8, H=32)
    index = VideoIndex.load(_write(emb, tmp_path / "idx", dtype="float16"))       # faiss gathers fp16 rows
    assert not index.clips.flags.writeable
    engines = [ExactSearch(index), ExactSearch(index, fused=False), FaissSearch(index, search_cfg(index_type="flat"))]
    q = _queries(emb, 4)
    for eng in engines:
        eng.search(q[:1], 10)
    entered = []
    real = warnings.catch_warnings
    monkeypatch.setattr(warnings, "catch_warnings", lambda *a, **kw: entered.append(1) or real(*a, **kw))
    for eng in engines:
        for i in range(len(q)):
            eng.search(q[i:i + 1], 10)
    assert engines[0].stats["fused"] == 1 + len(q)
    assert entered == []


def test_make_engine_screens_as_search_screen_says(tmp_path):
    index = VideoIndex.load(_write(_emb(20), tmp_path / "idx"))
    assert make_engine(index, search_cfg()).precision == "int8"                    # the default
    for screen in ("fp32", "int8"):
        assert make_engine(index, search_cfg(screen=screen)).precision == screen
    assert make_engine(index, search_cfg())._fused is not None                       # the default
    assert make_engine(index, search_cfg(fused_screen=False))._fused is None
    with pytest.raises(ValueError, match="screen"):
        search_cfg(screen="int4")


def test_screen_threads_set_the_threads_of_every_int8_pass(tmp_path, monkeypatch):
    index = VideoIndex.load(_write(_emb(20), tmp_path / "idx"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    for setting, threads in ((0, 1), (2, 2), (3, 3)):
        eng = make_engine(index, search_cfg(screen_threads=setting))
        sessions = [*eng._screen.sessions, eng._screen.rows_session, *eng._fused.sessions]
        assert [s.get_session_options().intra_op_num_threads for s in sessions] == [threads] * len(sessions)
    with pytest.raises(ValueError, match="screen_threads"):
        search_cfg(screen_threads=-1)


def test_int8_engine_equals_fp32_on_hostile_rows(tmp_path):
    """Zero rows (score 0) and near one-hot rows in the index: the int8 engine's top-10 has
    the fp32 engine's scores, and each listed video really has the score listed."""
    emb = _hostile_emb()
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    q = _queries(emb, 24)
    full = ExactSearch(index, precision="fp32").search(q, index.clips.shape[0])         # every video
    table = torch.empty_like(full.fused).scatter_(1, full.video_idx, full.fused)         # (Q, N) exact
    eng = ExactSearch(index, precision="int8", video_chunk=100)
    for rows in (slice(0, 24), *(slice(i, i + 1) for i in range(0, 24, 5))):
        got = eng.search(q[rows], 10)
        np.testing.assert_allclose(got.fused.numpy(), full.fused[rows, :10].numpy(), atol=1e-5)
        np.testing.assert_allclose(table[rows].gather(1, got.video_idx).numpy(), got.fused.numpy(), atol=1e-5)
    assert eng.stats["fallbacks"] < 3                       # the bound rarely fails to certify


def test_fp16_index_close_to_fp32(tmp_path):
    emb = _emb(300)
    idx32 = VideoIndex.load(_write(emb, tmp_path / "a"))
    idx16 = VideoIndex.load(_write(emb, tmp_path / "b", dtype="float16"))
    assert idx16.clips.dtype == np.float16 and idx16.clips.nbytes * 2 == idx32.clips.nbytes
    q = _queries(emb, 20)
    r32, r16 = ExactSearch(idx32).search(q, 10), ExactSearch(idx16).search(q, 10)
    assert torch.allclose(r32.fused, r16.fused, atol=2e-3)
    assert (r32.video_idx[:, :3] == r16.video_idx[:, :3]).float().mean() > 0.9


def test_manifest_and_moments(tmp_path):
    emb = _emb(20)
    path = _write(emb, tmp_path / "idx", map_size=16, fps=2.0, checkpoint_sha256="abc", text_encoder="t")
    m = json.loads((path / "manifest.json").read_text())
    assert (m["count"], m["num_clips"], m["hidden"], m["model_version"], m["fps"]) == (20, 8, 32, "v1", 2.0)
    assert set(m["files"]) == {"clips.npy", "attended.npy", "spans.npy", "num_frames.npy"}
    index = VideoIndex.load(path, verify=True)
    assert isinstance(index.clips, np.memmap) and index.spans.dtype == np.int32
    assert np.allclose(np.linalg.norm(index.clips, axis=-1), 1, atol=1e-5)
    # unit spans of 16 units in a 64-frame video -> frame spans x4
    assert (index.moment(np.array([3]), np.array([2]))[0] == emb.spans[3, 2].numpy() * 4).all()


def test_model_version_refused(tmp_path):
    path = _write(_emb(10), tmp_path / "idx")
    VideoIndex.load(path, expect_model_version="v1")
    with pytest.raises(SearchIndexError, match="model version 'v1'.*'v2'"):
        VideoIndex.load(path, expect_model_version="v2")


def test_corrupt_or_missing_files_refused(tmp_path):
    path = _write(_emb(10), tmp_path / "idx")
    with open(path / "attended.npy", "r+b") as f:          # same size, flipped bytes
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    VideoIndex.load(path)                                   # size check passes...
    with pytest.raises(SearchIndexError, match="sha256"):   # ...the checksum does not
        VideoIndex.load(path, verify=True)
    with open(path / "clips.npy", "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(SearchIndexError, match="clips.npy has .* bytes"):
        VideoIndex.load(path)
    (path / "spans.npy").unlink()
    with pytest.raises(SearchIndexError, match="missing"):
        VideoIndex.load(path)
    with pytest.raises(SearchIndexError, match="no video index"):
        VideoIndex.load(tmp_path / "nowhere")


def test_crash_mid_build_keeps_old_index(tmp_path, monkeypatch):
    out = tmp_path / "idx"
    _write(_emb(10, seed=0), out, model_version="old")

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(build_mod, "write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _write(_emb(12, seed=1), out, model_version="new")
    old = VideoIndex.load(out, expect_model_version="old", verify=True)
    assert old.count == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]       # temp dir cleaned up
    monkeypatch.undo()
    _write(_emb(12, seed=1), out, model_version="new")
    assert VideoIndex.load(out, expect_model_version="new").count == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]       # backup removed


def test_faiss_flat_equals_the_reference_and_ann_recall(tmp_path):
    """faiss's guarantee: every returned score is exact; flat with every video as a candidate is
    the exact top-k; the ANN indexes only approximate the candidate set (recall stated below)."""
    pytest.importorskip("faiss")
    emb = _emb(400, K=8, H=32, dup=False)
    index = VideoIndex.load(_write(emb, tmp_path / "idx", ann=search_cfg(index_type="hnsw")))
    assert index.manifest["ann"]["index_type"] == "hnsw" and (index.path / "faiss.index").is_file()
    q = _queries(emb, 30)
    ref = pair_scores(q, emb.clips, emb.attended)
    flat = make_engine(index, search_cfg(backend="faiss", index_type="flat", candidates=400)).search(q, 10)
    check_against_reference(flat, ref, 0.7, 10)
    fused = fused_of(ref, 0.7)
    recall = {}
    for kind in ("hnsw", "ivf", "ivfpq", "ivfpqfs"):
        cfg = search_cfg(backend="faiss", index_type=kind, nlist=16, nprobe=4, pq_m=8, candidates=40,
                         refine=200)
        res = make_engine(index, cfg).search(q, 10)
        ok = res.video_idx.numpy() >= 0
        exact_scores = np.take_along_axis(fused, res.video_idx.clamp_min(0).numpy(), 1)
        np.testing.assert_allclose(res.fused.numpy()[ok], exact_scores[ok], atol=1e-5)
        recall[kind] = overlap(res, ref, 0.7)
    refined = make_engine(index, search_cfg(backend="faiss", index_type="ivfpqfs", nlist=16, nprobe=16,
                                            pq_m=8, refine_codes="pq8", candidates=40, refine=400))
    assert refined.faiss.__class__.__name__ == "IndexRefine"
    res = refined.search(q, 10)
    ok = res.video_idx.numpy() >= 0
    exact_scores = np.take_along_axis(fused, res.video_idx.clamp_min(0).numpy(), 1)
    np.testing.assert_allclose(res.fused.numpy()[ok], exact_scores[ok], atol=1e-5)
    recall["ivfpqfs+pq"] = overlap(res, ref, 0.7)
    # recall@10 measured on this data (pure noise beyond the planted matches): nprobe 4 of 16
    # lists: hnsw 1.0, ivf 0.69, ivfpq 0.68, ivfpqfs 0.68; all 16 lists with an 8-byte PQ re-score: 0.94
    assert recall["hnsw"] >= 0.9 and min(recall[k] for k in ("ivf", "ivfpq", "ivfpqfs")) >= 0.5, recall
    assert recall["ivfpqfs+pq"] >= 0.85, recall


@pytest.mark.parametrize("index_type", ["ivfpqfs", "ivfpq", "ivf"])
def test_ivf_build_with_torch_assigned_lists_searches_like_faiss_own_add(index_type, monkeypatch):
    """train_and_add finds each clip's inverted list with one torch product (fast scan through
    an IVF-PQ twin it then converts); the index answers exactly as one filled by faiss's add."""
    import prvr.search.ann as ann

    emb = _emb(600, K=8, H=32, dup=False)
    clips, attended = emb.clips.numpy(), emb.attended.numpy()
    params = ann_params(search_cfg(index_type=index_type, nlist=16, nprobe=4, pq_m=8), 600 * 8, 0.7)
    ours = ann.train_and_add(clips, attended, params, chunk=1000)
    assert ann._coarse_lists(ours) is not None
    monkeypatch.setattr(ann, "_coarse_lists", lambda index: None)                   # faiss's own add
    theirs = ann.train_and_add(clips, attended, params, chunk=1000)
    assert type(ours) is type(theirs) and ours.ntotal == theirs.ntotal == 600 * 8
    q = ann.fused_rows(clips.reshape(-1, 32), attended.reshape(-1, 32), 0.7, 0, 50)
    (d1, i1), (d2, i2) = ours.search(q, 20), theirs.search(q, 20)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(d1, d2)


def test_faiss_reranks_from_an_fp16_index(tmp_path):
    """Re-scoring gathers rows of fp16 (memory-mapped) arrays as fp32: the exact top-k of the
    stored (fp16-rounded) vectors."""
    pytest.importorskip("faiss")
    emb = _emb(200, K=8, H=32, dup=False)
    index = VideoIndex.load(_write(emb, tmp_path / "idx", dtype="float16"))
    assert index.clips.dtype == np.float16
    q = _queries(emb, 20)
    ref = pair_scores(q, index.clips, index.attended, as_stored=True)    # the fp16 rows, in float64
    flat = make_engine(index, search_cfg(backend="faiss", index_type="flat", candidates=200)).search(q, 10)
    check_against_reference(flat, ref, 0.7, 10)


def test_faiss_refine_codes_rescore_hits_in_faiss_and_follow_the_config(tmp_path):
    """refine_codes fp16/sq8: faiss re-scores the hits from its own copy of z (an IndexRefine);
    the stored file's codes give way to the config's, both ways, and scores stay exact."""
    faiss = pytest.importorskip("faiss")
    emb = _emb(300, K=8, H=32, dup=False)
    built = search_cfg(index_type="ivfpqfs", nlist=8, nprobe=8, pq_m=8, refine_codes="fp16")
    index = VideoIndex.load(_write(emb, tmp_path / "idx", ann=built))
    assert index.manifest["ann"]["refine_codes"] == "fp16"
    q = _queries(emb, 20)
    ref = pair_scores(q, emb.clips, emb.attended)
    fused = fused_of(ref, 0.7)
    results = {}
    for codes in ("fp16", "sq8", "arrays"):
        eng = make_engine(index, search_cfg(backend="faiss", index_type="ivfpqfs", nprobe=8,
                                            refine_codes=codes, refine=400, candidates=40))
        assert isinstance(eng.faiss, faiss.IndexRefine) == (codes != "arrays"), codes
        assert eng.params["refine_codes"] == codes
        res = results[codes] = eng.search(q, 10)
        np.testing.assert_allclose(res.fused.numpy(), np.take_along_axis(fused, res.video_idx.numpy(), 1),
                                   atol=1e-5)                                       # exact scores
    # every list probed and 400 of 2,400 clips re-scored: the codes change only ties at the margin
    for codes, res in results.items():
        assert overlap(res, ref, 0.7) >= 0.95, codes
    assert torch.equal(results["fp16"].video_idx, results["arrays"].video_idx)
    # the codes an index object carries count, not the config's claim about it
    plain = train_and_add(index.clips, index.attended,
                          ann_params(built, 300 * 8, index.alpha) | {"refine_codes": "arrays"})
    given = FaissSearch(index, search_cfg(backend="faiss", nprobe=8, refine_codes="fp16"), faiss_index=plain)
    assert isinstance(given.faiss, faiss.IndexRefine) and given.params["refine_codes"] == "fp16"
    with pytest.raises(ConfigError, match="search.refine_codes"):
        search_cfg(backend="faiss", refine_codes="fp8")


def test_dots_of_many_fp16_rows_are_exact_across_blocks(monkeypatch):
    """The re-rank's q.x of fp16 rows, gathered DOT_ROWS at a time: every block within fp32
    rounding of the float64 product of the same rows, whatever the block size."""
    import prvr.search.ann as ann

    rng = np.random.default_rng(0)
    arr = rng.standard_normal((20000, 48)).astype(np.float16)
    rows = np.sort(rng.choice(len(arr), 9001, replace=False))
    q = torch.from_numpy(rng.standard_normal(48).astype(np.float32))
    ref = arr[rows].astype(np.float64) @ q.numpy().astype(np.float64)
    monkeypatch.setattr(ann, "DOT_ROWS", 1000)                       # ten blocks, the last one short
    blocks = ann._dots(arr, rows, q)
    monkeypatch.setattr(ann, "DOT_ROWS", 1 << 20)                    # one block
    whole = ann._dots(arr, rows, q)
    assert blocks.dtype == np.float32 and blocks.shape == (9001,)
    np.testing.assert_allclose(blocks, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(whole, ref, rtol=0, atol=1e-5)     # the kernel may sum in another order


@pytest.mark.parametrize("index_type", ANN_INDEX_TYPES)
def test_a_large_stored_faiss_file_is_mapped_and_searches_like_one_read_into_ram(index_type, tmp_path, monkeypatch):
    """Above MAP_ABOVE_BYTES a stored index of every type opens with its flat codes memory-mapped
    from the file, not copied, and answers like the index read into RAM; asking for other
    re-score codes (the base is then cloned) works on the mapped file too."""
    import faiss

    import prvr.search.ann as ann

    emb = _emb(300, K=8, H=32, dup=False)
    built = search_cfg(index_type=index_type, nlist=8, nprobe=4, pq_m=8, refine_codes="sq8")
    path = _write(emb, tmp_path / "idx", ann=built)
    q = _queries(emb, 20)
    results = {}
    for codes in ("sq8", "fp16"):
        cfg = search_cfg(backend="faiss", index_type=index_type, nprobe=4, refine_codes=codes, refine=200,
                         candidates=20)
        in_ram = make_engine(VideoIndex.load(path), cfg).search(q, 10)
        monkeypatch.setattr(ann, "MAP_ABOVE_BYTES", 0)
        mapped = make_engine(VideoIndex.load(path), cfg)
        monkeypatch.setattr(ann, "MAP_ABOVE_BYTES", 1 << 30)
        results[codes] = mapped.search(q, 10)
        assert mapped.params["refine_codes"] == codes
        assert torch.equal(results[codes].video_idx, in_ram.video_idx), codes
        assert torch.equal(results[codes].fused, in_ram.fused), codes
        if codes == "sq8":                               # the stored codes: read from the mapping
            assert not faiss.downcast_index(mapped.faiss.refine_index).codes.is_owned
    assert str((path / "faiss.index").resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.integration
def test_milvus_matches_the_reference(tmp_path):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    emb = _emb(2000, K=8, H=64, dup=False)
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    q = _queries(emb, 4)              # every video as a group: Milvus Lite needs ~2 s per query
    ref = pair_scores(q, emb.clips, emb.attended)
    cfg = search_cfg(backend="milvus", milvus_uri=str(tmp_path / "m.db"), milvus_candidates=2000)
    eng = make_engine(index, cfg)
    check_against_reference(eng.search(q, 10), ref, 0.7, 10, tol=1e-4)
    res = eng.search(q, 10, candidates=300)             # fewer groups: still exact scores
    ok = res.video_idx.numpy() >= 0
    exact_scores = np.take_along_axis(fused_of(ref, 0.7), res.video_idx.clamp_min(0).numpy(), 1)
    np.testing.assert_allclose(res.fused.numpy()[ok], exact_scores[ok], atol=1e-4)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_encoded, text_encoder, tmp_path_factory) -> Path:
    """An untrained checkpoint in `prvr train`'s format (training adds nothing to what is tested)."""
    from prvr.collection import Collection
    from prvr.model import PRVRModel
    cfg = load_config(None, [])
    coll = Collection(tiny_encoded)
    cfg.model.video_dim, cfg.model.text_dim = coll.video_dim, text_encoder.dim
    torch.manual_seed(0)
    model = PRVRModel(cfg.model)
    path = tmp_path_factory.mktemp("search_run") / "model.pt"
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "epoch": 0, "metrics": {},
                "text_encoder": text_encoder.name}, path)
    return path


def _encode_one_video(model, coll, cfg, video_id: str) -> VideoEmbeddings:
    """One video through the model alone: its raw frames, no batching, padding or cache."""
    from prvr.views import video_views
    units, frames, _ = video_views(coll.video_features(video_id), cfg.model)
    with torch.no_grad():
        return model.encode_videos(torch.from_numpy(units)[None], torch.from_numpy(frames)[None],
                                   torch.ones(1, len(frames), dtype=torch.bool))


def test_cli_build_and_search(tiny_encoded, tiny_checkpoint, text_encoder, tmp_path, capsys):
    """The index holds, row by row, what the model makes of each video on its own; `prvr index
    search` prints the reference's top-3 for the query."""
    from prvr.cli import main
    from prvr.collection import Collection
    from prvr.encoding import load_model
    out = tmp_path / "idx"
    assert main(["index", "build", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_encoded),
                 "--split", "test", "--out", str(out), "--model-version", "7"]) == 0
    index = VideoIndex.load(out, expect_model_version="7", verify=True)
    assert index.manifest["text_encoder"] == text_encoder.name
    model, cfg, _ = load_model(tiny_checkpoint)
    coll = Collection(tiny_encoded)
    ids = coll.videos("test")
    assert index.video_ids == ids
    for row in (0, len(ids) // 2, len(ids) - 1):
        one = _encode_one_video(model, coll, cfg, ids[row])
        assert index.num_frames[row] == len(coll.video_features(ids[row]))
        np.testing.assert_allclose(index.clips[row], _unit(one.clips[0]), atol=1e-5)
        np.testing.assert_allclose(index.attended[row], _unit(one.attended[0]), atol=1e-5)
        unit_len = index.num_frames[row] / cfg.model.map_size        # frames per clip unit
        assert np.abs(index.spans[row] - one.spans[0].numpy() * unit_len).max() <= 1, ids[row]
    assert (index.spans[..., 1] <= index.num_frames[:, None]).all()
    capsys.readouterr()
    assert main(["index", "search", "--index", str(out), "--checkpoint", str(tiny_checkpoint),
                 "--query", "a person walks", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: a person walks" and len(lines) == 5
    printed = [(line.split()[1], float(line.split()[2])) for line in lines[2:]]
    tokens = torch.from_numpy(np.asarray(text_encoder.encode(["a person walks"])[0], np.float32))[None]
    with torch.no_grad():
        q = model.encode_queries(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))
    fused = fused_of(pair_scores(q, index.clips, index.attended, as_stored=True), index.alpha)[0]
    best = np.argsort(-fused, kind="stable")[:4]
    assert np.diff(fused[best]).max() < -1e-4                      # no near-tie to blur the order
    assert [v for v, _ in printed] == [ids[i] for i in best[:3]]
    np.testing.assert_allclose([s for _, s in printed], fused[best[:3]], atol=6e-5)
    assert all("frames" in line for line in lines[2:])
    assert main(["index", "search", "--index", str(tmp_path / "none"), "--checkpoint",
                 str(tiny_checkpoint), "--query", "x"]) == 2


def test_index_of_all_videos_a_list_file_and_unknown_ids(tiny_encoded, tiny_checkpoint, tmp_path, capsys):
    """--videos all: every video in FeatureData (captioned or not); a list file: just those;
    an unknown id: refused by name. The manifest records the corpus and the data version."""
    from prvr.cli import main
    from prvr.collection import Collection
    from prvr.indexing import build_index

    coll = Collection(tiny_encoded)
    everything = coll.all_videos()
    assert len(everything) > max(len(coll.videos(s)) for s in coll.available_splits())
    assert main(["index", "build", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_encoded),
                 "--videos", "all", "--out", str(tmp_path / "all"), "--data-version", "md5:abc"]) == 0
    assert f"{len(everything)} videos (all)" in capsys.readouterr().out
    index = VideoIndex.load(tmp_path / "all", verify=True)
    assert index.video_ids == everything
    assert (index.manifest["corpus"], index.manifest["corpus_size"], index.manifest["data_version"]) == \
        ("all", len(everything), "md5:abc")
    listed = tmp_path / "videos.txt"
    listed.write_text(f"# two videos\n{everything[3]}\n\n  {everything[0]}  \n{everything[3]}\n")
    cfg = load_config(None, [])
    path = build_index(tiny_checkpoint, tiny_encoded, str(listed), tmp_path / "some", cfg, progress=False)
    some = VideoIndex.load(path)
    assert some.video_ids == [everything[3], everything[0]] and some.manifest["corpus_size"] == 2
    assert some.manifest["corpus"] == str(listed.resolve()) and some.manifest["data_version"] is None
    assert np.allclose(some.clips[1], index.clips[0], atol=1e-5)      # the same vectors as in `all`
    listed.write_text(f"{everything[0]}\nno_such_video\nnor_this\n")
    with pytest.raises(SearchIndexError, match="2 video id.*not in .*video2frames.txt: 'no_such_video', 'nor_this'"):
        build_index(tiny_checkpoint, tiny_encoded, str(listed), tmp_path / "bad", cfg, progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SearchIndexError, match="expected all, a split"):
        build_index(tiny_checkpoint, tiny_encoded, str(tmp_path / "missing.txt"), tmp_path / "bad", cfg)


def test_truth_ranks_equal_the_reference_ranks():
    """Evaluation's ranks (fused, clip, frame) == ranks counted from the pair-by-pair reference."""
    g = torch.Generator().manual_seed(5)
    clips = F.normalize(torch.randn(40, 6, 16, generator=g), dim=-1)
    attended = F.normalize(torch.randn(40, 6, 16, generator=g), dim=-1)
    q = torch.randn(25, 16, generator=g)
    truth = torch.randint(0, 40, (25,), generator=g).numpy()
    engine = ExactSearch(VideoIndex.from_arrays(clips.numpy(), attended.numpy(), alpha=0.6), video_chunk=7,
                         precision="fp32")
    got = engine.truth_ranks(q, truth, alpha=0.6, query_chunk=4)
    clip, frame, _ = ref = pair_scores(q, clips, attended)
    for kind, s in (("fused", fused_of(ref, 0.6)), ("clip", clip), ("frame", frame)):
        others = np.abs(s - s[np.arange(25), truth][:, None])
        others[np.arange(25), truth] = np.inf
        assert others.min() > 1e-5, kind                         # no near-tie that fp32 could flip
        assert np.array_equal(got[kind], reference_ranks(s, truth)), kind
    assert len(set(got["fused"].tolist())) > 5                      # truths spread over many ranks


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_an_empty_query_batch_gives_an_empty_result(tmp_path, backend):
    g = torch.Generator().manual_seed(5)
    clips = F.normalize(torch.randn(30, 4, 16, generator=g), dim=-1).numpy()
    attended = F.normalize(torch.randn(30, 4, 16, generator=g), dim=-1).numpy()
    index = VideoIndex.from_arrays(clips, attended, alpha=0.7)
    engine = make_engine(index, search_cfg(backend=backend, index_type="flat"))
    res = engine.search(torch.zeros(0, 16), top_k=5)
    assert res.video_idx.shape == res.fused.shape == (0, 5)


# ----------------------------------------------------------------------------- 1M-scale re-score path
@pytest.fixture
def one_faiss_thread():
    """faiss on one OpenMP thread: its k-means waits on busy cores' spinning threads otherwise
    (a 16-list training took 6.9 s with 2 threads on a loaded 2-core machine, 0.24 s with one)."""
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("codes", ["rabitq4", "sq4"])
def test_fine_rescore_codes_with_a_budget_covering_everything_give_the_exact_top10(tmp_path, codes,
                                                                                    one_faiss_thread):
    """The large-corpus path (fast scan -> in-RAM RaBitQ / 4-bit codes re-score the hits ->
    exact re-rank from memory-mapped fp16 arrays, read ahead) is the reference's top-10 when every
    list is probed, every clip re-scored and every video a candidate; codes stored with the index
    or swapped in by the config, read-ahead on or off."""
    faiss = pytest.importorskip("faiss")
    emb = _emb(1000, K=8, H=32, dup=False)
    built = search_cfg(index_type="ivfpqfs", nlist=16, pq_m=8, refine_codes="rabitq4")
    index = VideoIndex.load(_write(emb, tmp_path / "idx", dtype="float16", ann=built))
    assert isinstance(index.clips, np.memmap) and index.manifest["ann"]["refine_codes"] == "rabitq4"
    q = _queries(emb, 12)
    ref = pair_scores(q, index.clips, index.attended, as_stored=True)
    cfg = search_cfg(backend="faiss", index_type="ivfpqfs", nprobe=16, refine_codes=codes, refine=1000 * 8,
                     candidates=1000)
    for read_ahead in (True, False):
        eng = make_engine(index, cfg.replace(read_ahead=read_ahead))
        assert isinstance(eng.faiss, faiss.IndexRefine) and eng.params["refine_codes"] == codes
        check_against_reference(eng.search(q, 10), ref, 0.7, 10, tol=1e-4)
    # a partial budget (a quarter of the clips re-scored, 50 candidates): the fine codes keep the
    # top-10 (measured 1.0 for both; candidates taken in the 4-bit fast-scan order instead: 0.53)
    partial = make_engine(index, cfg.replace(refine=2000, candidates=50)).search(q, 10)
    assert overlap(partial, ref, 0.7) >= 0.95


def test_row_prefetcher_addresses_the_rows_of_a_memory_mapped_array(tmp_path):
    """Read-ahead covers exactly the asked rows of the file: its offset is row 0's bytes in the
    mapping (a 128-byte .npy header here), arrays in RAM get none, and every row can be asked for."""
    from prvr.search.index import RowPrefetcher
    arr = np.arange(1000 * 48, dtype=np.float16).reshape(1000, 48)
    np.save(tmp_path / "a.npy", arr)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    ahead = RowPrefetcher.of(mapped.reshape(100, 10, 48).reshape(1000, 48))
    assert ahead is not None and ahead.row_bytes == 96
    raw = np.frombuffer(mapped._mmap, np.uint8)
    assert np.array_equal(raw[ahead.offset + 7 * 96:ahead.offset + 8 * 96].view(np.float16), arr[7])
    ahead(np.array([0, 5, 999]))
    ahead(np.array([990]), 10)                                         # up to the last byte
    assert RowPrefetcher.of(arr) is None and RowPrefetcher.of(mapped.reshape(-1)) is None


def test_refine_code_settings_validate():
    for codes in ("sq4", "sq6", "sq8", "rabitq1", "rabitq9", "pq192", "fp16", "arrays"):
        assert search_cfg(refine_codes=codes).refine_codes == codes
    for bad in ("rabitq0", "rabitq10", "sq5", "rabitq", "pq0", "sq4 "):
        with pytest.raises(ConfigError, match="search.refine_codes"):
            search_cfg(refine_codes=bad)
