"""The supervisor: runs queued jobs as ``datafree`` commands in worker processes, at most N at a time.

Each worker is a child process that dies with the server (``PR_SET_PDEATHSIG``), so a killed
server leaves no job running behind its back. The signal is tied to the *thread* that started the
worker (prctl(2)), so the supervisor thread outlives its workers: on a clean stop it asks each job
to save a checkpoint and stop (SIGINT, as Ctrl-C would), waits for them (``STOP_TIMEOUT_S`` at
most), queues the ones that saved to resume on the next start, and only then ends. On start, jobs
the last server left ``running`` are resumed from their checkpoint when they have one and marked
``interrupted`` otherwise.

Example:
    >>> supervisor = Supervisor(store, workers=1); supervisor.start()   # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import threading
import time

from datafree.service.jobs import command_for, resumable

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 60.0  # on a clean stop, how long running jobs get to save a checkpoint before they are killed


def _die_with_parent():  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    os.setpgrp()


class Supervisor(threading.Thread):
    """Polls the store for queued jobs and runs them; records how each one ended."""

    def __init__(self, store, workers: int = 1, poll: float = 0.5, env: dict | None = None, device: dict | None = None):
        super().__init__(daemon=True, name="datafree-supervisor")
        self.store, self.workers, self.poll = store, max(1, workers), poll
        self.device = device or {}  # the server's accelerator and default precision for the jobs it runs
        self.env = dict(os.environ, **(env or {}))
        self.running: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.recover()

    def recover(self) -> None:
        """Jobs left running (or being cancelled) by a server that died: resume or mark interrupted."""
        for job in self.store.jobs(("running", "cancelling")):
            if job["state"] == "cancelling":
                self.store.update_job(job["id"], state="cancelled", finished=time.time(), note="cancelled while the server was down")
            elif resumable(self.store, job):
                self.store.update_job(job["id"], state="queued", resume=1, note="resumed from its last checkpoint after a server restart")
            else:
                self.store.update_job(job["id"], state="interrupted", finished=time.time(),
                                      error="the server stopped before the job wrote its first checkpoint; submit it again")

    def run(self) -> None:
        while not self.stopping.is_set():
            self._reap()
            while len(self.running) < self.workers:
                job = self.store.claim_next()
                if job is None:
                    break
                self._launch(job)
            self.stopping.wait(self.poll)
        self._drain()  # in this thread: its workers' PR_SET_PDEATHSIG fires when it ends

    def _launch(self, job: dict) -> None:
        folder = self.store.job_dir(job["id"])
        env = dict(self.env, DATAFREE_PROGRESS_FILE=str(folder / "progress.json"), PYTHONUNBUFFERED="1")
        # jobs side by side share the cores: more torch threads than cores makes OpenMP spin and can
        # starve one job almost completely (seen: 8 rounds in 25 s beside a job doing 1,700)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.workers)))
        try:
            argv = command_for(self.store, job, resume=job["resume"], device=self.device)
            with open(folder / "log.txt", "ab") as log:
                log.write(f"\n$ datafree {' '.join(argv[3:])}\n".encode())
                log.flush()
                self.running[job["id"]] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env,
                                                           preexec_fn=_die_with_parent)
        except Exception as e:  # a job that cannot even start fails alone
            self.store.update_job(job["id"], state="failed", finished=time.time(), error=f"could not start: {type(e).__name__}")

    def _reap(self, stopped: bool = False) -> None:
        """Record how each finished worker ended; ``stopped``: the server stopped them, so a job that did not
        succeed is queued to resume from the checkpoint it saved (or marked interrupted without one)."""
        for job_id, proc in list(self.running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.running[job_id]
            job = self.store.job(job_id)
            if job["state"] == "cancelling":
                self.store.update_job(job_id, state="cancelled", finished=time.time())
            elif rc == 0:
                _write_bundle(self.store, job)
                self.store.update_job(job_id, state="succeeded", finished=time.time(), error=None)
            elif stopped and resumable(self.store, job):
                self.store.update_job(job_id, state="queued", resume=1,
                                      note="stopped with the server; resumes from the checkpoint it saved then")
            elif stopped:
                self.store.update_job(job_id, state="interrupted", finished=time.time(),
                                      error="the server stopped before the job wrote a checkpoint; submit it again")
            else:
                self.store.update_job(job_id, state="failed", finished=time.time(), error=_last_error(self.store, job_id, rc))

    def _drain(self) -> None:
        """Ask each running job to save a checkpoint and stop (SIGINT), wait ``STOP_TIMEOUT_S`` at most, record them."""
        for proc in self.running.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.running.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self._reap(stopped=True)

    def cancel(self, job_id: str) -> str:
        """Queued: cancelled at once. Running: SIGINT (the job saves and stops), SIGKILL after 30 s."""
        job = self.store.job(job_id)
        if job["state"] == "queued":
            self.store.update_job(job_id, state="cancelled", finished=time.time())
        elif job["state"] == "running":
            self.store.update_job(job_id, state="cancelling")
            proc = self.running.get(job_id)
            if proc is not None:
                os.killpg(proc.pid, signal.SIGINT)
                threading.Timer(30, lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGKILL)).start()
        return self.store.job(job_id)["state"]

    def stop(self) -> None:
        """Stop taking jobs; each running job saves a checkpoint and stops, to resume on the next start.

        Returns once the workers have ended (``STOP_TIMEOUT_S`` at most, then they are killed).

        Example:
            >>> supervisor.stop()   # doctest: +SKIP
        """
        self.stopping.set()
        if self.is_alive():
            self.join(STOP_TIMEOUT_S + 30)
        else:  # never started: nothing runs
            self._drain()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def _last_error(store, job_id: str, rc: int) -> str:
    """The job's one-sentence error (``datafree: error: ...``) without server paths, or its exit status."""
    log = store.job_dir(job_id) / "log.txt"
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    for line in reversed(lines):
        if line.startswith("datafree: error: "):
            return line.removeprefix("datafree: error: ").replace(str(store.root), "<store>")
    return f"the job stopped with exit status {rc}"


def _write_bundle(store, job: dict) -> None:
    """A zip of a condensed set (images, manifest, safetensors), written whole before the job is marked done."""
    import zipfile

    from datafree.base.io import atomic_path

    run = store.job_dir(job["id"]) / "run"
    if job["kind"] != "condense" or not run.is_dir():
        return
    with atomic_path(run / "condensed.zip") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(run.rglob("*")):
                if path.is_file() and "checkpoints" not in path.parts and path.name != "condensed.zip" and not path.name.startswith("."):
                    z.write(path, path.relative_to(run).as_posix())


def read_progress(store, job_id: str) -> dict:
    path = store.job_dir(job_id) / "progress.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
