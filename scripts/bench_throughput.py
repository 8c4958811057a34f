"""Throughput of data-free distillation: the teacher pass against the machine's peak, and rounds per
minute of the default job against an earlier commit, in one invocation.

    python scripts/bench_throughput.py --baseline-tree /tmp/base --budget 120

1. **Teacher pass** (forward and backward to the images, batch 256, the synthesis step's pattern) of
   each suite teacher in every precision and layout ``--precision auto`` weighs, with the choice
   ``datafree.base.precision.choose`` makes, its GFLOP/s (FLOPs counted by torch's FlopCounterMode
   on the fp32 pass) and that as a share of the machine's matmul peak at the same precision
   (a 2048 x 2048 matmul, 1024 for a slow dtype, measured in the same run).
2. **Rounds per minute** of ``datafree distill --teacher T --time-budget B`` (the defaults) with this
   tree and with ``--baseline-tree`` (a checkout of the commit to compare with, e.g. made by
   ``git worktree add /tmp/base HEAD~1``), one after the other, each alone.

Prints the tables, writes ``bench/throughput.json`` and the tables into BENCHMARKS.md. Run it alone:
two torch processes on 2 cores slow each other.
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

PASS_TEACHERS = ["mnist_lenet5", "fmnist_convnet", "mnist_convnet_in", "mnist_resnet20", "mnist_owner_resgap", "fmnist_resnet8"]
ROUND_TEACHERS = ["mnist_lenet5", "mnist_resnet20", "mnist_owner_resgap"]


def suite() -> dict[str, dict]:
    return {m["name"]: m for m in json.loads((ROOT / "assets" / "suite" / "suite.json").read_text())["members"]}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> tuple[float, int]:
    """GFLOP/s of an n x n matmul in ``dtype`` (the best of ``repeats``) and the n used: a dtype
    that runs under 20 GFLOP/s at 512 (bf16 without native support: about 1 here) is measured at
    1024 once, as 2048 would take minutes."""
    small = torch.randn(512, 512, dtype=dtype)
    small @ small
    if 2 * 512 ** 3 / _seconds(lambda: small @ small) / 1e9 < 20:
        n, repeats = 1024, 1
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9, n


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def teacher_pass_rows(names: list[str], batch: int) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    from datafree.base.precision import Precision, choose, time_step
    from datafree.teachers.formats import load_teacher

    members, rows = suite(), []
    for name in names:
        member = members[name]
        teacher = load_teacher(ROOT / member["file"], input_spec=member.get("input_spec"))
        images = torch.randn(batch, *teacher.input_shape, generator=torch.Generator().manual_seed(0))

        def step(p: Precision):
            x = images.clone().requires_grad_(True)
            with p.autocast("cpu"):
                logits = teacher.forward_with_features(p.images(x))[1]
            logits.float().logsumexp(1).sum().backward()

        flops = None
        try:
            with FlopCounterMode(display=False) as counter:
                step(Precision())
            flops = counter.get_total_flops() or None
        except Exception:  # a TorchScript teacher runs outside the dispatcher's modes
            flops = None
        ms, failed = {}, {}
        for option in (Precision(d, cl) for d in ("fp32", "bf16") for cl in (False, True)):  # also what auto skips here
            try:
                ms[option.describe()] = round(1000 * time_step(lambda: step(option), "cpu", repeats=5), 2)
            except (RuntimeError, NotImplementedError) as e:
                failed[option.describe()] = str(e).splitlines()[0][:200]
        chosen, measured = choose("auto", "cpu", step, repeats=5)
        ms_auto = measured["ms"]
        rows.append({"teacher": name, "form": member["form"], "gflop_per_pass": round(flops / 1e9, 2) if flops else None,
                     "ms": ms, "chosen": chosen.describe(), "chosen_ms": ms_auto[chosen.describe()], "failed": failed,
                     "auto_timed": ms_auto, "chosen_gflops": round(flops / 1e9 / (ms_auto[chosen.describe()] / 1000), 1) if flops else None})
        print(f"  {name}: {ms} -> {chosen.describe()}", file=sys.stderr, flush=True)
    return rows


def distill_rounds(tree: Path, teacher: str, budget: int, work: Path, label: str) -> dict:
    """One default ``datafree distill`` run of ``budget`` seconds with the code in ``tree``."""
    out = work / f"{label}-{Path(teacher).stem}"
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, "-m", "datafree.cli", "distill", "--teacher", str(ROOT / teacher), "--time-budget", f"{budget}s",
            "--no-eval", "--no-progress", "--overwrite", "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"distill with {tree} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    precision = summary.get("precision") or {}
    return {"rounds": summary["steps"], "rounds_per_min": round(summary["steps"] / budget * 60, 1),
            "wall_s": round(time.monotonic() - started, 1), "holdout_agreement": summary.get("holdout_agreement"),
            "teacher": (precision.get("teacher") or {}), "student": (precision.get("student") or {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-tree", required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--baseline-label", help="what the baseline is (default: its commit)")
    parser.add_argument("--budget", type=int, default=120, help="seconds of each distill run")
    parser.add_argument("--batch", type=int, default=256, help="images per teacher pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-rounds", action="store_true", help="only the teacher-pass table")
    parser.add_argument("--out", default=str(ROOT / "bench" / "throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    baseline = Path(args.baseline_tree).resolve()
    commit = lambda tree: subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],  # noqa: E731
                                         capture_output=True, text=True).stdout.strip()
    label = args.baseline_label or commit(baseline)
    started = time.time()
    measured_peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    peaks = {k: round(v[0], 1) for k, v in measured_peaks.items()}
    sizes = {k: v[1] for k, v in measured_peaks.items()}
    print(f"matmul 2048 x 2048: {peaks} GFLOP/s", file=sys.stderr)
    passes = teacher_pass_rows(PASS_TEACHERS, args.batch)
    rounds, rounds_from = [], None
    if args.skip_rounds and Path(args.out).is_file():  # keep the rounds table of the last invocation that ran it
        earlier = json.loads(Path(args.out).read_text())
        rounds, rounds_from, label = earlier.get("rounds", []), earlier.get("rounds_from") or earlier.get("command"), earlier.get("baseline", label)
    if not args.skip_rounds:
        with tempfile.TemporaryDirectory() as tmp:
            for name in ROUND_TEACHERS:
                teacher = suite()[name]["file"]
                new = distill_rounds(ROOT, teacher, args.budget, Path(tmp), "new")
                old = distill_rounds(baseline, teacher, args.budget, Path(tmp), "old")
                rounds.append({"teacher": name, "new": new, "baseline": old,
                               "ratio": round(new["rounds"] / max(1, old["rounds"]), 2)})
                print(f"  {name}: {new['rounds']} rounds vs {old['rounds']}", file=sys.stderr, flush=True)
    cpu = platform.processor() or platform.machine()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads; "
               f"CPU flags: {'avx512_bf16' if 'avx512_bf16' in Path('/proc/cpuinfo').read_text() else 'no native bf16'}")
    command = "python scripts/bench_throughput.py " + " ".join(a for a in sys.argv[1:])
    lines = [f"Machine: {machine} ({cpu}). Date: {time.strftime('%Y-%m-%d')}, commit {commit(ROOT)}. "
             f"Wall-clock: {time.time() - started:.0f} s. Command: `{command}`", "",
             f"Matmul peak: fp32 {peaks['fp32']} GFLOP/s ({sizes['fp32']} x {sizes['fp32']}), bf16 {peaks['bf16']} GFLOP/s "
             f"({sizes['bf16']} x {sizes['bf16']}).", "",
             "Each setting timed (median of 5 after a warm-up); `chosen` is what `--precision auto` takes on this CPU, "
             "timing only what it weighs here (bf16 is skipped where a small bf16 matmul runs under half the fp32 speed).", "",
             "| teacher | form | GFLOP per pass | fp32 ms | fp32 + CL ms | bf16 ms | bf16 + CL ms | chosen | GFLOP/s | % of peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in passes:
        ms = [r["ms"].get(k, "fail") for k in ("fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last")]
        peak = peaks["bf16" if r["chosen"].startswith("bf16") else "fp32"]
        share = f"{100 * r['chosen_gflops'] / peak:.0f}%" if r["chosen_gflops"] else "-"
        lines.append(f"| {r['teacher']} | {r['form']} | {r['gflop_per_pass'] or '-'} | " + " | ".join(map(str, ms))
                     + f" | {r['chosen']} | {r['chosen_gflops'] or '-'} | {share} |")
    if rounds:
        budget = rounds[0]["new"]["rounds_per_min"] and round(rounds[0]["new"]["rounds"] * 60 / rounds[0]["new"]["rounds_per_min"])
        lines += ["", f"Rounds of `datafree distill --teacher T --time-budget {budget}s` (defaults), this tree against "
                      f"{label}, one after the other" + (f" (from the invocation `{rounds_from}`)" if rounds_from else "") + ":", "",
                  "| teacher | rounds (new) | rounds (baseline) | new / baseline | precision chosen (teacher / student) |",
                  "|---|---|---|---|---|"]
        for r in rounds:
            chosen = "/".join(f"{d.get('dtype', '?')}{' + CL' if d.get('channels_last') else ''}"
                              for d in (r["new"]["teacher"], r["new"]["student"]))
            lines.append(f"| {r['teacher']} | {r['new']['rounds']} | {r['baseline']['rounds']} | {r['ratio']} | {chosen} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command, "machine": machine, "peaks_gflops": peaks, "teacher_pass": passes,
                                          "rounds": rounds, "rounds_from": rounds_from or command, "baseline": label}, indent=1))
    write_block(Path(args.out).stem.replace("_", "-"), table, "Throughput: precision and layout of the teacher pass, and rounds per minute")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
