"""``lesionlocator serve``'s HTTP layer: a FastAPI app over :class:`~LesionLocatorLib.serverjobs.Service`,
served by uvicorn. The API (paths, payloads, status codes) is specified in
:mod:`LesionLocatorLib.serverapi`; the work (models, image cache, job queue, checks) is in
:mod:`LesionLocatorLib.serverjobs`. This module only authenticates, reads bodies under the upload
limit, moves blocking work off the event loop and turns errors into one-line JSON replies.

* :func:`create_app` (``config``, optionally a ready ``service``) -> the FastAPI app; its lifespan
  starts and stops the device threads.
* :func:`run_server` (``config``) serves it until SIGINT/SIGTERM (jobs cancelled, exit clean).
* :func:`serve_in_thread` (``config``) serves it on a background thread, for tests and benchmarks.

No interactive docs or OpenAPI schema are served: every path but ``/v1/health`` needs a key.
"""
import contextlib
import logging
import threading
import time
import uuid
from typing import Annotated, Optional

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .serverapi import PREFIX
from .serverjobs import ServerConfig, Service, ServiceError

log = logging.getLogger("lesionlocator.server")
LONG_POLLS = 256  # long polls waiting at once (threads of their own, apart from upload decoding)
UNAUTHORISED = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"


def create_app(config: ServerConfig, service: Optional[Service] = None) -> FastAPI:
    """The FastAPI app of ``config`` (or of ``service``, e.g. one built with a test runner)."""
    service = service or Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(title="LesionLocator server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _add_error_handlers(app)
    app.include_router(_routes(service))
    return app


def _routes(service: Service) -> APIRouter:
    router = APIRouter(prefix=PREFIX)
    polls = anyio.CapacityLimiter(LONG_POLLS)

    def client(request: Request) -> str:
        name = service.auth.client(request.headers.get("authorization"))
        if name is None:
            raise HTTPException(401, UNAUTHORISED, headers={"WWW-Authenticate": "Bearer"})
        return name

    Client = Annotated[str, Depends(client)]
    limit = service.config.max_upload_bytes

    @router.get("/health")
    def health():
        return service.health()

    @router.get("/info")
    def info(who: Client):
        return service.info()

    @router.put("/images/{image_id}", status_code=201)
    async def upload(image_id: str, request: Request, who: Client):
        data = await read_body(request, limit)
        return await run_in_threadpool(service.upload, who, image_id, data)

    @router.post("/jobs", status_code=202)
    async def submit(request: Request, who: Client):
        data = await read_body(request, limit)
        return await run_in_threadpool(service.submit, who, data)

    @router.get("/jobs/{job_id}")
    async def status(job_id: str, who: Client, wait: float = 0.0):
        return await anyio.to_thread.run_sync(service.jobs.status, who, job_id, wait, limiter=polls)

    @router.delete("/jobs/{job_id}")
    def cancel(job_id: str, who: Client):
        return service.jobs.cancel(who, job_id)

    return router


async def read_body(request: Request, limit: int) -> bytearray:
    """The request body, at most ``limit`` bytes: 413 when ``Content-Length`` says more (before
    anything is read) or when a body without one grows past the limit while it streams in."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ServiceError(400, f"Content-Length: not a byte count: {length[:40]!r}")
        if int(length) > limit:
            raise _too_large(f"{int(length)} bytes", limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large("more", limit)
    return body


def _too_large(size: str, limit: int) -> ServiceError:
    return ServiceError(413, f"the body holds {size}, over this server's upload limit of {limit} bytes "
                             f"(--max-upload-mb)")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError):
        return JSONResponse({"detail": e.detail, **e.extra}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header"))
        return JSONResponse({"detail": f"{where or 'request'}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        reference = uuid.uuid4().hex[:12]
        log.error("internal error %s in %s %s", reference, request.method, request.url.path, exc_info=e)
        return JSONResponse({"detail": f"internal error (reference {reference}; the details are in the server's "
                                       f"log)"}, status_code=500)


def uvicorn_server(config: ServerConfig, service: Optional[Service] = None):
    """A uvicorn server for ``config`` whose shutdown first cancels the jobs (so running jobs and
    long polls end at once) and that, after SIGINT/SIGTERM, returns normally instead of re-raising
    the signal."""
    import uvicorn

    app = create_app(config, service)
    service = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()  # stopped cleanly: no re-raise afterwards

        async def shutdown(self, sockets=None):
            await run_in_threadpool(service.close)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, host=config.host, port=config.port, ssl_certfile=config.ssl_certfile,
                                 ssl_keyfile=config.ssl_keyfile, log_level="info", timeout_graceful_shutdown=5,
                                 server_header=False))


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_server(config: ServerConfig, service: Optional[Service] = None) -> None:
    """Serve until SIGINT or SIGTERM; running jobs are cancelled on the way out."""
    _log_to_stderr()
    uvicorn_server(config, service).run()


@contextlib.contextmanager
def serve_in_thread(config: ServerConfig, service: Optional[Service] = None, timeout_s: float = 60.0):
    """Serve ``config`` on a background thread; yields the base URL (``http://host:port``), stops on exit."""
    server = uvicorn_server(config, service)
    thread = threading.Thread(target=server.run, name="lesionlocator-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {config.host}:{config.port} did not start")
        time.sleep(0.02)
    try:
        yield f"{'https' if config.ssl_certfile else 'http'}://{config.host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
