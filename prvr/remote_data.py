"""Versioned remote data sources for ``preprocess``: a collection folder (public release
layout, see :mod:`prvr.collection`) in a DVC repository at a git revision, or under an S3 prefix.

- ``dvc://<repo-url>@<rev>#<path>``: ``<repo-url>`` is anything git clones (``https://...``,
  ``file:///abs/path``, ``git@host:org/repo``); the last ``@`` before ``#`` ends it, so the
  ``@`` of ``git@host`` stays in the URL. ``<rev>`` is a tag, branch or commit. Read through
  DVC's Python API (``DVCFileSystem``): the files come from the DVC remote that the repository
  configures at that revision, with that remote's credentials from the environment.
- ``s3://<bucket>/<prefix>/<collection>``: every object under the prefix, fetched with boto3's
  transfer manager. Endpoint: ``$PRVR_DATA_ENDPOINT_URL`` when set, else boto3's own
  (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the AWS config file); credentials: boto3's
  chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an IAM role).

A source resolves to a data version without reading a feature file (:func:`resolve_remote`):

- ``dvc:<commit sha>:<md5>``: the commit ``<rev>`` names and DVC's hash of ``<path>`` (the md5
  of its ``.dvc`` / ``dvc.lock`` entry; for a folder inside a tracked one, or kept in git, the
  md5 over its files' relative paths and hashes);
- ``s3:<sha256>``: over the sorted (key, ETag) list of the objects under the prefix.

:func:`fetch_remote` downloads the collection into ``<out_dir>/<collection>`` through a temp
folder next to ``out_dir``, renamed into place on success: a missing revision, path, bucket
or prefix, missing credentials or a failed transfer is a :class:`DataError` naming the
source, and leaves ``out_dir`` as it was.

Usage::

    resolve_remote("dvc://https://github.com/org/data@v1#collections/tvr")["data_version"]
    path, version = fetch_remote("s3://datasets/prvr/tvr", "runs/dataset")
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from dvc.api import DVCFileSystem
from dvc.repo.open_repo import clean_repos

from prvr.errors import DataError

__all__ = ["DVC_PREFIX", "S3_PREFIX", "ENDPOINT_ENV", "MARKER", "remote_kind", "parse_dvc", "parse_s3",
           "resolve_remote", "fetch_remote", "check_version"]

DVC_PREFIX, S3_PREFIX = "dvc://", "s3://"
ENDPOINT_ENV = "PRVR_DATA_ENDPOINT_URL"     # S3 endpoint of s3:// sources (MinIO, Ceph...)
MARKER = ".prvr-remote.json"                # written into a downloaded collection: source + version
_DVC_FORM = "dvc://<repo-url>@<rev>#<path>"
_S3_FORM = "s3://<bucket>/<prefix>/<collection>"


# ----------------------------------------------------------------------------- parsing
def parse_dvc(source: str) -> tuple[str, str, str]:
    """``dvc://<repo-url>@<rev>#<path>`` -> (repo url, rev, path inside the repository)."""
    repo_rev, sep, path = source.removeprefix(DVC_PREFIX).partition("#")
    url, at, rev = repo_rev.rpartition("@")
    path = path.strip("/")
    if not sep or not path or path in (".", ".."):
        raise DataError(f"source {source!r}: no #<path> of the collection folder; expected {_DVC_FORM}")
    if not at or not url or not rev or ":" in rev:      # a git ref never holds ':' (git@host:org/repo)
        raise DataError(f"source {source!r}: no @<rev> (a tag, branch or commit); expected {_DVC_FORM}")
    return url, rev, path


def parse_s3(source: str) -> tuple[str, str]:
    """``s3://<bucket>/<prefix>/<collection>`` -> (bucket, key prefix ending in '/')."""
    bucket, _, prefix = source.removeprefix(S3_PREFIX).partition("/")
    prefix = prefix.strip("/")
    if not bucket or not prefix:
        raise DataError(f"source {source!r}: no collection folder under the bucket; expected {_S3_FORM}")
    return bucket, prefix + "/"


def remote_kind(source: str) -> str | None:
    """"dvc" or "s3" for a well-formed remote source (DataError when malformed), else None."""
    if source.startswith(DVC_PREFIX):
        parse_dvc(source)
        return "dvc"
    if source.startswith(S3_PREFIX):
        parse_s3(source)
        return "s3"
    return None


def _collection_name(source: str) -> str:
    if source.startswith(DVC_PREFIX):
        return posixpath.basename(parse_dvc(source)[2])
    return posixpath.basename(parse_s3(source)[1].rstrip("/"))


# ----------------------------------------------------------------------------- DVC
def _why(exc: BaseException) -> str:
    """An exception and its cause in words (dvc's CloneError says only "SCM error")."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:
        text += f" ({type(cause).__name__}: {cause})"
    return text


@contextlib.contextmanager
def _dvc_errors(source: str, what: str) -> Iterator[None]:
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"source {source!r}: {what}: not found ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - dvc, scmrepo, dvc-data and fsspec each raise their own types
        raise DataError(f"source {source!r}: {what} failed: {_why(exc)}") from exc


def _file_hash(info: dict[str, Any]) -> str:
    """DVC's md5 of a tracked file, git's blob sha of a git one."""
    git = info.get("fs_info") or {}
    return str(info.get("md5") or git.get("sha") or f"size:{info.get('size')}")


def _dvc_hash(fs: DVCFileSystem, path: str, info: dict[str, Any], source: str) -> str:
    """DVC's hash of a folder: the md5 of its .dvc / dvc.lock entry when it is a tracked
    output; else (a folder inside a tracked one, or in git) md5 over its files' hashes."""
    if info.get("type") != "directory":
        raise DataError(f"source {source!r}: {path} is a {info.get('type')}, not a collection folder")
    if info.get("md5"):
        return str(info["md5"])
    files = fs.find(path, detail=True)
    lines = sorted(f"{posixpath.relpath(name.lstrip('/'), path)} {_file_hash(d)}" for name, d in files.items())
    return hashlib.md5("\n".join(lines).encode(), usedforsecurity=False).hexdigest()


@contextlib.contextmanager
def _dvc_tree(source: str) -> Iterator[tuple[DVCFileSystem, str, str]]:
    """(the repository's file system at the revision, the path, the data version)."""
    url, rev, path = parse_dvc(source)
    fs = DVCFileSystem(url, rev=rev)
    try:
        with _dvc_errors(source, f"opening {url} at revision {rev!r}"):
            commit = fs.repo.get_rev()      # the commit the tree is read at (scm.get_rev() is the clone's HEAD)
        with _dvc_errors(source, f"reading {path} at revision {rev!r}"):
            version = f"dvc:{commit}:{_dvc_hash(fs, path, fs.info(path), source)}"
        yield fs, path, version
    finally:
        fs.close()
        clean_repos()       # DVC's process-wide git clones and caches, as the dvc CLI removes them at exit


# ----------------------------------------------------------------------------- S3
@contextlib.contextmanager
def _s3_errors(source: str, what: str) -> Iterator[None]:
    try:
        yield
    except NoCredentialsError as exc:
        raise DataError(f"source {source!r}: {what} failed: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, a profile or an IAM role)") from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        why = {"NoSuchBucket": "the bucket does not exist",
               "AccessDenied": "access denied; check the AWS credentials",
               "InvalidAccessKeyId": "unknown access key; check the AWS credentials",
               "SignatureDoesNotMatch": "bad secret key; check the AWS credentials"}.get(code, _why(exc))
        raise DataError(f"source {source!r}: {what} failed: {why}") from exc
    except (BotoCoreError, OSError) as exc:       # endpoint unreachable, timeouts, local disk
        raise DataError(f"source {source!r}: {what} failed: {_why(exc)}") from exc


def _s3_client(source: str) -> Any:
    # Bounded timeouts and retries: a dead endpoint fails the step in seconds, not minutes.
    cfg = BotoConfig(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    with _s3_errors(source, "connecting"):
        # A session of its own reads the environment now (boto3's default one caches credentials).
        return boto3.session.Session().client("s3", endpoint_url=os.environ.get(ENDPOINT_ENV) or None,
                                              config=cfg)


def _s3_objects(client: Any, bucket: str, prefix: str, source: str) -> list[tuple[str, str]]:
    """Sorted (key, ETag) of the objects under the prefix (folder markers left out)."""
    with _s3_errors(source, f"listing s3://{bucket}/{prefix}"):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        objects = sorted((o["Key"], str(o.get("ETag", "")).strip('"'))
                         for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    if not objects:
        raise DataError(f"source {source!r}: no objects under s3://{bucket}/{prefix}")
    return objects


def _s3_version(objects: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, etag in objects:
        h.update(f"{key}\t{etag}\n".encode())
    return f"s3:{h.hexdigest()}"


def _s3_download(client: Any, bucket: str, prefix: str, objects: list[tuple[str, str]], dest: Path,
                 source: str) -> None:
    for key, _ in objects:
        rel = PurePosixPath(key[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts:
            raise DataError(f"source {source!r}: object key {key!r} points outside the collection folder")
        target = dest.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(source, f"downloading s3://{bucket}/{key}"):
            client.download_file(bucket, key, str(target))


# ----------------------------------------------------------------------------- resolve / fetch
def resolve_remote(source: str) -> dict[str, str]:
    """{source, kind, data_version} of a dvc:// or s3:// source, reading no feature file:
    DVC clones the git repository and reads the .dvc entry; S3 lists the objects."""
    kind = remote_kind(source)
    if kind == "dvc":
        with _dvc_tree(source) as (_, _, version):
            return {"source": source, "kind": kind, "data_version": version}
    if kind != "s3":
        raise DataError(f"source {source!r} is not remote; expected {_DVC_FORM} or {_S3_FORM}")
    bucket, prefix = parse_s3(source)
    version = _s3_version(_s3_objects(_s3_client(source), bucket, prefix, source))
    return {"source": source, "kind": kind, "data_version": version}


def check_version(source: str, version: str, expected: str | None) -> None:
    """DataError when ``expected`` (a version resolved earlier) is given and is not ``version``."""
    if expected and version != expected:
        raise DataError(f"source {source!r} now resolves to {version}, not {expected}: the data changed "
                        "after it was resolved; run again")


@contextlib.contextmanager
def _staged(out_dir: Path, name: str) -> Iterator[Path]:
    """A temp folder next to ``out_dir`` to download into; on success it becomes
    ``out_dir/name`` (replacing an earlier download), on failure it is removed."""
    out_dir = out_dir.resolve()
    target = out_dir / name
    if target.exists() and not (target / MARKER).is_file():
        raise DataError(f"{target} exists and was not downloaded by prvr; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{name}.download-", dir=out_dir.parent))
    try:
        yield tmp / name
        out_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():
            os.replace(target, tmp / f".{name}.old")
        os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_remote(source: str, out_dir: str | Path, expected: str | None = None) -> tuple[Path, str]:
    """Download the collection folder of a dvc:// or s3:// source into ``out_dir/<collection>``;
    returns (its path, the data version). ``expected``: the version :func:`resolve_remote` gave
    earlier; a source that now resolves to another is a DataError, before any download."""
    kind = remote_kind(source)
    name = _collection_name(source) if kind else ""
    out_dir = Path(out_dir)
    if kind == "dvc":
        with _dvc_tree(source) as (fs, path, version):
            check_version(source, version, expected)
            with _staged(out_dir, name) as dest:
                with _dvc_errors(source, f"downloading {path}"):
                    fs.get(path, str(dest), recursive=True)
                _write_marker(dest, source, version)
        return out_dir.resolve() / name, version
    if kind != "s3":
        raise DataError(f"source {source!r} is not remote; expected {_DVC_FORM} or {_S3_FORM}")
    bucket, prefix = parse_s3(source)
    client = _s3_client(source)
    objects = _s3_objects(client, bucket, prefix, source)
    version = _s3_version(objects)
    check_version(source, version, expected)
    with _staged(out_dir, name) as dest:
        _s3_download(client, bucket, prefix, objects, dest, source)
        # Objects replaced during the download would not match the version recorded.
        check_version(source, _s3_version(_s3_objects(client, bucket, prefix, source)), version)
        _write_marker(dest, source, version)
    return out_dir.resolve() / name, version


def _write_marker(folder: Path, source: str, version: str) -> None:
    if not folder.is_dir():
        raise DataError(f"source {source!r}: the download produced no folder")
    (folder / MARKER).write_text(json.dumps({"source": source, "data_version": version}, indent=1) + "\n")
