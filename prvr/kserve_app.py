"""The KServe adapter: prvr's retrieval core served by KServe's Python model server.

A thin shell, like serving/handler.py for TorchServe: ``RetrievalModel`` (a ``kserve.Model``)
loads a ``Retriever`` and answers with the same validation (``prvr.serving.request``), the
same rankings and the same JSON answers; ``kserve.ModelServer`` serves it. `prvr serve-kserve`
pulls or unpacks the model, then runs ``python -m prvr.kserve_app SPEC`` in its place (KServe
parses the process's command line when it is imported, so it gets a process of its own).

    v1  POST /v1/models/prvr:predict   {"instances": [<request>, ...]}  ->  {"predictions": [<answer>, ...]}
    v2  POST /v2/models/prvr/infer     {"inputs": [{"name": "request", "datatype": "BYTES", "shape": [n],
                                                   "data": ["<request as JSON text>", ...]}]}
        ->  {"outputs": [{"name": "answer", "datatype": "BYTES", "shape": [n], "data": ["<answer JSON>", ...]}]}

A request is what TorchServe's /predictions/prvr takes (docs/serving.md); an answer is what it
returns. A v2 request holds the JSON text of each request (``"datatype": "JSON"`` with the objects
themselves is accepted too). A refused request fails the whole call with the core's status and
JSON body (``{"error": "bad_request", "status": 400, "message": ...}``; the message is prefixed
with the request's position when a call carries several). Health: /v2/health/live, and
/v1/models/prvr (200 once the model is loaded).
"""
from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

import kserve
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from kserve.model_server import app

from prvr.config import Config, ConfigError
from prvr.errors import PrvrError, RequestError
from prvr.serving.request import Answer, Request, answer_headers, error_answer
from prvr.serving.retriever import Retriever, torch_threads

__all__ = ["RetrievalModel", "ServedError", "load_retriever", "serve", "main", "INPUT", "OUTPUT"]

logger = logging.getLogger(__name__)

INPUT, OUTPUT = "request", "answer"       # the v2 tensors


class ServedError(Exception):
    """A refused call: the core's status and JSON body, sent as they are."""

    def __init__(self, answer: Answer):
        super().__init__(answer.body.get("message", ""))
        self.answer = answer


async def _served_error(_: HttpRequest, exc: ServedError) -> JSONResponse:
    return JSONResponse(exc.answer.body, status_code=exc.answer.status)


def load_retriever(spec: dict[str, Any]) -> Retriever:
    """The Retriever a spec names: an unpacked archive (``model_dir``, its serve.json settings) or
    pulled registry files (``checkpoint``, ``index``, ``version`` and the ``serve``/``search``
    settings of the config `prvr serve-kserve` read)."""
    if spec.get("model_dir"):
        model_dir = Path(spec["model_dir"])
        torch_threads(json.loads((model_dir / "serve.json").read_text()).get("serve") or {})
        return Retriever.from_model_dir(model_dir, registry=False)
    cfg = Config.from_dict({"serve": spec["serve"], "search": spec["search"]})
    torch_threads(cfg.serve)
    return Retriever.load(spec["checkpoint"], spec["index"], spec["version"], cfg.serve, cfg.search)


def _v2_requests(payload: kserve.InferRequest) -> list[Request]:
    """The requests of a v2 call: one input named ``request`` holding JSON text (BYTES) or objects (JSON)."""
    inputs = {i.name: i for i in payload.inputs}
    if set(inputs) != {INPUT}:
        raise RequestError(f"a v2 call needs exactly one input named {INPUT!r}, got {sorted(inputs)}")
    tensor = inputs[INPUT]
    data = tensor.data if isinstance(tensor.data, list) else None
    if tensor.datatype not in ("BYTES", "JSON") or not data:
        raise RequestError(f"input {INPUT!r} must be a non-empty list of BYTES (each request as JSON text) or "
                           f"JSON objects, got datatype {tensor.datatype} with {len(data or [])} item(s)")
    return [Request(item if tensor.datatype == "JSON" else
                    (item.encode("utf-8", "surrogatepass") if isinstance(item, str) else item), "application/json")
            for item in data]


def _v1_requests(payload: Any, headers: dict[str, str] | None) -> list[Request]:
    """The requests of a v1 call: ``instances``, each a request object (KServe decoded the JSON)."""
    if not isinstance(payload, dict):           # KServe passes a body of another content type as bytes
        return [Request(payload, (headers or {}).get("content-type"))]
    instances = payload.get("instances")
    if set(payload) != {"instances"} or not isinstance(instances, list) or not instances:
        raise RequestError('a v1 call must be {"instances": [<request>, ...]} with at least one request')
    return [Request(item, "application/json") for item in instances]


class RetrievalModel(kserve.Model):
    """prvr's retrieval core as a KServe model: ``load`` builds the Retriever, ``predict``
    answers a v1 or v2 call through it."""

    def __init__(self, name: str, spec: dict[str, Any]):
        super().__init__(name, return_response_headers=True)
        self.spec = spec
        self.retriever: Retriever | None = None

    def load(self) -> bool:
        self.retriever = load_retriever(self.spec)
        logger.info("prvr: serving %s (%d videos, text encoder %s)", self.retriever.model_version,
                    self.retriever.corpus_size, self.retriever.text_encoder)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    def answer(self, requests: list[Request]) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The answers of one call and its headers, or ServedError with the first refusal."""
        limit = self.retriever.serve_cfg.max_queries
        if len(requests) > limit:
            raise ServedError(error_answer(RequestError(
                f"a call holds {len(requests)} requests, more than serve.max_queries={limit}")))
        answers = self.retriever.answer(requests)
        for i, a in enumerate(answers):
            if a.status != 200:
                body = dict(a.body)
                if len(answers) > 1:
                    body["message"] = f"request {i}: {body['message']}"
                raise ServedError(Answer(a.status, body, a.outcome))
        return [a.body for a in answers], answer_headers(answers[0], self.retriever.last_timings)

    def predict(self, payload: Any, headers: dict[str, str] | None = None,
                response_headers: dict[str, str] | None = None) -> Any:
        v2 = isinstance(payload, kserve.InferRequest)
        try:
            requests = _v2_requests(payload) if v2 else _v1_requests(payload, headers)
        except RequestError as exc:
            raise ServedError(error_answer(exc)) from None
        bodies, extra = self.answer(requests)
        if response_headers is not None:
            response_headers["Server-Timing"] = extra["Server-Timing"]
        if not v2:
            return {"predictions": bodies}
        out = kserve.InferOutput(OUTPUT, [len(bodies)], "BYTES", [json.dumps(b) for b in bodies])
        return kserve.InferResponse(payload.id or str(uuid.uuid4()), self.name, [out],
                                    model_version=self.retriever.model_version)


def serve(spec: dict[str, Any]) -> None:
    """Load the model, then serve it over HTTP (v1 and v2) until SIGTERM / SIGINT."""
    model = RetrievalModel(spec.get("model_name", "prvr"), spec)
    model.load()
    app.add_exception_handler(ServedError, _served_error)
    server = kserve.ModelServer(http_port=int(spec.get("port", 8080)), enable_grpc=False, workers=1,
                                enable_latency_logging=False)
    # One log line per request (uvicorn's access line), as with TorchServe: not KServe's two
    # timing lines per request on top of it.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([model])


def main(argv: list[str]) -> int:
    """`python -m prvr.kserve_app SPEC` (run by `prvr serve-kserve`): a model that cannot load
    exits 2 with its reason, as the CLI does."""
    try:
        serve(json.loads(argv[1]))
    except (PrvrError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
