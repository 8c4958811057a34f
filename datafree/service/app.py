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

Example:
    >>> app = create_app(Store("store"), workers=1)      # then: uvicorn.run(app)   # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from datafree.errors import UserError
from datafree.service.jobs import validate_job
from datafree.service.worker import Supervisor, read_progress

MB = 1024 * 1024
TEACHER_SUFFIXES = {"safetensors": ".safetensors", "pt2": ".pt2", "torchscript": ".ts"}
# an event stream that has sent nothing for this long sends a ``: keep-alive`` comment line, so that
# proxies and clients do not time out on a quiet job (the environment variable is for tests and proxies)
KEEPALIVE_S = float(os.environ.get("DATAFREE_SSE_KEEPALIVE", "15"))
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")


def _document_configs(schema: dict) -> None:
    """``/openapi.json`` lists every field of each kind's config (the server checks them itself, in one sentence)."""
    from datafree.service.jobs import KINDS, config_schemas

    schemas = config_schemas()
    schema["properties"]["kind"]["enum"] = list(KINDS)
    schema["properties"]["config"] = {
        "description": "the job's config; its fields depend on the kind", "default": {},
        "oneOf": [dict(schemas[kind], title=f"{kind} config") for kind in KINDS]}


class JobRequest(BaseModel):
    """A job: its kind and the config of that kind."""

    model_config = ConfigDict(json_schema_extra=_document_configs)
    kind: str
    config: dict = {}


class LimitBody:
    """ASGI middleware: refuse request bodies over the limit (413), by header and by counting bytes.

    Past the limit the application sees the client disconnect, and whatever it answers is replaced
    by the 413, so an oversized upload is never written out whole.
    """

    def __init__(self, app, max_upload: int, max_json: int):
        self.app, self.max_upload, self.max_json = app, max_upload, max_json

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_upload if scope["path"].rstrip("/") == "/v1/teachers" else self.max_json
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(send, limit)
        seen, exceeded, answered = 0, False, False

        async def counted():
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal answered
            if exceeded:
                if not answered:
                    answered = True
                    await _too_large(send, limit)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not exceeded:
                raise
            if not answered:
                await _too_large(send, limit)


async def _too_large(send, limit: int):
    body = json.dumps({"detail": f"request body too large (limit {limit // MB} MiB)"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def _clean(message: str, store) -> str:
    """No server paths in messages sent to clients."""
    return message.replace(str(store.root), "<store>").replace(str(Path(tempfile.gettempdir())), "<tmp>")


def public_job(store, job: dict) -> dict:
    progress = read_progress(store, job["id"])
    if job["state"] == "succeeded":
        progress = dict(progress, fraction=1.0, eta_s=0)
    return {"id": job["id"], "kind": job["kind"], "state": job["state"], "config": job["config"],
            "created": job["created"], "started": job["started"], "finished": job["finished"], "attempts": job["attempts"],
            "progress": progress.get("fraction", 0.0), "eta_s": progress.get("eta_s"), "metrics": progress.get("metrics", {}),
            "error": job["error"], "note": job["note"]}


class JobEvents:
    """Numbers what a job's event stream shows: each change of the job's public record gets the next id.

    A ``progress`` event carries the whole record, so a client that reconnects with ``Last-Event-ID: N``
    is sent the current record only when it changed after event N (records it missed in between are
    superseded by it), then the stream goes on. The last id and record are kept in the job's folder
    (``events.json``), so ids keep increasing across server restarts; the ``end`` event's id is the
    last record's plus one.

    Example:
        >>> import tempfile
        >>> from datafree.service.store import Store
        >>> store = Store(tempfile.mkdtemp())
        >>> job = store.create_job("distill", {})
        >>> events = JobEvents(store)
        >>> event_id, text, state = events.observe(job["id"])
        >>> event_id, state
        (1, 'queued')
        >>> events.observe(job["id"])[0]   # nothing changed: the same id
        1
    """

    def __init__(self, store):
        self.store, self.lock, self.seen = store, threading.Lock(), {}

    def observe(self, job_id: str) -> tuple[int, str, str]:
        """The job's current (event id, record as JSON text, state)."""
        job = self.store.job(job_id)
        text = json.dumps(public_job(self.store, job))
        with self.lock:
            event_id, last = self.seen.get(job_id) or self._load(job_id)
            if text != last:
                event_id += 1
                self._save(job_id, event_id, text)
            self.seen[job_id] = (event_id, text)
        return event_id, text, job["state"]

    def _path(self, job_id: str) -> Path:
        return self.store.job_dir(job_id) / "events.json"

    def _load(self, job_id: str) -> tuple[int, str | None]:
        try:
            saved = json.loads(self._path(job_id).read_text())
            return int(saved["id"]), saved["record"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0, None

    def _save(self, job_id: str, event_id: int, text: str) -> None:
        path = self._path(job_id)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps({"id": event_id, "record": text}))
            os.replace(tmp, path)
        except OSError:  # numbering then lasts only as long as this server; the stream goes on
            pass


def _last_event_id(request: Request) -> int:
    """The ``Last-Event-ID`` a reconnecting client sends (0 when absent or not a number)."""
    value = request.headers.get("last-event-id", "").strip()
    return int(value) if value.isdigit() else 0


def create_app(store, workers: int = 1, max_upload_mb: int = 200, max_json_kb: int = 256, start_workers: bool = True) -> FastAPI:
    """The application over ``store``; starts the worker supervisor unless ``start_workers`` is False."""
    supervisor = Supervisor(store, workers)
    events = JobEvents(store)
    stopping = threading.Event()  # set when the server begins to stop: event streams end, so no client holds it up

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_workers:
            supervisor.start()
        yield
        stopping.set()
        await asyncio.to_thread(supervisor.stop)  # each running job saves a checkpoint and stops (bounded wait)

    app = FastAPI(title="datafree", version="1", description="Data-free distillation and condensation jobs.", lifespan=lifespan)
    app.state.supervisor, app.state.stopping = supervisor, stopping

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
        return JSONResponse({"detail": _clean(str(exc), store)}, status_code=422)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "workers": supervisor.workers, "running": len(supervisor.running)}

    @app.post("/v1/teachers", status_code=201)
    def upload_teacher(file: UploadFile = File(...), card: UploadFile | None = File(None), name: str | None = Form(None)):
        from datafree.teacher import load_teacher, sniff_format

        teacher_id = uuid.uuid4().hex[:12]
        folder = store.teacher_dir(teacher_id)
        staging = store.root / "teachers" / f".upload-{teacher_id}"
        staging.mkdir()
        try:
            raw = staging / "upload"
            with open(raw, "wb") as f:
                shutil.copyfileobj(file.file, f)
            try:
                fmt = sniff_format(raw)
            except UserError as e:
                raise HTTPException(400, _clean(str(e), store).replace(str(raw), "the upload"))
            if fmt not in TEACHER_SUFFIXES:  # pickle: never loaded, it could run code
                raise HTTPException(400, "pickle files are refused (loading one can run code); upload safetensors + card, .pt2 or TorchScript")
            target = staging / f"teacher{TEACHER_SUFFIXES[fmt]}"
            raw.rename(target)
            if card is not None:
                with open(target.with_suffix(".json"), "wb") as f:
                    shutil.copyfileobj(card.file, f)
            try:
                teacher = load_teacher(target)
            except UserError as e:
                raise HTTPException(400, _clean(str(e), store).replace(str(target), "the upload"))
            info = teacher.describe()
            sha = hashlib.sha256(target.read_bytes()).hexdigest()
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return store.add_teacher(teacher_id, name or file.filename or teacher_id, fmt, sha, (folder / target.name).stat().st_size,
                                 target.name, {k: info.get(k) for k in ("arch", "parameters", "bn_layers", "dataset", "test_accuracy")}
                                 | {"input": teacher.spec.describe(), "classes": teacher.num_classes})

    @app.get("/v1/teachers")
    def list_teachers():
        return [{k: t[k] for k in ("id", "name", "format", "sha256", "size", "info", "created")} for t in store.teachers()]

    @app.post("/v1/jobs", status_code=201)
    def create_job(request: JobRequest):
        config = validate_job(store, request.kind, request.config)
        return public_job(store, store.create_job(request.kind, config))

    @app.get("/v1/jobs")
    def list_jobs():
        return [public_job(store, j) for j in store.jobs()]

    def _job(job_id: str) -> dict:
        job = store.job(job_id) if job_id.isalnum() else None
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str):
        return public_job(store, _job(job_id))

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel_job(job_id: str):
        job = _job(job_id)
        if job["state"] not in ("queued", "running"):
            raise HTTPException(409, f"job {job_id} is already {job['state']}")
        supervisor.cancel(job_id)
        return public_job(store, store.job(job_id))

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        _job(job_id)

        seen = _last_event_id(request)

        async def stream():
            sent_id, sent_at = seen, time.monotonic()
            while not stopping.is_set():
                event_id, text, state = await asyncio.to_thread(events.observe, job_id)
                if sent_id > event_id + 1:  # an id this store never gave (another store, or its numbering lost)
                    sent_id = 0
                if event_id > sent_id:
                    yield f"id: {event_id}\nevent: progress\ndata: {text}\n\n"
                    sent_id, sent_at = event_id, time.monotonic()
                if state in FINAL_STATES:
                    if event_id + 1 > sent_id:
                        yield f"id: {event_id + 1}\nevent: end\ndata: {json.dumps({'state': state})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                if time.monotonic() - sent_at >= KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    sent_at = time.monotonic()
                await asyncio.sleep(min(0.5, KEEPALIVE_S))

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _artifact_root(job: dict) -> Path:
        if job["state"] != "succeeded":
            raise HTTPException(409, f"job {job['id']} is {job['state']}; artifacts are served once it has succeeded")
        return (store.job_dir(job["id"]) / "run").resolve()

    @app.get("/v1/jobs/{job_id}/artifacts")
    def list_artifacts(job_id: str):
        root = _artifact_root(_job(job_id))
        files = sorted(p for p in root.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(root).parts
                       and not p.name.startswith("."))
        return [{"name": p.relative_to(root).as_posix(), "size": p.stat().st_size} for p in files]

    @app.get("/v1/jobs/{job_id}/artifacts/{name:path}")
    def get_artifact(job_id: str, name: str):
        root = _artifact_root(_job(job_id))
        path = (root / name).resolve()
        if not path.is_relative_to(root) or ".." in Path(name).parts or "checkpoints" in Path(name).parts:
            raise HTTPException(400, "artifact names must stay inside the job's folder")
        if not path.is_file() or path.name.startswith("."):
            raise HTTPException(404, f"no artifact {name!r}")
        return FileResponse(path, filename=path.name)

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


def serve(host: str, port: int, store_dir, workers: int, max_upload_mb: int = 200) -> int:
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
    app = create_app(store, workers=workers, max_upload_mb=max_upload_mb)
    print(f"datafree serving on http://{host}:{port} (store {store.root}, {workers} worker(s))", file=sys.stderr, flush=True)
    # connections still open 5 s after the signal are closed: the jobs' checkpoints come first
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    try:
        _stopping_server(config, app.state.stopping).run()
    finally:
        store.close()
    return 0
