"""`prvr ui`: a one-page search UI in front of the running TorchServe.

The page (``prvr/ui_static/``: plain HTML, CSS and JS, no build step) talks only to this
small Starlette app, which asks the REST API through ``prvr.client`` on the server side:
the API key stays in this process and never reaches the browser.

Routes: ``GET /`` the page; ``GET /static/*`` its script and style; ``GET /api/info`` the
endpoint and default top-k; ``POST /api/search`` with ``{"query", "top_k", "alpha"}`` answers
``{"answer": ...}`` (the client's ``SearchResponse``) or ``{"error": {"status", "kind",
"message"}}``: the API's own 4xx status and message, 502 when the API failed or refused
the UI's key, 504 when it timed out.

Usage::

    app = create_app(Client("http://127.0.0.1:8080", key=read_key("runs/serve/key_file.json")))
    serve_ui(app, "127.0.0.1", 8000)
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from prvr.client import ApiError, AuthError, Client

__all__ = ["create_app", "serve_ui", "STATIC", "error_status", "DEFAULT_HOST", "DEFAULT_PORT"]

STATIC = Path(__file__).resolve().parent / "ui_static"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
_FIELDS = {"query", "top_k", "alpha"}
MAX_BODY = 1 << 20          # a typed query is short; the API refuses long ones with its own message


def error_status(exc: ApiError) -> int:
    """The page's status for an API error: the API's 4xx passes through (the user's request
    was at fault); a refused key, a failed or unreachable API is this gateway's 502; a timeout 504."""
    if isinstance(exc, AuthError) or exc.status is None or exc.status >= 500 or exc.status < 400:
        return 504 if exc.kind == "timeout" else 502
    return exc.status


def _error(status: int, kind: str | None, message: str, upstream: int | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": upstream, "kind": kind, "message": message}}, status_code=status)


def create_app(client: Client, top_k: int = 10) -> Starlette:
    """The page and its two API routes in front of ``client``; ``top_k``: the page's default."""

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"endpoint": client.endpoint, "top_k": top_k})

    async def search(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, "ui_bad_request", f"the page sent invalid JSON: {exc}")
        if not isinstance(body, dict) or not set(body) <= _FIELDS:
            return _error(400, "ui_bad_request", f"send a JSON object with {sorted(_FIELDS)} only")
        # Values go to the API as typed: it checks them and names the problem.
        payload = {"query": body.get("query"),
                   **{k: body[k] for k in ("top_k", "alpha") if body.get(k) is not None}}
        try:
            answer = await run_in_threadpool(client.request, payload)
        except AuthError as exc:
            return _error(502, exc.kind, f"the search API refused this UI's key ({exc.message}): "
                                         "renew it with TorchServe's token API (docs/serving.md, Requests)",
                          exc.status)
        except ApiError as exc:
            return _error(error_status(exc), exc.kind, exc.message, exc.status)
        return JSONResponse({"answer": answer.to_dict()})

    routes = [Route("/", page), Route("/api/info", info), Route("/api/search", search, methods=["POST"]),
              Mount("/static", app=StaticFiles(directory=STATIC), name="static")]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        client.close()

    return Starlette(routes=routes, lifespan=lifespan, max_body_size=MAX_BODY)


def serve_ui(app: Starlette, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "warning") -> None:
    """Run the app in the foreground until Ctrl-C (uvicorn, one process)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level)
