"""Pushgateway push of run metrics, against a real prometheus-pushgateway on 127.0.0.1."""
from __future__ import annotations

import logging
import re
import time

import pytest

from prvr.monitoring import GATEWAY_ENV, metric_name, push_run_metrics

try:
    from helpers.servers import free_port
except ImportError:  # tests/ imported as a package
    from tests.helpers.servers import free_port



def series(text: str, name: str) -> dict[str, float]:
    """{label-string: value} of one metric in Prometheus text exposition format."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


@pytest.mark.integration
def test_push_and_read_back(pushgateway, monkeypatch):
    monkeypatch.delenv(GATEWAY_ENV, raising=False)
    ok = push_run_metrics("prvr-train", {"duration_seconds": 812.5, "epochs": 37, "best sumr": 171.25,
                                         "note": "not a number", "collapsed": False, "bad": float("nan")},
                          gateway=pushgateway.address, labels={"collection": "tvr", "variant": "ms-sl++"})
    assert ok is True
    text = pushgateway.metrics_text()
    for name, value in [("prvr_run_duration_seconds", 812.5), ("prvr_run_epochs", 37.0),
                        ("prvr_run_best_sumr", 171.25), ("prvr_run_collapsed", 0.0)]:
        [(labels, got)] = series(text, name).items()
        assert got == value
        assert 'job="prvr-train"' in labels and 'collection="tvr"' in labels and 'variant="ms-sl++"' in labels
    assert not series(text, "prvr_run_note") and not series(text, "prvr_run_bad")


@pytest.mark.integration
def test_gateway_from_env_replaces_group(pushgateway, monkeypatch):
    monkeypatch.setenv(GATEWAY_ENV, pushgateway.address)
    assert push_run_metrics("prvr-eval", {"sumr": 1.0}, labels={"run": "r1"})
    assert push_run_metrics("prvr-eval", {"sumr": 2.5}, labels={"run": "r1"})
    got = series(pushgateway.metrics_text(), "prvr_run_sumr")
    assert [v for k, v in got.items() if 'job="prvr-eval"' in k and 'run="r1"' in k] == [2.5]


def test_no_gateway_is_a_no_op(monkeypatch):
    monkeypatch.delenv(GATEWAY_ENV, raising=False)
    assert push_run_metrics("prvr-train", {"epochs": 3}) is False


def test_unreachable_gateway_warns_and_returns_false(monkeypatch, caplog):
    monkeypatch.delenv(GATEWAY_ENV, raising=False)
    t = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="prvr.monitoring"):
        assert push_run_metrics("prvr-train", {"epochs": 3}, gateway=f"127.0.0.1:{free_port()}") is False
    assert time.monotonic() - t < 5
    assert "could not push" in caplog.text


def test_metric_names():
    assert metric_name("best sumr") == "prvr_run_best_sumr"
    assert metric_name("R@1") == "prvr_run_r_1"
    assert metric_name("Duration-Seconds") == "prvr_run_duration_seconds"
    with pytest.raises(ValueError):
        metric_name("@@")
