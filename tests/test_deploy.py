"""deploy/ without a cluster: the kustomize overlays rendered in Python (and compared with
`kubectl kustomize` where it is installed), validated offline against the Kubernetes schemas
(kubernetes-validate) and, for the CRDs, against subset schemas of the fields we use whose
embedded Kubernetes types (Container, Volume, ...) are the real ones; the wiring between
the pod's containers, nginx.conf, the Dockerfiles and compose.yaml; the alerting rules
(promtool) and the Grafana dashboard."""
from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

try:
    from helpers.kustomize import build, strategic_merge
except ImportError:  # tests/ imported as a package
    from tests.helpers.kustomize import build, strategic_merge

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/prod", "kserve")
# 1.30: the oldest release where HPA ContainerResource metrics are GA; 1.37: the newest schemas.
K8S_VERSIONS = ("1.30", "1.37")
NGINX_CONF = DEPLOY / "base" / "auth-proxy" / "nginx.conf"
PROMTOOL = os.environ.get("PRVR_PROMTOOL_BIN") or shutil.which("promtool") or "/usr/bin/promtool"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rendered(name: str) -> list[dict]:
    return build(DEPLOY / name)


def one(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def container(deployment: dict, name: str) -> dict:
    [c] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def serving_command(deployment: dict) -> list[str]:
    c = container(deployment, "torchserve")
    return c["command"] + c["args"]


def ts_settings(deployment: dict) -> dict[str, str]:
    """The --ts-set KEY=VALUE settings the serving container passes to TorchServe."""
    sets = [a.split("=", 1)[1] for a in container(deployment, "torchserve")["args"] if a.startswith("--ts-set=")]
    return dict(s.split("=", 1) for s in sets)


# ----------------------------------------------------------------------------- schemas of the CRDs
DEF = "https://kubernetes.io/api/_definitions.json#/$defs/"
_DURATION = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"


def _obj(properties: dict, required: list[str] = ()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


# The fields of monitoring.coreos.com/v1 ServiceMonitor and serving.kserve.io/v1beta1
# InferenceService that deploy/ uses, with the types and patterns of their CRDs (prometheus-operator
# 0.84, KServe 0.15); nothing else is allowed, so a misspelt field fails here.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _obj({
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"$ref": DEF + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": _obj({
            "selector": {"$ref": DEF + "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"},
            "jobLabel": {"type": "string"},
            "endpoints": {"type": "array", "minItems": 1, "items": _obj({
                "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": {"type": "string", "pattern": _DURATION},
                "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                "honorLabels": {"type": "boolean"}}, ["port"])}}, ["selector", "endpoints"])},
        ["apiVersion", "kind", "metadata", "spec"]),
    ("serving.kserve.io/v1beta1", "InferenceService"): _obj({
        "apiVersion": {"const": "serving.kserve.io/v1beta1"}, "kind": {"const": "InferenceService"},
        "metadata": {"$ref": DEF + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": _obj({"predictor": _obj({
            # ComponentExtensionSpec
            "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
            "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]}, "scaleTarget": {"type": "integer"},
            # the inlined PodSpec fields
            "containers": {"type": "array", "minItems": 1, "items": {"$ref": DEF + "io.k8s.api.core.v1.Container"}},
            "volumes": {"type": "array", "items": {"$ref": DEF + "io.k8s.api.core.v1.Volume"}},
            "securityContext": {"$ref": DEF + "io.k8s.api.core.v1.PodSecurityContext"},
            "automountServiceAccountToken": {"type": "boolean"}, "serviceAccountName": {"type": "string"},
        }, ["containers"])}, ["predictor"])},
        ["apiVersion", "kind", "metadata", "spec"]),
}


def _definitions(version: str) -> Resource:
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    return Resource.from_contents(json.loads((folder / "_definitions.json").read_text()))


def validate(doc: dict, version: str) -> None:
    """kubernetes-validate (strict) for Kubernetes kinds; the CRD subset schema otherwise."""
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema is None:
        kubernetes_validate.validate(doc, version, strict=True)
        return
    registry = Registry().with_resource("https://kubernetes.io/api/_definitions.json", _definitions(version))
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


# ----------------------------------------------------------------------------- rendering
def test_renderer_refuses_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels:\n  team: x\n")
    with pytest.raises(ValueError, match="commonLabels"):
        build(tmp_path)


def test_strategic_merge_merges_lists_by_their_key():
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                           {"name": "b", "image": "b:1"}], "args": ["--one"]}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}]}],
             "args": ["--two"]}
    out = strategic_merge(base, patch)
    assert out["containers"][0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "3"},
                                           {"name": "Z", "value": "4"}]
    assert out["containers"][1] == {"name": "b", "image": "b:1"} and out["args"] == ["--two"]
    assert strategic_merge({"a": 1, "b": 2}, {"a": None}) == {"b": 2}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(name):
    proc = subprocess.run(["kubectl", "kustomize", str(DEPLOY / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    real = {key(d): d for d in yaml.safe_load_all(proc.stdout) if d}
    assert {key(d): d for d in rendered(name)} == real


# ----------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_validate_against_the_schemas(name, version):
    docs = rendered(name)
    assert docs
    for doc in docs:
        validate(doc, version)


@pytest.mark.parametrize("kind,path,bad", [
    ("Deployment", ("spec", "template", "spec", "containers", 0), {"readinesProbe": {}}),
    ("Deployment", ("spec", "template", "spec", "containers", 1, "resources", "limits"), {"cpu": [1]}),
    ("HorizontalPodAutoscaler", ("spec",), {"minReplica": 1}),
    ("ServiceMonitor", ("spec", "endpoints", 0), {"interval": "15 seconds"}),
    ("ServiceMonitor", ("spec", "endpoints", 0), {"intervall": "15s"}),
])
def test_validation_catches_mistakes(kind, path, bad):
    """The negative control: the same validation rejects a misspelt or mistyped field."""
    doc = copy.deepcopy(one(rendered("overlays/prod"), kind))
    node = doc
    for step in path:
        node = node[step]
    node.update(bad)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc, K8S_VERSIONS[0])


def test_inference_service_containers_are_checked_as_kubernetes_containers():
    doc = copy.deepcopy(rendered("kserve")[0])
    doc["spec"]["predictor"]["containers"][0]["env"][0]["valueFrom"] = {"secretKeyRef": {"nam": "x"}}
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, K8S_VERSIONS[0])


# ----------------------------------------------------------------------------- the serving pod
def test_torchserve_stays_on_the_loopback_with_token_auth_off():
    dep = one(rendered("base"), "Deployment")
    assert serving_command(dep)[:2] == ["prvr", "serve-registry"]
    ts = ts_settings(dep)
    assert ts["disable_token_authorization"] == "true"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert ts[key].startswith("http://127.0.0.1:"), (key, ts[key])
    # the proxy forwards to exactly these ports, and listens on the container ports it declares
    conf = NGINX_CONF.read_text()
    upstreams = re.findall(r"server (127\.0\.0\.1:\d+);", conf)
    assert upstreams == [ts["inference_address"][7:], ts["metrics_address"][7:]]
    proxy = container(dep, "auth-proxy")
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert sorted(int(p) for p in re.findall(r"listen (\d+);", conf)) == sorted(ports.values())
    assert "ports" not in container(dep, "torchserve")


def test_pod_runs_non_root_on_read_only_filesystems():
    dep = one(rendered("overlays/prod"), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def _dockerfile_env(name: str) -> str:
    [value] = re.findall(rf"{name}=(\S+)", (REPO / "Dockerfile").read_text().split("AS serving", 1)[1])
    return value


def test_everything_torchserve_writes_is_an_empty_dir():
    dep = one(rendered("base"), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    ts = container(dep, "torchserve")
    mounts = {m["mountPath"]: m["name"] for m in ts["volumeMounts"]}
    args = dict(a.split("=", 1) for a in ts["args"] if a.startswith(("--workdir=", "--model-store=")))
    env = {e["name"]: e.get("value") for e in ts["env"]}
    # working dir (config, logs, pulled files), model store, TorchServe's logs and temp folder
    # (unpacked models, PID file: the image's LOG_LOCATION / TEMP), the home (caches)
    writable = {args["--workdir"], args["--model-store"], _dockerfile_env("LOG_LOCATION"),
                _dockerfile_env("TEMP"), env["HOME"]}
    assert writable <= set(mounts), writable - set(mounts)
    for path in writable:
        assert "emptyDir" in volumes[mounts[path]], path
    proxy_mounts = {m["mountPath"]: m["name"] for m in container(dep, "auth-proxy")["volumeMounts"]}
    assert "emptyDir" in volumes[proxy_mounts["/tmp"]]
    written = re.findall(r"(?:pid|_temp_path) (/\S+);", NGINX_CONF.read_text())    # the PID file, 5 buffers
    assert len(written) == 6 and all(path.startswith("/tmp/") for path in written), written


def test_proxy_reads_its_config_and_keys_from_the_mounts():
    docs = rendered("base")
    dep = one(docs, "Deployment")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(dep, "auth-proxy")["volumeMounts"]}
    # the Dockerfile's `nginx -c PATH` is the generated ConfigMap's nginx.conf, byte for byte
    entry = re.search(r'ENTRYPOINT \[(.*)\]', (DEPLOY / "base" / "auth-proxy" / "Dockerfile").read_text()).group(1)
    conf_path = Path(json.loads(f"[{entry}]")[-1])
    config_map = one(docs, "ConfigMap")
    assert mounts[str(conf_path.parent)]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"][conf_path.name] == NGINX_CONF.read_text()
    # the keys the map includes come from the Secret
    [keys] = re.findall(r"include (\S+);", NGINX_CONF.read_text())
    secret = mounts[str(Path(keys).parent)]["secret"]
    assert secret["secretName"] == "prvr-api-keys" and secret["items"] == [{"key": "keys.map", "path": "keys.map"}]


def test_s3_credentials_come_from_the_secret_the_pipeline_uses():
    from pipelines.options import S3_SECRET_KEYS

    for name, c in (("base", container(one(rendered("base"), "Deployment"), "torchserve")),
                    ("kserve", rendered("kserve")[0]["spec"]["predictor"]["containers"][0])):
        env = {e["name"]: e for e in c["env"]}
        assert env["PRVR_REGISTRY_URI"]["value"].startswith("s3://"), name
        for key in S3_SECRET_KEYS:
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"], ref.get("optional", False)) == ("prvr-s3", key, False), name
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_probes_use_the_addresses_torchserve_listens_on():
    dep = one(rendered("base"), "Deployment")
    ts, settings = container(dep, "torchserve"), ts_settings(dep)
    ping = f"{settings['inference_address']}/ping"
    for probe in ("startupProbe", "livenessProbe"):
        assert ping in ts[probe]["exec"]["command"][-1]
    assert f"{settings['management_address']}/models/prvr" in ts["readinessProbe"]["exec"]["command"][-1]
    startup = ts["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600     # registry pull + model load
    assert container(dep, "auth-proxy")["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}


def test_service_monitor_and_annotations_scrape_the_metrics_port():
    docs = rendered("base")
    dep, svc, monitor = one(docs, "Deployment"), one(docs, "Service"), one(docs, "ServiceMonitor")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    proxy_ports = {p["name"]: p["containerPort"] for p in container(dep, "auth-proxy")["ports"]}
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert {p["targetPort"] for p in svc_ports.values()} == set(proxy_ports)
    [endpoint] = monitor["spec"]["endpoints"]
    assert svc_ports[endpoint["port"]]["targetPort"] == "metrics" and endpoint["path"] == "/metrics"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == proxy_ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_autoscaler_owns_the_replica_count():
    docs = rendered("base")
    dep, hpa = one(docs, "Deployment"), one(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in dep["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    [metric] = hpa["spec"]["metrics"]
    container(dep, metric["containerResource"]["container"])          # the container exists
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("name,namespace,hpa_range,bucket", [
    ("overlays/dev", "prvr-dev", (1, 2), "s3://prvr-registry-dev"),
    ("overlays/prod", "prvr", (3, 10), "s3://prvr-registry"),
])
def test_overlays(name, namespace, hpa_range, bucket):
    docs = rendered(name)
    assert {d["metadata"]["namespace"] for d in docs} == {namespace}
    dep, hpa = one(docs, "Deployment"), one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == hpa_range
    images = [c["image"] for c in dep["spec"]["template"]["spec"]["containers"]]
    assert images == ["ghcr.io/prvr/prvr-serving:0.1.0", "ghcr.io/prvr/prvr-auth-proxy:0.1.0"]
    env = {e["name"]: e for e in container(dep, "torchserve")["env"]}
    assert env["PRVR_REGISTRY_URI"]["value"] == bucket
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "prvr-s3"   # kept by the patch
    base = container(one(rendered("base"), "Deployment"), "torchserve")
    assert container(dep, "torchserve")["args"] == base["args"]


def test_prod_disruption_budget_leaves_room_for_a_drain():
    docs = rendered("overlays/prod")
    pdb, hpa, dep = one(docs, "PodDisruptionBudget"), one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_inference_service_runs_the_kserve_adapter():
    [isvc] = rendered("kserve")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    assert (predictor["scaleMetric"], predictor["minReplicas"]) == ("cpu", 2)
    [c] = isvc["spec"]["predictor"]["containers"]
    assert c["name"] == "kserve-container" and c["command"] == ["prvr", "serve-kserve"]
    assert c["image"] == "ghcr.io/prvr/prvr-serving:0.1.0"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert isvc["spec"]["predictor"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/home/prvr"} <= mounts


# ----------------------------------------------------------------------------- compose
def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_images_and_ports():
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"torchserve", "auth-proxy", "pushgateway", "prometheus", "grafana"}
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (name, image)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"AS {services['torchserve']['build']['target']}" in dockerfile
    assert (DEPLOY / services["auth-proxy"]["build"]["context"] / "Dockerfile").is_file()
    # the proxy lives in TorchServe's network namespace, as in the pod; its ports are published there
    assert services["auth-proxy"]["network_mode"] == "service:torchserve"
    published = sorted(int(p.rsplit(":", 1)[1]) for p in services["torchserve"]["ports"])
    assert published == sorted(int(p) for p in re.findall(r"listen (\d+);", NGINX_CONF.read_text()))
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    assert services["torchserve"]["read_only"] is True and services["auth-proxy"]["read_only"] is True


def test_compose_runs_the_deployment_command_and_probe():
    """The serving command and the readiness check are written once (deploy/base/deployment.yaml)."""
    dep = one(rendered("base"), "Deployment")
    ts = _compose()["services"]["torchserve"]
    assert ts["command"] == serving_command(dep)
    assert ts["healthcheck"]["test"] == ["CMD", *container(dep, "torchserve")["readinessProbe"]["exec"]["command"]]
    assert set(ts["tmpfs"]) >= {m["mountPath"] for m in container(dep, "torchserve")["volumeMounts"]}


def _split_volume(volume: str) -> tuple[str, str]:
    """``SOURCE:TARGET[:ro]`` -> (SOURCE, TARGET); SOURCE may be ``${VAR:-default}`` (with colons)."""
    end = volume.index("}") + 1 if volume.startswith("${") else volume.index(":")
    return volume[:end], volume[end + 1:].split(":")[0]


def test_compose_mounts_exist_in_the_repository():
    mounts = [(name, v) for name, svc in _compose()["services"].items() for v in svc.get("volumes", [])]
    checked = 0
    for name, volume in mounts:
        source, target = _split_volume(volume)
        if source.startswith("${"):
            variable, _, default = source[2:-1].partition(":")
            if default.startswith("?"):                   # required: the API keys (a secret, never committed)
                assert variable == "PRVR_API_KEYS" and target == "/etc/prvr/auth/keys.map"
            else:                                         # the local registry: a git-ignored data folder
                assert default == "-../registry" and "/registry/" in (REPO / ".gitignore").read_text()
            continue
        if not source.startswith("."):
            continue                                      # a named volume
        assert (DEPLOY / source).exists(), (name, source)
        checked += 1
    assert checked >= 5


def test_compose_wiring_of_prometheus_and_grafana():
    compose = _compose()
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    metrics_port = int(re.findall(r"listen (\d+);", NGINX_CONF.read_text())[1])
    assert targets == {"prvr": [f"torchserve:{metrics_port}"], "pushgateway": ["pushgateway:9091"]}
    assert [j["honor_labels"] for j in prom["scrape_configs"] if j["job_name"] == "pushgateway"] == [True]
    mounted = dict(v.split(":")[:2][::-1] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("."))
    assert Path(mounted["/etc/prometheus/prometheus.yml"]).name == "prometheus.yml"
    for rule_file in prom["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounted
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    [ds] = datasources["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "9090:9090" in compose["services"]["prometheus"]["ports"][0]
    providers = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "prvr.yaml").read_text())
    grafana = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    dashboard_target = next(t for t, s in grafana.items() if s.endswith("prvr.json"))
    assert str(Path(dashboard_target).parent) == providers["providers"][0]["options"]["path"]
    dashboard = json.loads((DEPLOY / "grafana" / "prvr.json").read_text())
    [var] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert var["current"]["value"] == ds["uid"]


# ----------------------------------------------------------------------------- images, rules, dashboard
def test_auth_proxy_dockerfile_hadolint_clean():
    from test_build import hadolint

    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", "-"],
                          input=(DEPLOY / "base" / "auth-proxy" / "Dockerfile").read_text(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def _promtool(*args: str) -> subprocess.CompletedProcess:
    if not (Path(PROMTOOL).is_file() and os.access(PROMTOOL, os.X_OK)):
        pytest.skip(f"promtool not found at {PROMTOOL} (apt-get install prometheus; CI installs it)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY / "prometheus")


def test_alert_rules_check():
    proc = _promtool("check", "rules", "alerts.yaml")
    assert proc.returncode == 0 and "SUCCESS: 5 rules found" in proc.stdout, proc.stdout + proc.stderr
    names = [r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
             for r in g["rules"]]
    assert names == ["PrvrHighErrorRatio", "PrvrLatencyP99High", "PrvrNoReadyReplica", "PrvrNotScraped",
                     "PrvrPipelineStale"]


def test_alert_rules_fire_on_their_unit_test_series():
    proc = _promtool("test", "rules", "alerts.test.yaml")
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "prometheus" / "alerts.test.yaml").read_text()))
    assert tested == {"PrvrHighErrorRatio", "PrvrLatencyP99High", "PrvrNoReadyReplica", "PrvrNotScraped",
                      "PrvrPipelineStale"}


def test_compose_prometheus_config_check():
    proc = _promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_watch_the_metric_the_stages_push():
    from prvr.monitoring import LAST_SUCCESS, metric_name

    text = (DEPLOY / "prometheus" / "alerts.yaml").read_text()
    assert f'{metric_name(LAST_SUCCESS)}{{job="prvr-register"}}' in text
    assert '_push("prvr-register"' in (REPO / "prvr" / "stages.py").read_text()


def test_dashboard_structure():
    dashboard = json.loads((DEPLOY / "grafana" / "prvr.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    assert titles == {"Request rate by outcome", "Error ratio", "Latency p50 / p99", "Stage times (mean per batch)",
                      "Queue time (mean per request)", "Corpus size and model version", "Ready replicas",
                      "Worker restarts"}
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs) and all(t["expr"].strip() for t in p["targets"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("prvr_requests_total", "prvr_request_latency_deciseconds_bucket", "prvr_stage_deciseconds_sum",
                   "ts_queue_latency_microseconds", "prvr_corpus_size", "WorkerLoadTime", "Requests5XX"):
        assert metric in exprs, metric
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "job", "model"}


# ----------------------------------------------------------------------------- KFP tasks (monitoring)
def test_compiled_pipeline_gives_every_task_the_pushgateway(tmp_path):
    from pipelines import options
    from pipelines.prvr_pipeline import compile_pipeline
    from prvr.monitoring import GATEWAY_ENV

    url = "http://prometheus-pushgateway.monitoring:9091"
    spec = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", options.parse(environ={}, pushgateway=url))
                              .read_text())
    executors = next(spec)["deploymentSpec"]["executors"]
    assert len(executors) == 5
    for name, executor in executors.items():
        assert {"name": GATEWAY_ENV, "value": url} in executor["container"]["env"], name
    with pytest.raises(ValueError, match="--pushgateway 'pg 9091'"):
        options.parse(environ={}, pushgateway="pg 9091")
