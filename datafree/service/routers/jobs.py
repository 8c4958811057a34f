"""``/v1/jobs``: submit, list, follow (server-sent events), cancel, and fetch a job's artifacts.

Example:
    >>> app.include_router(router)   # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from datafree.service.events import event_stream, last_event_id, public_job
from datafree.service.jobs import validate_job

router = APIRouter(prefix="/v1/jobs")


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


def _job(request: Request, job_id: str) -> dict:
    store = request.app.state.store
    job = store.job(job_id) if job_id.isalnum() else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


@router.post("", status_code=201)
def create_job(job: JobRequest, request: Request):
    store = request.app.state.store
    config = validate_job(store, job.kind, job.config)
    return public_job(store, store.create_job(job.kind, config))


@router.get("")
def list_jobs(request: Request):
    store = request.app.state.store
    return [public_job(store, j) for j in store.jobs()]


@router.get("/{job_id}")
def get_job(job_id: str, request: Request):
    return public_job(request.app.state.store, _job(request, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, request: Request):
    job = _job(request, job_id)
    if job["state"] not in ("queued", "running"):
        raise HTTPException(409, f"job {job_id} is already {job['state']}")
    request.app.state.supervisor.cancel(job_id)
    return public_job(request.app.state.store, request.app.state.store.job(job_id))


@router.get("/{job_id}/events")
async def job_events(job_id: str, request: Request):
    _job(request, job_id)
    state = request.app.state
    stream = event_stream(state.events, job_id, last_event_id(request), state.stopping, request)
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _artifact_root(request: Request, job: dict) -> Path:
    if job["state"] != "succeeded":
        raise HTTPException(409, f"job {job['id']} is {job['state']}; artifacts are served once it has succeeded")
    return (request.app.state.store.job_dir(job["id"]) / "run").resolve()


@router.get("/{job_id}/artifacts")
def list_artifacts(job_id: str, request: Request):
    root = _artifact_root(request, _job(request, job_id))
    files = sorted(p for p in root.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(root).parts
                   and not p.name.startswith("."))
    return [{"name": p.relative_to(root).as_posix(), "size": p.stat().st_size} for p in files]


@router.get("/{job_id}/artifacts/{name:path}")
def get_artifact(job_id: str, name: str, request: Request):
    root = _artifact_root(request, _job(request, job_id))
    path = (root / name).resolve()
    if not path.is_relative_to(root) or ".." in Path(name).parts or "checkpoints" in Path(name).parts:
        raise HTTPException(400, "artifact names must stay inside the job's folder")
    if not path.is_file() or path.name.startswith("."):
        raise HTTPException(404, f"no artifact {name!r}")
    return FileResponse(path, filename=path.name)
