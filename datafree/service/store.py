"""The service's store: one folder with an SQLite database (jobs, teachers, token hashes), the uploaded
teachers and each job's folder. One server per store, enforced with an exclusive file lock.

    STORE/
      datafree.db          SQLite (WAL): teachers, jobs, tokens
      server.lock          held (flock) by the running server
      teachers/<id>/       uploaded files, validated on upload
      jobs/<id>/           request.json, log.txt, progress.json, run/ (the command's output folder)

Example:
    >>> import tempfile
    >>> store = Store(Path(tempfile.mkdtemp()) / "store")   # creates it; raises UserError if another server holds it
    >>> job = store.create_job("distill", {"teacher": "t1", "steps": 100})
    >>> store.job(job["id"])["state"]
    'queued'
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from datafree.base.errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS teachers (id TEXT PRIMARY KEY, name TEXT, format TEXT, sha256 TEXT, size INTEGER,
    file TEXT, info TEXT, created REAL);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, kind TEXT, state TEXT, config TEXT, created REAL, started REAL,
    finished REAL, error TEXT, attempts INTEGER DEFAULT 0, resume INTEGER DEFAULT 0, note TEXT);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, created REAL, source TEXT);
"""
TEACHER_SUFFIXES = {"safetensors": ".safetensors", "pt2": ".pt2", "torchscript": ".ts"}
ACTIVE = ("queued", "running", "cancelling")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")


class UploadRefused(UserError):
    """An uploaded teacher that is refused (pickle, unreadable, wrong form): the client's mistake (HTTP 400)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """Jobs and teachers in SQLite; files on disk. Holds the store's lock for its lifetime."""

    def __init__(self, root, lock: bool = True):
        self.root = Path(root).resolve()
        try:
            for sub in ("teachers", "jobs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the store folder {str(root)!r} ({e.strerror})") from None
        self._lock_file = None
        if lock:
            self._lock_file = open(self.root / "server.lock", "a+")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise UserError(f"another datafree server is using the store {str(root)!r}; stop it or choose another --store") from None
            self._lock_file.seek(0)
            self._lock_file.truncate()
            self._lock_file.write(str(os.getpid()))
            self._lock_file.flush()
        with self._db() as db:
            db.executescript(SCHEMA)

    def close(self) -> None:
        if self._lock_file:
            self._lock_file.close()
            self._lock_file = None

    @contextlib.contextmanager
    def _db(self):
        db = sqlite3.connect(self.root / "datafree.db", timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        try:
            yield db
        finally:
            db.close()

    # --- tokens ---------------------------------------------------------------------------------------
    def ensure_token(self, given: str | None) -> str | None:
        """Register ``given`` (DATAFREE_TOKEN) or, on first start, create a token; returns a new token to show once."""
        with self._db() as db:
            if given:
                db.execute("INSERT OR IGNORE INTO tokens VALUES (?, ?, ?)", (hash_token(given), time.time(), "environment"))
                return None
            if db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]:
                return None
            token = secrets.token_urlsafe(32)
            db.execute("INSERT INTO tokens VALUES (?, ?, ?)", (hash_token(token), time.time(), "generated"))
            return token

    def token_valid(self, token: str) -> bool:
        presented = hash_token(token)
        with self._db() as db:
            hashes = [r[0] for r in db.execute("SELECT hash FROM tokens")]
        return any(hmac.compare_digest(presented, h) for h in hashes)

    # --- teachers -------------------------------------------------------------------------------------
    def teacher_dir(self, teacher_id: str) -> Path:
        return self.root / "teachers" / teacher_id

    def add_teacher(self, teacher_id: str, name: str, fmt: str, sha256: str, size: int, file: str, info: dict) -> dict:
        with self._db() as db:
            db.execute("INSERT INTO teachers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (teacher_id, name, fmt, sha256, size, file, json.dumps(info), time.time()))
        return self.teacher(teacher_id)

    def import_teacher(self, upload, card=None, name: str | None = None, filename: str | None = None) -> dict:
        """Store an uploaded teacher (a binary file object, with its JSON card for safetensors) once it
        loads as a teacher; a refused upload raises :class:`UploadRefused` and leaves nothing behind.

        Example:
            >>> with open("assets/teachers/mnist_lenet5.safetensors", "rb") as f, \\
            ...      open("assets/teachers/mnist_lenet5.json", "rb") as card:   # doctest: +SKIP
            ...     store.import_teacher(f, card, name="lenet5")["format"]
            'safetensors'
        """
        from datafree.teachers.formats import load_teacher, sniff_format

        teacher_id = uuid.uuid4().hex[:12]
        folder = self.teacher_dir(teacher_id)
        staging = self.root / "teachers" / f".upload-{teacher_id}"
        staging.mkdir()
        try:
            raw = staging / "upload"
            with open(raw, "wb") as f:
                shutil.copyfileobj(upload, f)
            try:
                fmt = sniff_format(raw)
            except UserError as e:
                raise UploadRefused(self.public_message(str(e)).replace(str(raw), "the upload")) from None
            if fmt not in TEACHER_SUFFIXES:  # pickle: never loaded, it could run code
                raise UploadRefused("pickle files are refused (loading one can run code); upload safetensors + card, .pt2 or TorchScript")
            target = staging / f"teacher{TEACHER_SUFFIXES[fmt]}"
            raw.rename(target)
            if card is not None:
                with open(target.with_suffix(".json"), "wb") as f:
                    shutil.copyfileobj(card, f)
            try:
                teacher = load_teacher(target)
            except UserError as e:
                raise UploadRefused(self.public_message(str(e)).replace(str(target), "the upload")) from None
            info = teacher.describe()
            sha = hashlib.sha256(target.read_bytes()).hexdigest()
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.add_teacher(teacher_id, name or filename or teacher_id, fmt, sha, (folder / target.name).stat().st_size,
                                target.name, {k: info.get(k) for k in ("arch", "parameters", "bn_layers", "dataset", "test_accuracy")}
                                | {"input": teacher.spec.describe(), "classes": teacher.num_classes})

    def public_message(self, message: str) -> str:
        """``message`` without server paths, for a client to see."""
        return message.replace(str(self.root), "<store>").replace(str(Path(tempfile.gettempdir())), "<tmp>")

    def teacher(self, teacher_id: str) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM teachers WHERE id = ?", (teacher_id,)).fetchone()
        return _teacher_row(row) if row else None

    def teachers(self) -> list[dict]:
        with self._db() as db:
            return [_teacher_row(r) for r in db.execute("SELECT * FROM teachers ORDER BY created")]

    # --- jobs -----------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def create_job(self, kind: str, config: dict) -> dict:
        job_id = uuid.uuid4().hex[:12]
        self.job_dir(job_id).mkdir(parents=True)
        with self._db() as db:
            db.execute("INSERT INTO jobs (id, kind, state, config, created) VALUES (?, ?, 'queued', ?, ?)",
                       (job_id, kind, json.dumps(config), time.time()))
        return self.job(job_id)

    def job(self, job_id: str) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_row(row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        jobs = [_job_row(r) for r in rows]
        return [j for j in jobs if states is None or j["state"] in states]

    def update_job(self, job_id: str, **fields) -> None:
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"])
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def claim_next(self) -> dict | None:
        """Atomically move the oldest queued job to running and return it."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 WHERE id = ?",
                       (time.time(), row["id"]))
            db.execute("COMMIT")
        return self.job(row["id"])


def _teacher_row(row) -> dict:
    d = dict(row)
    d["info"] = json.loads(d["info"] or "{}")
    return d


def _job_row(row) -> dict:
    d = dict(row)
    d["config"] = json.loads(d["config"] or "{}")
    d["resume"] = bool(d["resume"])
    return d
