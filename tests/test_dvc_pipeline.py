"""dvc.yaml end to end: a temp git+DVC repo with the project's dvc.yaml and params.yaml (tiny preset,
a small model, 1 epoch); `dvc repro` runs the chain (its register stage puts the candidate on record
and never promotes: `prvr registry promote` does), a second one runs nothing, and changing
train.lr reruns train and what follows but never synth or encode_text."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DVC = VENV_BIN / "dvc"
FAST = {
    "synth": {"preset": "tiny"},
    "model": {"hidden_size": 64, "map_size": 8, "cluster_num": 8, "max_ctx_len": 32, "kmedoids_iters": 10},
    "train": {"epochs": 1, "batch_size": 64},
}
CHAIN = ["synth", "encode_text", "train", "evaluate", "register"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PATH", "")
    if str(VENV_BIN) not in path.split(os.pathsep):       # `prvr` and `dvc` of this venv
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{path}"
    env.pop("PRVR_PUSHGATEWAY", None)
    env.update(DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    return env


def _proc(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """A command that must succeed."""
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
    return proc


def _run(args: list[str], cwd: Path, timeout: float = 240) -> str:
    proc = _proc(args, cwd, timeout)
    return proc.stdout + proc.stderr


def _json(args: list[str], cwd: Path):
    """A `--json` command's stdout alone (DVC writes its notices to stderr), parsed."""
    return json.loads(_proc(args, cwd).stdout)


def _scalar_leaves(tree: dict) -> dict:
    """A metrics file as `dvc metrics show` has it: its numbers, strings and booleans (lists,
    nulls and whatever holds nothing else are left out)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = _scalar_leaves(value)
        if isinstance(value, (str, int, float)) or (isinstance(value, dict) and value):
            out[key] = value
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_params(repo: Path, updates: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in updates.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DVC.exists():
        pytest.skip(f"dvc is not installed next to {sys.executable}")
    probe = subprocess.run(["prvr", "stage", "--help"], env=_env(), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"`prvr stage` is not a command:\n{probe.stderr[-1500:]}")
    repo = tmp_path_factory.mktemp("dvc-repo")
    shutil.copy(REPO / "dvc.yaml", repo)
    shutil.copy(REPO / "params.yaml", repo)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():                 # source files the stages depend on
        for dep in stage.get("deps", []):
            if dep.startswith(("prvr/", "serving/")):
                (repo / dep).parent.mkdir(parents=True, exist_ok=True)
                if (REPO / dep).is_dir():
                    shutil.copytree(REPO / dep, repo / dep, ignore=shutil.ignore_patterns("__pycache__"),
                                    dirs_exist_ok=True)
                else:
                    shutil.copy(REPO / dep, repo / dep)
    _set_params(repo, FAST)
    _run(["git", "init", "-q"], repo)
    _run([str(DVC), "init", "-q"], repo)
    # dvclive (inside training) needs a commit to compare against
    _run(["git", "add", "dvc.yaml", "params.yaml", "prvr", "serving", ".dvc"], repo)
    _run(["git", "-c", "user.name=prvr-test", "-c", "user.email=test@prvr.invalid", "commit", "-q", "-m",
          "init"], repo)
    return repo


def test_repro_chain_then_nothing_then_only_downstream_of_train(dvc_repo: Path) -> None:
    repo = dvc_repo
    first = _run([str(DVC), "repro"], repo)
    assert _ran(first) == set(CHAIN), first[-3000:]
    assert (repo / "data/synth/FeatureData").is_dir()
    assert (repo / "data/features/synth/dataset.json").is_file()
    assert (repo / "runs/train/model.pt").is_file()
    assert sorted(p.name for p in (repo / "runs/evaluate/plots").iterdir()) == ["recall_at_k.png",
                                                                                 "sumr_by_mv.png"]
    metrics = json.loads((repo / "metrics/test.json").read_text())
    assert metrics["split"] == "test" and metrics["fused"]["sumr"] > 0
    # register (--no-promote): the candidate is on record with the decision; production never moves
    decision = json.loads((repo / "runs/register/decision.json").read_text())
    assert not decision["promoted"] and decision["version"] == "v0001" and decision["outcome"] == "held"
    first_candidate = decision["candidate"]
    assert first_candidate == pytest.approx(metrics["fused"]["sumr"])
    assert "promotion is explicit here: prvr registry promote --version v0001" in decision["reason"]
    model = repo / "registry/models/prvr-mssl-pp"
    assert json.loads((model / "v0001/manifest.json").read_text())["decision"]["outcome"] == "held"
    assert not (model / "production.json").exists()
    assert not (repo / "runs/register/model_store").exists()      # an archive only for a promoted version

    _run(["prvr", "registry", "promote", "--params", "params.yaml", "--version", "v0001"], repo)
    assert json.loads((model / "production.json").read_text())["version"] == "v0001"

    assert _json([str(DVC), "status", "--json"], repo) == {}
    second = _run([str(DVC), "repro"], repo)
    assert _ran(second) == set(), second[-3000:]

    _set_params(repo, {"train": {"lr": 1e-3}})
    status = _json([str(DVC), "status", "--json"], repo)
    assert status == {"train": [{"changed deps": {"params.yaml": {"train.lr": "modified"}}}]}, status
    third = _run([str(DVC), "repro"], repo)
    assert _ran(third) == {"train", "evaluate", "register"}, third[-3000:]
    decision = json.loads((repo / "runs/register/decision.json").read_text())
    assert decision["version"] == "v0002" and not decision["promoted"]
    # the gate evaluated production v0001 on this test split: the very score v0001 had as a candidate
    assert decision["production_version"] == "v0001"
    assert decision["production"] == pytest.approx(first_candidate, rel=1e-6)
    assert "promotion is explicit here: prvr registry promote --version v0002" in decision["reason"]
    assert json.loads((model / "production.json").read_text())["version"] == "v0001"

    # what DVC shows is what the stages wrote
    shown = _json([str(DVC), "metrics", "show", "--json"], repo)[""]["data"]
    assert set(shown) == {"metrics/test.json", "runs/train/train_summary.json"}, shown
    for path, entry in shown.items():
        assert entry == {"data": _scalar_leaves(json.loads((repo / path).read_text()))}, path
    plots = _json([str(DVC), "plots", "show", "--json"], repo)
    assert "errors" not in plots, plots["errors"]
    plots = plots["data"]
    curves = sorted(str(p.relative_to(repo)) for p in (repo / "runs/train/dvclive/plots/metrics").rglob("*.tsv"))
    images = ["runs/evaluate/plots/recall_at_k.png", "runs/evaluate/plots/sumr_by_mv.png"]
    assert curves and set(plots) == set(curves) | set(images), sorted(plots)
    for png in images:
        [entry] = plots[png]
        assert entry["type"] == "image" and Path(entry["url"]).read_bytes() == (repo / png).read_bytes()
    for tsv in curves:
        rows = list(csv.DictReader((repo / tsv).open(), delimiter="\t"))
        column = Path(tsv).stem
        [entry] = plots[tsv]
        values = entry["content"]["data"]["values"]
        assert entry["type"] == "vega" and len(rows) == 1, (tsv, rows)    # one epoch: one point
        assert [(v["step"], v[column]) for v in values] == [(r["step"], r[column]) for r in rows], tsv
