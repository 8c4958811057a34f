"""A job's public record and its server-sent event stream (``GET /v1/jobs/{id}/events``).

Example:
    >>> import tempfile
    >>> from datafree.service.store import Store
    >>> store = Store(tempfile.mkdtemp())
    >>> public_job(store, store.create_job("distill", {}))["state"]
    'queued'
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

from fastapi import Request

from datafree.service.worker import read_progress

# an event stream that has sent nothing for this long sends a ``: keep-alive`` comment line, so that
# proxies and clients do not time out on a quiet job (the environment variable is for tests and proxies)
KEEPALIVE_S = float(os.environ.get("DATAFREE_SSE_KEEPALIVE", "15"))
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")


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


def last_event_id(request: Request) -> int:
    """The ``Last-Event-ID`` a reconnecting client sends (0 when absent or not a number)."""
    value = request.headers.get("last-event-id", "").strip()
    return int(value) if value.isdigit() else 0


async def event_stream(events: JobEvents, job_id: str, seen: int, stopping, request: Request):
    """Server-sent events of one job: a ``progress`` event whenever its public record changes (from
    ``seen``, the client's ``Last-Event-ID``), ``: keep-alive`` comments while it is quiet, and an
    ``end`` event once it is final; it ends early when the client leaves or the server stops."""
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
