"""DVC data versioning against an S3 remote (a moto server on 127.0.0.1, no AWS).

Covers the round trip every collaborator relies on: `dvc add` -> `dvc push` -> lose
the workspace and the cache -> `dvc pull` gives the same bytes; and the repository's
committed `.dvc/config` (remote `storage`, endpoint from local config only).

Helpers for other tests: `run_dvc(...)`, `dvc_env(...)`, `copy_repo(dst)` and
`dvc_repro(repo, *targets)` run the real pipeline in a throwaway copy of this repository.
"""
from __future__ import annotations

import configparser
import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# The dvc of the interpreter running the tests (works in any venv, not only .venv).
DVC = Path(sys.executable).with_name("dvc")
DVC_TIMEOUT_S = 120

# Never copied into a repository copy: environments, caches, run outputs, VCS state.
COPY_SKIP_TOP = {".git", ".venv", ".pytest_cache", "data", "runs", "registry", "model_store",
                 "logs", "dvclive", "key_file.json"}
COPY_SKIP_DVC = {"cache", "tmp", "config.local"}
COPY_SKIP_ANY = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------- helpers
def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dvc_env(tmp: Path, endpoint: str | None = None, extra: dict[str, str] | None = None) -> dict:
    """An environment isolated from the user's AWS/DVC settings, with moto's fake credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    cfg = Path(tmp) / "_dvc_env"
    (cfg / "global").mkdir(parents=True, exist_ok=True)
    (cfg / "system").mkdir(parents=True, exist_ok=True)
    env.update({
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(cfg / "aws_config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(cfg / "aws_credentials"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_GLOBAL_CONFIG_DIR": str(cfg / "global"),
        "DVC_SYSTEM_CONFIG_DIR": str(cfg / "system"),
        "DVC_SITE_CACHE_DIR": str(cfg / "site_cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "prvr-tests", "GIT_AUTHOR_EMAIL": "tests@prvr.invalid",
        "GIT_COMMITTER_NAME": "prvr-tests", "GIT_COMMITTER_EMAIL": "tests@prvr.invalid",
    })
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = DVC_TIMEOUT_S) -> str:
    """Run a command with a time bound; on failure the assertion shows its whole output."""
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(map(str, cmd))} timed out after {timeout}s\n"
                             f"{exc.stdout}\n{exc.stderr}") from None
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout


def run_dvc(args: list[str], cwd: Path, env: dict, timeout: float = DVC_TIMEOUT_S) -> str:
    return run([DVC, *args], cwd, env, timeout)


def init_repo(path: Path, env: dict) -> Path:
    """A fresh git + dvc repository (nothing committed)."""
    path.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], path, env)
    run_dvc(["init", "-q"], path, env)
    return path


def copy_repo(dst: Path, src: Path = REPO_ROOT) -> Path:
    """Copy this repository's sources (no .git, venv, data or caches) and make it a git repo.

    The copy keeps `.dvc/config`, `dvc.yaml`, `dvc.lock` and `params.yaml`, so `dvc repro`
    there runs the real pipeline without touching the working tree.
    """
    src = Path(src).resolve()

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = set(COPY_SKIP_ANY(folder, names))
        here = Path(folder).resolve()
        if here == src:
            skip |= COPY_SKIP_TOP & set(names)
        elif here == src / ".dvc":
            skip |= COPY_SKIP_DVC & set(names)
        return skip

    shutil.copytree(src, dst, ignore=ignore, symlinks=True)
    run(["git", "init", "-q"], dst, dvc_env(dst.parent))
    if not (dst / ".dvc").is_dir():
        run_dvc(["init", "-q"], dst, dvc_env(dst.parent))
    return dst


def dvc_repro(repo: Path, *targets: str, env: dict | None = None,
              timeout: float = 600, extra_args: tuple[str, ...] = ()) -> str:
    """`dvc repro [targets]` in a repository copy (see copy_repo); returns dvc's stdout."""
    env = env or dvc_env(repo.parent)
    # The console script of this venv must be on PATH for the stages' `prvr ...` commands.
    env = {**env, "PATH": f"{DVC.parent}{os.pathsep}{env.get('PATH', '')}"}
    return run_dvc(["repro", *extra_args, *targets], repo, env, timeout=timeout)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 and a free port, for this module's tests."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str, name: str):
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=name)
    return s3


# ------------------------------------------------------------------------------- tests
def test_dvc_is_installed_next_to_python():
    assert DVC.exists(), f"dvc not found next to {sys.executable}"


def test_push_pull_roundtrip(tmp_path, s3_endpoint):
    env = dvc_env(tmp_path)
    repo = init_repo(tmp_path / "repo", env)
    s3 = make_bucket(s3_endpoint, "roundtrip")

    # One file output and one directory output (DVC stores a .dir manifest for the latter).
    rng = random.Random(2018)
    data = repo / "data"
    (data / "features").mkdir(parents=True)
    files = {
        data / "features" / "blob.bin": rng.randbytes(1 << 20),
        data / "features" / "small.bin": rng.randbytes(4096),
        data / "captions.txt": "v1#0 a man opens a door\nv1#1 the cat jumps\n".encode(),
    }
    for path, content in files.items():
        path.write_bytes(content)
    digests = {path: sha256(path) for path in files}

    run_dvc(["add", "-q", "data/features", "data/captions.txt"], repo, env)
    assert (repo / "data" / "features.dvc").is_file() and (repo / "data" / "captions.txt.dvc").is_file()

    run_dvc(["remote", "add", "-d", "storage", "s3://roundtrip/cache"], repo, env)
    run_dvc(["remote", "modify", "storage", "endpointurl", s3_endpoint], repo, env)
    run_dvc(["push", "-q"], repo, env)

    listed = s3.list_objects_v2(Bucket="roundtrip", Prefix="cache/")
    # 3 files + the directory manifest
    assert listed.get("KeyCount", 0) >= 4, listed

    for path in files:
        path.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    assert not any(p.exists() for p in files)

    run_dvc(["pull", "-q"], repo, env)
    for path, digest in digests.items():
        assert path.is_file(), f"{path} not restored by dvc pull"
        assert sha256(path) == digest, f"{path} differs after the round trip"


def test_repository_remote_config():
    """The committed config names the S3 remote `storage` as default, without endpoint or secrets."""
    config_file = REPO_ROOT / ".dvc" / "config"
    assert config_file.is_file(), "run `dvc init` and add the remote (see .dvc/config)"
    parser = configparser.ConfigParser()
    parser.read_string(config_file.read_text())
    assert parser.get("core", "remote") == "storage"
    section = "'remote \"storage\"'"
    assert parser.has_section(section), parser.sections()
    assert parser.get(section, "url").startswith("s3://")
    for secret in ("access_key_id", "secret_access_key", "session_token", "endpointurl"):
        assert not parser.has_option(section, secret), \
            f"{secret} belongs in .dvc/config.local (dvc remote modify --local), not in git"
    gitignore = (REPO_ROOT / ".dvc" / ".gitignore").read_text().split()
    assert "/config.local" in gitignore


def test_repository_remote_with_local_endpoint(tmp_path, s3_endpoint):
    """The documented setup works: a copy of this repo + `--local` endpoint pushes to the bucket."""
    parser = configparser.ConfigParser()
    parser.read_string((REPO_ROOT / ".dvc" / "config").read_text())
    url = parser.get("'remote \"storage\"'", "url")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")

    repo = copy_repo(tmp_path / "repo")
    env = dvc_env(tmp_path)
    s3 = make_bucket(s3_endpoint, bucket)
    run_dvc(["remote", "modify", "--local", "storage", "endpointurl", s3_endpoint], repo, env)
    assert "endpointurl" in (repo / ".dvc" / "config.local").read_text()

    probe = repo / "probe.bin"
    probe.write_bytes(b"\x00prvr\xff" * 1000)
    run_dvc(["add", "-q", "probe.bin"], repo, env)
    run_dvc(["push", "-q", "probe.bin.dvc"], repo, env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith(prefix) for k in keys), keys


def test_repro_helper_runs_a_stage(tmp_path):
    """dvc_repro runs stages with this venv's executables first on PATH, and skips clean ones."""
    env = dvc_env(tmp_path)
    repo = init_repo(tmp_path / "repo", env)
    (repo / "params.yaml").write_text("demo:\n  n: 3\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  count:\n"
        "    cmd: python -c \"import sys, yaml; n = yaml.safe_load(open('params.yaml'))['demo']['n'];"
        " open('out.txt', 'w').write(sys.prefix + '\\n' + str(n))\"\n"
        "    params:\n      - demo.n\n"
        "    outs:\n      - out.txt\n")
    dvc_repro(repo, env=env)
    prefix, n = (repo / "out.txt").read_text().splitlines()
    assert n == "3" and Path(prefix).resolve() == Path(sys.prefix).resolve()
    assert (repo / "dvc.lock").is_file()
    assert "Stage 'count' didn't change, skipping" in dvc_repro(repo, env=env)
