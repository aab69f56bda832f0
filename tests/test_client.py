"""prvr.client over real HTTP: answers parsed into types, retries of refused connections and
503s only, timeouts, and the server's errors raised as ApiError with status and message.

The server here is a scripted stdlib HTTP server on 127.0.0.1 that answers what TorchServe
answers (bodies and headers copied from a real one), so the cases TorchServe will not
produce on demand (a 503, a slow answer, a server that is not up yet) are exercised too.
The same client against a real TorchServe: tests/test_openapi.py and tests/test_ui.py."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from prvr.client import (ApiError, AuthError, Client, Hit, Moment, parse_server_timing, read_key)
from prvr.errors import PrvrError
from prvr.server import free_port

ANSWER = {"model_version": "v0001", "corpus_size": 30, "data_version": None, "top_k": 2, "alpha": 0.7,
          "results": [{"query": "a man opens the fridge", "videos": [
              {"video_id": "video000129", "score": 0.1064, "clip_score": 0.1827, "frame_score": -0.0715,
               "moment": {"start": 22, "end": 28, "unit": "frames"}},
              {"video_id": "video000128", "score": 0.1047, "clip_score": 0.1466, "frame_score": 0.0069,
               "moment": {"start": 28, "end": 29, "unit": "frames"}}]}]}
TIMING = "parse;dur=0.043, encode;dur=6.327, score;dur=1.310"
OK = (200, {"Server-Timing": TIMING}, json.dumps(ANSWER).encode())
UNAVAILABLE = (503, {}, json.dumps({"code": 503, "type": "ServiceUnavailableException",
                                    "message": "Model \"prvr\" has no worker to serve inference request."}).encode())
BAD_KEY = (400, {}, json.dumps({"code": 400, "type": "InvalidKeyException", "message":
                                "Token Authorization failed. Token either incorrect, expired, or not "
                                "provided correctly"}).encode())


class Scripted(ThreadingHTTPServer):
    """Answers POSTs with the scripted (status, headers, body) in order; records each request."""

    def __init__(self, script: list, port: int = 0, delay: float = 0.0):
        self.script, self.delay, self.seen = list(script), delay, []
        super().__init__(("127.0.0.1", port), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        time.sleep(self.server.delay)
        status, headers, payload = self.server.script.pop(0)
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except BrokenPipeError:       # the client gave up (the timeout test)
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted():
    servers = []

    def start(script, **kw) -> Scripted:
        servers.append(Scripted(script, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_search_sends_the_request_and_types_the_answer(scripted):
    srv = scripted([OK])
    with Client(srv.url, key="k123", model="prvr") as api:
        answer = api.search("a man opens the fridge", top_k=2, alpha=0.7)
    [req] = srv.seen
    assert req["path"] == "/predictions/prvr" and req["headers"]["Authorization"] == "Bearer k123"
    assert req["headers"]["Content-Type"] == "application/json"
    assert json.loads(req["body"]) == {"query": "a man opens the fridge", "top_k": 2, "alpha": 0.7}
    assert (answer.model_version, answer.corpus_size, answer.top_k, answer.alpha) == ("v0001", 30, 2, 0.7)
    assert answer.hits[0] == Hit(1, "video000129", 0.1064, 0.1827, -0.0715, Moment(22, 28, "frames"))
    assert [h.rank for h in answer.hits] == [1, 2] and answer.results[0].query == "a man opens the fridge"
    assert answer.timing.stages_ms == {"parse": 0.043, "encode": 6.327, "score": 1.310}
    assert answer.timing.server_ms == pytest.approx(7.68) and answer.timing.round_trip_ms > 0
    assert answer.to_dict()["results"][0]["hits"][1]["moment"] == {"start": 28, "end": 29, "unit": "frames"}


def test_several_queries_token_features_and_a_version(scripted):
    srv = scripted([OK, OK])
    with Client(srv.url, version="v0002") as api:
        api.search_many(["a", "b"], top_k=3)
        api.search_features(np.zeros((2, 3), np.float32))
    assert [r["path"] for r in srv.seen] == ["/predictions/prvr/v0002"] * 2
    assert "Authorization" not in srv.seen[0]["headers"]           # no key given, none sent
    assert json.loads(srv.seen[0]["body"]) == {"queries": ["a", "b"], "top_k": 3}
    assert json.loads(srv.seen[1]["body"]) == {"token_features": [[0.0] * 3] * 2}


def test_503_is_retried_until_answered(scripted):
    srv = scripted([UNAVAILABLE, UNAVAILABLE, OK])
    with Client(srv.url, retries=3, backoff=0.01) as api:
        assert api.search("x").model_version == "v0001"
    assert len(srv.seen) == 3


def test_503_after_the_last_retry_is_a_typed_error(scripted):
    srv = scripted([UNAVAILABLE] * 3)
    with Client(srv.url, retries=2, backoff=0.01) as api, pytest.raises(ApiError) as err:
        api.search("x")
    assert (err.value.status, err.value.kind) == (503, "ServiceUnavailableException")
    assert "no worker" in err.value.message and len(srv.seen) == 3


def test_a_bad_request_is_raised_at_once_with_the_servers_message(scripted):
    body = {"error": "bad_request", "status": 400, "message": "top_k must lie in [1, 1000], got 0"}
    srv = scripted([(400, {}, json.dumps(body).encode())])
    with Client(srv.url, retries=3) as api, pytest.raises(ApiError) as err:
        api.search("x", top_k=0)
    assert (err.value.status, err.value.kind, err.value.message) == (400, "bad_request", body["message"])
    assert err.value.body == body and str(err.value).startswith("400 top_k must lie")
    assert len(srv.seen) == 1 and not isinstance(err.value, AuthError)


def test_a_refused_key_is_an_auth_error(scripted):
    srv = scripted([BAD_KEY])
    with Client(srv.url, key="wrong") as api, pytest.raises(AuthError) as err:
        api.search("x")
    assert err.value.status == 400 and "Token Authorization failed" in err.value.message


def test_a_refused_key_is_read_again_from_the_key_file(scripted, tmp_path: Path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "old"}}))
    srv = scripted([OK, BAD_KEY, OK, BAD_KEY])
    with Client(srv.url, key_file=key_file) as api:
        api.search("x")
        key_file.write_text(json.dumps({"inference": {"key": "new"}}))      # TorchServe's token API
        api.search("x")
        with pytest.raises(AuthError):          # the file's key refused too: raised, not looped
            api.search("x")
    assert [r["headers"]["Authorization"] for r in srv.seen] == ["Bearer old", "Bearer old", "Bearer new",
                                                                 "Bearer new"]


def test_an_error_without_a_json_body_carries_the_status_reason(scripted):
    srv = scripted([(413, {}, b"")])          # TorchServe's answer to a body over max_request_size
    with Client(srv.url) as api, pytest.raises(ApiError) as err:
        api.search("x")
    assert err.value.status == 413 and err.value.message == "Request Entity Too Large"


@pytest.mark.parametrize("payload", [b"{\"results\": []}", b"not json", b"[1, 2]"])
def test_a_malformed_answer_is_named(scripted, payload):
    srv = scripted([(200, {}, payload)])
    with Client(srv.url) as api, pytest.raises(ApiError) as err:
        api.search("x")
    assert err.value.kind == "malformed_answer" and err.value.status == 200


def test_refused_connections_are_retried_until_the_server_is_up(scripted):
    port = free_port()
    later = threading.Timer(0.3, lambda: scripted([OK], port=port))
    later.start()
    t0 = time.monotonic()
    with Client(f"http://127.0.0.1:{port}", retries=6, backoff=0.2) as api:
        assert api.search("x").hits[0].video_id == "video000129"
    later.join()
    assert time.monotonic() - t0 >= 0.3


def test_an_unreachable_server_is_named_after_the_retries():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, retries=1, backoff=0.01) as api, pytest.raises(ApiError) as err:
        api.search("x")
    assert err.value.status is None and err.value.kind == "unreachable" and url in err.value.message


def test_a_timeout_is_raised_and_not_retried(scripted):
    srv = scripted([OK, OK], delay=1.0)
    with Client(srv.url, timeout=0.2, retries=3) as api, pytest.raises(ApiError) as err:
        api.search("x")
    assert err.value.kind == "timeout" and err.value.status is None and "0.2 s" in err.value.message
    time.sleep(0.3)
    assert len(srv.seen) == 1


def test_server_timing_parsing():
    assert parse_server_timing(TIMING) == {"parse": 0.043, "encode": 6.327, "score": 1.31}
    assert parse_server_timing("db;desc=\"x\";dur=2.5,cache, total;dur=bad") == {"db": 2.5}
    assert parse_server_timing(None) == {}


def test_read_key(tmp_path: Path):
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"management": {"key": "m1", "expiration time": "t"},
                                "inference": {"key": "i1", "expiration time": "t"}, "API": {"key": "a1"}}))
    assert read_key(path) == "i1" and read_key(path, "management") == "m1"
    with pytest.raises(PrvrError, match="start TorchServe first"):
        read_key(tmp_path / "missing.json")
    path.write_text("{}")
    with pytest.raises(PrvrError, match="holds no inference key"):
        read_key(path)
