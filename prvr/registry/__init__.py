"""Model registry: versioned, checksummed model files plus a production pointer.

Two backends share one layout and one protocol (``prvr.registry.stores``):

- ``file://PATH`` (embedded default, no server; used by ``make demo``)
- ``s3://BUCKET/PREFIX`` (AWS or any S3 endpoint via ``endpoint_url``, e.g. MinIO or moto)

``prvr.registry.registry.Registry`` claims version numbers with create-if-absent
writes, writes a version's manifest only after every file is uploaded and verified,
and moves the production pointer by compare-and-swap (the module docstring has the
layout and why). ``Registry.register_if_better`` is the promotion gate: every candidate
becomes a version whose manifest records the decision; a ``judge`` decides what "better"
means (``prvr.stages.register_step`` evaluates production on the candidate's own split).

Usage::

    reg = Registry("s3://models/prvr", endpoint_url="http://127.0.0.1:9000")
    decision = reg.register_if_better("prvr-mssl-pp", {"model.pt": ckpt}, metrics, params)
    path = reg.pull("prvr-mssl-pp", dest="models/current")
"""
from prvr.checkpoint import sha256_file
# _UNSET: promote's "not given" (prvr.cli.registry)
from prvr.registry.registry import _UNSET, Judge, Registry, compare_metric, resolve_metric
from prvr.registry.stores import FileStore, S3Store

__all__ = ["Registry", "Judge", "resolve_metric", "compare_metric", "sha256_file", "FileStore", "S3Store"]
