"""Benchmark glibc malloc's settings (datafree.base.runtime.tune_allocator) against the system's, job by job.

    DATAFREE_DATA=../shared/data python scripts/bench_allocator.py --seconds 60

Each job runs twice as its own ``datafree`` process, one after the other: with the thresholds the
project sets, and with ``DATAFREE_SYSTEM_MALLOC=1`` (glibc's defaults). The time-budgeted jobs
(condensation, distillation) report the work done in the same wall-clock budget; the evaluation
reports the wall-clock time of the same work. Prints a table, writes ``bench/allocator.json`` and
the table into ``BENCHMARKS.md``. Run it alone: two torch processes on 2 cores slow each other.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_block  # noqa: E402

SETTINGS = {"tuned (datafree)": {}, "glibc defaults": {"DATAFREE_SYSTEM_MALLOC": "1"}}


def jobs(seconds: int, work: Path, transfer: str | None = None) -> list[dict]:
    """The jobs: a name, the command's arguments, and how to read the work it did from its JSON output."""
    condense = ["condense", "--source", "mnist", "--ipc", "10", "--time-budget", f"{seconds}s", "--no-progress",
                "--overwrite"]
    data_free = [{"job": f"condense dm, data-free ipc 10 (transfer set of {transfer})",
                  "args": [*condense[:1], "--source", transfer, *condense[3:], "--method", "dm", "--out", str(work / "dm-data-free")],
                  "measure": "steps", "read": lambda out: out["iterations"]}] if transfer else []
    return data_free + [
        {"job": "condense dm, MNIST ipc 10", "args": [*condense, "--method", "dm", "--out", str(work / "dm")],
         "measure": "steps", "read": lambda out: out["iterations"]},
        {"job": "condense gm_pool, MNIST ipc 10", "args": [*condense, "--method", "gm_pool", "--out", str(work / "gm_pool")],
         "measure": "steps", "read": lambda out: out["iterations"]},
        {"job": "distill, shipped LeNet-5 (default preset)",
         "args": ["distill", "--time-budget", f"{seconds}s", "--no-eval", "--no-progress", "--overwrite", "--out", str(work / "distill")],
         "measure": "rounds", "read": lambda out: out["steps"]},
        {"job": "evaluate-set, 1 ConvNet x 30 epochs (fixed protocol)",
         "args": ["evaluate-set", str(work / "dm"), "--models", "1", "--epochs", "30", "--no-progress"],
         "measure": "seconds", "read": None},
    ]


def run(args: list[str], extra_env: dict) -> tuple[str, float]:
    """One ``datafree`` command in a process of its own: its standard output and wall-clock seconds."""
    env = {k: v for k, v in os.environ.items() if k != "DATAFREE_SYSTEM_MALLOC"} | extra_env
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "datafree.cli", *args], env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"datafree {' '.join(args[:1])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="wall-clock budget of each time-budgeted job")
    parser.add_argument("--transfer", help="a distill run folder: add a data-free condensation of its transfer set")
    parser.add_argument("--only", help="run only the jobs whose name contains this")
    parser.add_argument("--out", default=str(ROOT / "bench" / "allocator.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs(args.seconds, Path(tmp), args.transfer):
            if args.only and args.only not in job["job"]:
                continue
            row = {"job": job["job"], "measure": job["measure"]}
            for name, env in SETTINGS.items():
                out, seconds = run(job["args"], env)
                row[name] = round(seconds, 1) if job["read"] is None else job["read"](json.loads(out))
                print(f"{job['job']}: {name}: {row[name]} {job['measure']}", flush=True)
            tuned, system = row["tuned (datafree)"], row["glibc defaults"]
            row["speed-up"] = round(system / tuned if job["read"] is None else tuned / system, 2)
            rows.append(row)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    command = f"python scripts/bench_allocator.py {' '.join(sys.argv[1:])}"
    lines = [f"Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}. Budget of the timed jobs: {args.seconds} s. "
             f"Command: `{command}`", "",
             "| job | measure | tuned (datafree) | glibc defaults | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['job']} | {r['measure']} | {r['tuned (datafree)']} | {r['glibc defaults']} | {r['speed-up']}x |" for r in rows]
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps({"command": command, "machine": machine, "date": time.strftime("%Y-%m-%d"), "seconds": args.seconds,
                                          "rows": rows}, indent=2) + "\n")
    write_block(Path(args.out).stem.replace("_", "-"), "\n".join(lines), "Speed on a CPU: the memory allocator")


if __name__ == "__main__":
    main()
