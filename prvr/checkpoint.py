"""Files that must never be seen half-written, and checkpoints that must never run code.

Checkpoints load with ``weights_only=True`` (no unpickling of code); every writer goes
through a temporary file or folder and an atomic rename, so a killed process leaves the
previous version in place. Also the device choice, which every loader shares.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from prvr.errors import CheckpointError

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
    """torch.save through a temp file + rename: a kill never leaves half a checkpoint."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
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
    """Write JSON through a temp file + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class atomic_dir:
    """Context manager: yields a temp dir next to `out`, swapped in on success only.

    A crash or exception before the swap leaves the previous `out` untouched (the
    temp dir is removed on exceptions; a killed process leaves `out.tmp-*`)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        backup = None
        if self.out.exists():
            backup = self.out.with_name(f"{self.out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out, backup)
        os.replace(self.tmp, self.out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
