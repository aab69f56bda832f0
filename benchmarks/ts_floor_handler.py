"""serve_bench.py's floor: a TorchServe handler that answers every request with an answer
recorded from the real model (answer.json in its archive), doing no work of its own.

REST time through it is TorchServe's own path (client, frontend, batching, the socket to
the Python worker and back) for an answer of the real size: what no change inside prvr's
handler can remove.
"""
from __future__ import annotations

from pathlib import Path

_answer: str | None = None


def handle(data, context):
    """TorchServe calls this once with data=None when the worker starts, then per batch."""
    global _answer
    if _answer is None:
        _answer = (Path(context.system_properties["model_dir"]) / "answer.json").read_text()
    if data is None:
        return None
    for i in range(len(data)):
        context.set_response_content_type(i, "application/json")
    return [_answer] * len(data)
