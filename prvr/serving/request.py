"""Request schema and validation of the online retriever.

Request (``Content-Type: application/json``)::

    {"query": "a man opens the fridge"}                  # or "queries": [...]
    {"token_features": [[...Dt floats...], ...]}         # L x Dt, or a list of those
    optional: "top_k" (1..serve.max_top_k), "alpha" (0..1)

A model without a text encoder (trained on precomputed features) takes token features only;
typed text then gets a 422 saying why.

``parse_request`` turns one raw ``Request`` into a validated ``Query`` or raises
``RequestError`` (status 4xx) naming the problem; ``error_answer`` turns an exception
into the ``Answer`` of that one request. Nothing here knows about TorchServe.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from prvr.config import ServeConfig
from prvr.errors import RequestError

__all__ = ["Request", "Answer", "Query", "parse_request", "error_answer", "JSON_TYPES"]

JSON_TYPES = ("application/json",)
_ALLOWED_KEYS = {"query", "queries", "token_features", "top_k", "alpha"}


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
                  features_only: bool = False, refusal: str | None = None) -> Query:
    """Validate one request; raises RequestError (status 4xx) naming the problem.

    ``features_only``: the model has no text encoder, so typed text is refused (422) with
    ``refusal`` as the message when given (why, and what to do instead)."""
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
        raise RequestError(refusal or "this model serves 'token_features' only: its text encoder is not "
                           "available", status=422)
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
