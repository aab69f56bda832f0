"""Online retrieval: request validation, batched answering and TorchServe glue.

``serving/handler.py`` is a thin ``BaseHandler`` subclass; everything it does lives
here so it can be tested without a server:

- ``prvr.serving.request``: ``Request`` / ``Answer`` / ``Query`` and ``parse_request``,
  which validates one request body (raising a 4xx ``RequestError`` naming the problem).
- ``prvr.serving.retriever``: ``Retriever``, the checkpoint + text encoder + video
  index; ``answer(requests)`` gives one response per request: valid ones are encoded
  and scored together, a bad one gets its own 4xx and never fails the rest.
- ``prvr.serving.torchserve``: ``TorchServeService``, what the handler delegates to;
  it sets a status per request and records the custom metrics (``METRICS``) declared
  in ``serving/metrics.yaml``. The only module that touches TorchServe.

Usage::

    retriever = Retriever.load("runs/train/model.pt", "runs/index", version="v0003")
    [answer] = retriever.answer([Request({"query": "a man opens the fridge"})])
"""
from prvr.serving.request import Answer, Query, Request, parse_request
from prvr.serving.retriever import SERVE_MANIFEST, Retriever, check_index, load_serve_manifest
from prvr.serving.torchserve import METRICS, TorchServeService

__all__ = ["Request", "Answer", "Query", "Retriever", "TorchServeService", "SERVE_MANIFEST",
           "METRICS", "parse_request", "check_index", "load_serve_manifest"]
