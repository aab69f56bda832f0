"""Request schema and validation of the online retriever.

Request (``Content-Type: application/json``)::

    {"query": "a man opens the fridge"}                  # or "queries": [...]
    {"token_features": [[...Dt floats...], ...]}         # L x Dt, or a list of those
    optional: "top_k" (1..serve.max_top_k), "alpha" (0..1)

A model without a text encoder (trained on precomputed features) takes token features only;
typed text then gets a 422 saying why.

``parse_request`` turns one raw ``Request`` into a validated ``Query`` or raises
``RequestError`` (status 4xx) naming the problem, whatever the body holds: every input is
hostile until checked. A raw body is read strictly: at most ``serve.max_body_bytes`` (413),
UTF-8, RFC 8259 JSON (no NaN/Infinity, no repeated keys), nesting within the recursion
limit; a property test (tests/test_serving_input.py) throws random JSON and bytes at it.
``error_answer`` turns an exception into the ``Answer`` of that one request, and
``answer_headers`` gives the HTTP headers every server sends with an answer. Nothing here
knows about any server (TorchServe or KServe): both are thin adapters over this module and
``prvr.serving.retriever``.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from prvr.config import ServeConfig
from prvr.errors import RequestError

__all__ = ["Request", "Answer", "Query", "parse_request", "error_answer", "answer_headers", "server_timing",
           "JSON_TYPES", "STAGES"]

JSON_TYPES = ("application/json",)
_ALLOWED_KEYS = {"query", "queries", "token_features", "top_k", "alpha"}
STAGES = ("parse", "encode", "score")       # Retriever.last_timings, Server-Timing, the stage metrics

logger = logging.getLogger(__name__)


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


def _show(value: Any, limit: int = 40) -> str:
    """A short description of a client's value for an error message. Never the value's full
    repr: that could be megabytes long, nest deeper than the recursion limit, or (an integer
    of more than 4300 digits) raise ValueError itself."""
    if isinstance(value, dict):
        return f"an object of {len(value)} key(s)"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"an integer of about {int((value.bit_length() - 1) * math.log10(2)) + 1} digits"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice is refused (json.loads would keep the last one
    silently, so a client could not tell which value was used)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(f"request body repeats the key {_show(key)} in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise RequestError(f"request body holds {name}, which is not JSON (RFC 8259 has no NaN or Infinity)")


def _loads(raw: bytes, cfg: ServeConfig) -> Any:
    """Strict JSON of a raw body: size, UTF-8, syntax, no NaN/Infinity, no repeated keys,
    nesting within the interpreter's recursion limit, integers within its digit limit."""
    if len(raw) > cfg.max_body_bytes:
        raise RequestError(f"request body has {len(raw)} bytes, more than serve.max_body_bytes="
                           f"{cfg.max_body_bytes}", status=413)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request body is not UTF-8: byte {raw[exc.start]:#04x} at offset {exc.start} "
                           f"({exc.reason})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("request body nests arrays or objects too deeply") from None
    except ValueError:      # the only other ValueError json raises: int("9" * 5000)
        raise RequestError(f"request body holds an integer of more than {sys.get_int_max_str_digits()} "
                           "digits") from None


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _decode_body(body: Any, content_type: str | None, cfg: ServeConfig) -> dict[str, Any]:
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES:
        raise RequestError(f"Content-Type must be application/json, got {_show(content_type or 'none')}",
                           status=415)
    if isinstance(body, str):           # TorchServe decoded it as text: back to the bytes it came as
        body = body.encode("utf-8", "surrogatepass")
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = _loads(bytes(body), cfg)
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {_kind(body)}")
    return body


def _check_text(value: Any, where: str, cfg: ServeConfig) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string, got {_kind(value)}")
    if not value.strip():
        raise RequestError(f"{where} is empty")
    if len(value) > cfg.max_query_chars:
        raise RequestError(f"{where} has {len(value)} characters, more than serve.max_query_chars="
                           f"{cfg.max_query_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:   # a JSON escape such as "\ud800": the tokenizer would fail the batch
        raise RequestError(f"{where} holds a lone surrogate U+{ord(value[exc.start]):04X} at character "
                           f"{exc.start}: not a Unicode character") from None
    return value


def _matrix(item: Any, where: str, text_dim: int) -> np.ndarray:
    """One query's (L, Dt) token features as float32: numbers only (numpy would turn the strings
    "1.5" or "nan", booleans and nulls into numbers silently), finite, Dt = the model's text dim."""
    try:
        arr = np.asarray(item)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise RequestError(f"{where} must be a rectangular L x {text_dim} array of numbers") from None
    numbers = all(type(x) in (int, float) for x in arr.flat) if arr.dtype == object else arr.dtype.kind in "iuf"
    if not numbers:
        raise RequestError(f"{where} must hold numbers only, not strings, booleans, nulls or objects")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != text_dim:
        raise RequestError(f"{where} must have shape (L, {text_dim}) with L >= 1, got {tuple(arr.shape)}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(np.float32)
    except OverflowError:                   # an integer beyond float64 (object array)
        arr = np.full(arr.shape, np.inf, np.float32)
    if not np.isfinite(arr).all():
        raise RequestError(f"{where} contains NaN or infinite values (or numbers beyond the float32 range)")
    return arr


def _check_features(value: Any, text_dim: int, cfg: ServeConfig) -> list[np.ndarray]:
    """One (L, Dt) matrix or a list of them."""
    if not isinstance(value, list) or not value:
        raise RequestError("token_features must be a non-empty list (L x Dt numbers, or a list of those)")
    several = isinstance(value[0], list) and bool(value[0]) and isinstance(value[0][0], list)
    items = value if several else [value]
    if len(items) > cfg.max_queries:
        raise RequestError(f"token_features holds {len(items)} queries, more than serve.max_queries="
                           f"{cfg.max_queries}")
    return [_matrix(item, f"token_features[{i}]" if several else "token_features", text_dim)
            for i, item in enumerate(items)]


def _check_number(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not (isinstance(value, int) or float(value).is_integer())):
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{key} must be {kind}, got {_show(value)}")
    in_range = lo <= value <= hi if isinstance(value, int) else math.isfinite(value) and lo <= value <= hi
    if not in_range:
        raise RequestError(f"{key} must lie in [{lo:g}, {hi:g}], got {_show(value)}")
    return int(value) if integer else float(value)


def parse_request(req: Request, cfg: ServeConfig, text_dim: int, default_alpha: float,
                  features_only: bool = False, refusal: str | None = None) -> Query:
    """Validate one request; raises RequestError (status 4xx) naming the problem, and nothing else.

    ``features_only``: the model has no text encoder, so typed text is refused (422) with
    ``refusal`` as the message when given (why, and what to do instead).

    Whatever a client sends ends here, so any other exception (a case the checks missed) is
    still the client's bad request: a 400 with the exception's name, and a warning in the log
    to fix the check, never a failed batch (TorchServe answers 503 to all of it)."""
    try:
        return _parse(req, cfg, text_dim, default_alpha, features_only, refusal)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("request body nests arrays or objects too deeply") from None
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logger.warning("a request failed validation with an unexpected error", exc_info=True)
        raise RequestError(f"request could not be read ({type(exc).__name__})") from None


def _parse(req: Request, cfg: ServeConfig, text_dim: int, default_alpha: float, features_only: bool,
           refusal: str | None) -> Query:
    body = _decode_body(req.body, req.content_type, cfg)
    unknown = [k for k in body if k not in _ALLOWED_KEYS]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise RequestError(f"unknown field(s) {', '.join(_show(k) for k in unknown[:5])}{more}; allowed: "
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


def server_timing(timings: dict[str, float]) -> str:
    """W3C Server-Timing value of a batch's stages in ms (`parse;dur=0.02, encode;dur=6.9, ...`):
    the times of the batch a request was in (a lone request's own), visible to any client."""
    return ", ".join(f"{stage};dur={1e3 * timings.get(stage, 0.0):.3f}" for stage in STAGES)


def answer_headers(answer: Answer, timings: dict[str, float]) -> dict[str, str]:
    """The headers of one answer, the same from every server: JSON, and the stage times on a 200
    (a refused request took no part in them)."""
    headers = {"Content-Type": "application/json"}
    if answer.status == 200:
        headers["Server-Timing"] = server_timing(timings)
    return headers

