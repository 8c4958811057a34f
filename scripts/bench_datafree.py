"""Benchmark data-free distillation: every preset, plus KD on real data (upper bound) and on noise (lower bound).

    DATAFREE_DATA=../shared/data python scripts/bench_datafree.py                 # the full table
    DATAFREE_DATA=../shared/data python scripts/bench_datafree.py --quick         # a smoke run

Prints a table, writes ``bench/datafree.json`` and the table into ``BENCHMARKS.md`` (between the
``datafree`` markers). Real test accuracy is measured once, after each run, and chooses nothing:
each run keeps the student that agrees most with the teacher on held-out *synthetic* samples.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datafree.config import parse_duration, resolve_distill_config  # noqa: E402
from datafree.data import load_dataset  # noqa: E402
from datafree.distill import build_student, run_distill  # noqa: E402
from datafree.models import count_parameters  # noqa: E402
from datafree.student import kd_loss, student_augment  # noqa: E402
from datafree.teacher import load_teacher  # noqa: E402
from datafree.training import accuracy  # noqa: E402

TEACHERS = ROOT / "assets" / "teachers"
PAIRS = [  # (name, teacher file, student arch, data set)
    ("MNIST lenet5 (BN) -> lenet5_half", "mnist_lenet5.safetensors", "lenet5_half", "mnist"),
    ("MNIST lenet5_nobn -> lenet5_half", "mnist_lenet5_nobn.safetensors", "lenet5_half", "mnist"),
    ("F-MNIST convnet64 -> convnet32", "fmnist_convnet.safetensors", "convnet", "fashion-mnist"),
]


def kd_baseline(teacher, student, source: str, budget_s: float, seed: int, train=None) -> tuple[int, float]:
    """KD on real training images or on Gaussian noise, same loss, optimiser, augmentation and budget."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    augment = student_augment()
    start, steps = time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < budget_s:
        for g in opt.param_groups:
            g["lr"] = 0.05 * 0.5 * (1 + torch.cos(torch.tensor(elapsed / budget_s * torch.pi)).item())
        if source == "real":
            x = train.images[torch.randint(0, len(train), (256,))]
        else:
            x = torch.randn(256, *teacher.input_shape)
        x = augment(x)
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(student(x), t, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return steps, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main-preset", default="fast")
    parser.add_argument("--main-budget", default="10m", help="budget of the main preset on the MNIST pairs")
    parser.add_argument("--fmnist-budget", default="15m")
    parser.add_argument("--preset-budget", default="2m", help="budget of every other preset and the baselines")
    parser.add_argument("--presets", default="fast,deepinversion,dafl,dfad,zskt,dfq")
    parser.add_argument("--pairs", default="0,1,2", help="indices into the pair list")
    parser.add_argument("--all-presets-on", default="0", help="pairs that run every preset; the others run the main preset only")
    parser.add_argument("--baselines-on", default="0,1,2", help="pairs that also run the real-data and noise KD baselines")
    parser.add_argument("--merge", help="rows of an earlier run (JSON list) to put in the same table")
    parser.add_argument("--quick", action="store_true", help="20 s per run: checks the script, not the methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "datafree.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.main_budget = args.fmnist_budget = args.preset_budget = "20s"

    rows = []
    for index in map(int, args.pairs.split(",")):
        name, teacher_file, student_arch, dataset = PAIRS[index]
        teacher_path = str(TEACHERS / teacher_file)
        teacher = load_teacher(teacher_path)
        test = load_dataset(dataset, train=False)
        teacher_acc = accuracy(teacher, test)
        # convnet width 32 has 22k parameters, 27% of the width-64 teacher's 81k
        student_kwargs = {"width": 32, "depth": 3, "norm": "batch"} if student_arch == "convnet" else {}
        every = str(index) in args.all_presets_on.split(",")
        for preset in args.presets.split(",") if every else [args.main_preset]:
            main_run = preset == args.main_preset
            budget = (args.fmnist_budget if dataset == "fashion-mnist" else args.main_budget) if main_run else args.preset_budget
            overrides = {"teacher": teacher_path, "student": student_arch, "student_kwargs": student_kwargs, "time_budget": budget, "steps": 10 ** 6,
                         "out": str(ROOT / "runs" / "bench" / f"{teacher_file.split('.')[0]}-{preset}"),
                         "eval_data": dataset, "seed": args.seed, "checkpoint_every": 200, "eval_every": 100}
            cfg = resolve_distill_config(preset=preset, overrides=overrides)
            summary = run_distill(cfg, overwrite=True, progress=False, notify=lambda m: None)
            rows.append({"pair": name, "method": preset, "budget": budget, "steps": summary["steps"],
                         "seconds": summary["seconds"], "teacher_acc": round(teacher_acc, 2),
                         "student_acc": summary["student_test_accuracy"],
                         "ratio": round(summary["student_test_accuracy"] / teacher_acc, 4),
                         "holdout_agreement": summary["holdout_agreement"], "student_params": summary["student_parameters"]})
            print(_row_text(rows[-1]), flush=True)
        train = load_dataset(dataset, train=True)
        for source in ("real", "noise") if str(index) in args.baselines_on.split(",") else ():
            torch.manual_seed(args.seed)
            student = build_student(student_arch, teacher, student_kwargs)[0]
            steps, seconds = kd_baseline(teacher, student, source, parse_duration(args.preset_budget), args.seed, train)
            acc = accuracy(student.eval(), test)
            rows.append({"pair": name, "method": "KD on real training images (upper bound)" if source == "real" else "KD on Gaussian noise (lower bound)",
                         "budget": args.preset_budget, "steps": steps, "seconds": round(seconds, 1),
                         "teacher_acc": round(teacher_acc, 2), "student_acc": round(acc, 2), "ratio": round(acc / teacher_acc, 4),
                         "holdout_agreement": None, "student_params": count_parameters(student)})
            print(_row_text(rows[-1]), flush=True)

    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        rows = earlier + rows
        rows.sort(key=lambda r: [p[0] for p in PAIRS].index(r["pair"]))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    result = {"machine": machine, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = _markdown(result)
    print(table)
    if not args.quick:
        _update_benchmarks_md(table)


def _row_text(r) -> str:
    return f"{r['pair']:<36} {r['method']:<48} {r['budget']:>5} {r['steps']:>7} {r['seconds']:>7} {r['teacher_acc']:>6} {r['student_acc']:>6} {r['ratio']:>6}"


def _markdown(result) -> str:
    lines = [f"Machine: {result['machine']}. Date: {result['date']}. Command: `{result['command']}`", "",
             "| teacher -> student | method | budget | rounds/steps | wall-clock s | teacher % | student % | student/teacher | held-out synthetic agreement % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['pair']} | {r['method']} | {r['budget']} | {r['steps']} | {r['seconds']} | {r['teacher_acc']} | "
                     f"{r['student_acc']} | {r['ratio']:.3f} | {r['holdout_agreement'] if r['holdout_agreement'] is not None else '-'} |")
    return "\n".join(lines)


def _update_benchmarks_md(table: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = "<!-- datafree:start -->", "<!-- datafree:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{table}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## Data-free distillation\n\n{block}\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
