"""A typed client of the prvr REST API: TorchServe's predictions endpoint with token auth.

The request and answer are documented in docs/openapi.yaml. The client retries what is
safe to retry (a search changes nothing): refused connections and 503 (no free worker),
with exponential backoff; a timeout or any other error status is raised at once as an
``ApiError`` carrying the status, the server's message and its error kind. It knows
nothing of TorchServe's Python side, so it runs wherever ``requests`` does.

Usage::

    with Client("http://127.0.0.1:8080", key=read_key("runs/serve/key_file.json")) as api:
        answer = api.search("a man opens the fridge", top_k=5)
        print(answer.hits[0].video_id, answer.hits[0].moment, answer.timing.server_ms)
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from prvr.errors import PrvrError

__all__ = ["Client", "ApiError", "AuthError", "Moment", "Hit", "QueryResult", "Timing", "SearchResponse",
           "read_key", "parse_server_timing", "parse_answer"]

RETRY_STATUSES = (503,)


class ApiError(PrvrError):
    """The API refused or failed a request. ``status`` is None when no answer came (the server
    could not be reached, or timed out); ``kind`` is the server's error type (``bad_request``,
    ``internal_error``, or TorchServe's own, e.g. ``ModelNotFoundException``)."""

    def __init__(self, message: str, status: int | None = None, kind: str | None = None,
                 body: Any = None):
        super().__init__(f"{status} {message}" if status else message)
        self.status, self.message, self.kind, self.body = status, message, kind, body


class AuthError(ApiError):
    """The API key was refused (TorchServe answers 400 ``InvalidKeyException``, not 401)."""


@dataclass(frozen=True)
class Moment:
    start: float
    end: float
    unit: str                      # "frames" or "seconds" (the model knows its features' fps)


@dataclass(frozen=True)
class Hit:
    rank: int                      # 1-based
    video_id: str
    score: float                   # fused from the two parts below with the answer's alpha
    clip_score: float
    frame_score: float
    moment: Moment
    title: str | None = None       # from the corpus's videos.jsonl, when it describes the video
    duration: float | None = None  # video length in the moment's unit
    url: str | None = None


@dataclass(frozen=True)
class QueryResult:
    query: str | None              # None for a token-features query
    hits: list[Hit]


@dataclass(frozen=True)
class Timing:
    round_trip_ms: float           # measured here: send to last byte received
    stages_ms: dict[str, float]    # the worker's Server-Timing: parse, encode, score

    @property
    def server_ms(self) -> float:
        return sum(self.stages_ms.values())


@dataclass(frozen=True)
class SearchResponse:
    model_version: str
    corpus_size: int
    data_version: str | None
    top_k: int
    alpha: float
    results: list[QueryResult]
    timing: Timing

    @property
    def hits(self) -> list[Hit]:
        """The hits of the first (for ``search``: the only) query."""
        return self.results[0].hits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_key(key_file: str | Path, kind: str = "inference") -> str:
    """The ``kind`` key from TorchServe's key_file.json (written where it was started)."""
    path = Path(key_file)
    try:
        return str(json.loads(path.read_text())[kind]["key"])
    except FileNotFoundError:
        raise PrvrError(f"{path} is missing: start TorchServe first (`prvr serve`), which writes it") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PrvrError(f"{path} holds no {kind} key ({type(exc).__name__}: {exc})") from None


def parse_server_timing(value: str | None) -> dict[str, float]:
    """``parse;dur=0.02, encode;dur=6.9`` -> {"parse": 0.02, "encode": 6.9}; other metrics skipped."""
    out: dict[str, float] = {}
    for metric in (value or "").split(","):
        name, *params = [p.strip() for p in metric.split(";")]
        for p in params:
            if p.startswith("dur="):
                try:
                    out[name] = float(p[4:])
                except ValueError:
                    pass
    return out


def _hit(rank: int, v: dict[str, Any]) -> Hit:
    m = v["moment"]
    return Hit(rank, str(v["video_id"]), float(v["score"]), float(v["clip_score"]), float(v["frame_score"]),
               Moment(m["start"], m["end"], str(m["unit"])), v.get("title"),
               float(m["video_length"]) if m.get("video_length") is not None else None, v.get("url"))


def parse_answer(body: Any, timing: Timing) -> SearchResponse:
    """The typed form of a 200 answer; ApiError naming the gap when it is not one."""
    try:
        results = [QueryResult(r.get("query"), [_hit(i, v) for i, v in enumerate(r["videos"], 1)])
                   for r in body["results"]]
        return SearchResponse(str(body["model_version"]), int(body["corpus_size"]), body.get("data_version"),
                              int(body["top_k"]), float(body["alpha"]), results, timing)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ApiError(f"malformed answer ({type(exc).__name__}: {exc}): {str(body)[:200]}", 200,
                       "malformed_answer", body) from None


def _error(resp: requests.Response) -> ApiError:
    """prvr's {"error", "status", "message"} or TorchServe's {"code", "type", "message"}."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        kind = body.get("error") or body.get("type")
        cls = AuthError if kind == "InvalidKeyException" else ApiError
        return cls(body["message"], resp.status_code, kind, body)
    text = resp.text.strip()[:200] or resp.reason or "no message"
    return ApiError(text, resp.status_code, None, body)


class Client:
    """One model's predictions endpoint: ``{url}/predictions/{model}[/{version}]``.

    ``timeout`` (s) bounds connecting and each read; ``retries`` (with ``backoff`` s, doubling)
    covers refused connections and 503s. A ``key`` of None sends no Authorization header.
    With ``key_file`` (TorchServe's key_file.json) the key is read from it, and read again
    when the server refuses it: TorchServe's keys expire (60 min by default) and its token
    API writes the new one there, so a long-running client follows without a restart."""

    def __init__(self, url: str, key: str | None = None, model: str = "prvr", version: str | None = None,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.2,
                 key_file: str | Path | None = None):
        self.url = url.rstrip("/")
        self.endpoint = f"{self.url}/predictions/{model}" + (f"/{version}" if version else "")
        self.timeout = timeout
        self.session = requests.Session()
        # No retry after a read error or timeout: the request may be running in a worker already,
        # and sending it again would only add load to a busy server.
        retry = Retry(total=None, connect=retries, read=False, redirect=0, other=0, status=retries,
                      status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"POST"}),
                      backoff_factor=backoff, raise_on_status=False, respect_retry_after_header=True)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.session.headers["Content-Type"] = "application/json"
        self.key_file = Path(key_file) if key_file else None
        self._key: str | None = None
        self._use_key(key if key or self.key_file is None else read_key(self.key_file))

    def _use_key(self, key: str | None) -> None:
        self._key = key
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        else:
            self.session.headers.pop("Authorization", None)

    def _key_changed(self) -> bool:
        """Read key_file again; True when it now holds another key (then in use)."""
        try:
            key = read_key(self.key_file) if self.key_file else None
        except PrvrError:
            return False
        if key is None or key == self._key:
            return False
        self._use_key(key)
        return True

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def post(self, body: dict[str, Any]) -> tuple[requests.Response, float]:
        """One request (with the retries above) and its round-trip seconds; ApiError when no answer."""
        t0 = time.perf_counter()
        try:
            resp = self.session.post(self.endpoint, data=json.dumps(body), timeout=self.timeout)
        except requests.Timeout:
            raise ApiError(f"{self.endpoint} did not answer within {self.timeout:g} s", None, "timeout") from None
        except requests.ConnectionError as exc:
            raise ApiError(f"cannot reach {self.endpoint}: {exc}", None, "unreachable") from None
        return resp, time.perf_counter() - t0

    def request(self, body: dict[str, Any]) -> SearchResponse:
        """Send a raw request body; the typed answer, or ApiError with the server's status and message."""
        try:
            return self._request(body)
        except AuthError:
            if not self._key_changed():
                raise
            return self._request(body)

    def _request(self, body: dict[str, Any]) -> SearchResponse:
        resp, seconds = self.post(body)
        if resp.status_code != 200:
            raise _error(resp)
        try:
            data = resp.json()
        except ValueError:
            raise ApiError(f"answer is not JSON: {resp.text[:200]!r}", 200, "malformed_answer") from None
        return parse_answer(data, Timing(1e3 * seconds, parse_server_timing(resp.headers.get("Server-Timing"))))

    @staticmethod
    def _options(top_k: int | None, alpha: float | None) -> dict[str, Any]:
        # Sent as given: the server checks the bounds and names the problem.
        return {k: v for k, v in (("top_k", top_k), ("alpha", alpha)) if v is not None}

    def search(self, query: str, top_k: int | None = None, alpha: float | None = None) -> SearchResponse:
        """Rank the corpus for one typed query (top_k / alpha: the server's defaults when None)."""
        return self.request({"query": query, **self._options(top_k, alpha)})

    def search_many(self, queries: Sequence[str], top_k: int | None = None,
                    alpha: float | None = None) -> SearchResponse:
        """Several typed queries in one request: one QueryResult each, in order."""
        return self.request({"queries": list(queries), **self._options(top_k, alpha)})

    def search_features(self, token_features: Any, top_k: int | None = None,
                        alpha: float | None = None) -> SearchResponse:
        """Queries given as token features (L x Dt, or a list of those), e.g. for a model
        trained on precomputed text features, which refuses typed text."""
        feats = token_features.tolist() if hasattr(token_features, "tolist") else token_features
        return self.request({"token_features": feats, **self._options(top_k, alpha)})
