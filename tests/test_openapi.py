"""docs/openapi.yaml: a valid OpenAPI 3.1 document whose limits are the packaged defaults, whose
request schema agrees with the real parser, and whose response schemas fit every answer a
real TorchServe (token auth on, the tiny model) gives: 200 and each 4xx the API returns."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import requests
import yaml
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from prvr.client import ApiError, AuthError, Client
from prvr.config import default_config
from prvr.errors import RequestError
from prvr.serving import Request, parse_request
from test_serving import make_checkpoint, serving_artifacts

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
DOC = yaml.safe_load(DOC_PATH.read_text())
SERVE = default_config().serve
DIM = 384                                      # MiniLM token features
URI = "urn:prvr:openapi"
REGISTRY = Registry().with_resource(URI, Resource.from_contents(DOC, default_specification=DRAFT202012))


def schema_validator(pointer: str) -> jsonschema.Draft202012Validator:
    """A validator of ``#/<pointer>`` inside the document (its $refs resolve there)."""
    return jsonschema.Draft202012Validator({"$ref": f"{URI}#/{pointer}"}, registry=REGISTRY)


def resolve(node: dict) -> dict:
    """Follow a local ``$ref`` (responses are referenced from the paths)."""
    while "$ref" in node:
        target = DOC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def response_spec(path: str, status: int) -> dict:
    return resolve(DOC["paths"][path]["post"]["responses"][str(status)])


def test_the_document_is_valid_openapi():
    validate_spec(DOC)
    assert DOC["openapi"].startswith("3.1")
    ops = {p: set(item) - {"parameters"} for p, item in DOC["paths"].items()}
    assert ops == {"/predictions/{model_name}": {"post"}, "/predictions/{model_name}/{model_version}": {"post"}}
    assert DOC["components"]["securitySchemes"]["inferenceKey"] == {**DOC["components"]["securitySchemes"][
        "inferenceKey"], "type": "http", "scheme": "bearer"}


def test_the_documented_limits_are_the_packaged_defaults():
    s = DOC["components"]["schemas"]
    req = s["SearchRequest"]["properties"]
    assert s["QueryText"]["maxLength"] == SERVE.max_query_chars
    assert req["queries"]["maxItems"] == SERVE.max_queries == req["token_features"]["oneOf"][1]["maxItems"]
    assert req["top_k"]["maximum"] == SERVE.max_top_k and f"serve.top_k` = {SERVE.top_k}" in req["top_k"]["description"]
    assert set(req) == {"query", "queries", "token_features", "top_k", "alpha"}


# Requests as the parser sees them: (body, accepted?). The schema must say the same.
BODIES = [
    ({"query": "a man opens the fridge"}, True),
    ({"query": "x" * SERVE.max_query_chars, "top_k": SERVE.max_top_k, "alpha": 0}, True),
    ({"queries": ["a", "b"], "alpha": 1.0}, True),
    ({"token_features": [[0.5] * DIM] * 3, "top_k": 1}, True),
    ({"token_features": [[[0.5] * DIM] * 2, [[0.1] * DIM]]}, True),
    ({}, False),
    ({"top_k": 3}, False),
    ({"query": ""}, False),
    ({"query": "  \t"}, False),
    ({"query": 42}, False),
    ({"query": "x" * (SERVE.max_query_chars + 1)}, False),
    ({"queries": []}, False),
    ({"queries": ["q"] * (SERVE.max_queries + 1)}, False),
    ({"queries": ["ok", ""]}, False),
    ({"query": "x", "queries": ["y"]}, False),
    ({"query": "x", "top_k": 0}, False),
    ({"query": "x", "top_k": SERVE.max_top_k + 1}, False),
    ({"query": "x", "top_k": 2.5}, False),
    ({"query": "x", "top_k": "5"}, False),
    ({"query": "x", "alpha": 1.5}, False),
    ({"query": "x", "alpha": -0.1}, False),
    ({"query": "x", "k": 3}, False),
    ({"token_features": []}, False),
]


@pytest.mark.parametrize("body,accepted", BODIES, ids=[json.dumps(b)[:40] for b, _ in BODIES])
def test_the_request_schema_agrees_with_the_parser(body, accepted):
    try:
        parse_request(Request(body), SERVE, DIM, 0.7)
        parsed = True
    except RequestError:
        parsed = False
    errors = list(schema_validator("components/schemas/SearchRequest").iter_errors(body))
    assert parsed is accepted
    assert (not errors) is accepted, [e.message for e in errors]


# ----------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(tmp_path_factory, text_encoder):
    """The tiny model as `prvr`, and a features-only model (trained on precomputed HDF5 text
    features: typed text gets 422) as `feat`, in one real TorchServe on free loopback ports."""
    from prvr.archive import build_archive
    from prvr.collection import Collection
    from prvr.indexing import build_index
    from prvr.server import TorchServe

    art = serving_artifacts(tmp_path_factory.getbasetemp() / "serving-artifacts", text_encoder)
    root = tmp_path_factory.mktemp("feat-model")
    ckpt = make_checkpoint(root / "model.pt", Collection(art.data).video_dim, 8, "hdf5:roberta_tiny_query_feat.hdf5")
    index = build_index(ckpt, art.data, "test", root / "index", art.cfg, model_version="f0001", progress=False)
    feat = build_archive(ckpt, index, root / "store", "f0001", "feat", art.cfg)
    shutil.copy(art.mars["v0001"], root / "store")          # the shared artifacts stay as they are
    ts = TorchServe(tmp_path_factory.mktemp("ts-openapi"), root / "store",
                    {"prvr": art.mars["v0001"].name, "feat": feat.name}, free_ports=True)
    ts.start(wait=180)
    yield ts
    ts.stop()


P, PV = "/predictions/{model_name}", "/predictions/{model_name}/{model_version}"
# (name, path template, url tail, body or raw bytes, header changes (None: drop it), status)
CASES = [
    ("one query", P, "prvr", {"query": "a man opens the fridge", "top_k": 3}, {}, 200),
    ("several queries", P, "prvr", {"queries": ["a man", "a dog runs"], "alpha": 0.25}, {}, 200),
    ("token features", P, "prvr", {"token_features": [[0.1] * DIM] * 4, "top_k": 2}, {}, 200),
    ("top_k above the corpus", P, "prvr", {"query": "x", "top_k": SERVE.max_top_k}, {}, 200),
    ("explicit version", PV, "prvr/v0001", {"query": "a man"}, {}, 200),
    ("features-only model, features", P, "feat", {"token_features": [[0.1] * 8] * 2}, {}, 200),
    ("bad JSON", P, "prvr", b'{"query": ', {}, 400),
    ("not an object", P, "prvr", ["a man"], {}, 400),
    ("unknown field", P, "prvr", {"query": "x", "k": 3}, {}, 400),
    ("missing query", P, "prvr", {"top_k": 5}, {}, 400),
    ("empty query", P, "prvr", {"query": ""}, {}, 400),
    ("query too long", P, "prvr", {"query": "x" * (SERVE.max_query_chars + 1)}, {}, 400),
    ("too many queries", P, "prvr", {"queries": ["q"] * (SERVE.max_queries + 1)}, {}, 400),
    ("top_k too big", P, "prvr", {"query": "x", "top_k": SERVE.max_top_k + 1}, {}, 400),
    ("alpha out of range", P, "prvr", {"query": "x", "alpha": 2}, {}, 400),
    ("features wrong shape", P, "prvr", {"token_features": [[0.1] * (DIM - 1)]}, {}, 400),
    ("features with NaN", P, "prvr", b'{"token_features": [[NaN' + b", 0.1" * (DIM - 1) + b"]]}", {}, 400),
    ("no key (unauthorised)", P, "prvr", {"query": "x"}, {"Authorization": None}, 400),
    ("wrong key (unauthorised)", P, "prvr", {"query": "x"}, {"Authorization": "Bearer wrong"}, 400),
    ("unknown model", P, "nope", {"query": "x"}, {}, 404),
    ("unknown version", PV, "prvr/v0999", {"query": "x"}, {}, 404),
    ("body over max_body_bytes", P, "prvr", b'{"query": "' + b"x" * SERVE.max_body_bytes + b'"}', {}, 413),
    ("wrong content type", P, "prvr", b"a man opens the fridge", {"Content-Type": "text/plain"}, 415),
    ("typed text to a features-only model", P, "feat", {"query": "a man"}, {}, 422),
]


def _send(ts, tail: str, body, changes: dict) -> requests.Response:
    h = {"Content-Type": "application/json", **ts.headers("inference"), **changes}
    h = {k: v for k, v in h.items() if v is not None}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{ts.inference_url}/predictions/{tail}", data=data, headers=h, timeout=60)


def body_validator(path: str, status: int) -> jsonschema.Draft202012Validator:
    """The documented JSON body of ``status`` on ``path`` (through its components/responses $ref)."""
    ref = DOC["paths"][path]["post"]["responses"][str(status)]["$ref"]
    return schema_validator(f"{ref.removeprefix('#/')}/content/application~1json/schema")


def _fits(validator: jsonschema.Draft202012Validator, body) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]


OK_CASES = [c for c in CASES if c[-1] == 200]
ERROR_CASES = [c for c in CASES if c[-1] != 200]


@pytest.mark.integration
@pytest.mark.parametrize("name,path,tail,body,headers,status", OK_CASES, ids=[c[0] for c in OK_CASES])
def test_answers_fit_the_document(server, name, path, tail, body, headers, status):
    r = _send(server, tail, body, headers)
    assert r.status_code == 200, r.text[:300]
    assert _fits(body_validator(path, 200), r.json()) == []
    header = resolve(response_spec(path, 200)["headers"]["Server-Timing"])["schema"]
    jsonschema.validate(r.headers["Server-Timing"], header)


@pytest.mark.integration
@pytest.mark.parametrize("name,path,tail,body,headers,status", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_refusals_fit_the_document(server, name, path, tail, body, headers, status):
    r = _send(server, tail, body, headers)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("application/json")
    assert _fits(body_validator(path, status), r.json()) == []
    assert "Server-Timing" not in r.headers


@pytest.mark.integration
def test_a_body_over_torchserves_own_limit_gets_a_bare_413(server):
    limit = int(server.props["max_request_size"])
    assert limit > SERVE.max_body_bytes          # prvr's limit answers first, with a message
    r = _send(server, "prvr", b'{"query": "' + b"x" * limit + b'"}', {})
    assert r.status_code == 413 and r.content == b""
    assert "max_request_size" in response_spec(P, 413)["description"]


def test_every_documented_status_is_exercised():
    by_path = {p: set(item["post"]["responses"]) for p, item in DOC["paths"].items()}
    assert by_path[P] == by_path[PV]
    # 500 (a failing batch) and 503 (no free worker) cannot be caused from outside on demand:
    # tests/test_serving.py answers a failing batch with 500, tests/test_client.py retries 503s.
    assert {int(s) for s in by_path[P]} - {c[-1] for c in CASES} == {500, 503}


@pytest.mark.integration
def test_the_client_reads_what_torchserve_answers(server):
    key = server.keys()["inference"]
    raw = _send(server, "prvr", {"queries": ["a man opens the fridge", "a dog"], "top_k": 4}, {}).json()
    with Client(server.inference_url, key=key) as api:
        answer = api.search_many(["a man opens the fridge", "a dog"], top_k=4)
        assert (answer.model_version, answer.corpus_size, answer.top_k) == ("v0001", 30, 4)
        for typed, plain in zip(answer.results, raw["results"]):
            assert typed.query == plain["query"]
            assert [h.video_id for h in typed.hits] == [v["video_id"] for v in plain["videos"]]
            assert [h.score for h in typed.hits] == pytest.approx([v["score"] for v in plain["videos"]], abs=1e-5)
            assert [(h.moment.start, h.moment.end, h.moment.unit) for h in typed.hits] == \
                [(v["moment"]["start"], v["moment"]["end"], v["moment"]["unit"]) for v in plain["videos"]]
        assert set(answer.timing.stages_ms) == {"parse", "encode", "score"}
        assert answer.timing.round_trip_ms >= answer.timing.server_ms > 0
        with pytest.raises(ApiError) as err:
            api.search("x", top_k=0)
        assert (err.value.status, err.value.kind) == (400, "bad_request") and "top_k" in err.value.message
    with Client(server.inference_url, key=key, model="nope") as api, pytest.raises(ApiError) as err:
        api.search("x")
    assert (err.value.status, err.value.kind) == (404, "ModelNotFoundException")
    with Client(server.inference_url, key="wrong") as api, pytest.raises(AuthError) as err:
        api.search("x")
    assert err.value.status == 400 and err.value.kind == "InvalidKeyException"
    feat = Client(server.inference_url, key=key, model="feat")
    with feat, pytest.raises(ApiError) as err:
        feat.search("a man")
    assert err.value.status == 422 and "hdf5:" in err.value.message
