"""TorchServe glue: what ``serving/handler.py`` delegates to.

``TorchServeService`` loads a ``Retriever`` from the unpacked archive, reads TorchServe's
batch, and hands each answer back with its own status (``context.set_response_status(code,
phrase, idx)``) and the headers of ``prvr.serving.request.answer_headers``; it records the
custom metrics declared in ``serving/metrics.yaml``. Validation, retrieval and the answer's
schema live in the server-free core (``request.py``, ``retriever.py``), shared with the KServe
adapter (``prvr.kserve_app``). This is the only module that touches TorchServe, and it imports
``ts`` only inside a TorchServe worker (see ``_register_metrics``), so it loads, and is tested,
without a server.

Latencies are recorded in deciseconds (100 ms): TorchServe 0.12 gives every histogram the
Prometheus Java client's default buckets (0.005 .. 10), which then span 0.5 ms .. 1 s.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from prvr.serving.request import STAGES, Request, answer_headers
from prvr.serving.retriever import Retriever, load_serve_manifest, torch_threads

__all__ = ["TorchServeService", "request_from_torchserve", "METRICS", "OUTCOMES", "DECISECONDS"]

logger = logging.getLogger(__name__)

# Custom metrics: (name, type, unit, extra dimensions). serving/metrics.yaml declares the
# same names (a test keeps them in step); TorchServe adds ModelName/Level and Hostname.
# Latencies in deciseconds: see the module docstring (multiply by 0.1 for seconds).
METRICS = (
    ("prvr_requests_total", "counter", "count", ["outcome"]),
    ("prvr_request_latency_deciseconds", "histogram", "Deciseconds", []),
    ("prvr_stage_deciseconds", "histogram", "Deciseconds", ["stage"]),
    ("prvr_queries_total", "counter", "count", []),
    ("prvr_corpus_size", "gauge", "count", ["model_version"]),
)
OUTCOMES = ("ok", "bad_request", "error")
DECISECONDS = 10.0      # per second


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
        try:
            torch_threads(load_serve_manifest(model_dir).get("serve") or {})
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
        # TorchServe is imported only inside a TorchServe worker (a metrics cache exists
        # only there): everything else in prvr loads and runs without it.
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
            context.set_response_status(a.status, "OK" if a.status == 200 else a.body.get("error", "error"), i)
            for key, value in answer_headers(a, timings).items():
                if key == "Content-Type":
                    context.set_response_content_type(i, value)
                else:
                    context.set_response_header(i, key, value)
            out.append(json.dumps(a.body))
        self._record(answers, timings, time.perf_counter() - t0)
        return out

    def _record(self, answers: list, timings: dict[str, float], elapsed: float) -> None:
        """One metric line per request (outcome, latency) and per batch (stages, queries)."""
        for a in answers:
            self._emit("prvr_requests_total", 1, [a.outcome])
            self._emit("prvr_request_latency_deciseconds", DECISECONDS * elapsed)
        for stage in STAGES:
            if stage == "parse" or timings.get("queries"):
                self._emit("prvr_stage_deciseconds", DECISECONDS * timings.get(stage, 0.0), [stage])
        if timings.get("queries"):
            self._emit("prvr_queries_total", timings["queries"])
