"""The request parser against hostile input: whatever a client sends, ``parse_request`` returns
a valid ``Query`` or raises ``RequestError`` (4xx) with a short message naming the problem.

Property tests (Hypothesis) throw random JSON values, dicts with the real keys and random
values, and random byte strings at it; the examples come from a fixed seed (derandomize) so CI
never flakes, and their number is bounded so the file runs in seconds. The parser's last-resort
net (any other exception -> 400 "could not be read") must never be what catches them: every
input has to be refused by a check that names its problem."""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prvr.serving.request as request_module
from prvr.config import default_config, load_config
from prvr.errors import RequestError
from prvr.server import read_properties
from prvr.serving import Query, Request, parse_request

REPO = Path(__file__).resolve().parent.parent
DIM = 4
# Small limits, so random examples reach the limit checks (bodies of deep nesting stay below
# the byte limit, so they reach the JSON reader); the named cases below use the shipped ones.
SERVE = default_config().serve
CFG = load_config(None, ["serve.max_body_bytes=20000", "serve.max_queries=3", "serve.max_query_chars=40",
                         "serve.max_top_k=50", "serve.top_k=5"]).serve
SAFETY_NET = "could not be read"
MAX_MESSAGE = 300
PROPERTY = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(body, content_type="application/json", features_only=False, cfg=CFG):
    """Parse one request; a RequestError is returned (not raised), anything else propagates."""
    try:
        query = parse_request(Request(body, content_type), cfg, DIM, 0.7, features_only=features_only)
    except RequestError as exc:
        return exc
    return query


def assert_valid(result, cfg=CFG) -> None:
    """Either a refusal (4xx, a short message from a named check) or a Query within every limit."""
    if isinstance(result, RequestError):
        message = str(result)
        assert 400 <= result.status < 500, (result.status, message)
        assert message and len(message) <= MAX_MESSAGE, message
        assert SAFETY_NET not in message, message
        return
    assert isinstance(result, Query)
    assert (result.texts is None) != (result.features is None)
    assert 1 <= result.count <= cfg.max_queries
    assert isinstance(result.top_k, int) and 1 <= result.top_k <= cfg.max_top_k
    assert isinstance(result.alpha, float) and 0.0 <= result.alpha <= 1.0
    for text in result.texts or []:
        assert text.strip() and len(text) <= cfg.max_query_chars
        text.encode("utf-8")                 # no lone surrogates reach the tokenizer
    for arr in result.features or []:
        assert arr.dtype == np.float32 and arr.ndim == 2 and arr.shape[0] >= 1 and arr.shape[1] == DIM
        assert np.isfinite(arr).all()


# --------------------------------------------------------------------------- strategies
SPECIAL = (st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 2 ** 63, -(2 ** 64), 10 ** 40,
                            True, False, None, "", " ", "\x00", "\ud800", "\udfff x", "a\u2028b", "5", "1.5",
                            "nan", "x" * 100])
           | st.integers(4300, 6000).map(lambda n: 10 ** n))      # past int's 4300-digit str limit
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | SPECIAL)


def nested(value, depth: int):
    """``value`` inside ``depth`` arrays: deeper than the recursion limit at the top of the range."""
    for _ in range(depth):
        value = [value]
    return value


JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5)
                           | st.builds(nested, inner, st.integers(1, 3000)), max_leaves=25)
NUMBER = st.floats(-1e6, 1e6) | st.integers(-1000, 1000)
FEATURES = (st.lists(st.lists(NUMBER, min_size=DIM, max_size=DIM), min_size=1, max_size=3)
            | st.lists(st.lists(st.lists(NUMBER | SPECIAL, min_size=DIM - 1, max_size=DIM + 1), min_size=1,
                                max_size=3), min_size=1, max_size=4)
            | JSON_VALUES)
TEXT = st.text(max_size=60) | SPECIAL | JSON_VALUES
BODIES = st.fixed_dictionaries({}, optional={
    "query": TEXT,
    "queries": st.lists(TEXT, max_size=5) | JSON_VALUES,
    "token_features": FEATURES,
    "top_k": st.integers(-5, 100) | st.floats() | SPECIAL | JSON_VALUES,
    "alpha": st.floats() | st.integers(-2, 2) | SPECIAL | JSON_VALUES,
    "topk": JSON_VALUES,
})
CONTENT_TYPES = (st.sampled_from(["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", None,
                                  "", "text/plain", "application/x-www-form-urlencoded"])
                 | st.text(max_size=30))

# JSON *text*, for what a Python value cannot hold: NaN/Infinity literals, integers past the
# 4300-digit limit, repeated keys, escaped lone surrogates, nesting past the recursion limit.
RAW_SCALARS = (st.sampled_from(["null", "true", "false", "NaN", "Infinity", "-Infinity", "1e999", "-1e999",
                                "-0", "0.5", "1E-400", '""', '" "', '"\\ud800"', '"x\\udc00"', '"\\u0000"',
                                '"\\ud83d\\ude00"'])
               | st.integers().map(str) | st.integers(1, 6000).map(lambda n: "9" * n)
               | st.floats(allow_nan=False, allow_infinity=False).map(repr) | st.text(max_size=20).map(json.dumps))
KEYS = st.sampled_from(["query", "queries", "token_features", "top_k", "alpha"]) | st.text(max_size=4)


def raw_array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def raw_object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


RAW_VALUES = st.recursive(
    RAW_SCALARS,
    lambda inner: (st.lists(inner, max_size=4).map(raw_array)
                   | st.lists(st.tuples(KEYS, inner), max_size=4).map(raw_object)
                   | st.builds(lambda v, d: "[" * d + v + "]" * d, inner, st.integers(1, 3000))),
    max_leaves=20)
RAW_BODIES = st.lists(st.tuples(KEYS, RAW_VALUES), max_size=5).map(raw_object) | RAW_VALUES


def to_bytes(value) -> bytes | None:
    """The JSON text a client would send (Python writes NaN/Infinity, which JSON lacks), or None
    for what json cannot write (an integer over the 4300-digit limit, nesting past the recursion
    limit): test_raw_json_text sends those as text."""
    try:
        return json.dumps(value).encode()
    except (ValueError, RecursionError):
        return None


def mutated(raw: bytes, data) -> bytes:
    """``raw`` with a few bytes flipped, dropped or inserted: almost-JSON, the hardest case."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        if not out:
            break
        i = data.draw(st.integers(0, len(out) - 1))
        op = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if op == "flip":
            out[i] ^= data.draw(st.integers(1, 255))
        elif op == "drop":
            del out[i]
        else:
            out.insert(i, data.draw(st.sampled_from(b'[]{}",:\\\x00\xff\xed0-eE.nN')))
    return bytes(out)


# --------------------------------------------------------------------------- properties
@PROPERTY
@given(JSON_VALUES)
def test_any_json_value_as_decoded_body(value):
    assert_valid(outcome(value))


@PROPERTY
@given(BODIES, st.booleans())
def test_dicts_with_the_real_keys(body, features_only):
    """As TorchServe (decode_input_request=true) or a Python caller hands them over: decoded."""
    assert_valid(outcome(body, features_only=features_only))


@PROPERTY
@given(BODIES.map(to_bytes).filter(lambda raw: raw is not None), st.booleans())
def test_dicts_with_the_real_keys_as_bytes(raw, features_only):
    """The same bodies as the raw bytes a client sends (NaN written as NaN, as Python does)."""
    assert_valid(outcome(raw, features_only=features_only))


@PROPERTY
@given(BODIES, st.data())
def test_almost_json_bytes(body, data):
    raw = to_bytes(body) or b"{}"
    assert_valid(outcome(mutated(raw, data)))


@PROPERTY
@given(RAW_BODIES, st.booleans(), st.data())
def test_raw_json_text(text, mutate, data):
    """Bodies only JSON text can carry (NaN literals, long integers, repeated keys, deep nesting)."""
    raw = text.encode("utf-8", "surrogatepass")
    assert_valid(outcome(mutated(raw, data) if mutate else raw))


@PROPERTY
@given(st.binary(max_size=4000), CONTENT_TYPES)
def test_random_bytes_and_content_types(raw, content_type):
    assert_valid(outcome(raw, content_type))


@PROPERTY
@given(st.binary(max_size=200) | BODIES, CONTENT_TYPES.filter(
    lambda c: (c or "").split(";")[0].strip().lower() != "application/json"))
def test_other_content_types_get_415(body, content_type):
    result = outcome(body, content_type)
    assert isinstance(result, RequestError) and result.status == 415, result
    assert_valid(result)


@PROPERTY
@given(st.text(max_size=200))
def test_random_text_bodies(text):
    assert_valid(outcome(text))
    assert_valid(outcome(text.encode("utf-8", "surrogatepass")))


def test_valid_bodies_still_parse():
    """The strict reader keeps every well-formed request working, bytes and dicts alike."""
    for body in ({"query": "a man opens the fridge", "top_k": 3, "alpha": 0.25},
                 {"queries": ["one", "two"], "top_k": None},
                 {"token_features": [[0.5] * DIM, [1, 2, 3, 4]]},
                 {"token_features": [[[0.5] * DIM], [[-1e30] * DIM, [0] * DIM]], "alpha": 1}):
        for form in (body, json.dumps(body).encode(), json.dumps(body)):
            result = outcome(form)
            assert isinstance(result, Query), (form, result)
            assert_valid(result)


# --------------------------------------------------------------------------- named cases
DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE = [
    ("100k-deep arrays", DEEP, 400, "nests arrays or objects too deeply"),
    ("deep value of a field", b'{"query": "x", "top_k": ' + DEEP + b"}", 400, "too deeply"),
    ("deep objects", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, 400, "too deeply"),
    ("600-deep features", json.dumps({"token_features": json.loads("[" * 600 + "]" * 600)}).encode(), 400,
     "rectangular"),
    ("integer of 5000 digits", b'{"query": "x", "top_k": ' + b"9" * 5000 + b"}", 400,
     f"more than {sys.get_int_max_str_digits()} digits"),
    ("integer of 4000 digits", b'{"query": "x", "alpha": ' + b"9" * 4000 + b"}", 400,
     "alpha must lie in [0, 1], got an integer of about 4000 digits"),
    ("huge integer features", b'{"token_features": [[' + b",".join([b"9" * 400] * DIM) + b"]]}", 400,
     "beyond the float32 range"),
    ("float overflow to inf", b'{"query": "x", "alpha": 1e999}', 400, "alpha must lie in [0, 1], got inf"),
    ("float32 overflow", b'{"token_features": [[1e39, 0, 0, 0]]}', 400, "beyond the float32 range"),
    ("NaN literal", b'{"query": "x", "alpha": NaN}', 400, "holds NaN, which is not JSON"),
    ("Infinity literal", b'{"token_features": [[Infinity, 0, 0, 0]]}', 400, "holds Infinity"),
    ("-Infinity literal", b'{"query": "x", "top_k": -Infinity}', 400, "holds -Infinity"),
    ("repeated key", b'{"query": "x", "query": "y"}', 400, "repeats the key 'query'"),
    ("repeated nested key", b'{"query": "x", "top_k": {"a": 1, "a": 2}}', 400, "repeats the key 'a'"),
    ("invalid UTF-8", b'{"query": "\xff\xfe"}', 400, "not UTF-8: byte 0xff at offset 11"),
    ("UTF-8-encoded surrogate", b'{"query": "\xed\xa0\x80"}', 400, "not UTF-8: byte 0xed"),
    ("truncated UTF-8", b'{"query": "\xe2\x82', 400, "not UTF-8"),
    ("escaped lone surrogate", b'{"query": "ok \\ud800"}', 400,
     "query holds a lone surrogate U+D800 at character 3"),
    ("escaped low surrogate in a list", b'{"queries": ["a", "\\udc00"]}', 400,
     "queries[1] holds a lone surrogate"),
    ("a number", b"42", 400, "must be a JSON object, got a number"),
    ("a string", b'"query"', 400, "must be a JSON object, got a string"),
    ("an array", b'[{"query": "x"}]', 400, "must be a JSON object, got an array"),
    ("null", b"null", 400, "got null"),
    ("empty body", b"", 400, "not valid JSON"),
    ("BOM", b'\xef\xbb\xbf{"query": "x"}', 400, "not valid JSON"),
    ("not JSON", b"query=a+man", 400, "not valid JSON"),
    ("trailing garbage", b'{"query": "x"} {}', 400, "not valid JSON: Extra data"),
    ("control character", b'{"query": "a\x01b"}', 400, "not valid JSON: Invalid control character"),
    ("strings as features", b'{"token_features": [["1.5", "2", "nan", "0"]]}', 400, "numbers only"),
    ("booleans as features", b'{"token_features": [[true, false, true, false]]}', 400, "numbers only"),
    ("nulls in features", b'{"token_features": [[null, 0, 0, 0]]}', 400, "numbers only"),
    ("object as query", b'{"query": {"text": "x"}}', 400, "query must be a string, got an object"),
    ("huge string as top_k", b'{"query": "x", "top_k": "' + b"9" * 10_000 + b'"}', 400,
     "top_k must be an integer, got '9999999999"),
    ("many unknown keys", json.dumps({f"k{i}": i for i in range(1000)}).encode(), 400,
     "unknown field(s) 'k0', 'k1', 'k2', 'k3', 'k4' and 995 more"),
    ("over serve.max_body_bytes", b'{"query": "' + b"a" * SERVE.max_body_bytes + b'"}', 413,
     f"more than serve.max_body_bytes={SERVE.max_body_bytes}"),
]


@pytest.mark.parametrize("what,raw,status,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_are_refused_with_a_named_problem(what, raw, status, message):
    result = outcome(raw, cfg=SERVE)
    assert isinstance(result, RequestError), result
    assert result.status == status and message in str(result), str(result)
    assert_valid(result, SERVE)


def test_decoded_bodies_get_the_same_checks():
    """A body TorchServe (decode_input_request=true) or a Python caller already decoded."""
    for body, message in (({"query": "x", "alpha": math.nan}, "alpha must lie in [0, 1], got nan"),
                          ({"query": "\ud800"}, "lone surrogate U+D800"),
                          ({"token_features": [[10 ** 400] * DIM]}, "beyond the float32 range"),
                          ({"query": "x", "top_k": 10 ** 5000}, "top_k must lie in [1, 1000], got an integer of"),
                          ({1: "x"}, "unknown field(s) 1"),
                          ({"token_features": [[{"a": 1}] * DIM]}, "numbers only")):
        result = outcome(body, cfg=SERVE)
        assert isinstance(result, RequestError) and message in str(result), (body, result)
        assert_valid(result, SERVE)


def test_an_unforeseen_error_is_still_a_400(monkeypatch, caplog):
    """The last-resort net: a bug in a check answers this request 400 and logs a warning with the
    traceback, instead of failing the batch (TorchServe would answer 503 to all of it)."""
    def broken(*args):
        raise ZeroDivisionError("a bug in a check")
    monkeypatch.setattr(request_module, "_check_features", broken)
    with caplog.at_level(logging.WARNING, logger="prvr.serving.request"):
        result = outcome(b'{"token_features": [[0, 0, 0, 0]]}')
    assert isinstance(result, RequestError) and result.status == 400
    assert str(result) == "request could not be read (ZeroDivisionError)"
    assert "a bug in a check" in caplog.text and "unexpected error" in caplog.text


def test_torchserve_limit_is_above_prvr_limit():
    """The handler can answer 413 with a JSON body only for bodies TorchServe lets through, and
    counts bytes only when TorchServe hands them over undecoded."""
    props = read_properties(REPO / "serving" / "config.properties")
    assert int(props["max_request_size"]) > default_config().serve.max_body_bytes
    assert props["decode_input_request"] == "false"
