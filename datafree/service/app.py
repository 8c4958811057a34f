"""The HTTP job API (FastAPI). Every endpoint but ``/healthz`` needs ``Authorization: Bearer TOKEN``.

    POST /v1/teachers                      multipart: file (+ card for safetensors), name
    GET  /v1/teachers
    POST /v1/jobs                          {"kind": "distill", "config": {...}}
    GET  /v1/jobs                          GET /v1/jobs/{id}
    GET  /v1/jobs/{id}/events              server-sent events until the job ends (ids, keep-alive, Last-Event-ID)
    POST /v1/jobs/{id}/cancel
    GET  /v1/jobs/{id}/artifacts           GET /v1/jobs/{id}/artifacts/{name}
    GET  /healthz

Errors are ``{"detail": "one sentence"}``: never a stack trace or a server path.

The endpoints live in routers (:mod:`datafree.service.routers.teachers`, :mod:`datafree.service.routers.jobs`);
this module assembles them with the bearer-token check, the body-size limit, the error handlers and the
worker supervisor, and runs the server.

Example:
    >>> app = create_app(Store("store"), workers=1)      # then: uvicorn.run(app)   # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from datafree.base.errors import UserError
from datafree.service.events import JobEvents
from datafree.service.limits import MB, LimitBody
from datafree.service.routers import jobs, teachers
from datafree.service.worker import Supervisor


def create_app(store, workers: int = 1, max_upload_mb: int = 200, max_json_kb: int = 256, start_workers: bool = True,
               device: dict | None = None) -> FastAPI:
    """The application over ``store``; starts the worker supervisor unless ``start_workers`` is False.
    ``device`` (``accelerator``, ``precision``) is where and how the jobs that train networks run."""
    supervisor = Supervisor(store, workers, device=device)
    stopping = threading.Event()  # set when the server begins to stop: event streams end, so no client holds it up

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_workers:
            supervisor.start()
        yield
        stopping.set()
        await asyncio.to_thread(supervisor.stop)  # each running job saves a checkpoint and stops (bounded wait)

    app = FastAPI(title="datafree", version="1", description="Data-free distillation and condensation jobs.", lifespan=lifespan)
    app.state.store, app.state.supervisor, app.state.stopping = store, supervisor, stopping
    app.state.events = JobEvents(store)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path != "/healthz":
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not token or not store.token_valid(token):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        try:
            return await call_next(request)
        except Exception:  # never a stack trace to the client
            return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return JSONResponse({"detail": store.public_message(str(exc))}, status_code=422)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "workers": supervisor.workers, "running": len(supervisor.running)}

    app.include_router(teachers.router)
    app.include_router(jobs.router)
    app.add_middleware(LimitBody, max_upload=max_upload_mb * MB, max_json=max_json_kb * 1024)
    return app


def _stopping_server(config, stopping: threading.Event):
    """uvicorn's server, made to stop cleanly on SIGTERM or Ctrl-C.

    Event streams end at once (an open stream would hold the shutdown until its job ends), the
    lifespan then lets each running job save a checkpoint and stop, and the process exits 0: uvicorn
    (>= 0.29) re-raises the signal once it has shut down, which made the exit status 143.

    Example:
        >>> server = _stopping_server(uvicorn.Config(app), app.state.stopping); server.run()   # doctest: +SKIP
    """
    import signal

    import uvicorn
    from uvicorn.server import HANDLED_SIGNALS

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            stopping.set()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's, without raising the captured signal again at the end
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return StoppingServer(config)


def serve(host: str, port: int, store_dir, workers: int, max_upload_mb: int = 200, accelerator: str = "auto",
          precision: str = "auto") -> int:
    """Run the server until SIGTERM or Ctrl-C (the ``datafree serve`` command); then each running job
    saves a checkpoint and stops (it resumes on the next start), and 0 is returned.

    Example:
        >>> serve("127.0.0.1", 8000, "datafree-store", workers=1)   # doctest: +SKIP
        0
    """
    import sys

    import uvicorn

    from datafree.service.store import Store

    store = Store(store_dir)
    token = store.ensure_token(os.environ.get("DATAFREE_TOKEN"))
    if token:
        print(f"API token (shown once; it is stored hashed): {token}", file=sys.stderr, flush=True)
    app = create_app(store, workers=workers, max_upload_mb=max_upload_mb,
                     device={"accelerator": accelerator, "precision": precision})
    print(f"datafree serving on http://{host}:{port} (store {store.root}, {workers} worker(s))", file=sys.stderr, flush=True)
    # connections still open 5 s after the signal are closed: the jobs' checkpoints come first
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    try:
        _stopping_server(config, app.state.stopping).run()
    finally:
        store.close()
    return 0
