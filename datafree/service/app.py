"""The HTTP job API (FastAPI). Every endpoint but ``/healthz`` needs ``Authorization: Bearer TOKEN``.

    POST /v1/teachers                      multipart: file (+ card for safetensors), name
    GET  /v1/teachers
    POST /v1/jobs                          {"kind": "distill", "config": {...}}
    GET  /v1/jobs                          GET /v1/jobs/{id}
    GET  /v1/jobs/{id}/events              server-sent events until the job ends
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
import shutil
import tempfile
import uuid
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel

from datafree.errors import UserError
from datafree.service.jobs import validate_job
from datafree.service.worker import Supervisor, read_progress

MB = 1024 * 1024
TEACHER_SUFFIXES = {"safetensors": ".safetensors", "pt2": ".pt2", "torchscript": ".ts"}


class JobRequest(BaseModel):
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


def create_app(store, workers: int = 1, max_upload_mb: int = 200, max_json_kb: int = 256, start_workers: bool = True) -> FastAPI:
    """The application over ``store``; starts the worker supervisor unless ``start_workers`` is False."""
    supervisor = Supervisor(store, workers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_workers:
            supervisor.start()
        yield
        supervisor.stop()

    app = FastAPI(title="datafree", version="1", description="Data-free distillation and condensation jobs.", lifespan=lifespan)
    app.state.supervisor = supervisor

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

        async def stream():
            last = None
            while True:
                job = await asyncio.to_thread(store.job, job_id)
                record = public_job(store, job)
                text = json.dumps(record)
                if text != last:
                    yield f"event: progress\ndata: {text}\n\n"
                    last = text
                if job["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
                    yield f"event: end\ndata: {json.dumps({'state': job['state']})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

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


def serve(host: str, port: int, store_dir, workers: int, max_upload_mb: int = 200) -> int:
    """Run the server until interrupted (the ``datafree serve`` command)."""
    import os
    import sys

    import uvicorn

    from datafree.service.store import Store

    store = Store(store_dir)
    token = store.ensure_token(os.environ.get("DATAFREE_TOKEN"))
    if token:
        print(f"API token (shown once; it is stored hashed): {token}", file=sys.stderr, flush=True)
    app = create_app(store, workers=workers, max_upload_mb=max_upload_mb)
    print(f"datafree serving on http://{host}:{port} (store {store.root}, {workers} worker(s))", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        store.close()
    return 0
