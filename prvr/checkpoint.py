"""Files that must never be seen half-written, and checkpoints that must never run code.

Checkpoints load with ``weights_only=True`` (no unpickling of code); every writer goes
through a temporary file or folder and an atomic rename, so a killed process or a full disk
leaves the previous version in place. Temporaries are hidden (dot) names carrying the writer's
pid; the next writer removes those of dead processes. Also the device choice, which every
loader shares.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from prvr.errors import CheckpointError, PrvrError

__all__ = ["resolve_device", "read_checkpoint", "save_checkpoint", "sha256_file", "write_json_atomic",
           "atomic_dir"]

_CHUNK = 1 << 22


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A prvr checkpoint as a dict holding at least 'state_dict' and 'config'."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
        raise CheckpointError(f"{path} is not a readable prvr checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path} lacks 'state_dict'/'config': not a prvr checkpoint")
    return ckpt


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save through a temp file, fsync and rename: a kill or a full disk never leaves half
    a checkpoint (the previous one stays); a failed write is a CheckpointError naming the file.

    The payload is serialised in memory first: torch's own file writer reports a full disk as
    an opaque 'enforce fail', plain file I/O as ENOSPC."""
    path = Path(path)
    _remove_dead_debris(path, rf"\.{re.escape(path.name)}\.tmp(\d+)")
    buf = io.BytesIO()
    torch.save(payload, buf)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"cannot write checkpoint {path}: {(exc.strerror or str(exc)).lower()} "
                              f"({kept})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed (checkpoints and indexes can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON through a temp file + rename: readers never see half a file, and a full disk
    is a PrvrError naming the file (the previous version stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise PrvrError(f"cannot write {path}: {(exc.strerror or str(exc)).lower()}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class atomic_dir:
    """Context manager: yields a hidden temp dir next to `out`, swapped in on success only.

    The swap is one renameat2(RENAME_EXCHANGE) on Linux, so `out` is always a complete old or
    new version, whatever the moment of a kill; elsewhere it is two renames through a backup,
    which the next writer restores should a kill strand it. An exception removes the temp dir;
    a kill leaves `.{out}.tmp-PID-*`, removed by the next writer to `out`."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _recover_dir(self.out)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        sys.audit("prvr.atomic_dir.swap", str(self.tmp), str(self.out))   # for tracers and fault tests
        if not self.out.exists():
            os.replace(self.tmp, self.out)
        elif _exchange(self.tmp, self.out):          # self.tmp now holds the previous version
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, backup)
            os.replace(self.tmp, self.out)
            shutil.rmtree(backup, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _libc_renameat2() -> Any:
    """glibc's renameat2 (2.28+), or None on another libc or OS."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the OS or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


def _remove_dead_debris(out: Path, pattern: str) -> None:
    """Remove the siblings of `out` matching `pattern` (group 1: the writer's pid) whose writer
    is dead: what a killed writer left behind."""
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = re.fullmatch(pattern, p.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _recover_dir(out: Path) -> None:
    """Before writing `out`: put back a backup that a killed two-rename swap stranded, then
    remove the temp and backup dirs of dead writers."""
    name = re.escape(out.name)
    if not out.exists():
        stranded = [p for p in out.parent.iterdir()
                    if (m := re.fullmatch(rf"\.{name}\.old-(\d+)-[0-9a-f]{{8}}", p.name))
                    and not _pid_alive(int(m.group(1)))]
        if stranded:
            os.replace(max(stranded, key=lambda p: p.lstat().st_mtime), out)
    _remove_dead_debris(out, rf"\.{name}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")
