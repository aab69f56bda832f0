"""Online retrieval: request validation, batched answering and TorchServe glue.

``serving/handler.py`` is a thin ``BaseHandler`` subclass; everything it does lives
here so it can be tested without a server:

- ``Retriever``: the checkpoint (``load_model``), the text encoder the model was
  trained with, and the precomputed video index (``prvr.search``). ``answer(requests)``
  turns a batch of raw requests into one response per request: valid ones are
  encoded and scored together, a bad one gets its own 4xx and never fails the rest.
- ``TorchServeService``: what the handler delegates to; reads TorchServe's batch,
  sets a status per request (``context.set_response_status(code, phrase, idx)``)
  and records the custom metrics declared in ``serving/metrics.yaml``.

Request (``Content-Type: application/json``)::

    {"query": "a man opens the fridge"}                  # or "queries": [...]
    {"token_features": [[...Dt floats...], ...]}         # L x Dt, or a list of those
    optional: "top_k" (1..serve.max_top_k), "alpha" (0..1)

Response::

    {"model_version": "v0003", "corpus_size": 2179, "top_k": 10, "alpha": 0.7,
     "results": [{"query": "...", "videos": [{"video_id", "score", "clip_score",
                  "frame_score", "moment": {"start", "end", "unit"}}, ...]}]}

Usage::

    retriever = Retriever.load("runs/train/model.pt", "runs/index", version="v0003")
    [answer] = retriever.answer([Request({"query": "a man opens the fridge"})])
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from prvr.config import Config, SearchConfig, ServeConfig
from prvr.errors import CheckpointError, RequestError

__all__ = ["Request", "Answer", "Query", "Retriever", "TorchServeService", "SERVE_MANIFEST",
           "METRICS", "parse_request", "check_index", "load_serve_manifest"]

logger = logging.getLogger(__name__)

SERVE_MANIFEST = "serve.json"       # written by prvr.packaging into the archive
INDEX_DIR = "index"
CHECKPOINT = "model.pt"
JSON_TYPES = ("application/json",)
_ALLOWED_KEYS = {"query", "queries", "token_features", "top_k", "alpha"}

# Custom metrics: (name, type, unit, extra dimensions). serving/metrics.yaml declares the
# same names (a test keeps them in step); TorchServe adds ModelName/Level and Hostname.
METRICS = (
    ("prvr_requests_total", "counter", "count", ["outcome"]),
    ("prvr_request_latency_seconds", "histogram", "s", []),
    ("prvr_stage_seconds", "histogram", "s", ["stage"]),
    ("prvr_queries_total", "counter", "count", []),
    ("prvr_corpus_size", "gauge", "count", ["model_version"]),
)
OUTCOMES = ("ok", "bad_request", "error")


class Request(NamedTuple):
    """One HTTP request as TorchServe hands it over: the body and its content type."""
    body: Any                      # dict (JSON already decoded), bytes or str
    content_type: str | None = "application/json"


class Answer(NamedTuple):
    status: int                    # HTTP status of this request
    body: dict[str, Any]
    outcome: str                   # ok | bad_request | error


@dataclass
class Query:
    """A validated request: texts or token features (never both), top_k and alpha."""
    texts: list[str] | None
    features: list[np.ndarray] | None
    top_k: int
    alpha: float
    vectors: list[int] = field(default_factory=list)   # rows of the batch's query matrix

    @property
    def count(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.features or [])


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _decode_body(body: Any, content_type: str | None) -> dict[str, Any]:
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise RequestError(f"Content-Type must be application/json, got {content_type or 'none'!r}",
                           status=415)
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(bytes(body).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RequestError(f"request body is not UTF-8: {exc}") from None
        except json.JSONDecodeError as exc:
            raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_text(value: Any, where: str, cfg: ServeConfig) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(f"{where} is empty")
    if len(value) > cfg.max_query_chars:
        raise RequestError(f"{where} has {len(value)} characters, more than serve.max_query_chars="
                           f"{cfg.max_query_chars}")
    return value


def _check_features(value: Any, text_dim: int, cfg: ServeConfig) -> list[np.ndarray]:
    """One (L, Dt) matrix or a list of them, finite numbers, Dt = the model's text dim."""
    if not isinstance(value, list) or not value:
        raise RequestError("token_features must be a non-empty list (L x Dt numbers, or a list of those)")
    several = isinstance(value[0], list) and bool(value[0]) and isinstance(value[0][0], list)
    items = value if several else [value]
    if len(items) > cfg.max_queries:
        raise RequestError(f"token_features holds {len(items)} queries, more than serve.max_queries="
                           f"{cfg.max_queries}")
    out = []
    for i, item in enumerate(items):
        where = f"token_features[{i}]" if several else "token_features"
        try:
            arr = np.asarray(item, dtype=np.float32)
        except (ValueError, TypeError):
            raise RequestError(f"{where} must be a rectangular L x {text_dim} array of numbers") from None
        if arr.dtype == object or arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != text_dim:
            raise RequestError(f"{where} must have shape (L, {text_dim}) with L >= 1, got "
                               f"{tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise RequestError(f"{where} contains NaN or infinite values")
        out.append(arr)
    return out


def _check_number(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not (isinstance(value, int) or float(value).is_integer())):
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {kind}, got {value!r}")
    in_range = lo <= value <= hi if isinstance(value, int) else math.isfinite(value) and lo <= value <= hi
    if not in_range:
        raise RequestError(f"{key} must lie in [{lo:g}, {hi:g}], got {value!r}")
    return int(value) if integer else float(value)


def parse_request(req: Request, cfg: ServeConfig, text_dim: int, default_alpha: float,
                  features_only: bool = False) -> Query:
    """Validate one request; raises RequestError (status 4xx) naming the problem."""
    body = _decode_body(req.body, req.content_type)
    unknown = sorted(set(body) - _ALLOWED_KEYS)
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                           f"{', '.join(sorted(_ALLOWED_KEYS))}")
    given = [k for k in ("query", "queries", "token_features") if body.get(k) is not None]
    if not given:
        raise RequestError("missing 'query' (a string), 'queries' (a list of strings) or "
                           "'token_features'")
    if len(given) > 1:
        raise RequestError(f"give only one of 'query', 'queries', 'token_features' (got {given})")
    top_k = _check_number(body, "top_k", cfg.top_k, 1, cfg.max_top_k, integer=True)
    alpha = _check_number(body, "alpha", default_alpha, 0.0, 1.0, integer=False)
    if given[0] == "token_features":
        return Query(None, _check_features(body["token_features"], text_dim, cfg), top_k, alpha)
    if features_only:
        raise RequestError("this model serves 'token_features' only: its text encoder is not available")
    if given[0] == "query":
        return Query([_check_text(body["query"], "query", cfg)], None, top_k, alpha)
    queries = body["queries"]
    if not isinstance(queries, list) or not queries:
        raise RequestError("queries must be a non-empty list of strings")
    if len(queries) > cfg.max_queries:
        raise RequestError(f"queries holds {len(queries)} queries, more than serve.max_queries="
                           f"{cfg.max_queries}")
    return Query([_check_text(q, f"queries[{i}]", cfg) for i, q in enumerate(queries)], None, top_k, alpha)


def error_answer(exc: Exception) -> Answer:
    if isinstance(exc, RequestError):
        return Answer(exc.status, {"error": "bad_request", "status": exc.status, "message": str(exc)},
                      "bad_request")
    return Answer(500, {"error": "internal_error", "status": 500,
                        "message": f"{type(exc).__name__}: {exc}"}, "error")


# --------------------------------------------------------------------------- #
# The retriever
# --------------------------------------------------------------------------- #
def check_index(manifest: dict[str, Any], index_dir: str | Path, checkpoint: str | Path, ckpt: dict,
                version: str | None) -> None:
    """Refuse an index built by another checkpoint (sha256), model version or text encoder."""
    from prvr.errors import SearchIndexError
    from prvr.registry import sha256_file

    built_sha = manifest.get("checkpoint_sha256")
    if built_sha:
        if built_sha != sha256_file(checkpoint):
            raise SearchIndexError(f"video index {index_dir} was built from another checkpoint than "
                                   f"{checkpoint} (sha256 {built_sha[:12]}...): rebuild it")
    elif version and manifest.get("model_version") not in (None, version):
        raise SearchIndexError(f"video index {index_dir} was built by model version "
                               f"{manifest.get('model_version')!r}, not {version!r}: rebuild it")
    trained_with, indexed_with = ckpt.get("text_encoder"), manifest.get("text_encoder")
    if trained_with and indexed_with and trained_with != indexed_with:
        raise CheckpointError(f"video index {index_dir} records text encoder {indexed_with!r}, the "
                              f"checkpoint {checkpoint} was trained with {trained_with!r}")


def load_serve_manifest(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / SERVE_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: build the archive with `prvr package`")
    return json.loads(path.read_text())


class Retriever:
    """Checkpoint + text encoder + video index; answers batches of requests."""

    def __init__(self, model, cfg: Config, engine, index, encoder, serve_cfg: ServeConfig,
                 model_version: str, text_encoder: str | None, fps: float | None):
        self.model, self.cfg, self.engine, self.index = model, cfg, engine, index
        self.encoder, self.serve_cfg = encoder, serve_cfg
        self.model_version, self.text_encoder, self.fps = model_version, text_encoder, fps
        self.video_ids = [str(v) for v in index.video_ids]
        self.spans = np.asarray(index.spans)
        self.corpus_size = len(self.video_ids)
        self.text_dim = cfg.model.text_dim
        self.default_alpha = cfg.model.alpha
        self.last_timings: dict[str, float] = {}

    # -- loading -------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | Path, index_dir: str | Path, version: str | None = None,
             serve_cfg: ServeConfig | None = None, search_cfg: SearchConfig | None = None,
             encoder: Any = None, load_encoder: bool = True) -> "Retriever":
        """Load the model and its index; refuse an index or text encoder built for another model."""
        from prvr.evaluate import load_model
        from prvr.search import VideoIndex, make_engine

        model, cfg, ckpt = load_model(checkpoint, "cpu")
        index = VideoIndex.load(index_dir)
        manifest = dict(index.manifest or {})
        check_index(manifest, index_dir, checkpoint, ckpt, version)
        version = version or manifest.get("model_version") or "unversioned"
        trained_with = ckpt.get("text_encoder")
        if encoder is None and load_encoder:
            from prvr.text import TextEncoder
            encoder = TextEncoder.from_config(cfg.text)
        if encoder is not None:
            expected = trained_with or manifest.get("text_encoder")
            if expected and encoder.name != expected:
                raise CheckpointError(f"text encoder {encoder.name!r} differs from {expected!r}, the "
                                      f"one the model was trained with; refusing to serve")
            if encoder.dim != cfg.model.text_dim:
                raise CheckpointError(f"text encoder {encoder.name!r} gives {encoder.dim}-d tokens, the "
                                      f"model expects {cfg.model.text_dim}-d")
        serve_cfg = serve_cfg or ServeConfig()
        engine = make_engine(index, search_cfg or SearchConfig())
        fps = manifest.get("fps") or serve_cfg.fps
        retriever = cls(model, cfg, engine, index, encoder, serve_cfg, version,
                        trained_with or manifest.get("text_encoder"), float(fps) if fps else None)
        retriever.warmup()
        return retriever

    def warmup(self) -> None:
        """One throw-away query, so the first real request does not pay for lazy initialisation."""
        feats = [np.zeros((2, self.text_dim), np.float32)]
        self.answer([Request({"token_features": feats[0].tolist(), "top_k": 1})])
        if self.encoder is not None:
            self.answer([Request({"query": "warm up", "top_k": 1})])

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Retriever":
        """Load from an unpacked archive (serve.json, model.pt, index/), or from the registry
        when PRVR_REGISTRY_URI is set (PRVR_REGISTRY_VERSION, default production)."""
        model_dir = Path(model_dir)
        manifest = load_serve_manifest(model_dir)
        serve_cfg = Config.from_dict({"serve": manifest.get("serve", {})}).serve
        search_cfg = Config.from_dict({"search": manifest.get("search", {})}).search
        uri = os.environ.get("PRVR_REGISTRY_URI")
        if uri:
            from prvr.registry import Registry
            reg = Registry(uri, endpoint_url=os.environ.get("PRVR_REGISTRY_ENDPOINT_URL") or None)
            name = os.environ.get("PRVR_REGISTRY_MODEL") or manifest.get("registry_model") or "prvr-mssl-pp"
            version = os.environ.get("PRVR_REGISTRY_VERSION") or reg.production(name)
            if not version:
                raise CheckpointError(f"registry {uri} has no production version of {name}")
            local = reg.pull(name, version, model_dir / "registry" / version)
            return cls.load(local / CHECKPOINT, local / INDEX_DIR, version, serve_cfg, search_cfg)
        return cls.load(model_dir / manifest.get("checkpoint", CHECKPOINT),
                        model_dir / manifest.get("index", INDEX_DIR), manifest.get("model_version"),
                        serve_cfg, search_cfg)

    # -- answering -----------------------------------------------------------
    def parse(self, req: Request) -> Query:
        return parse_request(req, self.serve_cfg, self.text_dim, self.default_alpha,
                             features_only=self.encoder is None)

    @torch.inference_mode()
    def encode(self, queries: Sequence[Query]) -> torch.Tensor:
        """Query vectors (Q, H) of every query of every request, in order."""
        from prvr.dataset import collate_queries

        texts = [t for q in queries if q.texts is not None for t in q.texts]
        text_feats = iter(self.encoder.encode(texts, batch_size=max(len(texts), 1)) if texts else [])
        feats: list[np.ndarray] = []
        for q in queries:
            q.vectors = list(range(len(feats), len(feats) + q.count))
            feats += [next(text_feats) for _ in q.texts] if q.texts is not None else q.features
        tokens, mask = collate_queries(feats, self.cfg.model.max_desc_len)
        return self.model.encode_queries(tokens, mask).float()

    def search(self, vectors: torch.Tensor, queries: Sequence[Query]) -> list[dict[str, Any]]:
        """Rank the corpus for each request (one engine call per distinct alpha)."""
        bodies: list[dict[str, Any]] = [{} for _ in queries]
        by_alpha: dict[float, list[int]] = {}
        for i, q in enumerate(queries):
            by_alpha.setdefault(q.alpha, []).append(i)
        for alpha, members in by_alpha.items():
            rows = [r for i in members for r in queries[i].vectors]
            k = min(max(queries[i].top_k for i in members), self.corpus_size)
            res = self.engine.search(vectors[rows], top_k=k, alpha=alpha)
            arrays = [np.asarray(getattr(res, f)) for f in ("video_idx", "fused", "clip", "frame", "key_clip")]
            pos = 0
            for i in members:
                q = queries[i]
                kq = min(q.top_k, self.corpus_size)
                results = []
                for j in range(q.count):
                    row = [a[pos + j, :kq] for a in arrays]
                    results.append({"query": q.texts[j] if q.texts is not None else None,
                                    "videos": self._videos(*row)})
                pos += q.count
                bodies[i] = {"model_version": self.model_version, "corpus_size": self.corpus_size,
                             "top_k": kq, "alpha": alpha, "results": results}
        return bodies

    def _videos(self, vidx, fused, clip, frame, key) -> list[dict[str, Any]]:
        out = []
        for v, s, c, f, kc in zip(vidx.tolist(), fused.tolist(), clip.tolist(), frame.tolist(), key.tolist()):
            start, end = (int(x) for x in self.spans[v, kc])
            if self.fps:
                moment = {"start": round(start / self.fps, 3), "end": round(end / self.fps, 3),
                          "unit": "seconds"}
            else:
                moment = {"start": start, "end": end, "unit": "frames"}
            out.append({"video_id": self.video_ids[v], "score": s, "clip_score": c, "frame_score": f,
                        "moment": moment})
        return out

    def answer(self, requests: Sequence[Request]) -> list[Answer]:
        """One Answer per request; invalid requests get their own 4xx, the rest are served together.

        ``last_timings`` holds this batch's parse / encode / score seconds and query count."""
        t0 = time.perf_counter()
        answers: list[Answer | None] = [None] * len(requests)
        valid: list[tuple[int, Query]] = []
        for i, req in enumerate(requests):
            try:
                valid.append((i, self.parse(req)))
            except RequestError as exc:
                answers[i] = error_answer(exc)
        t1 = t2 = time.perf_counter()
        if valid:
            queries = [q for _, q in valid]
            try:
                vectors = self.encode(queries)
                t2 = time.perf_counter()
                for (i, _), body in zip(valid, self.search(vectors, queries)):
                    answers[i] = Answer(200, body, "ok")
            except Exception as exc:  # noqa: BLE001 - a failed batch must not kill the worker
                logger.exception("answering a batch of %d requests failed", len(valid))
                for i, _ in valid:
                    answers[i] = error_answer(exc)
        t3 = time.perf_counter()
        self.last_timings = {"parse": t1 - t0, "encode": t2 - t1 if valid else 0.0,
                             "score": t3 - t2 if valid else 0.0,
                             "queries": float(sum(q.count for _, q in valid))}
        return [a for a in answers if a is not None]


# --------------------------------------------------------------------------- #
# TorchServe glue
# --------------------------------------------------------------------------- #
def _header(headers: Any, name: str) -> str | None:
    if not isinstance(headers, dict):
        return None
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def request_from_torchserve(row: dict[str, Any], context: Any, idx: int) -> Request:
    """A TorchServe batch row ({'body': ...} or {'data': ...}) and its content type."""
    name = "body" if "body" in row else ("data" if "data" in row else next(iter(row), None))
    body = row.get(name) if name is not None else None
    ctype = None
    try:
        headers = context.get_all_request_header(idx)
    except Exception:  # noqa: BLE001 - a context without headers (old TS, tests)
        headers = {}
    if isinstance(headers, dict):
        param = headers.get(name)
        ctype = _header(param, "content-type") if isinstance(param, dict) else None
        ctype = ctype or _header(headers, "content-type")
    if ctype is None and isinstance(body, dict):
        ctype = "application/json"    # TorchServe only decodes JSON bodies into objects
    return Request(body, ctype)


def server_timing(timings: dict[str, float]) -> str:
    """W3C Server-Timing value of a batch's stages in ms (`parse;dur=0.02, encode;dur=6.9, ...`):
    the times of the batch a request was in (a lone request's own), which the metrics
    histograms' 5 ms buckets cannot resolve, visible to any client."""
    return ", ".join(f"{stage};dur={1e3 * timings.get(stage, 0.0):.3f}" for stage in ("parse", "encode", "score"))


class TorchServeService:
    """What serving/handler.py delegates to: load once, then answer TorchServe batches."""

    def __init__(self, retriever: Retriever, metrics_cache: Any = None, model_name: str = "prvr"):
        self.retriever = retriever
        self.model_name = model_name
        self._metrics = self._register_metrics(metrics_cache)
        self._emit("prvr_corpus_size", retriever.corpus_size, [retriever.model_version])

    @classmethod
    def from_context(cls, context: Any) -> "TorchServeService":
        model_dir = context.system_properties.get("model_dir")
        # serve.threads (env PRVR_TORCH_THREADS overrides): intra-op threads of this worker,
        # set before anything runs. docs/serving.md has the measured trade-off.
        try:
            serve = load_serve_manifest(model_dir).get("serve") or {}
            torch.set_num_threads(max(1, int(os.environ.get("PRVR_TORCH_THREADS") or serve.get("threads") or 1)))
            retriever = Retriever.from_model_dir(model_dir)
        except Exception:
            # TorchServe shows only the log: say why the model failed to load, then fail it.
            logger.exception("prvr: model in %s failed to load", model_dir)
            raise
        logger.info("prvr: serving %s (%d videos, text encoder %s)", retriever.model_version,
                    retriever.corpus_size, retriever.text_encoder)
        return cls(retriever, getattr(context, "metrics", None), getattr(context, "model_name", "prvr"))

    def _register_metrics(self, cache: Any) -> dict[str, Any]:
        """Fetch (or declare) each custom metric once; TorchServe parses them from the worker log."""
        if cache is None:
            return {}
        from ts.metrics.metric_type_enum import MetricTypes

        out = {}
        for name, kind, unit, dims in METRICS:
            mtype = MetricTypes(kind)
            try:
                out[name] = cache.get_metric(name, mtype)
            except Exception:  # noqa: BLE001 - not declared in the metrics config
                out[name] = cache.add_metric_to_cache(name, unit, ["ModelName", "Level"] + dims, mtype)
        return out

    def _emit(self, name: str, value: float, extra: list[str] | None = None) -> None:
        metric = self._metrics.get(name)
        if metric is not None:
            metric.add_or_update(value, [self.model_name, "Model"] + (extra or []))

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        t0 = time.perf_counter()
        requests = [request_from_torchserve(row or {}, context, i) for i, row in enumerate(data)]
        answers = self.retriever.answer(requests)
        timings = self.retriever.last_timings
        out = []
        for i, a in enumerate(answers):
            phrase = "OK" if a.status == 200 else a.body.get("error", "error")
            context.set_response_status(a.status, phrase, i)
            context.set_response_content_type(i, "application/json")
            if a.status == 200:                      # a refused request took no part in them
                context.set_response_header(i, "Server-Timing", server_timing(timings))
            out.append(json.dumps(a.body))
        elapsed = time.perf_counter() - t0
        for a in answers:
            self._emit("prvr_requests_total", 1, [a.outcome])
            self._emit("prvr_request_latency_seconds", elapsed)
        for stage in ("parse", "encode", "score"):
            if stage == "parse" or timings.get("queries"):
                self._emit("prvr_stage_seconds", timings.get(stage, 0.0), [stage])
        if timings.get("queries"):
            self._emit("prvr_queries_total", timings["queries"])
        return out
