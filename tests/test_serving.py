"""prvr.serving without a server: validation, batching, the handler with a mock context,
consistency with offline scoring, and the archive.

``serving_artifacts`` (a checkpoint, its index and two archives) is shared with
test_serving_http.py and test_serving_prometheus.py."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from prvr.collection import Collection
from prvr.config import Config, default_config, load_config
from prvr.errors import CheckpointError, RequestError, SearchIndexError
from prvr.model import PRVRModel, score
from prvr.serving import (METRICS, Request, Retriever, TorchServeService, parse_request)

REPO = Path(__file__).resolve().parent.parent
_ARTIFACTS: dict[str, SimpleNamespace] = {}


def make_checkpoint(path: Path, video_dim: int, text_dim: int, encoder_name: str, seed: int = 0) -> Path:
    """A randomly initialised MS-SL++ checkpoint with the real format (no training needed)."""
    cfg = default_config()
    cfg.model.video_dim, cfg.model.text_dim = video_dim, text_dim
    torch.manual_seed(seed)
    model = PRVRModel(cfg.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": cfg.to_dict(), "epoch": 0, "metrics": {},
                "text_encoder": encoder_name}, path)
    return path


def serving_artifacts(root: Path, encoder) -> SimpleNamespace:
    """Checkpoint + index (tiny synthetic test split) + prvr-v0001.mar / prvr-v0002.mar, built once."""
    if "a" in _ARTIFACTS:
        return _ARTIFACTS["a"]
    from prvr.collection import Collection
    from prvr.archive import build_archive
    from prvr.indexing import build_index
    from prvr.synth import synthesize

    data = synthesize(root / "data", "tiny", preset="tiny", seed=2018)
    ckpt = make_checkpoint(root / "run" / "model.pt", Collection(data).video_dim, encoder.dim, encoder.name)
    cfg = load_config(None, ["serve.max_batch_delay_ms=50", "serve.batch_size=4"])
    index = build_index(ckpt, data, "test", root / "index", cfg, model_version="v0001", progress=False)
    store = root / "model_store"
    mars = {v: build_archive(ckpt, index, store, v, "prvr", cfg) for v in ("v0001", "v0002")}
    _ARTIFACTS["a"] = SimpleNamespace(data=data, checkpoint=ckpt, index=index, store=store, mars=mars, cfg=cfg)
    return _ARTIFACTS["a"]


def start_serving(tmp_path_factory, name: str, encoder):
    """A real TorchServe on free loopback ports serving v0001 of the shared artifacts."""
    from prvr.server import TorchServe

    art = serving_artifacts(tmp_path_factory.getbasetemp() / "serving-artifacts", encoder)
    ts = TorchServe(tmp_path_factory.mktemp(name), art.store, {"prvr": art.mars["v0001"].name},
                    free_ports=True)
    ts.start(wait=180)
    ts.art = art
    return ts


@pytest.fixture(scope="module")
def art(tmp_path_factory, text_encoder):
    return serving_artifacts(tmp_path_factory.getbasetemp() / "serving-artifacts", text_encoder)


@pytest.fixture(scope="module")
def retriever(art, text_encoder) -> Retriever:
    return Retriever.load(art.checkpoint, art.index, "v0001", art.cfg.serve, encoder=text_encoder)


# --------------------------------------------------------------------------- validation
CFG = default_config().serve
BAD = [
    (Request(b"{not json", "application/json"), 400, "not valid JSON"),
    (Request({"query": "x"}, "text/plain"), 415, "Content-Type must be application/json"),
    (Request(b'{"query": "x"}', None), 415, "Content-Type"),
    (Request([1, 2], "application/json"), 400, "must be a JSON object"),
    (Request({}, "application/json"), 400, "missing 'query'"),
    (Request({"top_k": 3}, "application/json"), 400, "missing 'query'"),
    (Request({"query": 3}), 400, "query must be a string"),
    (Request({"query": "   "}), 400, "query is empty"),
    (Request({"query": "a" * (CFG.max_query_chars + 1)}), 400, "max_query_chars"),
    (Request({"queries": []}), 400, "non-empty list"),
    (Request({"queries": "a man"}), 400, "non-empty list"),
    (Request({"queries": ["ok", ""]}), 400, "queries[1] is empty"),
    (Request({"queries": ["q"] * (CFG.max_queries + 1)}), 400, "max_queries"),
    (Request({"query": "x", "top_k": 0}), 400, "top_k must lie in [1, 1000]"),
    (Request({"query": "x", "top_k": CFG.max_top_k + 1}), 400, "top_k must lie"),
    (Request({"query": "x", "top_k": 2.5}), 400, "top_k must be an integer"),
    (Request({"query": "x", "top_k": "5"}), 400, "top_k must be an integer"),
    (Request({"query": "x", "top_k": True}), 400, "top_k must be an integer"),
    (Request({"query": "x", "top_k": 10 ** 30}), 400, "top_k must lie"),
    (Request({"query": "x", "alpha": 1.5}), 400, "alpha must lie in [0, 1]"),
    (Request({"query": "x", "alpha": -0.1}), 400, "alpha must lie"),
    (Request({"query": "x", "alpha": math.nan}), 400, "alpha must lie"),
    (Request({"query": "x", "alpha": "0.5"}), 400, "alpha must be a number"),
    (Request({"query": "x", "topk": 5}), 400, "unknown field(s) 'topk'"),
    (Request({"query": "x", "token_features": [[0.0] * 8]}), 400, "only one of"),
    (Request({"token_features": []}), 400, "non-empty list"),
    (Request({"token_features": [[0.0] * 7]}), 400, "shape (L, 8)"),
    (Request({"token_features": [0.0] * 8}), 400, "shape (L, 8)"),
    (Request({"token_features": [[0.0] * 8, [0.0] * 7]}), 400, "rectangular"),
    (Request({"token_features": [[0.0] * 7 + [math.nan]]}), 400, "NaN or infinite"),
    (Request({"token_features": [[[0.0] * 8], [[0.0] * 8, [1.0] * 7]]}), 400, "token_features[1]"),
    (Request({"token_features": [["a"] * 8]}), 400, "numbers"),
]


@pytest.mark.parametrize("req,status,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_requests_name_the_problem(req, status, message):
    with pytest.raises(RequestError) as exc:
        parse_request(req, CFG, text_dim=8, default_alpha=0.7)
    assert exc.value.status == status
    assert message in str(exc.value)


def test_valid_requests_parse():
    q = parse_request(Request(b'{"query": "a man", "top_k": 5, "alpha": 0}', "application/json; charset=utf-8"),
                      CFG, 8, 0.7)
    assert (q.texts, q.top_k, q.alpha) == (["a man"], 5, 0.0)
    q = parse_request(Request({"queries": ["a", "b"]}), CFG, 8, 0.7)
    assert (q.texts, q.top_k, q.alpha) == (["a", "b"], CFG.top_k, 0.7)
    q = parse_request(Request({"token_features": [[[1.0] * 8] * 3, [[2.0] * 8]]}), CFG, 8, 0.7)
    assert [f.shape for f in q.features] == [(3, 8), (1, 8)]
    with pytest.raises(RequestError, match="serves .token_features. only") as refused:
        parse_request(Request({"query": "x"}), CFG, 8, 0.7, features_only=True)
    assert refused.value.status == 422
    with pytest.raises(RequestError, match="retrain"):
        parse_request(Request({"queries": ["x"]}), CFG, 8, 0.7, features_only=True, refusal="retrain")


# --------------------------------------------------------------------------- answering
def test_answer_schema_and_per_request_errors(art, retriever):
    answers = retriever.answer([
        Request({"query": "a man opens the fridge", "top_k": 3}),
        Request(b"{oops", "application/json"),
        Request({"queries": ["a dog runs", "someone cooks"], "top_k": 2, "alpha": 0.2}),
        Request({"query": "x", "top_k": 1000}),
    ])
    assert [a.status for a in answers] == [200, 400, 200, 200]
    assert [a.outcome for a in answers] == ["ok", "bad_request", "ok", "ok"]
    ok = answers[0].body
    assert ok["model_version"] == "v0001" and ok["corpus_size"] == retriever.corpus_size
    assert "data_version" in ok and ok["data_version"] is None          # an index built without one
    assert ok["alpha"] == pytest.approx(0.7) and ok["top_k"] == 3
    [res] = ok["results"]
    assert res["query"] == "a man opens the fridge" and len(res["videos"]) == 3
    hit = res["videos"][0]
    assert set(hit) == {"video_id", "score", "clip_score", "frame_score", "moment", "title", "duration_s"}
    assert hit["score"] == pytest.approx(0.7 * hit["clip_score"] + 0.3 * hit["frame_score"], abs=1e-5)
    # the synthetic corpus's videos.jsonl: its title and duration, and moments in seconds from it
    info = Collection(art.data).video_info[hit["video_id"]]
    assert (hit["title"], hit["duration_s"]) == (info.title, info.duration_s)
    i = retriever.video_ids.index(hit["video_id"])
    frames, seconds = int(retriever.index.num_frames[i]), info.duration_s / int(retriever.index.num_frames[i])
    start, end = round(hit["moment"]["start"] / seconds), round(hit["moment"]["end"] / seconds)
    assert hit["moment"] == {"start": round(start * seconds, 3), "end": round(end * seconds, 3),
                             "unit": "seconds", "video_length": round(frames * seconds, 3)}
    assert [int(start), int(end)] in retriever.index.spans[i].tolist() and 0 <= start < end <= frames
    scores = [v["score"] for v in res["videos"]]
    assert scores == sorted(scores, reverse=True)
    assert len(answers[2].body["results"]) == 2 and answers[2].body["alpha"] == pytest.approx(0.2)
    # top_k above the corpus size returns the whole corpus, ranked
    assert answers[3].body["top_k"] == retriever.corpus_size
    assert len({v["video_id"] for v in answers[3].body["results"][0]["videos"]}) == retriever.corpus_size
    assert "not valid JSON" in answers[1].body["message"]


def test_served_scores_equal_offline_scores(art, retriever, text_encoder):
    """Served top-k (fused, clip, frame) equal prvr.model.score over evaluate's corpus encoding."""
    from prvr.collection import Collection
    from prvr.views import collate_queries
    from prvr.evaluate import encode_corpus, load_model
    from prvr.encoding import VideoSource

    model, cfg, _ = load_model(art.checkpoint)
    coll = Collection(art.data)
    vids = coll.videos("test")
    emb, _ = encode_corpus(model, VideoSource(coll, cfg, vids), vids, torch.device("cpu"))
    texts = ["a man opens the fridge", "a dog runs on the beach", "someone plays the guitar"]
    feats = text_encoder.encode(texts)
    with torch.no_grad():
        q = model.encode_queries(*collate_queries(feats, cfg.model.max_desc_len))
    for alpha in (0.7, 0.3):
        ref = score(q, emb.clips, emb.attended, alpha)
        k = 10
        answers = retriever.answer([Request({"queries": texts, "top_k": k, "alpha": alpha}),
                                    Request({"token_features": [f.tolist() for f in feats], "top_k": k,
                                             "alpha": alpha})])
        for a in answers:
            for i, res in enumerate(a.body["results"]):
                idx = [vids.index(v["video_id"]) for v in res["videos"]]
                for key, kind in (("score", "fused"), ("clip_score", "clip"), ("frame_score", "frame")):
                    served = np.array([v[key] for v in res["videos"]])
                    np.testing.assert_allclose(served, getattr(ref, kind)[i, idx].numpy(), atol=1e-4)
                np.testing.assert_allclose([v["score"] for v in res["videos"]],
                                           ref.fused[i].topk(k).values.numpy(), atol=1e-4)


def test_failure_inside_a_batch_is_a_500_for_its_valid_requests_only(retriever, monkeypatch):
    def boom(queries):
        raise RuntimeError("scoring exploded")
    monkeypatch.setattr(retriever, "encode", boom)
    answers = retriever.answer([Request({"query": "fine"}), Request({"query": ""})])
    assert [a.status for a in answers] == [500, 400]
    assert answers[0].outcome == "error" and "scoring exploded" in answers[0].body["message"]


def test_moments_in_seconds_when_fps_is_known(art, text_encoder):
    cfg = load_config(None, ["serve.fps=2.0"])
    r = Retriever.load(art.checkpoint, art.index, "v0001", cfg.serve, encoder=text_encoder)
    [a] = r.answer([Request({"query": "a man", "top_k": 2})])
    m = a.body["results"][0]["videos"][0]["moment"]
    assert m["unit"] == "seconds" and isinstance(m["start"], float) and m["end"] > m["start"]


def test_refuses_another_text_encoder(art, text_encoder, tmp_path):
    from prvr.collection import Collection

    other = make_checkpoint(tmp_path / "other.pt", Collection(art.data).video_dim, text_encoder.dim,
                            "some-other-encoder:1.0")
    from prvr.indexing import build_index
    index = build_index(other, art.data, "test", tmp_path / "idx", art.cfg, model_version="v9", progress=False)
    with pytest.raises(CheckpointError, match="some-other-encoder:1.0"):
        Retriever.load(other, index, "v9", encoder=text_encoder)
    # and an index of another checkpoint is refused too
    with pytest.raises(SearchIndexError, match="another checkpoint"):
        Retriever.load(art.checkpoint, index, "v0001", encoder=text_encoder)


# --------------------------------------------------------------------------- handler
def _load_handler():
    spec = importlib.util.spec_from_file_location("prvr_handler_under_test", REPO / "serving" / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PRVRHandler


def _context(model_dir: Path, bodies: list[tuple[object, str]]):
    from ts.context import Context, RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(config_file_path=str(REPO / "serving" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "prvr"
    ctx = Context("prvr", str(model_dir), {"model": {"modelName": "prvr"}}, 4, None, "0.12.0", metrics=metrics)
    ctx.request_ids = {i: f"req-{i}" for i in range(len(bodies))}
    ctx.request_processor = [RequestProcessor({"body": {"content-type": ct}}) for _, ct in bodies]
    metrics.request_ids = ctx.request_ids
    return ctx, [{"body": b} for b, _ in bodies]


def test_handler_with_mock_context(art, tmp_path, caplog, monkeypatch, text_encoder):
    """The archive's files + a TorchServe Context: one status per request, metrics emitted."""
    import prvr.text

    model_dir = tmp_path / "model_dir"
    with zipfile.ZipFile(art.mars["v0001"]) as z:
        z.extractall(model_dir)
    monkeypatch.setattr(prvr.text.TextEncoder, "from_config", lambda *a, **k: text_encoder)  # reuse the loaded one
    monkeypatch.setenv("PRVR_TORCH_THREADS", str(torch.get_num_threads()))     # keep the session's
    bodies = [({"query": "a man opens the fridge", "top_k": 2}, "application/json"),
              (b"{bad json", "application/json"),
              ({"query": "x"}, "text/plain"),
              ({"queries": ["one", "two"]}, "application/json")]
    ctx, data = _context(model_dir, bodies)
    handler = _load_handler()()
    with caplog.at_level(logging.INFO):
        handler.initialize(ctx)
        out = handler.handle(data, ctx)
    assert len(out) == 4
    statuses = [ctx.get_response_status(i)[0] for i in range(4)]
    assert statuses == [200, 400, 415, 200]
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(4))
    bodies_out = [json.loads(o) for o in out]
    assert bodies_out[0]["model_version"] == "v0001" and len(bodies_out[0]["results"][0]["videos"]) == 2
    assert bodies_out[1]["error"] == "bad_request" and "JSON" in bodies_out[1]["message"]
    assert len(bodies_out[3]["results"]) == 2
    logged = caplog.text
    assert "[METRICS]prvr_requests_total.Count:1|#ModelName:prvr,Level:Model,outcome:ok|#type:COUNTER" in logged
    assert "outcome:bad_request" in logged
    assert "[METRICS]prvr_request_latency_deciseconds.Deciseconds:" in logged and "#type:HISTOGRAM" in logged
    assert "stage:encode" in logged and "stage:score" in logged
    assert f"[METRICS]prvr_corpus_size.Count:{bodies_out[0]['corpus_size']}|" in logged


def test_handler_initialize_fails_clearly_on_encoder_mismatch(art, tmp_path, caplog, text_encoder, monkeypatch):
    import prvr.text

    model_dir = tmp_path / "model_dir"
    with zipfile.ZipFile(art.mars["v0001"]) as z:
        z.extractall(model_dir)

    class Other:
        name, dim = "another-encoder:2", text_encoder.dim
    monkeypatch.setattr(prvr.text.TextEncoder, "from_config", lambda *a, **k: Other())
    monkeypatch.setenv("PRVR_TORCH_THREADS", str(torch.get_num_threads()))
    ctx, _ = _context(model_dir, [])
    with caplog.at_level(logging.ERROR), pytest.raises(CheckpointError, match="another-encoder:2"):
        _load_handler()().initialize(ctx)
    assert "failed to load" in caplog.text


def test_metrics_yaml_declares_every_custom_metric():
    spec = yaml.safe_load((REPO / "serving" / "metrics.yaml").read_text())["model_metrics"]
    declared = {m["name"]: (kind, m["unit"], m["dimensions"]) for kind, items in spec.items() for m in items}
    for name, kind, unit, dims in METRICS:
        assert declared[name] == (kind, unit, ["ModelName", "Level"] + dims), name
    # latencies in deciseconds, so the frontend's fixed buckets (0.005 .. 10) span 0.5 ms .. 1 s
    assert [n for n, kind, _, _ in METRICS if kind == "histogram"] == ["prvr_request_latency_deciseconds",
                                                                        "prvr_stage_deciseconds"]
    assert "ts_inference_requests_total" in str(yaml.safe_load((REPO / "serving" / "metrics.yaml").read_text()))


class _PlainContext:
    """The part of TorchServe's Context the service uses: statuses and headers per request."""

    def __init__(self):
        self.status, self.headers = {}, {}

    def get_all_request_header(self, idx):
        return {}

    def set_response_status(self, code, phrase, idx):
        self.status[idx] = code

    def set_response_content_type(self, idx, value):
        pass

    def set_response_header(self, idx, key, value):
        self.headers[idx] = (key, value)


def test_service_without_metrics_cache(retriever):
    ctx = _PlainContext()
    out = TorchServeService(retriever).handle([{"body": {"query": "x"}}, {"body": b"{"}], ctx)
    assert ctx.status == {0: 200, 1: 415} and len(out) == 2   # raw bytes without a type: not JSON
    assert 1 not in ctx.headers                                  # the refused one: no stage times
    key, value = ctx.headers[0]
    stages = dict(part.split(";dur=") for part in value.split(", "))
    assert key == "Server-Timing" and set(stages) == {"parse", "encode", "score"}
    assert float(stages["encode"]) > 0 and float(stages["score"]) > 0


# --------------------------------------------------------------------------- archive
def test_archive_contents(art, text_encoder):
    with zipfile.ZipFile(art.mars["v0002"]) as z:
        names = set(z.namelist())
        serve = json.loads(z.read("serve.json"))
        model_cfg = yaml.safe_load(z.read("model-config.yaml"))
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"model.pt", "handler.py", "serve.json", "index/manifest.json", "index/clips.npy"} <= names
    assert serve["model_version"] == "v0002" and serve["text_encoder"] == text_encoder.name
    assert serve["serve"]["max_batch_delay_ms"] == 50
    assert model_cfg["batchSize"] == 4 and model_cfg["maxBatchDelay"] == 50
    assert "clientTimeoutInMills" not in model_cfg           # serve.client_timeout_ms 0: none
    assert manifest["model"]["modelVersion"] == "v0002" and manifest["model"]["modelName"] == "prvr"


def test_archive_for_the_faiss_engine_carries_its_faiss_index(art, tmp_path):
    """search.backend faiss: the archive's index gets the faiss index the config asks for
    (the source index has none), and the served answers keep exact scores."""
    from prvr.archive import build_archive

    assert not (art.index / "faiss.index").exists()
    cfg = Config.from_dict({"search": {"backend": "faiss", "index_type": "flat", "refine_codes": "fp16"},
                            "serve": {"client_timeout_ms": 45000}})
    mar = build_archive(art.checkpoint, art.index, tmp_path / "store", "v0007", "prvr", cfg)
    with zipfile.ZipFile(mar) as z:
        assert "index/faiss.index" in z.namelist()
        assert yaml.safe_load(z.read("model-config.yaml"))["clientTimeoutInMills"] == 45000
        ann = json.loads(z.read("index/manifest.json"))["ann"]
        z.extractall(tmp_path / "unpacked")
    assert ann["index_type"] == "flat" and ann["refine_codes"] == "fp16"
    assert not (art.index / "faiss.index").exists()                  # the source index is untouched
    served = Retriever.from_model_dir(tmp_path / "unpacked")
    assert served.engine.__class__.__name__ == "FaissSearch" and served.engine.params["refine_codes"] == "fp16"


def test_archive_refuses_foreign_index(art, tmp_path, text_encoder):
    from prvr.collection import Collection
    from prvr.archive import build_archive

    other = make_checkpoint(tmp_path / "m.pt", Collection(art.data).video_dim, text_encoder.dim,
                            text_encoder.name, seed=1)
    with pytest.raises(SearchIndexError, match="another checkpoint"):
        build_archive(other, art.index, tmp_path / "store", "v0009", "prvr", art.cfg)
    assert not (tmp_path / "store" / "prvr-v0009.mar").exists()


def test_package_cli_from_registry(art, tmp_path, monkeypatch):
    from prvr.cli import main
    from prvr.registry import Registry

    reg = Registry(f"file://{tmp_path / 'reg'}")
    version = reg.register("prvr-mssl-pp", {"model.pt": art.checkpoint, "index": art.index}, {"sumr": 1.0})
    reg.promote("prvr-mssl-pp", version)
    monkeypatch.chdir(tmp_path)
    # the index was built for v0001 of another registry, but from the same checkpoint (sha256): accepted
    assert main(["package", "--registry", f"file://{tmp_path / 'reg'}", "--out", "store"]) == 0
    assert (tmp_path / "store" / f"prvr-{version}.mar").is_file()
    assert main(["package", "--checkpoint", str(art.checkpoint), "--version", "v7", "--out", "store"]) == 2


def test_model_dir_can_load_a_registry_version(art, tmp_path, monkeypatch, text_encoder):
    """PRVR_REGISTRY_URI: the worker pulls model.pt + index/ of a registry version instead."""
    import prvr.text
    from prvr.registry import Registry

    reg = Registry(f"file://{tmp_path / 'reg'}")
    reg.register("prvr-mssl-pp", {"model.pt": art.checkpoint, "index": art.index}, {"sumr": 1.0})
    version = reg.register("prvr-mssl-pp", {"model.pt": art.checkpoint, "index": art.index}, {"sumr": 2.0})
    reg.promote("prvr-mssl-pp", version)
    model_dir = tmp_path / "model_dir"
    with zipfile.ZipFile(art.mars["v0001"]) as z:
        z.extractall(model_dir)
    monkeypatch.setattr(prvr.text.TextEncoder, "from_config", lambda *a, **k: text_encoder)
    monkeypatch.setenv("PRVR_REGISTRY_URI", f"file://{tmp_path / 'reg'}")
    assert Retriever.from_model_dir(model_dir).model_version == version
    monkeypatch.setenv("PRVR_REGISTRY_VERSION", "v0001")
    r = Retriever.from_model_dir(model_dir)
    assert r.model_version == "v0001" and (model_dir / "registry" / "v0001" / "model.pt").is_file()
    [a] = r.answer([Request({"query": "a man", "top_k": 1})])
    assert a.status == 200 and a.body["model_version"] == "v0001"
