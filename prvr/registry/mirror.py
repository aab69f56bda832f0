"""Files of a run folder mirrored to storage that outlives the machine: ``s3://BUCKET/PREFIX``
(``S3Store``, AWS or any endpoint) or an absolute folder (``FileStore``, e.g. a volume).

``prvr.stages.train_step`` keeps the resume state of a run (``last.pt``, ``model.pt``,
``resume.json``) there when ``train.checkpoint_uri`` is set, so a retried pod with an empty
run folder continues from the last complete epoch. Each file is replaced atomically (an S3
object appears only when its PUT, or its multipart upload, completes; on disk temp file +
``os.replace``); :meth:`Mirror.pull` takes all the files or none.

Usage::

    mirror = Mirror("s3://models/prvr/ckpt/run-1", endpoint_url=None)
    mirror.pull(Path("runs/train"), ("resume.json", "model.pt", "last.pt"))   # False: not there
    mirror.push(Path("runs/train"), ("last.pt",))
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from prvr.config import RegistryConfig
from prvr.errors import RegistryError
from prvr.registry.stores import FileStore, S3Store, file_digest, open_store

__all__ = ["Mirror"]


class Mirror:
    """Named files of one local folder, copied to and from ``uri``."""

    def __init__(self, uri: str, endpoint_url: str | None = None, settings: RegistryConfig | None = None):
        if not (uri.startswith("s3://") or Path(uri).is_absolute()):
            raise RegistryError(f"{uri!r}: expected s3://BUCKET/PREFIX or an absolute folder path")
        self.store: FileStore | S3Store = open_store(uri, endpoint_url, "train.checkpoint_uri", settings)
        self.uri = uri

    def pull(self, folder: Path, names: Iterable[str]) -> bool:
        """Copy every named file into ``folder`` (moved into place in the order given, each
        atomically) and return True; False, with ``folder`` untouched, when one is missing."""
        names = list(names)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".mirror-") as tmp:
            with self.store.errors(f"download from {self.uri}"):
                for name in names:
                    try:
                        self.store.download(name, Path(tmp) / name)
                    except RegistryError:          # the stores raise it (only) for a missing key
                        return False
            for name in names:
                os.replace(Path(tmp) / name, folder / name)
        return True

    def push(self, folder: Path, names: Iterable[str]) -> None:
        """Upload the named files of ``folder`` in order, each replacing its copy atomically."""
        with self.store.errors(f"upload to {self.uri}"):
            for name in names:
                src = folder / name
                self.store.upload(name, src, file_digest(src, self.store.part_size(src.stat().st_size)))

    def delete(self, names: Iterable[str]) -> None:
        with self.store.errors(f"delete in {self.uri}"):
            for name in names:
                self.store.delete(name)
