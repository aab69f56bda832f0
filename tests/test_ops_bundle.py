"""The operations bundle of deploy/ against real servers on 127.0.0.1: a TorchServe with
token authorisation off (as in the pod), two Debian nginx auth proxies run from
deploy/base/auth-proxy/nginx.conf sharing one key file (two replicas, one Secret), the
Deployment's probe commands, a real Pushgateway fed by a pipeline stage, and a real
Prometheus run from deploy/prometheus/prometheus.yml (targets moved to 127.0.0.1) with the
alerting rules, evaluating every query of the Grafana dashboard and every alert."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from helpers.servers import Pushgateway, pushgateway_available, stop_process
from prvr.server import TorchServe, free_port
from test_deploy import DEPLOY, NGINX_CONF, container, one, rendered
from test_serving import serving_artifacts

pytestmark = pytest.mark.integration

NGINX = os.environ.get("PRVR_NGINX_BIN") or shutil.which("nginx") or "/usr/sbin/nginx"
PROMETHEUS = os.environ.get("PRVR_PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"
for _binary, _package in ((NGINX, "nginx"), (PROMETHEUS, "prometheus")):
    if not (Path(_binary).is_file() and os.access(_binary, os.X_OK)):
        pytest.skip(f"{_package} not found at {_binary} (apt-get install {_package}; CI installs it)",
                    allow_module_level=True)
if not pushgateway_available():
    pytest.skip("prometheus-pushgateway not installed (CI installs it)", allow_module_level=True)

KEYS = {"alice": "3f1c9a0d2b7e4f6a8c5d0e1f2a3b4c5d", "bob": "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"}
# Grafana's variables, as the dashboard is opened on this stack
GRAFANA_VARS = {"$__rate_interval": "1m", "$job": "prvr", "$model": "prvr"}


# ----------------------------------------------------------------------------- the pieces
def render_nginx_conf(folder: Path, api: int, metrics: int, upstream: str, upstream_metrics: str,
                      keys: Path) -> Path:
    """deploy's nginx.conf with only its addresses and paths moved: the listen ports onto the
    loopback, the upstreams to the test's TorchServe, the key file and /tmp into ``folder``."""
    text = NGINX_CONF.read_text()
    subs = {"listen 8000;": f"listen 127.0.0.1:{api};", "listen 8002;": f"listen 127.0.0.1:{metrics};",
            "127.0.0.1:8080": upstream, "127.0.0.1:8082": upstream_metrics,
            "/etc/prvr/auth/keys.map": str(keys), "/tmp/": f"{folder}/"}
    for old in subs:
        assert old in text, f"{NGINX_CONF} no longer contains {old!r}: update this test's substitutions"
    text = re.sub("|".join(map(re.escape, subs)), lambda m: subs[m.group(0)], text)
    path = folder / "nginx.conf"
    path.write_text(text)
    return path


class Nginx:
    """Debian's nginx on the rendered config (foreground: `daemon off;` is in the file)."""

    def __init__(self, folder: Path, upstream: str, upstream_metrics: str, keys: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.api, self.metrics = free_port(), free_port()
        self.url, self.metrics_url = f"http://127.0.0.1:{self.api}", f"http://127.0.0.1:{self.metrics}"
        conf = render_nginx_conf(folder, self.api, self.metrics, upstream, upstream_metrics, keys)
        cmd = [NGINX, "-e", "stderr", "-c", str(conf)]
        if os.geteuid() == 0:      # as root, workers would run as nobody, outside the test's private tmp
            cmd += ["-g", "user root;"]
        self.log = open(folder / "nginx.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(f"{self.metrics_url}/nope", timeout=1)
                return
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not start: {(folder / 'nginx.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def post(self, body: dict, key: str | None = None, scheme: str = "Bearer", **kw) -> requests.Response:
        headers = {"Authorization": f"{scheme} {key}"} if key is not None else {}
        return requests.post(f"{self.url}/predictions/prvr", json=body, headers=headers, timeout=30, **kw)

    def stop(self) -> None:
        stop_process(self.proc, self.log)


class Prometheus:
    """A real Prometheus on deploy/prometheus/prometheus.yml: scrape and rule intervals 1 s,
    targets moved to 127.0.0.1, the rule file by absolute path."""

    def __init__(self, folder: Path, targets: dict[str, str]):
        folder.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
        for job in config["scrape_configs"]:
            [static] = job["static_configs"]
            static["targets"] = [targets[t] for t in static["targets"]]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "wb")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                                      f"--web.listen-address={self.url[7:]}", f"--storage.tsdb.path={folder / 'tsdb'}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).ok:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start: {(folder / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def query(self, expr: str) -> dict:
        """The API's whole answer: status "success" with data, or "error" with errorType."""
        return requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()

    def stop(self) -> None:
        stop_process(self.proc, self.log, timeout=15)


def probe(command: list[str], replace: dict[str, str]) -> int:
    """Run a probe command of the Deployment here: this venv's python for the image's, and
    the pod's loopback addresses moved to the test server's."""
    code = command[-1]
    for old, new in replace.items():
        assert old in code, (old, code)
        code = code.replace(old, new)
    assert command[:2] == ["python", "-c"]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


# ----------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def bundle(tmp_path_factory, text_encoder):
    """TorchServe (token auth off, loopback) behind two nginx proxies sharing one key file, a
    Pushgateway, and Prometheus scraping proxy A's metrics port and the gateway."""
    art = serving_artifacts(tmp_path_factory.getbasetemp() / "serving-artifacts", text_encoder)
    ts = TorchServe(tmp_path_factory.mktemp("ts-auth"), art.store, {"prvr": art.mars["v0001"].name},
                    free_ports=True, overrides={"disable_token_authorization": "true"})
    dep = one(rendered("base"), "Deployment")
    readiness = container(dep, "torchserve")["readinessProbe"]["exec"]["command"]
    moved = {"http://127.0.0.1:8081": ts.management_url}
    stack = [ts.start(wait=None)]
    try:
        deadline = time.monotonic() + 180
        while probe(readiness, moved) != 0:        # the pod's readiness probe decides when to go on
            assert time.monotonic() < deadline, f"TorchServe not ready; see {ts.workdir}/logs"
            time.sleep(0.5)
        root = tmp_path_factory.mktemp("proxies")
        keys = root / "keys.map"
        keys.write_text("".join(f'"Bearer {key}" {client};\n' for client, key in KEYS.items()))
        upstream, upstream_metrics = ts.inference_url[7:], ts.metrics_url[7:]
        proxies = [Nginx(root / name, upstream, upstream_metrics, keys) for name in ("a", "b")]
        stack += proxies
        gateway = Pushgateway()
        stack.append(gateway)
        prom = Prometheus(tmp_path_factory.mktemp("prom"),
                          {"torchserve:8002": proxies[0].metrics_url[7:], "pushgateway:9091": gateway.address})
        stack.append(prom)
        yield {"ts": ts, "proxies": proxies, "gateway": gateway, "prom": prom, "dep": dep, "root": root,
               "keys": keys}
    finally:
        for server in reversed(stack):
            server.stop()


# ----------------------------------------------------------------------------- probes
def test_probe_commands_against_a_real_torchserve(bundle):
    ts, dep = bundle["ts"], bundle["dep"]
    c = container(dep, "torchserve")
    management = {"http://127.0.0.1:8081": ts.management_url}
    assert probe(c["readinessProbe"]["exec"]["command"], management) == 0
    assert probe(c["readinessProbe"]["exec"]["command"], {**management, "/models/prvr": "/models/other"}) != 0
    for name in ("startupProbe", "livenessProbe"):
        command = c[name]["exec"]["command"]
        assert probe(command, {"http://127.0.0.1:8080": ts.inference_url}) == 0
        assert probe(command, {"http://127.0.0.1:8080": f"http://127.0.0.1:{free_port()}"}) != 0


# ----------------------------------------------------------------------------- the auth proxy
def test_every_proxy_accepts_the_shared_keys_and_only_them(bundle):
    for proxy in bundle["proxies"]:
        for key, scheme in ((None, "Bearer"), ("not-a-key", "Bearer"), (KEYS["alice"][:-1], "Bearer"),
                            (KEYS["alice"], "Basic")):
            r = proxy.post({"query": "a man opens the fridge"}, key, scheme)
            assert r.status_code == 401, (key, scheme, r.status_code, r.text)
            assert r.headers["Content-Type"] == "application/json"
            assert "Authorization: Bearer" in r.json()["error"]
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="prvr"'
        for client, key in KEYS.items():
            r = proxy.post({"query": "a man opens the fridge", "top_k": 3}, key)
            assert r.status_code == 200, (client, r.text)
            answer = r.json()
            assert answer["model_version"] == "v0001" and len(answer["results"][0]["videos"]) == 3
        # the handler's own answers pass through unchanged
        body = {"query": "x", "top_k": 0}
        bad = proxy.post(body, KEYS["bob"])
        direct = requests.post(f"{bundle['ts'].inference_url}/predictions/prvr", json=body, timeout=30)
        assert (bad.status_code, bad.json()) == (direct.status_code, direct.json()) and bad.status_code == 400
        assert requests.get(f"{proxy.url}/ping", timeout=5).json() == {"status": "Healthy"}


def test_metrics_port_serves_only_metrics_without_a_key(bundle):
    proxy = bundle["proxies"][1]
    r = requests.get(f"{proxy.metrics_url}/metrics", timeout=5)
    assert r.status_code == 200 and "prvr_corpus_size" in r.text
    other = requests.get(f"{proxy.metrics_url}/predictions/prvr", timeout=5)
    assert other.status_code == 404 and other.json()["code"] == 404


def test_proxy_refuses_huge_bodies_and_reports_a_missing_model_server(bundle, tmp_path):
    proxy = bundle["proxies"][0]
    r = requests.post(f"{proxy.url}/predictions/prvr", data=b"x" * (9 << 20), timeout=30,
                      headers={"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "8 MiB" in r.json()["error"]
    closed = f"127.0.0.1:{free_port()}"
    orphan = Nginx(tmp_path / "orphan", closed, closed, bundle["keys"])
    try:
        down = orphan.post({"query": "x"}, KEYS["alice"])
        assert down.status_code == 503 and down.json()["error"] == "model server not reachable"
        assert requests.get(f"{orphan.url}/ping", timeout=5).status_code == 503
        assert orphan.post({"query": "x"}).status_code == 401        # the key is checked first
    finally:
        orphan.stop()


# ----------------------------------------------------------------------------- Pushgateway
def test_a_stage_pushes_its_last_success(bundle, tmp_path, monkeypatch, toy_collection):
    from prvr import stages
    from prvr.config import load_config
    from prvr.monitoring import GATEWAY_ENV

    monkeypatch.setenv(GATEWAY_ENV, bundle["gateway"].address)
    t0 = time.time()
    stages.preprocess(str(toy_collection), tmp_path / "ds", load_config())   # has text features: no encoding
    t1 = time.time()
    pushed = [line for line in bundle["gateway"].metrics_text().splitlines()
              if line.startswith("prvr_run_last_success_timestamp_seconds{")]
    [line] = [x for x in pushed if 'job="prvr-preprocess"' in x]
    assert t0 <= float(line.rsplit(" ", 1)[1]) <= t1
    # Prometheus scrapes the gateway with honor_labels: the series keeps the stage's job
    prom = bundle["prom"]
    deadline = time.monotonic() + 20
    while not (result := prom.query('prvr_run_last_success_timestamp_seconds{job="prvr-preprocess"}')
               ["data"]["result"]):
        assert time.monotonic() < deadline, "the pushed series never reached Prometheus"
        time.sleep(0.5)
    assert result[0]["metric"]["collection"] == load_config().data.collection


# ----------------------------------------------------------------------------- dashboard and alerts
def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "prvr.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
            out.append((panel["title"], expr))
    return out


def _alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def _has_number(answer: dict) -> bool:
    """A query has data once one of its series holds a number: a quantile over buckets that
    have not moved between two scrapes is NaN, a series but not yet an answer."""
    return any(math.isfinite(float(r["value"][1])) for r in answer["data"]["result"])


def test_dashboard_and_alert_queries_run_on_real_metrics(bundle):
    """Traffic through the proxy, scraped through the proxy's metrics port: every query of the
    dashboard parses and, except those on kube-state-metrics series, returns a number; every alert
    expression parses and Prometheus evaluates every rule without error."""
    proxy, prom = bundle["proxies"][0], bundle["prom"]
    t0 = time.monotonic()
    queries = _dashboard_queries()
    must_answer = {expr for _, expr in queries if "kube_" not in expr}
    answered: set[str] = set()
    i = 0
    while answered != must_answer:
        assert time.monotonic() - t0 < 45, f"no data after 45 s for: {sorted(must_answer - answered)}"
        for _ in range(3):                                   # traffic keeps the rates above zero
            body = {"query": f"a man opens the fridge {i}"} if i % 4 else {"query": ""}
            assert proxy.post(body, KEYS["alice"]).status_code in (200, 400)
            i += 1
        for title, expr in queries:
            answer = prom.query(expr)
            assert answer["status"] == "success", (title, expr, answer)
            if expr in must_answer and _has_number(answer):
                answered.add(expr)
        time.sleep(0.5)
    for name, expr in _alert_queries():
        answer = prom.query(expr)
        assert answer["status"] == "success", (name, answer)
    # the rule file as Prometheus loaded it: every rule evaluated, none in error
    deadline = time.monotonic() + 10
    while True:
        groups = requests.get(f"{prom.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if len(rules) == len(_alert_queries()) and all(r["lastEvaluation"] > "2000" for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert {r["name"]: r["health"] for r in rules} == {name: "ok" for name, _ in _alert_queries()}
    # a quantile of the latency histogram is a number, not NaN, on this traffic
    [p99] = [e for title, e in queries if title == "Latency p50 / p99" and "0.99" in e]
    assert 0 < float(prom.query(p99)["data"]["result"][0]["value"][1]) < 10
    assert time.monotonic() - t0 < 60

