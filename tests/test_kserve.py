"""The KServe adapter (prvr/kserve_app.py) next to TorchServe: one retrieval core, two servers.

In process: ``RetrievalModel`` answers v1 and v2 payloads exactly as ``Retriever.answer`` does.
For real: `prvr serve-kserve` (KServe's ModelServer, started as deploy/kserve starts it: the
registry named by PRVR_REGISTRY_URI, no model arguments) and a real TorchServe serving the same
checkpoint and index get the same requests: the same rankings and scores, and the same 4xx
statuses and JSON bodies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import kserve
import pytest
import requests

import prvr.text
from helpers.servers import stop_process
from prvr.config import default_config
from prvr.kserve_app import RetrievalModel, ServedError
from prvr.registry import Registry
from prvr.serving import Request
from prvr.server import free_port
from test_serving import serving_artifacts, start_serving

DIM = 384   # MiniLM token features
GOOD = [
    {"query": "a man opens the fridge", "top_k": 5},
    {"queries": ["a dog runs on the beach", "someone plays the guitar"], "top_k": 3, "alpha": 0.2},
    {"query": "a woman cooks", "top_k": 1000},
    {"token_features": [[0.01 * (i % 7)] * DIM for i in range(4)], "alpha": 1.0},
]
# Bodies as clients send them: each gets the same status and JSON body from TorchServe and from
# KServe v2 (the body's text, read by prvr's strict parser). The flag: v1 too. A v1 call's JSON is
# parsed by KServe (orjson) before prvr sees it: it keeps the last of a repeated key and refuses
# NaN, lone surrogates and non-JSON with KServe's own 400, so those are compared on v2 only.
BAD = [
    (b'{"query": ""}', True),
    (b'{"query": "x", "top_k": 0}', True),
    (b'{"query": "x", "alpha": 1.5}', True),
    (b'{"query": "x", "topk": 5}', True),
    (b'{"token_features": [[0.0, 1.0]]}', True),
    (b'{"query": "a", "queries": ["b"]}', True),
    (b"[1, 2]", True),
    (b'{"query": "' + b"a" * (default_config().serve.max_query_chars + 1) + b'"}', True),
    (b'{"query": "x", "query": "y"}', False),
    (b'{"query": "x", "alpha": NaN}', False),
    (b'{"query": "\\ud800"}', False),
    (b"not json at all", False),
]


def ranking(body: dict) -> list[list[str]]:
    return [[v["video_id"] for v in r["videos"]] for r in body["results"]]


def scores(body: dict) -> list[float]:
    return [v[k] for r in body["results"] for v in r["videos"] for k in ("score", "clip_score", "frame_score")]


def same_answer(a: dict, b: dict) -> None:
    """Equal answers: everything but the scores exactly, the scores to float32 rounding."""
    assert ranking(a) == ranking(b)
    assert scores(a) == pytest.approx(scores(b), abs=1e-5)
    strip = lambda d: {**d, "results": [{**r, "videos": [{**v, "score": 0, "clip_score": 0, "frame_score": 0}  # noqa: E731
                                                          for v in r["videos"]]} for r in d["results"]]}
    assert strip(a) == strip(b)


def v2_body(*raw: bytes) -> dict:
    return {"inputs": [{"name": "request", "datatype": "BYTES", "shape": [len(raw)],
                        "data": [r.decode() for r in raw]}]}


def v2_answers(resp: requests.Response) -> list[dict]:
    [out] = resp.json()["outputs"]
    assert out["name"] == "answer" and out["datatype"] == "BYTES"
    return [json.loads(item) for item in out["data"]]


# ----------------------------------------------------------------------------- in process
@pytest.fixture(scope="module")
def art(tmp_path_factory, text_encoder):
    return serving_artifacts(tmp_path_factory.getbasetemp() / "serving-artifacts", text_encoder)


@pytest.fixture(scope="module")
def model(art, tmp_path_factory, text_encoder):
    """RetrievalModel over the unpacked v0001 archive (what `prvr serve-kserve --archive` loads)."""
    model_dir = tmp_path_factory.mktemp("kserve-archive")
    with zipfile.ZipFile(art.mars["v0001"]) as z:
        z.extractall(model_dir)
    mp = pytest.MonkeyPatch()
    mp.setattr(prvr.text.TextEncoder, "from_config", lambda *a, **k: text_encoder)   # reuse the loaded one
    mp.setenv("PRVR_TORCH_THREADS", "1")
    mp.setenv("PRVR_REGISTRY_URI", "file:///nonexistent")      # an archive is served as it is, never pulled
    try:
        m = RetrievalModel("prvr", {"model_dir": str(model_dir)})
        assert m.load() and m.ready
    finally:
        mp.undo()
    return m


def test_v1_and_v2_payloads_answer_like_the_core(model):
    expected = [a.body for a in model.retriever.answer([Request(b) for b in GOOD])]
    headers: dict[str, str] = {}
    v1 = model.predict({"instances": GOOD}, {}, headers)
    assert v1 == {"predictions": expected} and set(headers) == {"Server-Timing"}
    tensor = kserve.InferInput("request", [len(GOOD)], "BYTES", [json.dumps(b) for b in GOOD])
    v2 = model.predict(kserve.InferRequest("prvr", [tensor], request_id="r1"), {}, {})
    [out] = v2.outputs
    assert v2.id == "r1" and v2.model_version == "v0001"
    assert [json.loads(x) for x in out.data] == expected


@pytest.mark.parametrize("payload,status,message", [
    ({"instances": []}, 400, "at least one request"),
    ({"inputs": []}, 400, "at least one request"),
    ({"instances": [{"query": "ok"}, {"query": "x", "top_k": 0}]}, 400, "request 1: top_k must lie in"),
    ({"instances": [{"query": "q"}] * 65}, 400, "more than serve.max_queries=64"),
    (b"a man", 415, "Content-Type must be application/json"),
])
def test_refused_calls_carry_the_cores_status_and_body(model, payload, status, message):
    with pytest.raises(ServedError) as exc:
        model.predict(payload, {"content-type": "text/plain"}, {})
    answer = exc.value.answer
    assert (answer.status, answer.body["status"], answer.body["error"]) == (status, status, "bad_request")
    assert message in answer.body["message"]


def test_v2_input_must_be_named_and_typed(model):
    wrong_name = kserve.InferRequest("prvr", [kserve.InferInput("text", [1], "BYTES", ['{"query": "x"}'])])
    wrong_type = kserve.InferRequest("prvr", [kserve.InferInput("request", [1], "FP32", [1.0])])
    for payload, message in ((wrong_name, "exactly one input named 'request'"), (wrong_type, "datatype FP32")):
        with pytest.raises(ServedError, match=message):
            model.predict(payload, {}, {})


# ----------------------------------------------------------------------------- both servers for real
@pytest.fixture(scope="module")
def servers(art, tmp_path_factory, text_encoder):
    """A real TorchServe (archive v0001) and `prvr serve-kserve` on the same checkpoint and index,
    registered as v0001 of a file registry and found through PRVR_REGISTRY_URI, as in deploy/kserve."""
    root = tmp_path_factory.mktemp("kserve-real")
    reg = Registry(f"file://{root / 'registry'}")
    version = reg.register(default_config().registry.model_name, {"model.pt": art.checkpoint, "index": art.index},
                           {"sumr": 1.0})
    reg.promote(default_config().registry.model_name, version)
    assert version == "v0001"
    port = free_port()
    env = dict(os.environ, PRVR_REGISTRY_URI=f"file://{root / 'registry'}")
    env.pop("PRVR_REGISTRY_VERSION", None)
    log = open(root / "kserve.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prvr"), "serve-kserve", "--port", str(port),
                             "--workdir", str(root / "run")], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    ts = None
    try:
        ts = start_serving(tmp_path_factory, "ts-kserve", text_encoder)
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (root / "kserve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "KServe not ready: " + (root / "kserve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/v1/models/prvr", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield ts, url, root
    finally:
        stop_process(proc, log, timeout=30)
        if ts is not None:
            ts.stop()


@pytest.mark.integration
def test_health_routes_that_deploy_kserve_probes(servers):
    _, url, _ = servers
    assert requests.get(f"{url}/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(f"{url}/v1/models/prvr", timeout=5).json() == {"name": "prvr", "ready": True}
    meta = requests.get(f"{url}/v2/models/prvr", timeout=5).json()
    assert meta["inputs"] == [{"name": "request", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.integration
def test_same_rankings_and_scores_from_both_servers(servers):
    ts, url, _ = servers
    for body in GOOD:
        torchserve = ts.infer(body)
        v1 = requests.post(f"{url}/v1/models/prvr:predict", json={"instances": [body]}, timeout=60)
        v2 = requests.post(f"{url}/v2/models/prvr/infer", json=v2_body(json.dumps(body).encode()), timeout=60)
        assert (torchserve.status_code, v1.status_code, v2.status_code) == (200, 200, 200), (v1.text, v2.text)
        expected = torchserve.json()
        assert expected["model_version"] == "v0001"
        [from_v1] = v1.json()["predictions"]
        [from_v2] = v2_answers(v2)
        same_answer(from_v1, expected)
        same_answer(from_v2, expected)
        for resp in (torchserve, v1, v2):
            assert set(dict(p.split(";dur=") for p in resp.headers["Server-Timing"].split(", "))) == \
                {"parse", "encode", "score"}
    # several requests in one KServe call: one answer each, in order
    v1 = requests.post(f"{url}/v1/models/prvr:predict", json={"instances": GOOD}, timeout=60).json()
    assert [ranking(p) for p in v1["predictions"]] == [ranking(ts.infer(b).json()) for b in GOOD]


@pytest.mark.integration
@pytest.mark.parametrize("raw,v1_too", BAD, ids=[b[:30].decode() for b, _ in BAD])
def test_same_refusals_from_both_servers(servers, raw, v1_too):
    """A refused request: the same status and JSON body from TorchServe and KServe v2 (which
    carries the request's JSON text, read by the same strict parser), and v1 (see BAD)."""
    ts, url, _ = servers
    torchserve = ts.infer(data=raw)
    assert 400 <= torchserve.status_code < 500
    expected = torchserve.json()
    assert expected["error"] == "bad_request" and expected["status"] == torchserve.status_code
    v2 = requests.post(f"{url}/v2/models/prvr/infer", json=v2_body(raw), timeout=60)
    assert (v2.status_code, v2.json()) == (torchserve.status_code, expected)
    if v1_too:
        v1 = requests.post(f"{url}/v1/models/prvr:predict", data=b'{"instances": [' + raw + b"]}",
                           headers={"Content-Type": "application/json"}, timeout=60)
        assert (v1.status_code, v1.json()) == (torchserve.status_code, expected)


@pytest.mark.integration
def test_a_body_that_is_not_json_gets_415_from_both(servers):
    ts, url, _ = servers
    torchserve = ts.infer(data=b"a man", content_type="text/plain")
    v1 = requests.post(f"{url}/v1/models/prvr:predict", data=b"a man", headers={"Content-Type": "text/plain"},
                       timeout=60)
    assert (v1.status_code, v1.json()) == (torchserve.status_code, torchserve.json())
    assert torchserve.status_code == 415


@pytest.mark.integration
def test_one_log_line_per_request_from_kserve(servers):
    _, url, root = servers
    log = root / "kserve.log"
    before = len(log.read_text(errors="replace").splitlines())
    for i in range(10):
        assert requests.post(f"{url}/v1/models/prvr:predict", json={"instances": [{"query": f"q {i}"}]},
                             timeout=60).status_code == 200
    time.sleep(1)
    lines = log.read_text(errors="replace").splitlines()[before:]
    assert len([line for line in lines if "POST /v1/models/prvr%3Apredict" in line]) == 10   # uvicorn quotes ":"
    assert len(lines) <= 2 * 10, lines[:12]
