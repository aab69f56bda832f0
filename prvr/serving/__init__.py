"""Online retrieval: a server-free core (request validation, batched answering, the answer's
schema) and one thin adapter per server.

- ``prvr.serving.request``: ``Request`` / ``Answer`` / ``Query`` and ``parse_request``,
  which validates one request body (raising a 4xx ``RequestError`` naming the problem), and
  ``answer_headers`` (Content-Type, Server-Timing) that every server sends.
- ``prvr.serving.retriever``: ``Retriever``, the checkpoint + text encoder + video
  index; ``answer(requests)`` gives one response per request: valid ones are encoded
  and scored together, a bad one gets its own 4xx and never fails the rest.
- ``prvr.serving.torchserve``: ``TorchServeService``, what ``serving/handler.py`` delegates
  to; it sets a status per request and records the custom metrics (``METRICS``) declared
  in ``serving/metrics.yaml``. The only module here that touches TorchServe.

The KServe adapter (``prvr.kserve_app``, KServe's Python model server) sits on the same core
and is not imported here: the core and TorchServe glue load without KServe.

Usage::

    retriever = Retriever.load("runs/train/model.pt", "runs/index", version="v0003")
    [answer] = retriever.answer([Request({"query": "a man opens the fridge"})])
"""
from prvr.serving.request import Answer, Query, Request, answer_headers, parse_request, server_timing
from prvr.serving.retriever import SERVE_MANIFEST, Retriever, check_index, load_serve_manifest
from prvr.serving.torchserve import METRICS, TorchServeService

__all__ = ["Request", "Answer", "Query", "Retriever", "TorchServeService", "SERVE_MANIFEST",
           "METRICS", "parse_request", "answer_headers", "server_timing", "check_index",
           "load_serve_manifest"]
