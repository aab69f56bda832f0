"""A real TorchServe (token auth on, free loopback ports) serving the tiny model over HTTP:
hardening, batching, a bounded load test and a zero-failure rollout to a new version."""
from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from prvr.config import default_config
from prvr.server import TorchServe
from test_serving import start_serving

pytestmark = pytest.mark.integration
SERVE = default_config().serve
DIM = 384  # MiniLM token features


@pytest.fixture(scope="module")
def server(tmp_path_factory, text_encoder):
    ts = start_serving(tmp_path_factory, "ts-http", text_encoder)
    yield ts
    ts.stop()


def ok(ts: TorchServe, query: str = "a man opens the fridge", **extra) -> dict:
    r = ts.infer(dict(query=query, **extra))
    assert r.status_code == 200, r.text
    return r.json()


def worker_pids(ts: TorchServe, version: str | None = None) -> list[int]:
    path = "/models/prvr" + (f"/{version}" if version else "")
    r = ts.manage("GET", path)
    r.raise_for_status()
    return [w["pid"] for m in r.json() for w in m["workers"] if w["status"] == "READY"]


def test_query_round_trip(server):
    r = server.infer({"query": "a man opens the fridge", "top_k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    # the worker's stage times, per request, in ms (W3C Server-Timing)
    stages = dict(part.split(";dur=") for part in r.headers["Server-Timing"].split(", "))
    assert set(stages) == {"parse", "encode", "score"} and float(stages["encode"]) > 0
    assert body["model_version"] == "v0001" and body["corpus_size"] == 30 and body["top_k"] == 5
    videos = body["results"][0]["videos"]
    assert len(videos) == 5 and videos[0]["moment"]["unit"] == "seconds"    # durations from videos.jsonl
    assert all(0 <= v["moment"]["start"] < v["moment"]["end"] <= v["moment"]["video_length"] for v in videos)
    assert [v["score"] for v in videos] == sorted((v["score"] for v in videos), reverse=True)


def test_token_authorisation_is_on(server):
    url = f"{server.inference_url}/predictions/prvr"
    assert requests.post(url, json={"query": "x"}, timeout=10).status_code in (400, 401, 403)
    assert requests.post(url, json={"query": "x"}, headers={"Authorization": "Bearer wrong"},
                         timeout=10).status_code in (400, 401, 403)
    # the management API needs the management key, not the inference key
    murl = f"{server.management_url}/models"
    assert requests.get(murl, timeout=10).status_code in (400, 401, 403)
    assert requests.get(murl, headers=server.headers("inference"), timeout=10).status_code in (400, 401, 403)
    assert requests.get(murl, headers=server.headers("management"), timeout=10).status_code == 200
    assert server.props["management_address"].startswith("http://127.0.0.1:")


BAD = [
    ("invalid JSON", dict(data=b'{"query": '), 400, "not valid JSON"),
    ("wrong content type", dict(data=b"a man opens the fridge", content_type="text/plain"), 415, "Content-Type"),
    ("not an object", dict(body=["a man"]), 400, "JSON object"),
    ("missing query", dict(body={"top_k": 5}), 400, "missing 'query'"),
    ("non-string query", dict(body={"query": 42}), 400, "query must be a string"),
    ("empty query", dict(body={"query": ""}), 400, "query is empty"),
    ("query too long", dict(body={"query": "x" * (SERVE.max_query_chars + 1)}), 400, "max_query_chars"),
    ("too many queries", dict(body={"queries": ["q"] * (SERVE.max_queries + 1)}), 400, "max_queries"),
    ("top_k zero", dict(body={"query": "x", "top_k": 0}), 400, "top_k must lie"),
    ("top_k too large", dict(body={"query": "x", "top_k": SERVE.max_top_k + 1}), 400, "top_k must lie"),
    ("alpha out of range", dict(body={"query": "x", "alpha": 2}), 400, "alpha must lie"),
    ("features wrong shape", dict(body={"token_features": [[0.1] * (DIM - 1)] * 3}), 400, f"(L, {DIM})"),
    ("features with NaN", dict(body={"token_features": [[0.1] * (DIM - 1) + [math.nan]]}), 400, "NaN"),
    ("unknown field", dict(body={"query": "x", "k": 3}), 400, "unknown field"),
]


@pytest.mark.parametrize("what,kwargs,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_request_then_good_one(server, what, kwargs, status, message):
    r = server.infer(**kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()
    assert err["error"] == "bad_request" and message in err["message"], err
    ok(server)  # the worker keeps serving


def test_token_features_request(server, text_encoder):
    feats = text_encoder.encode(["a man opens the fridge"])[0]
    by_features = server.infer({"token_features": feats.tolist(), "top_k": 3}).json()
    by_text = ok(server, top_k=3)
    a = [v["video_id"] for v in by_features["results"][0]["videos"]]
    b = [v["video_id"] for v in by_text["results"][0]["videos"]]
    assert a == b
    assert by_features["results"][0]["videos"][0]["score"] == pytest.approx(
        by_text["results"][0]["videos"][0]["score"], abs=1e-4)


def _parse_batches(ts: TorchServe) -> float:
    """Handler calls so far (one parse-stage observation per batch), from TorchServe's /metrics."""
    text = requests.get(f"{ts.metrics_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("prvr_stage_deciseconds_count{") and 'stage="parse"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_batched_requests_get_their_own_answers(server):
    """4 concurrent requests (batch size 4, 50 ms delay): one bad one gets a 400, the others 200."""
    bodies = [{"query": "a man opens the fridge", "top_k": 1}, {"query": ""},
              {"queries": ["a dog", "a cat"], "top_k": 2}, {"query": "someone cooks", "top_k": 3}]
    batched = False
    for _ in range(3):
        before = _parse_batches(server)
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda b: server.infer(b), bodies))
        assert [r.status_code for r in rs] == [200, 400, 200, 200]
        assert [len(r.json()["results"]) for r in (rs[0], rs[2], rs[3])] == [1, 2, 1]
        assert [len(r.json()["results"][0]["videos"]) for r in (rs[0], rs[2], rs[3])] == [1, 2, 3]
        assert "query is empty" in rs[1].json()["message"]
        time.sleep(0.5)   # metrics reach /metrics through the worker log
        if _parse_batches(server) - before < len(bodies):
            batched = True
            break
    assert batched, "4 concurrent requests were never answered in one batch"


def test_bounded_load_no_errors_no_worker_restart(server):
    pids = worker_pids(server)
    clients, per_client = 4, 50
    latencies: list[float] = []

    def client(i: int) -> list[int]:
        codes = []
        with requests.Session() as s:
            for j in range(per_client):
                t = time.perf_counter()
                r = server.infer({"query": f"person {i} does thing {j}", "top_k": 10}, session=s, timeout=30)
                latencies.append(time.perf_counter() - t)
                codes.append(r.status_code)
        return codes

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        codes = [c for cs in pool.map(client, range(clients)) for c in cs]
    elapsed = time.perf_counter() - t0
    assert codes == [200] * clients * per_client
    assert elapsed < 120
    assert worker_pids(server) == pids      # no worker died and came back
    print(f"load: {len(codes)} requests in {elapsed:.1f} s, {len(codes) / elapsed:.0f} req/s, "
          f"p50 {sorted(latencies)[len(latencies) // 2] * 1e3:.0f} ms")


def test_rollout_to_new_version_drops_nothing(server):
    """Register v0002 next to v0001, make it the default, unregister v0001 under steady traffic."""
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def stream():
        with requests.Session() as s:
            deadline = time.monotonic() + 150
            while not stop.is_set() and len(results) < 3000 and time.monotonic() < deadline:
                try:
                    r = server.infer({"query": "a man opens the fridge", "top_k": 2}, session=s, timeout=30)
                    results.append((r.status_code, r.json().get("model_version") if r.ok else r.text[:200]))
                except requests.RequestException as exc:
                    results.append((0, repr(exc)))

    def wait_for(pred, what: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    try:
        wait_for(lambda: len(results) >= 5, "first answers")
        r = server.manage("POST", "/models", url=server.art.mars["v0002"].name, model_name="prvr",
                          initial_workers=1, synchronous="true")
        assert r.status_code == 200, r.text
        r = server.manage("PUT", "/models/prvr/v0002/set-default")
        assert r.status_code == 200, r.text
        # the stream is sequential: once it has seen v0002, nothing is in flight on v0001
        wait_for(lambda: any(v == "v0002" for _, v in results), "an answer from v0002")
        r = server.manage("DELETE", "/models/prvr/v0001")
        assert r.status_code == 200, r.text
        n = len(results)
        wait_for(lambda: len(results) >= n + 5, "answers after unregistering v0001")
    finally:
        stop.set()
        client.join(timeout=60)
    failures = [res for res in results if res[0] != 200]
    assert not failures, failures[:5]
    versions = [v for _, v in results]
    assert versions[0] == "v0001" and versions[-1] == "v0002"
    first_new = versions.index("v0002")
    assert set(versions[first_new:]) == {"v0002"}       # no flapping back once switched
    listed = server.manage("GET", "/models/prvr/all").json()
    assert [m["modelVersion"] for m in listed] == ["v0002"]
    assert json.loads(json.dumps(ok(server)))["model_version"] == "v0002"
