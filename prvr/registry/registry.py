"""The model registry: versioned, checksummed model files plus a production pointer.

Layout under the store's root::

    models/<name>/<version>/.claim          version number taken (conditional create)
    models/<name>/<version>/<files...>      checkpoint, index files, anything given
    models/<name>/<version>/manifest.json   written LAST: a version without it is incomplete
    models/<name>/production.json           {"version", "previous": [...], "updated"}

Why this shape: version numbers are claimed with a create-if-absent write, so two
concurrent registrations never share a number; the manifest is written only after
every file is uploaded and verified, so readers never see a half-written version;
the production pointer moves by compare-and-swap (S3 ``IfMatch`` on its ETag, a
locked read-compare-replace on disk), so concurrent promotions never lose one.
The stores themselves live in ``prvr.registry.stores``.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from prvr.checkpoint import sha256_file
from prvr.errors import RegistryError
from prvr.registry.stores import FileStore, S3Store, file_hashes

__all__ = ["Registry", "resolve_metric", "MANIFEST", "POINTER", "CLAIM"]

MANIFEST = "manifest.json"
POINTER = "production.json"
CLAIM = ".claim"
_RESERVED = {MANIFEST, CLAIM}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_UNSET: Any = object()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def resolve_metric(metrics: Mapping[str, Any], key: str) -> float | None:
    """Look up ``key`` ("fused.sumr" dotted, or "sumr" = metrics["sumr"] else metrics["fused"]["sumr"])."""
    def walk(d: Any, parts: list[str]) -> Any:
        for p in parts:
            if not isinstance(d, Mapping) or p not in d:
                return None
            d = d[p]
        return d
    value = walk(metrics, key.split("."))
    if value is None and "." not in key:
        value = walk(metrics, ["fused", key])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Registry:
    """Versioned model store with a CAS-moved production pointer (file:// or s3://)."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.uri = uri
        if uri.startswith("s3://"):
            bucket, _, prefix = uri[5:].partition("/")
            if not bucket:
                raise RegistryError(f"registry URI {uri!r} names no bucket (expected s3://BUCKET/PREFIX)")
            prefix = prefix.strip("/")
            self._store: FileStore | S3Store = S3Store(bucket, prefix + "/" if prefix else "", endpoint_url)
        elif uri.startswith("file://") or "://" not in uri:
            root = uri[len("file://"):] if uri.startswith("file://") else uri
            if not root:
                raise RegistryError(f"registry URI {uri!r} names no folder (expected file://PATH)")
            self._store = FileStore(Path(root).expanduser())
        else:
            raise RegistryError(f"registry URI {uri!r}: scheme must be file:// or s3://")

    # -- helpers
    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.match(name or ""):
            raise RegistryError(f"model name {name!r} must match {_NAME_RE.pattern}")

    @staticmethod
    def _check_version(version: str) -> None:
        if not _VERSION_RE.match(version or ""):
            raise RegistryError(f"version {version!r} is not of the form v0001")

    def _read_json(self, key: str) -> tuple[dict[str, Any], str] | None:
        got = self._store.get(key)
        if got is None:
            return None
        try:
            return json.loads(got[0].decode()), got[1]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"registry {self._store.where}: {key} is not valid JSON ({exc})") from None

    @staticmethod
    def _dump(obj: Any) -> bytes:
        return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()

    def _pointer(self, name: str) -> tuple[dict[str, Any], str] | None:
        return self._read_json(f"models/{name}/{POINTER}")

    @staticmethod
    def _collect(files: Mapping[str, str | Path] | str | Path) -> dict[str, Path]:
        """Flatten {relative name: file or folder} (or one folder) into {relative key: file}."""
        items = {"": Path(files)} if isinstance(files, (str, Path)) else {k: Path(v) for k, v in files.items()}
        out: dict[str, Path] = {}
        for rel, src in items.items():
            if src.is_dir():
                for p in sorted(src.rglob("*")):
                    if p.is_file():
                        out["/".join(filter(None, [rel.strip("/"), p.relative_to(src).as_posix()]))] = p
            elif src.is_file():
                if not rel:
                    raise RegistryError(f"{src} is a file: give it a name, e.g. {{'model.pt': path}}")
                out[rel.strip("/")] = src
            else:
                raise RegistryError(f"model file {src} does not exist")
        if not out:
            raise RegistryError("no files to register")
        for rel in out:
            parts = rel.split("/")
            if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or rel in _RESERVED:
                raise RegistryError(f"file name {rel!r} is not a clean relative path (or is reserved)")
        return out

    def _claim_version(self, name: str) -> str:
        existing = [int(m.group(1)) for v in self._store.children(f"models/{name}")
                    if (m := _VERSION_RE.match(v))]
        n = max(existing, default=0) + 1
        claim = self._dump({"claimed": _now(), "host": os.uname().nodename, "pid": os.getpid()})
        for _ in range(1000):
            version = f"v{n:04d}"
            if self._store.put_new(f"models/{name}/{version}/{CLAIM}", claim):
                return version
            n += 1  # someone else took it: try the next number
        raise RegistryError(f"could not claim a version of {name!r} after 1000 tries")

    # -- public API
    def register(self, name: str, files: Mapping[str, str | Path] | str | Path,
                 metrics: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                 data_version: str | None = None, git_commit: str | None = None) -> str:
        """Upload a new version; returns its id ("v0001", ...). Manifest last, after verification."""
        self._check_name(name)
        local = self._collect(files)
        hashes = {rel: file_hashes(p) for rel, p in local.items()}
        entries = {rel: {"sha256": hashes[rel][0], "size": p.stat().st_size} for rel, p in local.items()}
        with self._store.errors(f"registering {name}"):
            version = self._claim_version(name)
        base = f"models/{name}/{version}"
        uploaded: list[str] = []
        try:
            with self._store.errors(f"uploading {name} {version}"):
                for rel, src in local.items():
                    self._store.upload(f"{base}/{rel}", src, *hashes[rel])
                    uploaded.append(rel)
                for rel, e in entries.items():
                    problem = self._store.verify(f"{base}/{rel}", *hashes[rel], e["size"])
                    if problem:
                        raise RegistryError(f"registry {self._store.where}: uploaded {base}/{rel} "
                                            f"does not match the local file ({problem})")
                manifest = {
                    "name": name, "version": version,
                    "metrics": dict(metrics or {}), "params": dict(params or {}),
                    "data_version": data_version,
                    "git_commit": git_commit if git_commit is not None else _git_commit(),
                    "created": _now(),
                    "files": entries,
                }
                if not self._store.put_new(f"{base}/{MANIFEST}", self._dump(manifest)):
                    raise RegistryError(f"registry {self._store.where}: {base}/{MANIFEST} already exists")
        except RegistryError:
            self._cleanup(base, uploaded)
            raise
        return version

    def _cleanup(self, base: str, uploaded: list[str]) -> None:
        """Best effort: drop the files of a failed version (its claim stays, so the id is never reused)."""
        for rel in uploaded:
            try:
                self._store.delete(f"{base}/{rel}")
            except Exception:  # noqa: BLE001 - the store may be the thing that failed
                pass

    def versions(self, name: str) -> list[str]:
        """Complete versions (with a manifest), oldest first."""
        self._check_name(name)
        with self._store.errors(f"listing {name}"):
            out = []
            for v in self._store.children(f"models/{name}"):
                if _VERSION_RE.match(v) and self._store.get(f"models/{name}/{v}/{MANIFEST}") is not None:
                    out.append(v)
        return out

    def list(self, name: str) -> list[dict[str, Any]]:
        """One summary row per complete version: version, created, metrics, production flag."""
        prod = self.production(name)
        rows = []
        for v in self.versions(name):
            m = self.show(name, v)
            rows.append({"version": v, "created": m.get("created"), "production": v == prod,
                         "sumr": resolve_metric(m.get("metrics", {}), "sumr"),
                         "data_version": m.get("data_version"), "git_commit": m.get("git_commit")})
        return rows

    def show(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The manifest of ``version`` (default: the production version)."""
        self._check_name(name)
        if version is None:
            version = self.production(name)
            if version is None:
                raise RegistryError(f"model {name!r} has no production version in {self._store.where}")
        self._check_version(version)
        with self._store.errors(f"reading {name} {version}"):
            got = self._read_json(f"models/{name}/{version}/{MANIFEST}")
        if got is None:
            raise RegistryError(f"model {name!r} has no complete version {version} in {self._store.where}")
        return got[0]

    def production(self, name: str) -> str | None:
        """The version the production pointer names, or None."""
        self._check_name(name)
        with self._store.errors(f"reading the production pointer of {name}"):
            got = self._pointer(name)
        return got[0].get("version") if got else None

    def pointer(self, name: str) -> dict[str, Any] | None:
        """The full production pointer record (version, previous, updated)."""
        self._check_name(name)
        with self._store.errors(f"reading the production pointer of {name}"):
            got = self._pointer(name)
        return got[0] if got else None

    def _move_pointer(self, name: str, new: Callable[[dict[str, Any] | None], dict[str, Any] | None],
                      what: str, attempts: int = 50) -> dict[str, Any]:
        """CAS loop: read pointer + token, compute the new record, write only if unchanged."""
        key = f"models/{name}/{POINTER}"
        with self._store.errors(what):
            for i in range(attempts):
                got = self._pointer(name)
                current, token = (got[0], got[1]) if got else (None, None)
                record = new(current)
                if record is None:  # nothing to change
                    return current or {}
                if self._store.put_if(key, self._dump(record), token):
                    return record
                time.sleep(min(0.5, 0.01 * (2 ** i)) * (0.5 + (uuid.uuid4().int % 100) / 100))
        raise RegistryError(f"{what}: the production pointer kept changing; gave up after {attempts} tries")

    def promote(self, name: str, version: str, expected_current: str | None = _UNSET) -> dict[str, Any]:
        """Point production at ``version``; with ``expected_current`` (None = no production yet),
        refuse when the pointer no longer names that version (someone promoted meanwhile)."""
        self.show(name, version)  # must be a complete version

        def new(cur: dict[str, Any] | None) -> dict[str, Any] | None:
            cur_version = cur.get("version") if cur else None
            if expected_current is not _UNSET and cur_version != expected_current:
                raise RegistryError(f"promote {name} {version}: production is {cur_version}, "
                                    f"expected {expected_current} (stale; re-read and decide again)")
            if cur_version == version:
                return None
            history = list(cur.get("previous", [])) + [cur_version] if cur else []
            return {"version": version, "previous": history, "updated": _now()}

        return self._move_pointer(name, new, f"promoting {name} {version}")

    def rollback(self, name: str) -> dict[str, Any]:
        """Point production back at the previous production version."""
        self._check_name(name)

        def new(cur: dict[str, Any] | None) -> dict[str, Any]:
            if not cur or not cur.get("previous"):
                raise RegistryError(f"model {name!r} has no previous production version to roll back to")
            history = list(cur["previous"])
            return {"version": history.pop(), "previous": history, "updated": _now(),
                    "rolled_back_from": cur.get("version")}

        return self._move_pointer(name, new, f"rolling back {name}")

    def pull(self, name: str, version: str | None = None, dest: str | Path | None = None) -> Path:
        """Download a version's files into ``dest`` (default ./<name>/<version>), sha256-verified."""
        manifest = self.show(name, version)
        version = manifest["version"]
        dest = Path(dest) if dest is not None else Path(name) / version
        base = f"models/{name}/{version}"
        for rel, e in manifest["files"].items():
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex}"
            try:
                with self._store.errors(f"pulling {base}/{rel}"):
                    self._store.download(f"{base}/{rel}", tmp)
                got = sha256_file(tmp)
                if got != e["sha256"] or tmp.stat().st_size != e["size"]:
                    raise RegistryError(f"registry {self._store.where}: {base}/{rel} is corrupted "
                                        f"(sha256 {got}, manifest says {e['sha256']}); refusing it")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return dest

    def register_if_better(self, name: str, files: Mapping[str, str | Path] | str | Path,
                           metrics: Mapping[str, Any], params: Mapping[str, Any] | None = None,
                           metric_key: str = "sumr", margin: float = 0.0,
                           data_version: str | None = None, git_commit: str | None = None) -> dict[str, Any]:
        """Promotion gate: register and promote only if ``metric_key`` beats production by > margin."""
        candidate = resolve_metric(metrics, metric_key)
        if candidate is None or math.isnan(candidate):
            raise RegistryError(f"candidate metrics have no numeric {metric_key!r} "
                                f"(keys: {sorted(metrics)})")

        def judge(prod_version: str | None) -> tuple[bool, float | None, str]:
            if prod_version is None:
                return True, None, "no production model yet"
            prod = resolve_metric(self.show(name, prod_version).get("metrics", {}), metric_key)
            if prod is None:
                raise RegistryError(f"production {name} {prod_version} has no {metric_key!r} metric to compare")
            if candidate > prod + margin:
                return True, prod, f"{metric_key} {candidate:.3f} beats production {prod_version} " \
                                   f"({prod:.3f}) by more than {margin}"
            return False, prod, f"{metric_key} {candidate:.3f} does not beat production {prod_version} " \
                                f"({prod:.3f}) by more than {margin}"

        prod_version = self.production(name)
        better, prod, reason = judge(prod_version)
        decision = {"promoted": False, "version": None, "reason": reason, "metric_key": metric_key,
                    "candidate": candidate, "production": prod, "production_version": prod_version}
        if not better:
            return decision
        version = self.register(name, files, metrics, params, data_version, git_commit)
        decision["version"] = version
        while True:
            try:
                self.promote(name, version, expected_current=prod_version)
            except RegistryError:
                now = self.production(name)
                if now == prod_version:
                    raise  # not a stale expectation: a real failure
                prod_version = now  # production moved meanwhile: judge again against it
                better, prod, reason = judge(prod_version)
                decision.update(production=prod, production_version=prod_version, reason=reason)
                if not better:
                    decision["reason"] = f"registered {version}, not promoted: {reason}"
                    return decision
                continue
            decision.update(promoted=True, reason=f"promoted {version}: {reason}")
            return decision
