"""Registry storage backends: one small key/value protocol, two implementations.

- ``FileStore``: ``file://PATH``; keys are paths under a folder, writes are atomic
  (temp file + ``os.replace``), create-if-absent is ``os.link``, compare-and-swap is a
  locked read-compare-replace.
- ``S3Store``: ``s3://BUCKET/PREFIX`` on AWS or any S3 endpoint (MinIO, moto);
  conditional writes use ``If-None-Match`` / ``If-Match`` (HTTP 412).

Both offer get / put / put_new / put_if / upload / verify / download / children /
delete and an ``errors(what)`` context that turns backend failures into RegistryError.
``prvr.registry.registry.Registry`` builds the version layout on top of them.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from prvr.checkpoint import sha256_file
from prvr.errors import RegistryError

__all__ = ["FileStore", "S3Store", "file_hashes"]

_CHUNK = 1 << 20


def file_hashes(path: str | Path) -> tuple[str, str]:
    """(sha256, md5) hex in one pass: sha256 goes in the manifest, md5 checks S3 ETags."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


class FileStore:
    """Keys are POSIX paths under a root folder; writes are atomic (temp + os.replace)."""

    def __init__(self, root: Path):
        self.root = root
        self.where = f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def _tmp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_new(self, key: str, data: bytes) -> bool:
        """Create-if-absent: os.link of a complete temp file fails atomically when the key exists."""
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            tmp.write_bytes(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put_if(self, key: str, data: bytes, token: str | None) -> bool:
        """Compare-and-swap under an exclusive flock (flock also excludes threads of one process)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = self.get(key)
                if (current[1] if current else None) != token:
                    return False
                self.put(key, data)
                return True
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def upload(self, key: str, src: Path, sha256: str, md5: str) -> None:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def verify(self, key: str, sha256: str, md5: str, size: int) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return "missing after upload"
        if path.stat().st_size != size:
            return f"size {path.stat().st_size} != {size}"
        got = sha256_file(path)
        return None if got == sha256 else f"sha256 {got} != {sha256}"

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except FileNotFoundError:
            raise RegistryError(f"{self.where}/{key} is missing") from None

    def children(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _errors(self.where, what)


class S3Store:
    """S3 keys under ``prefix``; conditional writes use If-None-Match / If-Match (HTTP 412)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None):
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix, endpoint_url
        self.where = f"s3://{bucket}/{prefix}".rstrip("/") + (f" at {endpoint_url}" if endpoint_url else "")
        # Small, bounded retries/timeouts: a dead endpoint must fail a CLI call in seconds.
        cfg = BotoConfig(connect_timeout=5, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"})
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=cfg)

    def _key(self, key: str) -> str:
        return self.prefix + key

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    @staticmethod
    def _status(exc: Exception) -> int:
        return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)

    def _precondition_failed(self, exc: Exception) -> bool:
        # 412 PreconditionFailed: the condition did not hold; 409 ConditionalRequestConflict:
        # a concurrent conditional write on the same key won (S3 asks to retry).
        return self._status(exc) in (409, 412) or self._code(exc) in ("PreconditionFailed",
                                                                      "ConditionalRequestConflict")

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_new(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if self._precondition_failed(exc):
                return False
            raise

    def put_if(self, key: str, data: bytes, token: str | None) -> bool:
        cond = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **cond)
            return True
        except ClientError as exc:
            if self._precondition_failed(exc):
                return False
            raise

    def upload(self, key: str, src: Path, sha256: str, md5: str) -> None:
        # AWS rejects a body that does not match Content-MD5 / ChecksumSHA256 (BadDigest) and
        # keeps the SHA-256 for later HEADs. (moto stores both headers without checking them.)
        with open(src, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=f,
                                   ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),
                                   ChecksumAlgorithm="SHA256",
                                   ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode())

    def verify(self, key: str, sha256: str, md5: str, size: int) -> str | None:
        """Check the stored object: size, stored SHA-256, and the ETag, which for a single-part
        upload without SSE-KMS is the MD5 the server computed from the bytes it stored."""
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        if int(head.get("ContentLength", -1)) != size:
            return f"size {head.get('ContentLength')} != {size}"
        stored = head.get("ChecksumSHA256")
        if stored and "-" not in stored and base64.b64decode(stored).hex() != sha256:
            return f"stored sha256 {base64.b64decode(stored).hex()} != {sha256}"
        etag = str(head.get("ETag", "")).strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag) and head.get("ServerSideEncryption") != "aws:kms":
            return None if etag == md5 else f"ETag (MD5 of the stored bytes) {etag} != {md5}"
        # No usable ETag: re-read and hash.
        h = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        for block in iter(lambda: body.read(_CHUNK), b""):
            h.update(block)
        got = h.hexdigest()
        return None if got == sha256 else f"sha256 {got} != {sha256}"

    def download(self, key: str, dest: Path) -> None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                raise RegistryError(f"{self.where}: s3://{self.bucket}/{self._key(key)} is missing") from None
            raise
        with open(dest, "wb") as f:
            for block in iter(lambda: obj["Body"].read(_CHUNK), b""):
                f.write(block)

    def children(self, prefix: str) -> list[str]:
        base = self._key(prefix.rstrip("/") + "/")
        names: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"):
            names += [p["Prefix"][len(base):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _errors(self.where, what, self._explain)

    def _explain(self, exc: Exception) -> str:
        """S3 error codes a user can act on, in words; other errors as they come."""
        if not isinstance(exc, ClientError):
            return str(exc)             # BotoCoreError: endpoint unreachable, timeouts, no credentials
        code = self._code(exc)
        if code == "NoSuchBucket":
            return f"bucket {self.bucket!r} does not exist"
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access denied ({code}); check the AWS credentials"
        return f"{code or 'error'}: {exc}"


def open_store(uri: str, endpoint_url: str | None, what: str) -> FileStore | S3Store:
    """The store ``uri`` names: ``s3://BUCKET[/PREFIX]``, ``file://PATH`` or a plain folder path."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise RegistryError(f"{what} {uri!r} names no bucket (expected s3://BUCKET/PREFIX)")
        prefix = prefix.strip("/")
        return S3Store(bucket, prefix + "/" if prefix else "", endpoint_url)
    if uri.startswith("file://") or "://" not in uri:
        root = uri[len("file://"):] if uri.startswith("file://") else uri
        if not root:
            raise RegistryError(f"{what} {uri!r} names no folder (expected file://PATH)")
        return FileStore(Path(root).expanduser())
    raise RegistryError(f"{what} {uri!r}: scheme must be file:// or s3://")


@contextlib.contextmanager
def _errors(where: str, what: str, explain: Callable[[Exception], str] = str) -> Iterator[None]:
    """Any store failure inside as one RegistryError naming the registry and the operation."""
    try:
        yield
    except RegistryError:
        raise
    except (OSError, ClientError, BotoCoreError) as exc:
        raise RegistryError(f"registry {where}: {what} failed: {explain(exc)}") from exc
