"""dvc.lock is committed for the default pipeline: it names every stage of dvc.yaml, with the
params.yaml values it was run with, so `dvc status` on a checkout says what a change reruns.

(A code change to a stage's dependencies, or a setting added to a stage's params since the
run, makes its entry stale on purpose: `dvc status` names it, `dvc repro` reruns that stage
and rewrites the lock. A recorded value that differs from params.yaml is an error.)"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent


def _dvc_yaml(path: Path) -> Any:
    """DVC writes YAML 1.2 (ruamel): `1e-05` is a number there, a string for PyYAML's YAML 1.1."""
    return YAML(typ="safe").load(path.read_text())


def _value(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def test_lock_names_every_stage_with_the_committed_params():
    lock = _dvc_yaml(ROOT / "dvc.lock")
    stages = _dvc_yaml(ROOT / "dvc.yaml")["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(lock["stages"]) == set(stages)
    checked = 0
    for name, entry in lock["stages"].items():
        recorded = entry.get("params", {}).get("params.yaml", {})
        assert set(recorded) <= set(stages[name].get("params", [])), name   # added since: stale
        for key, value in recorded.items():
            current = _value(params, key)
            if isinstance(value, dict):        # a whole section: the keys it had then
                current = {k: current[k] for k in value}
            assert current == value, f"{name}: {key}"
            checked += 1
    assert checked >= 20


def test_lock_records_outputs_and_code_deps():
    lock = _dvc_yaml(ROOT / "dvc.lock")["stages"]
    assert any(d["path"] == "prvr/train.py" for d in lock["train"]["deps"])
    assert {o["path"] for o in lock["train"]["outs"]} >= {"runs/train/model.pt"}
    assert all(o.get("md5") for o in lock["train"]["outs"] if o["path"] == "runs/train/model.pt")
