"""The HTTP service: the FastAPI app factory, its middlewares (upload limit, request metrics)
and error handlers. The routes live in :mod:`.api` (one router per resource, the key check in
:mod:`.api.deps`), the shared state in :mod:`.service`.

``create_app(settings)`` loads the bundles, the key file and the job table (a bad one stops
start-up with a one-line error naming it); its lifespan starts and supervises the job worker
processes (:mod:`.worker`) and the streaming decoder.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

from .api import ROUTERS
from .metrics import Metrics
from .service import Service
from .settings import ServeSettings


class UploadLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, from its Content-Length
    before anything is read, or while it streams (chunked) — never read whole into memory."""

    class _TooLarge(BaseException):  # not an Exception: the body parser must not swallow it
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._TooLarge
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except self._TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"upload larger than serve.max_upload_mb "
                                     f"({self.limit / 2**20:g} MB)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class Timed:
    """ASGI middleware: request latency by method, route template and status (no query
    strings, so keys sent as ``?key=`` never reach a label or a log)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(scope["method"], getattr(route, "path", "unmatched"),
                                         status, time.perf_counter() - t0)


def _allowed(request: Request) -> list[str]:
    """The methods some route of the app answers at this request's path (asked of the
    router per method: included routers nest their routes)."""
    return [method for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                   for route in request.app.router.routes)]


def _binary_uploads(node) -> None:
    """Mark each upload ``format: binary`` beside OpenAPI 3.1's ``contentMediaType``: client
    generators that read the 3.0 convention (openapi-python-client) then type it as a file, not
    a string (``tests/test_serve.py`` generates a client and submits a job with it)."""
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == \
                "application/octet-stream":
            node.setdefault("format", "binary")
        for value in node.values():
            _binary_uploads(value)
    elif isinstance(node, list):
        for value in node:
            _binary_uploads(value)


def create_app(settings: ServeSettings, *, start_workers: bool = True) -> FastAPI:
    """Build the service (bundles, keys and job table loaded now; workers at start-up)."""
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        svc.hub.loop = asyncio.get_running_loop()
        svc.streamer.start()
        if start_workers:
            svc.workers = [svc.start_worker(k) for k in range(svc.n_worker_processes())]
            task = asyncio.create_task(svc.supervise())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            svc.streamer.stop(wait=5.0)
            svc.stop_workers()

    app = FastAPI(title="neurorecon", version="0.1.0", lifespan=lifespan,
                  description="Batch fMRI-to-image decoding with trained neurorecon bundles: "
                              "upload a BOLD run (or betas), get retrieved gallery images, "
                              "reconstructions and, with ground truth, metrics.")
    app.state.service = svc
    for router in ROUTERS:
        app.include_router(router)

    def openapi() -> dict:
        if app.openapi_schema is None:
            _binary_uploads(FastAPI.openapi(app))  # FastAPI's, cached in app.openapi_schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(DataError)
    async def _bad_input(request: Request, exc: DataError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # Allow: every method of the path, not the first route's
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed(request))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # logged, never sent
        logger.exception("serve: unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error (logged by the service)"},
                            status_code=500)

    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes)
    app.add_middleware(Timed, metrics=svc.metrics)  # outermost: times the 413s too
    return app
