"""TorchServe's Prometheus endpoint scraped by a real Prometheus (Debian package): the
custom prvr series (requests by outcome, latency histogram, stage times, corpus size)
read back through Prometheus' HTTP API."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from helpers.servers import stop_process
from prvr.server import free_port
from test_serving import start_serving

pytestmark = pytest.mark.integration
PROMETHEUS_BIN = os.environ.get("PRVR_PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"

if not (Path(PROMETHEUS_BIN).is_file() and os.access(PROMETHEUS_BIN, os.X_OK)):
    pytest.skip(f"Prometheus binary not found at {PROMETHEUS_BIN} (apt-get install prometheus; CI installs it)",
                allow_module_level=True)


class Prometheus:
    """A real Prometheus on a free loopback port scraping one target every second."""

    def __init__(self, workdir: Path, target: str):
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          "scrape_configs:\n  - job_name: torchserve\n    static_configs:\n"
                          f"      - targets: ['{target}']\n")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen([PROMETHEUS_BIN, f"--config.file={config}",
                                      f"--web.listen-address={self.url[7:]}",
                                      f"--storage.tsdb.path={workdir / 'tsdb'}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def query(self, expr: str) -> list[dict]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def wait_value(self, expr: str, pred, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                last = float(result[0]["value"][1])
                if pred(last):
                    return last
            time.sleep(0.5)
        raise AssertionError(f"{expr}: last value {last} after {timeout} s")

    def stop(self) -> None:
        stop_process(self.proc, self.log, timeout=15)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, text_encoder):
    ts = start_serving(tmp_path_factory, "ts-prom", text_encoder)
    try:
        prom = Prometheus(tmp_path_factory.mktemp("prom"), ts.metrics_url.split("//", 1)[1])
    except Exception:
        ts.stop()
        raise
    yield ts, prom
    prom.stop()
    ts.stop()


def test_custom_series_reach_prometheus(stack):
    ts, prom = stack
    encode_ms = 0.0
    for i in range(6):
        r = ts.infer({"query": f"a man opens the fridge {i}"})
        assert r.status_code == 200
        stages = dict(part.split(";dur=") for part in r.headers["Server-Timing"].split(", "))
        encode_ms += float(stages["encode"])
    for body in ({"query": ""}, {"query": "x", "top_k": 0}):
        assert ts.infer(body).status_code == 400
    assert ts.infer(data=b"plain", content_type="text/plain").status_code == 415

    m = 'ModelName="prvr"'
    ok = prom.wait_value(f'sum(prvr_requests_total{{{m},outcome="ok"}})', lambda v: v >= 6)
    bad = prom.wait_value(f'sum(prvr_requests_total{{{m},outcome="bad_request"}})', lambda v: v >= 3)
    assert (ok, bad) == (6, 3)
    # latency is a real histogram in deciseconds: the frontend's fixed buckets 0.005 .. 10
    # then mean 0.5 ms .. 1 s
    buckets = prom.query(f"prvr_request_latency_deciseconds_bucket{{{m}}}")
    assert {b["metric"]["le"] for b in buckets} >= {"0.005", "0.01", "0.1", "1.0", "10.0", "+Inf"}
    assert prom.wait_value(f"sum(prvr_request_latency_deciseconds_count{{{m}}})", lambda v: v >= 9) >= 9
    p50 = prom.wait_value(
        f"0.1 * histogram_quantile(0.5, sum by (le) (prvr_request_latency_deciseconds_bucket{{{m}}}))",
        lambda v: v > 0)
    assert 0 < p50 < 1                                                   # seconds
    # the stage sums are the Server-Timing durations (ms) in units of 100 ms
    encode = prom.wait_value(f'sum(prvr_stage_deciseconds_sum{{{m},stage="encode"}})', lambda v: v > 0)
    assert 100 * encode == pytest.approx(encode_ms, rel=0.01, abs=0.01)
    score = prom.wait_value(f'sum(prvr_stage_deciseconds_sum{{{m},stage="score"}})', lambda v: v > 0)
    assert score > 0
    assert prom.wait_value(f"sum(prvr_queries_total{{{m}}})", lambda v: v >= 6) == 6
    # corpus size of the served version
    [corpus] = prom.query(f"prvr_corpus_size{{{m}}}")
    assert corpus["metric"]["model_version"] == "v0001" and float(corpus["value"][1]) == 30
    # TorchServe's own series are still there
    assert prom.wait_value('sum(ts_inference_requests_total{model_name="prvr"})', lambda v: v >= 9) >= 9
