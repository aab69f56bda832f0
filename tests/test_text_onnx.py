"""The MiniLM through ONNX Runtime (text.runtime onnx, text.quantize int8): the same token
features as torch in fp32, close ones in int8, one deterministic export per weights and
settings in a cache, and clear errors for a missing, corrupt or foreign file."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import prvr.text
from prvr.collection import Collection
from prvr.config import ConfigError, load_config
from prvr.encoding import VideoSource, encode_corpus, encode_token_features, load_model
from prvr.errors import PrvrError
from prvr.search import ExactSearch, VideoIndex
from prvr.text import LeanBert, OnnxBert, TextEncoder, encoder_identifier, export_onnx, onnx_file, weights_digest

SENTENCES = ["A woman in a red coat opens the fridge in the kitchen.", "hi", "", "   ",
             "naïve café — 日本語のテスト 🙂 Ünïcödé", "In the kitchen, the lady grabs a mug and then walks slowly " * 4]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_fp32(onnx_cache: Path) -> TextEncoder:
    return TextEncoder("minilm", 30, "float32", runtime="onnx", onnx_cache=onnx_cache)


@pytest.fixture(scope="module")
def onnx_int8(onnx_cache: Path) -> TextEncoder:
    return TextEncoder("minilm", 30, "float32", runtime="onnx", quantize="int8", onnx_cache=onnx_cache)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _token_cosines(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    x, y = np.concatenate(a), np.concatenate(b)
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


@pytest.mark.parametrize("batch_size", [1, 128])         # alone, and padded in one batch
def test_fp32_onnx_gives_the_torch_features(fp32_encoder, onnx_fp32, batch_size):
    ref, got = fp32_encoder.encode(SENTENCES, batch_size), onnx_fp32.encode(SENTENCES, batch_size)
    assert [g.shape for g in got] == [r.shape for r in ref] and got[-1].shape == (30, 384)
    for r, g in zip(ref, got):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, r, rtol=0, atol=5e-5)          # measured: ~4e-6
    assert onnx_fp32.runtime == "onnx" and isinstance(onnx_fp32._forward, OnnxBert)
    assert onnx_fp32.name == fp32_encoder.name                       # the same encoder, by name


def test_int8_features_are_close_but_another_encoder(fp32_encoder, onnx_fp32, onnx_int8, tiny_collection):
    texts = SENTENCES + [c.text for c in Collection(tiny_collection).captions("test")]
    ref, got = fp32_encoder.encode(texts), onnx_int8.encode(texts)
    cos = _token_cosines(ref, got)
    assert cos.mean() > 0.98 and cos.min() > 0.93                    # measured on 1190 captions: 0.991 / 0.971
    assert max(np.abs(r - g).max() for r, g in zip(ref, got)) > 1e-2      # really quantized, not fp32
    assert onnx_int8.name == fp32_encoder.name + "@int8" == encoder_identifier("minilm", "float32", "int8")
    int8_file, fp32_file = onnx_int8._forward.path, onnx_fp32._forward.path
    assert int8_file.stat().st_size < 0.75 * fp32_file.stat().st_size
    ops = {n.op_type for n in onnx.load(str(int8_file)).graph.node}
    assert "MatMulInteger" in ops and "MatMulInteger" not in {n.op_type for n in onnx.load(str(fp32_file)).graph.node}


def test_int8_queries_keep_a_trained_models_ranking(trained, tiny_encoded, fp32_encoder, onnx_int8):
    """Typed queries of the test split through a trained model: int8 against fp32 features."""
    model, cfg, _ = load_model(trained["root"] / "run" / "model.pt")
    coll = Collection(tiny_encoded, cfg.data.video_feature)
    caps, vids = coll.captions("test"), coll.videos("test")
    emb, _ = encode_corpus(model, VideoSource(coll, cfg, vids), vids, torch.device("cpu"))
    engine = ExactSearch(VideoIndex.from_arrays(emb.clips.numpy(), emb.attended.numpy(), alpha=cfg.model.alpha),
                         precision="fp32")
    texts = [c.text for c in caps]
    q32 = encode_token_features(model, fp32_encoder.encode(texts))
    q8 = encode_token_features(model, onnx_int8.encode(texts))
    cos = torch.nn.functional.cosine_similarity(q32, q8)
    top32, top8 = engine.search(q32, top_k=10).video_idx.numpy(), engine.search(q8, top_k=10).video_idx.numpy()
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top32, top8)])
    # measured: query cosine 0.991 mean / 0.958 min, top-10 overlap 0.91, top-1 0.81 (119 queries, 30
    # videos, a 1-epoch model: near ties). The small preset's trained model: 0.92 / 0.98 (text_bench.py)
    assert cos.mean() > 0.98 and cos.min() > 0.93
    assert len(vids) == 30 and overlap > 0.85 and (top32[:, 0] == top8[:, 0]).mean() > 0.7


def test_the_settings_choose_the_path(onnx_cache, onnx_fp32, onnx_int8, monkeypatch):
    monkeypatch.setenv("PRVR_ONNX_CACHE", str(onnx_cache))
    before = {p: p.stat().st_mtime_ns for p in onnx_cache.glob("*.onnx")}
    assert len(before) == 2
    fp32 = ["text.quantize=none"]
    on_torch = TextEncoder.from_config(load_config(overrides=fp32 + ["text.runtime=torch"]))
    on_onnx = TextEncoder.from_config(load_config(overrides=fp32 + ["text.runtime=onnx"]))
    int8 = TextEncoder.from_config(load_config())                                # the default
    bf16 = TextEncoder.from_config(load_config(overrides=fp32 + ["text.runtime=onnx", "text.precision=bfloat16"]))
    assert isinstance(on_torch._forward, LeanBert) and on_torch.runtime == "torch"
    assert isinstance(on_onnx._forward, OnnxBert) and on_onnx._forward.path == onnx_fp32._forward.path
    assert isinstance(int8._forward, OnnxBert) and int8._forward.path == onnx_int8._forward.path
    assert bf16.runtime == "torch" and bf16.name.endswith("@bfloat16")   # ONNX Runtime has no bf16 CPU path
    np.testing.assert_array_equal(int8.encode(SENTENCES[:1])[0], onnx_int8.encode(SENTENCES[:1])[0])
    assert {p: p.stat().st_mtime_ns for p in onnx_cache.glob("*.onnx")} == before     # reused, not exported


def test_export_is_deterministic(onnx_int8, tmp_path):
    """int8 covers both steps: the TorchScript export and the quantization."""
    again = export_onnx(onnx_int8.model, tmp_path / "again.onnx", "int8")
    assert _sha(again) == _sha(onnx_int8._forward.path)
    assert [p.name for p in tmp_path.iterdir()] == ["again.onnx"]       # no temp folder left


def test_missing_corrupt_or_foreign_files_are_refused(onnx_fp32, tmp_path):
    digest, good = weights_digest(onnx_fp32.model), onnx_fp32._forward.path
    with pytest.raises(PrvrError, match="not found"):
        OnnxBert(tmp_path / "absent.onnx", digest, "none", 1)
    (tmp_path / "garbage.onnx").write_bytes(b"not a model" * 100)
    (tmp_path / "cut.onnx").write_bytes(good.read_bytes()[:200_000])
    for name in ("garbage.onnx", "cut.onnx"):
        with pytest.raises(PrvrError, match=f"{name} is unreadable or corrupt.*delete it"):
            OnnxBert(tmp_path / name, digest, "none", 1)
    with pytest.raises(PrvrError, match="other weights or settings"):
        OnnxBert(good, digest, "int8", 1)                           # an fp32 file where int8 is expected
    with pytest.raises(PrvrError, match="other weights or settings"):
        OnnxBert(good, "0" * 64, "none", 1)


def test_a_corrupt_cache_file_is_reported_not_replaced(onnx_fp32, tmp_path):
    cache = tmp_path / "cache"
    name = onnx_fp32._forward.path.name
    cache.mkdir()
    (cache / name).write_bytes(b"\0" * 1000)
    with pytest.raises(PrvrError, match=f"{name} is unreadable or corrupt"):
        TextEncoder("minilm", 30, "float32", runtime="onnx", onnx_cache=cache)
    assert (cache / name).read_bytes() == b"\0" * 1000


def test_a_failed_export_leaves_nothing(onnx_fp32, tmp_path, monkeypatch):
    def half_export(module, args, f, **kwargs):
        Path(f).write_bytes(b"half a model")
        raise RuntimeError("export interrupted")

    monkeypatch.setattr(prvr.text.torch.onnx, "export", half_export)
    with pytest.raises(RuntimeError, match="interrupted"):
        onnx_file(onnx_fp32.model, "none", tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PrvrError, match="cannot write the ONNX text encoder.*PRVR_ONNX_CACHE"):
        onnx_file(onnx_fp32.model, "none", tmp_path / "a-file" / "cache")


@pytest.mark.parametrize("kwargs,message", [
    ({"runtime": "tensorflow"}, "text.runtime must be one of"),
    ({"quantize": "int4"}, "text.quantize must be one of"),
    ({"precision": "bfloat16", "quantize": "int8"}, "quantizes the float32 encoder"),
    ({"quantize": "int8", "device": "cuda"}, "runs in ONNX Runtime on the CPU"),
])
def test_impossible_settings_are_refused(kwargs, message):
    with pytest.raises(PrvrError, match=message):
        TextEncoder("minilm", 30, **{"precision": "float32", **kwargs})


def test_config_checks_the_text_settings():
    with pytest.raises(ConfigError, match="quantizes the float32 encoder"):
        load_config(overrides=["text.precision=bfloat16", "text.quantize=int8"])
    with pytest.raises(ConfigError, match="text.runtime must be one of"):
        load_config(overrides=["text.runtime=tensorflow"])
    with pytest.raises(ConfigError, match="quantizes the float32 encoder"):      # int8 is the default
        load_config(overrides=["text.precision=bfloat16"])
    cfg = load_config(overrides=["text.runtime=onnx", "text.quantize=none", "text.precision=bfloat16"])
    assert (cfg.text.runtime, cfg.text.precision) == ("onnx", "bfloat16")
