"""The model registry: versioned, checksummed model files plus a production pointer.

Layout under the store's root::

    models/<name>/<version>/.claim          version number taken (conditional create)
    models/<name>/<version>/<files...>      checkpoint, index files, anything given
    models/<name>/<version>/manifest.json   written LAST: a version without it is incomplete;
                                            holds the promotion gate's "decision" too
    models/<name>/production.json           {"version", "previous": [...], "updated"}

Why this shape: version numbers are claimed with a create-if-absent write, so two
concurrent registrations never share a number; the manifest is written only after
every file is uploaded and verified, so readers never see a half-written version;
the production pointer moves by compare-and-swap (S3 ``IfMatch`` on its ETag, a
locked read-compare-replace on disk), so concurrent promotions never lose one. The gate
(:meth:`Registry.register_if_better`) registers every candidate; its manifest says whether
it was promoted and why. Only the gate rewrites a manifest, and only its own version's
``decision``, by the same compare-and-swap, once the promotion it announced is settled.
The stores themselves live in ``prvr.registry.stores``.

A registration killed at any point (SIGKILL, a lost pod) leaves at most a claimed version
without a manifest: never listed, never promotable, its number never reused (its files, and
on S3 an unfinished multipart upload, stay behind as garbage). A pull checks every file's
sha256 and size against the manifest in a staging folder and moves them into ``dest`` only
when all match, so a corrupt or truncated object leaves ``dest`` as it was.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from prvr.checkpoint import sha256_file
from prvr.config import RegistryConfig
from prvr.errors import RegistryError
from prvr.registry.stores import FileStore, S3Store, file_digest, open_store

__all__ = ["Registry", "Judge", "resolve_metric", "compare_metric", "MANIFEST", "POINTER", "CLAIM"]

MANIFEST = "manifest.json"
POINTER = "production.json"
CLAIM = ".claim"
_RESERVED = {MANIFEST, CLAIM}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_UNSET: Any = object()

Judge = Callable[[str | None], Mapping[str, Any]]
"""The promotion gate's judge: production version (None: none yet) -> {"better": bool,
"production": production's metric or None, "reason": str} plus "comparable": False when the
two cannot be compared, and any further fields to record in the decision."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def compare_metric(metric_key: str, candidate: float, production_version: str | None,
                   production: float | None, margin: float, where: str = "") -> dict[str, Any]:
    """A judge's verdict on two numbers; ``where`` (" on the test split of this data") says
    what both were measured on."""
    if production_version is None:
        return {"better": True, "production": None, "reason": "no production model yet"}
    if production is None or math.isnan(production):
        return {"better": False, "comparable": False, "production": None,
                "reason": f"production {production_version} has no {metric_key!r} to compare{where}"}
    better = candidate > production + margin
    return {"better": better, "production": production,
            "reason": f"{metric_key} {candidate:.3f} {'beats' if better else 'does not beat'} production "
                      f"{production_version} ({production:.3f}){where} by more than {margin}"}


def _verdict(verdict: Mapping[str, Any], metric_key: str, candidate: float, production_version: str | None,
             margin: float) -> tuple[bool, dict[str, Any]]:
    """(better, the decision record as judged: not yet registered, not yet promoted)."""
    better = bool(verdict["better"])
    outcome = "promoted" if better else ("not better" if verdict.get("comparable", True) else "not comparable")
    extra = {k: v for k, v in verdict.items() if k not in ("better", "comparable", "production", "reason")}
    return better, {"promoted": False, "outcome": outcome, "version": None, "reason": verdict["reason"],
                    "metric_key": metric_key, "candidate": candidate, "production": verdict.get("production"),
                    "production_version": production_version, "margin": margin, **extra, "decided": _now()}


def _settled(decision: Mapping[str, Any], version: str, explicit: bool) -> dict[str, Any]:
    """The record of a registered, not promoted candidate."""
    d = {**decision, "version": version, "promoted": False}
    if explicit:
        d.update(outcome="held", reason=f"registered {version}, not promoted: promotion is explicit here: "
                                        f"prvr registry promote --version {version} (gate: {decision['reason']})")
    else:
        d["reason"] = f"registered {version}, not promoted: {decision['reason']}"
    return d


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

    def __init__(self, uri: str, endpoint_url: str | None = None, settings: RegistryConfig | None = None):
        """``settings``: the ``registry`` config section (S3 retries, multipart transfers);
        None reads it as ``load_config()`` does."""
        self.uri = uri
        self._store: FileStore | S3Store = open_store(uri, endpoint_url, "registry URI", settings)

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
            _check_relative(rel, "file name")
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
                 data_version: str | None = None, git_commit: str | None = None, source: str | None = None,
                 decision: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None = None) -> str:
        """Upload a new version; returns its id ("v0001", ...). Manifest last, after verification.
        ``decision`` (or a function of the new version's id giving it) goes into the manifest."""
        self._check_name(name)
        local = self._collect(files)
        digests = {rel: file_digest(p, self._store.part_size(p.stat().st_size)) for rel, p in local.items()}
        entries = {rel: {"sha256": d.sha256, "size": d.size} for rel, d in digests.items()}
        with self._store.errors(f"registering {name}"):
            version = self._claim_version(name)
        base = f"models/{name}/{version}"
        uploaded: list[str] = []
        try:
            with self._store.errors(f"uploading {name} {version}"):
                for rel, src in local.items():
                    uploaded.append(rel)     # before: a failed multipart upload may leave an object
                    self._store.upload(f"{base}/{rel}", src, digests[rel])
                for rel in entries:
                    problem = self._store.verify(f"{base}/{rel}", digests[rel])
                    if problem:
                        raise RegistryError(f"registry {self._store.where}: uploaded {base}/{rel} "
                                            f"does not match the local file ({problem})")
                manifest = {
                    "name": name, "version": version,
                    "metrics": dict(metrics or {}), "params": dict(params or {}),
                    "data_version": data_version, "source": source,
                    "git_commit": git_commit if git_commit is not None else _git_commit(),
                    "created": _now(),
                    "files": entries,
                }
                if decision is not None:
                    manifest["decision"] = dict(decision(version) if callable(decision) else decision)
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
        """One summary row per complete version: version, created, metrics, production flag,
        the gate's decision (outcome and reason; None for versions registered without the gate)."""
        prod = self.production(name)
        rows = []
        for v in self.versions(name):
            m = self.show(name, v)
            decision = m.get("decision") or {}
            rows.append({"version": v, "created": m.get("created"), "production": v == prod,
                         "sumr": resolve_metric(m.get("metrics", {}), "sumr"),
                         "decision": decision.get("outcome"), "reason": decision.get("reason"),
                         "data_version": m.get("data_version"), "source": m.get("source"),
                         "git_commit": m.get("git_commit")})
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

    def pull(self, name: str, version: str | None = None, dest: str | Path | None = None,
             files: Iterable[str] | None = None) -> Path:
        """Download a version's files (or only ``files``) into ``dest`` (default ./<name>/<version>).
        Every file is checked against the manifest's sha256 and size before any reaches ``dest``;
        one that differs fails the pull, naming it, and leaves ``dest`` as it was."""
        manifest = self.show(name, version)
        version = manifest["version"]
        dest = Path(dest) if dest is not None else Path(name) / version
        wanted = manifest["files"] if files is None else list(files)
        missing = [rel for rel in wanted if rel not in manifest["files"]]
        if missing:
            raise RegistryError(f"model {name!r} {version} in {self._store.where} has no {', '.join(missing)}")
        for rel in manifest["files"]:        # a tampered manifest must not write outside dest
            _check_relative(rel, f"model {name!r} {version} in {self._store.where}: manifest entry")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".tmp-pull-{dest.name}-{uuid.uuid4().hex}"
        try:
            for rel in wanted:
                self._download_verified(f"models/{name}/{version}", rel, manifest["files"][rel], staging / rel)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _install(staging, dest, [*wanted, MANIFEST])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest

    def _download_verified(self, base: str, rel: str, entry: Mapping[str, Any], target: Path) -> None:
        """``base/rel`` into ``target``, or a RegistryError naming it when it differs from ``entry``."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._store.errors(f"pulling {base}/{rel}"):
            self._store.download(f"{base}/{rel}", target)
        size, got = target.stat().st_size, sha256_file(target)
        if got != entry["sha256"] or size != entry["size"]:
            raise RegistryError(f"registry {self._store.where}: {base}/{rel} is corrupted: {size} bytes with "
                                f"sha256 {got}, the manifest says {entry['size']} bytes with sha256 "
                                f"{entry['sha256']}; refusing it (nothing was written to the destination)")

    def register_if_better(self, name: str, files: Mapping[str, str | Path] | str | Path,
                           metrics: Mapping[str, Any], params: Mapping[str, Any] | None = None,
                           metric_key: str = "sumr", margin: float = 0.0,
                           data_version: str | None = None, git_commit: str | None = None,
                           judge: Judge | None = None, promote: bool = True,
                           source: str | None = None) -> dict[str, Any]:
        """The promotion gate. Every candidate becomes a new version whose manifest records the
        decision (promoted, outcome, reason, candidate and production metric, the production
        version compared against, margin); it is promoted only when ``promote`` is set and
        ``judge`` finds it better than production by more than ``margin``.

        The default judge compares the ``metric_key`` stored with production, and only when both
        were measured on the same ``data_version``; ``prvr.stages.register_step`` passes one that
        evaluates production on the candidate's own split. ``promote=False`` never moves the
        pointer (``prvr registry promote`` does). When production moves while the candidate is
        being promoted, the candidate is judged again against the new production.
        """
        candidate = resolve_metric(metrics, metric_key)
        if candidate is None or math.isnan(candidate):
            raise RegistryError(f"candidate metrics have no numeric {metric_key!r} "
                                f"(keys: {sorted(metrics)})")
        judge = judge or self._stored_judge(name, metric_key, candidate, margin, data_version)
        prod_version = self.production(name)
        better, decision = _verdict(judge(prod_version), metric_key, candidate, prod_version, margin)
        go = promote and better

        def record(version: str) -> dict[str, Any]:
            if not go:
                return _settled(decision, version, explicit=not promote)
            return {**decision, "version": version, "outcome": "pending",
                    "reason": f"registered {version}, being promoted: {decision['reason']}"}

        version = self.register(name, files, metrics, params, data_version, git_commit, source, decision=record)
        if not go:
            return record(version)
        final = self._promote_candidate(name, version, decision, prod_version, judge)
        warning = self._record_decision(name, version, final)
        return {**final, "warning": warning} if warning else final

    def _stored_judge(self, name: str, metric_key: str, candidate: float, margin: float,
                      data_version: str | None) -> Judge:
        """Production's stored metric, comparable only when measured on the same data version."""
        def judge(prod_version: str | None) -> dict[str, Any]:
            if prod_version is None:
                return compare_metric(metric_key, candidate, None, None, margin)
            manifest = self.show(name, prod_version)
            if manifest.get("data_version") != data_version:
                return {"better": False, "comparable": False, "production": None,
                        "reason": f"production {prod_version}'s stored {metric_key} was measured on other data "
                                  f"({manifest.get('data_version')}; this candidate: {data_version})"}
            prod = resolve_metric(manifest.get("metrics", {}), metric_key)
            if prod is None:
                raise RegistryError(f"production {name} {prod_version} has no {metric_key!r} metric to compare")
            return compare_metric(metric_key, candidate, prod_version, prod, margin)
        return judge

    def _promote_candidate(self, name: str, version: str, decision: dict[str, Any], prod_version: str | None,
                           judge: Judge) -> dict[str, Any]:
        """Move the pointer from ``prod_version`` to ``version`` by CAS; when production moved
        meanwhile, judge again against the new one. Returns the final decision."""
        while True:
            try:
                self.promote(name, version, expected_current=prod_version)
            except RegistryError as exc:
                now = self.production(name)
                if now == prod_version:  # not a stale expectation: a real failure
                    self._record_decision(name, version, {**decision, "version": version, "outcome": "failed",
                                                          "reason": f"registered {version}, promotion failed: {exc}"})
                    raise
                prod_version = now
                better, decision = _verdict(judge(now), decision["metric_key"], decision["candidate"], now,
                                            decision["margin"])
                if not better:
                    return _settled(decision, version, explicit=False)
                continue
            return {**decision, "version": version, "promoted": True, "outcome": "promoted",
                    "reason": f"promoted {version}: {decision['reason']}"}

    def _record_decision(self, name: str, version: str, decision: Mapping[str, Any]) -> str | None:
        """Replace the ``decision`` in ``version``'s manifest (compare-and-swap on the manifest);
        returns a warning instead of raising, since the pointer already says what happened."""
        key = f"models/{name}/{version}/{MANIFEST}"
        try:
            with self._store.errors(f"recording the decision of {name} {version}"):
                for _ in range(10):
                    got = self._read_json(key)
                    if got is None:
                        raise RegistryError(f"{key} disappeared")
                    manifest, token = got
                    manifest["decision"] = dict(decision)
                    if self._store.put_if(key, self._dump(manifest), token):
                        return None
                raise RegistryError(f"{key} kept changing")
        except RegistryError as exc:
            return f"the decision was not recorded in {version}'s manifest: {exc}"


def _install(staging: Path, dest: Path, rels: list[str]) -> None:
    """Move verified files from ``staging`` into ``dest``: the whole folder at once when
    ``dest`` does not exist yet, else file by file (each atomically), the manifest last."""
    if not dest.exists():
        os.replace(staging, dest)
        return
    for rel in rels:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dest / rel)


def _check_relative(rel: Any, what: str) -> None:
    """A registry file key: a relative, normalised path inside its version folder, not reserved."""
    parts = rel.split("/") if isinstance(rel, str) else [""]
    if not isinstance(rel, str) or rel.startswith("/") or "\\" in rel or rel in _RESERVED \
            or any(p in ("", ".", "..") for p in parts):
        raise RegistryError(f"{what} {rel!r} is not a clean relative path inside the version folder "
                            "(or is reserved)")
