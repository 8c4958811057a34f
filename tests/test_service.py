"""The HTTP job service, against live servers on 127.0.0.1 started by these tests (httpx as the client)."""
import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import ROOT, TEACHERS

TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY_DISTILL = {"preset": "dfq", "batch_size": 32, "student_batch": 32, "student_steps": 2, "pool_size": 256,
                "eval_every": 5, "checkpoint_every": 5, "grid_every": 50, "holdout_every": 5,
                "generator_kwargs": {"latent_dim": 16, "width": 8}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(store: Path, port: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    """``datafree serve`` on ``store`` in a new process (not waited for); its output goes to a log next to the store.
    (Its jobs inherit OMP_NUM_THREADS from the test session: one torch thread each, see ../conftest.py.)"""
    env = dict(os.environ, DATAFREE_TOKEN=TOKEN)
    log_path = store.parent / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "datafree.cli", "serve", "--port", str(port), "--store", str(store), *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, log_path


class Server:
    started: list["Server"] = []  # every server a test started: one left running is stopped after its test

    def __init__(self, store: Path, *extra: str):
        self.store, self.port = store, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc, self.log_path = _serve(store, self.port, *extra)
        Server.started.append(self)  # before waiting for it: one that never answers is stopped too
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        self.client = httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def stop(self, sig=signal.SIGTERM):
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    """A test that fails half way leaves no server (and its jobs) running for the rest of the session."""
    before = len(Server.started)
    yield
    for left in Server.started[before:]:
        if left.proc.poll() is None:
            left.stop(signal.SIGKILL)
    del Server.started[before:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("svc") / "store", "--max-upload-mb", "2", "--workers", "3")  # jobs run side by side
    yield s
    s.stop()


def _upload(client, path: Path, card: Path | None = None):
    files = {"file": (path.name, path.read_bytes())}
    if card is not None:
        files["card"] = (card.name, card.read_bytes())
    return client.post("/v1/teachers", files=files, data={"name": path.stem})


@pytest.fixture(scope="module")
def teacher_id(server):
    r = _upload(server.client, TEACHERS / "mnist_lenet5.safetensors", TEACHERS / "mnist_lenet5.json")
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(client, job_id, states=("succeeded", "failed", "cancelled", "interrupted"), timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def test_health_needs_no_token_but_everything_else_does(server):
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(server.url + "/v1/jobs").status_code == 401
    assert httpx.get(server.url + "/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/openapi.json", headers=AUTH).json()["info"]["title"] == "datafree"


def test_token_is_stored_hashed(server):
    db = sqlite3.connect(server.store / "datafree.db")
    hashes = [r[0] for r in db.execute("SELECT hash FROM tokens")]
    assert hashlib.sha256(TOKEN.encode()).hexdigest() in hashes and TOKEN not in hashes


def test_upload_and_list_teachers(server, teacher_id):
    listed = server.client.get("/v1/teachers").json()
    mine = next(t for t in listed if t["id"] == teacher_id)
    assert mine["format"] == "safetensors" and mine["info"]["arch"] == "lenet5" and mine["info"]["input"] == "1x28x28"
    assert "path" not in json.dumps(listed) and str(server.store) not in json.dumps(listed)


def test_bad_uploads(server, tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    r = _upload(server.client, evil)
    assert r.status_code == 400 and "pickle" in r.json()["detail"]
    torch.save({"w": torch.zeros(3)}, tmp_path / "zip_pickle.pt")
    assert _upload(server.client, tmp_path / "zip_pickle.pt").status_code == 400
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    r = _upload(server.client, big)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    r = _upload(server.client, junk)
    assert r.status_code == 400 and str(tmp_path) not in r.text and str(server.store) not in r.text


def test_malformed_job_requests_name_the_field(server, teacher_id):
    r = server.client.post("/v1/jobs", json={"kind": "distill", "config": {"teacher": teacher_id, "stepz": 5}})
    assert r.status_code == 422 and "stepz" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "distill", "config": {"teacher": teacher_id, "steps": "many"}})
    assert r.status_code == 422 and "steps" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "distill", "config": {"teacher": "nope"}})
    assert r.status_code == 422 and "teacher" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "distill", "config": {"teacher": teacher_id, "out": "/etc"}})
    assert r.status_code == 422 and "out" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "condense", "config": {"source": "../../etc", "ipc": 1}})
    assert r.status_code == 422 and "source" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "condense", "config": {"source": "mnist", "dp_epsilon": 0}})
    assert r.status_code == 422 and "dp_epsilon" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "audit", "config": {"job": "0123456789ab", "members": "mnist"}})
    assert r.status_code == 422 and "job" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "mine-bitcoin", "config": {}})
    assert r.status_code == 422 and "kind" in r.json()["detail"]
    r = server.client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert server.client.get("/v1/jobs/doesnotexist").status_code == 404


@pytest.fixture(scope="module")
def mnist_condensation(server):
    """The id of a condense job of real MNIST digits (None without the real data), for the derived-jobs test; submitted
    before the distill job below, so that it runs beside it."""
    from conftest import _real_data_reason

    if _real_data_reason():  # the test that uses it is skipped then
        return None
    r = server.client.post("/v1/jobs", json={"kind": "condense", "config": {
        "source": "mnist", "ipc": 1, "method": "dm", "steps": 2, "net_width": 8, "real_per_class": 4}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def finished_distill(server, teacher_id, mnist_condensation):
    r = server.client.post("/v1/jobs", json={"kind": "distill", "config": {"teacher": teacher_id, "steps": 12, **TINY_DISTILL}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    events = []
    with server.client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return job_id, events


def test_distill_job_end_to_end(server, finished_distill, tmp_path):
    job_id, events = finished_distill
    assert events[-1] == {"state": "succeeded"}, events[-3:]
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 1.0
    job = server.client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["progress"] == 1.0
    names = {a["name"] for a in server.client.get(f"/v1/jobs/{job_id}/artifacts").json()}
    assert {"student.safetensors", "student.json", "student.pt2", "transfer.safetensors", "report.html"} <= names
    assert not any("checkpoints" in n for n in names)
    for name in ("student.safetensors", "student.json", "student.pt2"):
        r = server.client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert r.status_code == 200
        (tmp_path / name).write_bytes(r.content)
    from datafree.teachers.formats import load_model

    model, card = load_model(tmp_path / "student.safetensors")
    program = torch.export.load(str(tmp_path / "student.pt2")).module()
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(program(x).argmax(1), model((x - 0.1307) / 0.3081).argmax(1))


def test_compress_job_validates_then_runs(server, teacher_id):
    """A compress job: its config in the command's words, refusals naming the field, then the handoff as artifacts."""
    program = _upload(server.client, ROOT / "assets" / "suite" / "mnist_owner_resgap.pt2")
    assert program.status_code == 201, program.text
    stored = program.json()["id"]
    for config, words in (({"teacher": stored}, f"teacher {stored!r} is a torch.export .pt2 program"),
                          ({"teacher": teacher_id, "sparsity": 2}, "sparsity"),
                          ({"teacher": teacher_id, "out": "/tmp"}, "'out' is set by the server"),
                          ({"teacher": teacher_id, "sparsity": 0.5, "target_macs": "2x"}, "not both"),
                          ({"teacher": "nope"}, "teacher")):
        r = server.client.post("/v1/jobs", json={"kind": "compress", "config": config})
        assert r.status_code == 422 and words in r.json()["detail"], (config, r.text)
        assert str(server.store) not in r.text
    schema = server.client.get("/openapi.json").json()
    assert "compress" in json.dumps(schema)
    r = server.client.post("/v1/jobs", json={"kind": "compress", "config": {
        "teacher": teacher_id, "target_macs": "2x", "steps": 4, "precision": "fp32", "int8": False}})
    assert r.status_code == 201, r.text
    job = _wait(server.client, r.json()["id"])
    assert job["state"] == "succeeded", job
    names = {a["name"] for a in server.client.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert {"compress.json", "COMPRESS.md", "handoff/student.onnx", "handoff/student.pt2", "pruned.safetensors"} <= names
    assert "handoff/student_int8.pt2" not in names  # int8 off, as asked
    summary = server.client.get(f"/v1/jobs/{job['id']}/artifacts/compress.json").json()
    assert [row["stage"] for row in summary["stages"]] == ["teacher", "pruned", "recovered"]
    assert summary["pruning"]["macs_ratio"] >= 2 and "test_accuracy" not in summary["stages"][0]  # no eval_data: none read


def test_artifact_names_cannot_escape(server, finished_distill):
    job_id, _ = finished_distill
    for name in ("../../datafree.db", "..%2F..%2Fdatafree.db", "checkpoints/last.ckpt", "/etc/passwd"):
        r = server.client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
        assert r.status_code in (400, 404), (name, r.status_code)
        assert b"SQLite" not in r.content and b"root:" not in r.content


@pytest.mark.real_data
def test_derived_jobs_audit_export_condense(server, finished_distill, mnist_condensation):
    distill_id, _ = finished_distill
    condense = {"id": mnist_condensation}  # submitted with the distill job
    audit = server.client.post("/v1/jobs", json={"kind": "audit", "config": {"job": distill_id}}).json()
    r = server.client.post("/v1/jobs", json={"kind": "audit", "config": {"job": distill_id, "members": "mnist"}})
    assert r.status_code == 422 and "membership" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "audit", "config": {"job": distill_id, "membership": True, "members": "mnist"}})
    assert r.status_code == 422 and "non-members" in r.json()["detail"]
    r = server.client.post("/v1/jobs", json={"kind": "audit", "config": {"job": distill_id, "membership": True, "members": "mnist",
                                                                         "non_members": "mnist:test", "reference_data": "mnist:val"}})
    assert r.status_code == 422 and "unknown split 'val'" in r.json()["detail"]
    membership = server.client.post("/v1/jobs", json={"kind": "audit", "config": {
        "job": distill_id, "membership": True, "members": "mnist", "non_members": "mnist:test", "samples": 100, "references": 1}}).json()
    export = server.client.post("/v1/jobs", json={"kind": "export", "config": {"job": distill_id}}).json()
    r = server.client.post("/v1/jobs", json={"kind": "condense", "config": {"source": "job:0123456789ab", "ipc": 1}})
    assert r.status_code == 422 and "source" in r.json()["detail"]
    assert _wait(server.client, condense["id"])["state"] == "succeeded", server.client.get(f"/v1/jobs/{condense['id']}").json()
    evaluate = server.client.post("/v1/jobs", json={"kind": "evaluate", "config": {  # runs beside audit and export
        "job": condense["id"], "arch": "lenet5", "models": 2, "epochs": 60}}).json()
    for job in (audit, export):
        assert _wait(server.client, job["id"])["state"] == "succeeded", server.client.get(f"/v1/jobs/{job['id']}").json()
    report = server.client.get(f"/v1/jobs/{audit['id']}/artifacts/audit.json").json()
    assert report["schema"] == "datafree-audit/1"
    assert _wait(server.client, membership["id"])["state"] == "succeeded", server.client.get(f"/v1/jobs/{membership['id']}").json()
    attacked = server.client.get(f"/v1/jobs/{membership['id']}/artifacts/membership.json").json()
    assert attacked["kind"] == "distill run's student" and set(attacked["attacks"]) == {"loss", "lira"}
    assert attacked["reference_models"]["drawn_from"] == "the members and non-members not audited"
    card = server.client.get(f"/v1/jobs/{export['id']}/artifacts/model_card.json").json()
    assert card["latency_ms"]["batch_1"] > 0
    import zipfile

    z = zipfile.ZipFile(io.BytesIO(server.client.get(f"/v1/jobs/{condense['id']}/artifacts/condensed.zip").content))
    assert {"dataset.safetensors", "manifest.json", "train/metadata.jsonl"} <= set(z.namelist())
    assert server.client.post(f"/v1/jobs/{audit['id']}/cancel").status_code == 409
    assert _wait(server.client, evaluate["id"])["state"] == "succeeded"
    result = server.client.get(f"/v1/jobs/{evaluate['id']}/artifacts/evaluation.json").json()
    assert result["protocol"]["arch"] == "lenet5" and result["protocol"]["models"] == 2 and result["protocol"]["epochs"] == 60
    assert result["set"] == "dm" and result["ipc"] == 1
    accuracies = result["accuracies"]
    assert len(accuracies) == 2 and len(set(accuracies)) == 2  # two fresh networks, two different results
    assert result["mean"] == pytest.approx(sum(accuracies) / 2, abs=0.01)
    assert result["std"] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5, abs=0.01)
    # ten real digits, one a class, trained for 60 epochs: clearly above the 10% of chance on the real test set
    assert min(accuracies) > 25


def test_concurrent_status_requests_while_a_job_runs(server, teacher_id):
    job = server.client.post("/v1/jobs", json={"kind": "distill", "config": {
        "teacher": teacher_id, "steps": 100000, "time_budget": "2m", **TINY_DISTILL}}).json()
    _wait(server.client, job["id"], states=("running",), timeout=120)

    def status(_):
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
            return c.get(f"/v1/jobs/{job['id']}").status_code

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(status, range(50)))
    assert codes == [200] * 50
    r = server.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert _wait(server.client, job["id"])["state"] == "cancelled"


def test_sigkill_mid_job_then_restart_resumes_and_keeps_everything(tmp_path):
    """After a SIGKILL of the server, a job with a checkpoint continues from it (its earlier rounds are not recomputed),
    a running job without one is marked interrupted with the reason, and finished jobs are untouched."""
    store = tmp_path / "store"
    first = Server(store, "--workers", "2")
    refused, refused_log = _serve(store, _free_port())  # a second server on the same store, checked below while a job runs
    tid = _upload(first.client, TEACHERS / "mnist_lenet5.safetensors", TEACHERS / "mnist_lenet5.json").json()["id"]
    done = first.client.post("/v1/jobs", json={"kind": "distill", "config": {"teacher": tid, "steps": 4, **TINY_DISTILL}}).json()
    try:
        refused.wait(timeout=120)
    except subprocess.TimeoutExpired:
        refused.kill()
        raise AssertionError("a second server on the same store did not refuse to start") from None
    assert refused.returncode != 0 and "another datafree server" in refused_log.read_text()  # it refused to start
    assert _wait(first.client, done["id"])["state"] == "succeeded"
    kept = {p: p.read_bytes() for p in (store / "jobs" / done["id"] / "run").rglob("*") if p.is_file()}
    job = first.client.post("/v1/jobs", json={"kind": "distill", "config": {
        "teacher": tid, "steps": 80, **TINY_DISTILL}}).json()  # steps, not a time budget: a loaded machine must not end it early
    unsaved = first.client.post("/v1/jobs", json={"kind": "distill", "config": {  # never reaches a checkpoint
        "teacher": tid, "steps": 100000, "time_budget": "10m", **TINY_DISTILL, "checkpoint_every": 100000}}).json()
    run = store / "jobs" / job["id"] / "run"
    metrics = run / "metrics.jsonl"

    def logged_rounds():
        try:
            return [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"kind": "round"' in l]
        except (OSError, ValueError):
            return []

    deadline = time.monotonic() + 180
    while not any(step >= 21 for step in logged_rounds()) and time.monotonic() < deadline:  # checkpoints at 5, 10, 15, 20
        time.sleep(0.2)
    assert _wait(first.client, unsaved["id"], states=("running",), timeout=5)["state"] == "running"
    first.stop(signal.SIGKILL)
    time.sleep(1)
    worker_alive = subprocess.run(["pgrep", "-f", f"jobs/{job['id']}"], capture_output=True).returncode == 0
    assert not worker_alive  # the worker died with the server
    assert sqlite3.connect(store / "datafree.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    saved = int(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["datafree"]["rounds"])
    assert saved >= 20
    before = [l for l in metrics.read_text().splitlines()[:-1] if json.loads(l)["step"] <= saved]  # the last line may be cut
    assert not (store / "jobs" / unsaved["id"] / "run" / "checkpoints" / "last.ckpt").exists()

    second = Server(store)
    try:
        resumed = _wait(second.client, job["id"])
        assert resumed["state"] == "succeeded" and resumed["attempts"] == 2 and "resumed" in resumed["note"]
        summary = second.client.get(f"/v1/jobs/{job['id']}/artifacts/summary.json").json()
        assert summary["steps"] > saved  # went on past the checkpoint it resumed from
        after = metrics.read_text().splitlines()
        # the rounds up to the checkpoint are the killed run's own lines (their timings too): kept, not recomputed ...
        assert after[:len(before)] == before
        # ... and the resumed run logged only rounds after the checkpoint: no round is logged twice
        for kind in ("round", "eval"):
            steps = [json.loads(l)["step"] for l in after if json.loads(l)["kind"] == kind]
            assert steps == sorted(set(steps)) and steps[-1] > saved, kind
        interrupted = second.client.get(f"/v1/jobs/{unsaved['id']}").json()
        assert interrupted["state"] == "interrupted" and interrupted["attempts"] == 1 and interrupted["finished"]
        assert "before the job wrote its first checkpoint" in interrupted["error"]
        assert {p: p.read_bytes() for p in kept} == kept  # the finished job's artifacts are untouched
        assert second.client.get(f"/v1/jobs/{done['id']}").json()["state"] == "succeeded"
    finally:
        second.stop()


# --- the event stream: keep-alive, ids, Last-Event-ID --------------------------------------------------
@pytest.fixture
def quiet_server(tmp_path, monkeypatch):
    """The app in this process over a store without workers: a job stays as the test leaves it, so its stream is quiet."""
    import threading

    import uvicorn

    from datafree.service import events as service_events
    from datafree.service.app import create_app
    from datafree.service.store import Store

    monkeypatch.setattr(service_events, "KEEPALIVE_S", 0.5)
    store = Store(tmp_path / "store")
    store.ensure_token(TOKEN)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(store, start_workers=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10)
    try:
        yield store, client
    finally:
        client.close()
        server.should_exit = True
        thread.join(30)
        store.close()


def _sse(lines, deadline: float, comments: bool = False):
    """Server-sent events as dicts ({"id", "event", "data"}; a comment line as {"comment": text}), until ``deadline``."""
    event = {}
    for line in lines:
        assert time.monotonic() < deadline, "the stream went on past the test's deadline"
        if line.startswith(":"):
            if comments:
                yield {"comment": line[1:].strip(), "at": time.monotonic()}
        elif not line:
            if event:
                yield event
            event = {}
        else:
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")


def test_event_stream_sends_keep_alive_on_a_quiet_job(quiet_server):
    store, client = quiet_server
    job = store.create_job("distill", {})  # queued, and no worker will take it: nothing changes
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=5) as r:
        items = _sse(r.iter_lines(), time.monotonic() + 10, comments=True)
        first = next(items)
        assert first["event"] == "progress" and json.loads(first["data"])["state"] == "queued"
        since = time.monotonic()
        beats = [next(items), next(items)]
    assert [b.get("comment") for b in beats] == ["keep-alive", "keep-alive"]
    # KEEPALIVE_S is 0.5 here: a keep-alive at least every 0.5 s (+ one poll), not only after the default 15 s
    assert beats[0]["at"] - since < 1.5 and beats[1]["at"] - beats[0]["at"] < 1.5


def test_event_ids_increase_and_last_event_id_resumes(quiet_server):
    from datafree.service.events import JobEvents

    store, client = quiet_server
    job = store.create_job("distill", {})
    url = f"/v1/jobs/{job['id']}/events"
    seen = []
    with client.stream("GET", url) as r:
        events = _sse(r.iter_lines(), time.monotonic() + 20)
        seen.append(next(events))  # queued
        store.update_job(job["id"], state="running")
        seen.append(next(events))
        (store.job_dir(job["id"]) / "progress.json").write_text(json.dumps({"fraction": 0.5, "eta_s": 3.0}))
        seen.append(next(events))
        store.update_job(job["id"], state="succeeded")
        seen += list(events)  # the final record, then the end
    assert [e["event"] for e in seen] == ["progress"] * 4 + ["end"]
    assert [json.loads(e["data"]).get("progress") for e in seen[:4]] == [0.0, 0.0, 0.5, 1.0]
    ids = [int(e["id"]) for e in seen]
    assert ids == sorted(set(ids))

    def reconnect(last_id=None):
        headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
        with client.stream("GET", url, headers=headers) as r:
            return list(_sse(r.iter_lines(), time.monotonic() + 20))

    assert reconnect(ids[2]) == seen[3:]  # only what came after the last event the client saw
    assert reconnect(ids[3]) == seen[4:]
    assert reconnect(ids[4]) == []  # it saw the end: nothing again
    assert reconnect() == seen[3:]  # a new client: the current record and the end
    assert reconnect(10 ** 9) == seen[3:]  # an id this store never gave is ignored
    assert JobEvents(store).observe(job["id"])[0] == ids[3]  # the numbering outlives the server


# --- clean shutdown -------------------------------------------------------------------------------------
def test_sigterm_mid_job_saves_then_restart_resumes_where_it_stopped(tmp_path):
    """SIGTERM to the server: the running job saves a checkpoint at that moment (none was due), the server exits 0,
    and the next start resumes the job from that checkpoint, not from its beginning."""
    store = tmp_path / "store"
    first = Server(store)
    tid = _upload(first.client, TEACHERS / "mnist_lenet5.safetensors", TEACHERS / "mnist_lenet5.json").json()["id"]
    # long enough to be stopped mid-job: the stop comes a few rounds after the 5th (a round takes ~0.1 s here alone,
    # and the metrics line of round 5 is written as that round ends, unlike the progress file, written every second)
    steps = 100
    job = first.client.post("/v1/jobs", json={"kind": "distill", "config": {
        "teacher": tid, "steps": steps, **TINY_DISTILL, "checkpoint_every": 100000}}).json()
    folder = store / "jobs" / job["id"]
    metrics, ckpt = folder / "run" / "metrics.jsonl", folder / "run" / "checkpoints" / "last.ckpt"

    def rounds_logged():  # the last round with a metrics line (eval_every 5: a line at round 5, 10, ...)
        try:
            return max((json.loads(l)["step"] for l in metrics.read_text().splitlines()), default=0)
        except (OSError, ValueError, KeyError):
            return 0

    deadline = time.monotonic() + 120
    while rounds_logged() < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped_at = rounds_logged()
    assert 5 <= stopped_at < steps and not ckpt.exists()  # mid-job, and no periodic checkpoint was due
    first.stop(signal.SIGTERM)
    assert first.proc.returncode == 0, first.log_path.read_text()[-2000:]
    saved = int(torch.load(ckpt, weights_only=True)["datafree"]["rounds"])
    assert stopped_at <= saved < steps  # saved where it stopped: the round running at the signal at most
    row = sqlite3.connect(store / "datafree.db").execute("SELECT state, resume FROM jobs WHERE id = ?", (job["id"],)).fetchone()
    assert tuple(row) == ("queued", 1)
    before = [l for l in metrics.read_text().splitlines() if json.loads(l)["step"] <= saved]

    second = Server(store)
    try:
        resumed = _wait(second.client, job["id"], timeout=120)
        assert resumed["state"] == "succeeded" and resumed["attempts"] == 2 and "checkpoint it saved" in resumed["note"]
        assert "--resume" in (folder / "log.txt").read_text()
        after = metrics.read_text().splitlines()
        assert after[:len(before)] == before  # the rounds up to the stop are the first run's own ...
        for kind in ("round", "eval"):  # ... and none was run again (round 1 would be logged twice)
            logged = [json.loads(l)["step"] for l in after if json.loads(l)["kind"] == kind]
            assert logged == sorted(set(logged)) and logged[-1] == steps, kind
        assert second.client.get(f"/v1/jobs/{job['id']}/artifacts/summary.json").json()["steps"] == steps
    finally:
        second.stop()
