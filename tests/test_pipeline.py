"""The Kubeflow pipeline: the committed YAML is current, the whole pipeline runs locally
(kfp.local SubprocessRunner), and each component runs as a plain function on local artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

REPO = Path(__file__).resolve().parent.parent
PIPELINE_PY = REPO / "pipelines" / "prvr_pipeline.py"
PIPELINE_YAML = REPO / "pipelines" / "prvr.yaml"
KFP_CLI = Path(sys.executable).with_name("kfp")
# Compile-time settings from the environment (components/common.py, pipelines/options.py)
COMPILE_ENV = ("PRVR_IMAGE", "PRVR_TRAIN_IMAGE", "PRVR_TRAIN_GPUS")
# Small model: a tiny-preset epoch takes seconds on 2 CPU cores.
FAST = ["model.hidden_size=64", "model.map_size=8", "model.cluster_num=8", "model.max_ctx_len=32",
        "model.kmedoids_iters=10"]
SCORE_KEYS = {"r1", "r5", "r10", "r100", "sumr", "medr", "mnr"}

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def test_committed_yaml_matches_a_fresh_compile(tmp_path: Path) -> None:
    fresh = tmp_path / "prvr.yaml"
    env = {k: v for k, v in os.environ.items() if k not in COMPILE_ENV}
    proc = subprocess.run([sys.executable, str(PIPELINE_PY), str(fresh)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PIPELINE_YAML.is_file(), "pipelines/prvr.yaml is missing: run `python pipelines/prvr_pipeline.py`"
    assert yaml.safe_load(fresh.read_text()) == yaml.safe_load(PIPELINE_YAML.read_text()), \
        "pipelines/prvr.yaml is stale: run `python pipelines/prvr_pipeline.py` and commit it"


def _body(text: str) -> str:
    """The YAML without kfp's header comment: it prints base_params' default, a protobuf Struct,
    in an order that changes from process to process (hash seed)."""
    lines = text.splitlines(keepends=True)
    return "".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):])


def test_kfp_cli_compiles_the_committed_yaml(tmp_path: Path) -> None:
    """`kfp dsl compile --py pipelines/prvr_pipeline.py` (the file must not be called prvr.py: the
    CLI puts its folder first on sys.path, where it would shadow the prvr package)."""
    out = tmp_path / "kfp.yaml"
    env = {k: v for k, v in os.environ.items() if k not in COMPILE_ENV}
    proc = subprocess.run([str(KFP_CLI), "dsl", "compile", "--py", str(PIPELINE_PY), "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh, committed = out.read_text(), PIPELINE_YAML.read_text()
    assert _body(fresh) == _body(committed), "pipelines/prvr.yaml is stale: run `prvr pipeline compile`"
    assert yaml.safe_load(fresh) == yaml.safe_load(committed)
    assert fresh.startswith("# PIPELINE DEFINITION\n# Name: prvr\n")


def test_compiled_spec_shape() -> None:
    spec = yaml.safe_load(PIPELINE_YAML.read_text())
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-resolve", "exec-preprocess", "exec-train", "exec-evaluate", "exec-register"}
    from components.common import DEFAULT_IMAGE
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert images.pop("exec-train") == f"{DEFAULT_IMAGE}-cu128"        # the CUDA build trains
    assert set(images.values()) == {DEFAULT_IMAGE}
    gpu = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert gpu["resourceType"] == "nvidia.com/gpu" and gpu["resourceCount"] == "1"
    assert spec["root"]["dag"]["tasks"]["train"]["retryPolicy"]["maxRetryCount"] == 2
    assert "platforms" not in spec          # no PVC, secret, node selector or toleration by default
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"source", "variant", "epochs", "alpha", "nproc_per_node", "registry_uri", "promotion_margin",
            "params_overrides", "base_params", "endpoint_url"} == set(params)
    from prvr.config import load_config
    cfg = load_config()
    assert params["epochs"]["defaultValue"] == cfg.train.epochs
    assert params["registry_uri"]["defaultValue"] == cfg.registry.uri
    assert params["base_params"]["defaultValue"]["train"]["lr"] == cfg.train.lr


@pytest.mark.integration
def test_whole_pipeline_runs_locally(tmp_path: Path, tiny_encoded: Path) -> None:
    import kfp.local

    from pipelines.prvr_pipeline import prvr_pipeline
    from prvr.registry import Registry

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    uri = f"file://{tmp_path / 'registry'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "custom base image" / "accelerator has no effect locally"
        task = prvr_pipeline(source=str(tiny_encoded), epochs=2, registry_uri=uri, params_overrides=FAST)
    out = task.outputs
    dataset = json.loads((Path(out["dataset"].path) / "dataset.json").read_text())
    assert dataset["stats"]["splits"]["test"]["videos"] == 30 and not dataset["encoded_text"]
    metrics = json.loads((Path(out["evaluation"].path) / "metrics.json").read_text())
    for score in ("fused", "clip", "frame"):
        assert SCORE_KEYS <= set(metrics[score])
    assert metrics["split"] == "test" and metrics["epoch"] in (1, 2)
    decision = json.loads((Path(out["decision"].path) / "decision.json").read_text())
    assert decision["promoted"] and decision["version"] == "v0001"
    assert decision["reason"] == "promoted v0001: no production model yet"
    # the register step also hands the new production version over as a TorchServe archive
    mar = Path(out["decision"].path) / "model_store" / "prvr-v0001.mar"
    assert decision["archive"] == str(mar) and mar.stat().st_size > 0
    reg = Registry(uri)
    assert reg.production("prvr-mssl-pp") == "v0001"
    assert reg.show("prvr-mssl-pp", "v0001")["params"]["train"]["epochs"] == 2
    run_dir = Path(out["dataset"].path).parent.parent
    assert (run_dir / "evaluate" / "report").read_text().startswith("<!DOCTYPE html>")
    assert "| fused |" in (run_dir / "evaluate" / "summary").read_text()
    assert (run_dir / "train" / "model" / "model.pt").is_file()
    assert not (run_dir / "train" / "model" / "last.pt").exists()


@pytest.mark.integration
def test_components_as_plain_functions(tmp_path: Path, tiny_encoded: Path) -> None:
    from components import evaluate, preprocess, register, train
    from prvr.stages import pipeline_params, stage_config

    base = pipeline_params(stage_config(None, FAST))
    dataset = Dataset(uri=str(tmp_path / "dataset"))
    preprocess.python_func(source=str(tiny_encoded), base_params=base, params_overrides=[], dataset=dataset)
    assert dataset.metadata["test_videos"] == 30 and (tmp_path / "dataset" / "dataset.json").is_file()

    model, fit = Model(uri=str(tmp_path / "model")), Metrics(uri=str(tmp_path / "fit"))
    train.python_func(dataset=dataset, base_params=base, params_overrides=["train.patience=5"],
                      variant="mean-pool", epochs=1, alpha=0.5, nproc_per_node=1, model=model, metrics=fit)
    assert (tmp_path / "model" / "model.pt").is_file() and model.metadata["variant"] == "mean-pool"
    assert fit.metadata["epochs"] == 1 and "best_sumr" in fit.metadata

    metrics, report = Metrics(uri=str(tmp_path / "metrics")), HTML(uri=str(tmp_path / "report.html"))
    summary, evaluation = Markdown(uri=str(tmp_path / "summary.md")), Artifact(uri=str(tmp_path / "evaluation"))
    evaluate.python_func(dataset=dataset, model=model, base_params=base, params_overrides=[], metrics=metrics,
                         report=report, summary=summary, evaluation=evaluation)
    assert {f"{s}_sumr" for s in ("fused", "clip", "frame")} <= set(metrics.metadata)
    assert "<img" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "evaluation" / "metrics.json").is_file()

    decision = Artifact(uri=str(tmp_path / "decision"))
    uri = f"file://{tmp_path / 'registry'}"
    outputs = register.python_func(model=model, evaluation=evaluation, dataset=dataset, base_params=base,
                                   params_overrides=[], registry_uri=uri, promotion_margin=0.0, endpoint_url="",
                                   decision=decision)
    assert outputs.promoted and outputs.version == "v0001" and "no production" in outputs.reason
    assert json.loads((tmp_path / "decision" / "decision.json").read_text())["promoted"]
    again = register.python_func(model=model, evaluation=evaluation, dataset=dataset, base_params=base,
                                 params_overrides=["search.backend='exact'"], registry_uri=uri,
                                 promotion_margin=1.0, endpoint_url="", decision=Artifact(uri=str(tmp_path / "d2")))
    # the same model, production evaluated on the same split: not better by the margin, yet on record
    assert not again.promoted and again.version == "v0002" and "does not beat" in again.reason


@pytest.mark.integration
def test_demo_without_pipeline_prints_data_metrics_and_decision(tmp_path: Path, monkeypatch, capsys) -> None:
    import argparse

    from prvr.cli import demo

    parser = argparse.ArgumentParser(prog="prvr")
    demo.register_cli(parser.add_subparsers(dest="command"))
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["demo", "--preset", "tiny", "--epochs", "1", "--no-pipeline",
                              *sum((["--set", s] for s in FAST), [])])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "== data ==" in out and "fused" in out and "promoted v0001" in out
    # the last step: the production model packaged, served by TorchServe, asked over REST
    served = out.split("== served by TorchServe (REST, token auth) ==")[1]
    assert served.count("query: ") == 2 and " 1. " in served and "moment" in served
    assert (tmp_path / "registry" / "models" / "prvr-mssl-pp" / "production.json").is_file()
