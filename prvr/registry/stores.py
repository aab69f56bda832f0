"""Registry storage backends: one small key/value protocol, two implementations.

- ``FileStore``: ``file://PATH``; keys are paths under a folder, writes are atomic
  (temp file + ``os.replace``), create-if-absent is ``os.link``, compare-and-swap is a
  locked read-compare-replace.
- ``S3Store``: ``s3://BUCKET/PREFIX`` on AWS or any S3 endpoint (MinIO, moto);
  conditional writes use ``If-None-Match`` / ``If-Match`` (HTTP 412). Files move through
  boto3's transfer manager: from ``registry.multipart_threshold_mb`` on in parallel parts
  (a single PUT stops at 5 GiB), every request retried by botocore
  (``registry.max_attempts``, ``registry.retry_mode``).

Both offer get / put / put_new / put_if / part_size / upload / verify / download / children /
delete and an ``errors(what)`` context that turns backend failures into RegistryError.
A file's :class:`Digest` (sha256 for the manifest, the ETag S3 will report for it) is
computed in one local pass, so verifying an upload never downloads it again.
``prvr.registry.registry.Registry`` builds the version layout on top of them.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import ChunksizeAdjuster

from prvr.checkpoint import sha256_file
from prvr.config import RegistryConfig, load_config
from prvr.errors import RegistryError

__all__ = ["FileStore", "S3Store", "Digest", "file_digest", "open_store"]

_CHUNK = 1 << 20
_MIB = 1 << 20


class Digest(NamedTuple):
    """What a stored copy of a file must match."""

    sha256: str         # hex, recorded in the manifest
    etag: str           # S3's ETag for it: MD5 hex, or MD5 of the part MD5s + "-N" when sent in N parts
    size: int


def file_digest(path: str | Path, part_size: int | None = None) -> Digest:
    """sha256, size and the S3 ETag of ``path`` uploaded whole (``part_size`` None) or in
    parts of ``part_size`` bytes, in one pass over the file (1 MiB reads)."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    parts: list[bytes] = []                         # MD5 of each complete part
    size = in_part = 0
    limit = part_size or math.inf
    with open(path, "rb") as f:
        while block := f.read(min(_CHUNK, limit - in_part)):
            sha.update(block)
            md5.update(block)
            size, in_part = size + len(block), in_part + len(block)
            if in_part == limit:
                parts, md5, in_part = parts + [md5.digest()], hashlib.md5(usedforsecurity=False), 0
    if in_part or not parts:                        # the last part (or the whole file)
        parts.append(md5.digest())
    if part_size is None:
        return Digest(sha.hexdigest(), parts[0].hex(), size)
    etag = f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"
    return Digest(sha.hexdigest(), etag, size)


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

    @staticmethod
    def part_size(size: int) -> None:
        """Files are copied whole."""
        return None

    def upload(self, key: str, src: Path, digest: Digest) -> None:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def verify(self, key: str, digest: Digest) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return "missing after upload"
        if path.stat().st_size != digest.size:
            return f"size {path.stat().st_size} != {digest.size}"
        got = sha256_file(path)
        return None if got == digest.sha256 else f"sha256 {got} != {digest.sha256}"

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

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, settings: RegistryConfig):
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix, endpoint_url
        self.where = f"s3://{bucket}/{prefix}".rstrip("/") + (f" at {endpoint_url}" if endpoint_url else "")
        # Short timeouts: a dead endpoint must fail a CLI call in seconds; retries (with backoff)
        # ride out throttling (503 SlowDown) and dropped connections.
        cfg = BotoConfig(connect_timeout=5, read_timeout=5,
                         retries={"total_max_attempts": settings.max_attempts,     # the first try included
                                  "mode": settings.retry_mode})
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=cfg)
        # "classic": the part size must be the one part_size() predicts (the CRT client picks its own).
        self.transfer = TransferConfig(multipart_threshold=settings.multipart_threshold_mb * _MIB,
                                       multipart_chunksize=settings.multipart_chunk_mb * _MIB,
                                       max_concurrency=settings.max_concurrency,
                                       preferred_transfer_client="classic")

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

    def part_size(self, size: int) -> int | None:
        """The part size the transfer manager will cut a ``size``-byte file into (None: one PUT)."""
        if size < self.transfer.multipart_threshold:
            return None
        return ChunksizeAdjuster().adjust_chunksize(self.transfer.multipart_chunksize, size)

    def upload(self, key: str, src: Path, digest: Digest) -> None:
        # Every request carries a SHA-256 of its bytes (of each part, when in parts) that S3
        # checks before storing (BadDigest otherwise); verify() then checks the whole object.
        try:
            self.client.upload_file(str(src), self.bucket, self._key(key), Config=self.transfer,
                                    ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        except S3UploadFailedError as exc:     # boto3 wraps the S3 error: unwrap it for errors()
            if isinstance(exc.__context__, ClientError):
                raise exc.__context__ from None
            raise

    def verify(self, key: str, digest: Digest) -> str | None:
        """Check the stored object: size, stored SHA-256 (single part), and the ETag, which
        without SSE-KMS/SSE-C is the MD5 (of the part MD5s, for N parts) the server computed
        from the bytes it stored."""
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        if int(head.get("ContentLength", -1)) != digest.size:
            return f"size {head.get('ContentLength')} != {digest.size}"
        stored = head.get("ChecksumSHA256")
        whole = "-" not in digest.etag      # in parts, S3 keeps a SHA-256 of the parts' SHA-256s
        if whole and stored and "-" not in stored and base64.b64decode(stored).hex() != digest.sha256:
            return f"stored sha256 {base64.b64decode(stored).hex()} != {digest.sha256}"
        etag = str(head.get("ETag", "")).strip('"')
        encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") \
            or bool(head.get("SSECustomerAlgorithm"))
        if re.fullmatch(r"[0-9a-f]{32}(-[0-9]+)?", etag) and not encrypted:
            return None if etag == digest.etag else f"ETag {etag} != {digest.etag} (expected from the local file)"
        # No usable ETag: re-read and hash.
        h = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        for block in iter(lambda: body.read(_CHUNK), b""):
            h.update(block)
        got = h.hexdigest()
        return None if got == digest.sha256 else f"sha256 {got} != {digest.sha256}"

    def download(self, key: str, dest: Path) -> None:
        """Into ``dest`` (from ``registry.multipart_threshold_mb`` on as parallel ranged GETs);
        callers check what arrived against the manifest."""
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                raise RegistryError(f"{self.where}: s3://{self.bucket}/{self._key(key)} is missing") from None
            raise

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


def open_store(uri: str, endpoint_url: str | None, what: str,
               settings: RegistryConfig | None = None) -> FileStore | S3Store:
    """The store ``uri`` names: ``s3://BUCKET[/PREFIX]``, ``file://PATH`` or a plain folder path.
    ``settings`` (the ``registry`` section: S3 retries and transfers) defaults to the run's
    config as ``load_config()`` finds it (params.yaml, PRVR_REGISTRY__* variables)."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise RegistryError(f"{what} {uri!r} names no bucket (expected s3://BUCKET/PREFIX)")
        prefix = prefix.strip("/")
        return S3Store(bucket, prefix + "/" if prefix else "", endpoint_url,
                       settings if settings is not None else load_config().registry)
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
    except (OSError, ClientError, BotoCoreError, S3UploadFailedError) as exc:
        raise RegistryError(f"registry {where}: {what} failed: {explain(exc)}") from exc
