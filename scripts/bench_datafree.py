"""Benchmark data-free distillation over the teacher suite: candidate presets, the data-free choice
between them, and the KD-on-real-data (upper) and KD-on-noise (lower) bounds, all at one budget.

    DATAFREE_DATA=../shared/data python scripts/train_suite.py       # once: the suite's teachers
    DATAFREE_DATA=../shared/data python scripts/bench_datafree.py --budget 5m --workers 2
    DATAFREE_DATA=../shared/data python scripts/bench_datafree.py --quick         # a smoke run

Every row is one run folder (``runs/bench/suite/TEACHER/METHOD-BUDGET``); the student is always the
default ``lenet5_half`` and the preset's own settings apply (``datafree distill --teacher T --preset P``).
Real data is read only after a run has finished, to score it:

- ``student %``: the kept student on the real test set (measured once; chooses nothing);
- ``cross-agreement %``: the data-free signal (:mod:`datafree.distill.selection`) that picks the method for
  each teacher: agreement with the teacher on the *other* candidates' held-out synthetic samples;
- ``curve``: test accuracy of the student snapshots taken during the run (every ``eval_every``
  rounds), to read the time needed to reach an accuracy; reporting only.

Rows run in ``--workers`` processes of ``--threads`` threads each; every row records that load.
Writes ``bench/datafree_suite.json`` (with the command and the machine) and the table into
``BENCHMARKS.md`` between the ``datafree-suite`` markers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def kd_baseline(teacher, student, source: str, budget_s: float, seed: int, train=None) -> int:
    """KD on real training images or on Gaussian noise: the student's loss, optimiser, augmentation and
    cosine schedule of the distill loop, for the same wall-clock budget."""
    import torch

    from datafree.distill.losses import kd_loss
    from datafree.distill.module import student_augment

    torch.manual_seed(seed)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    augment = student_augment()
    start, steps = time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < budget_s:
        for g in opt.param_groups:
            g["lr"] = 0.05 * 0.5 * (1 + torch.cos(torch.tensor(elapsed / budget_s * torch.pi)).item())
        x = train.images[torch.randint(0, len(train), (256,))] if source == "real" else torch.randn(256, *teacher.input_shape)
        x = augment(x)
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(student(x), t, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return steps


def test_set_for(teacher, dataset):
    """The real test set in the teacher's input space."""
    from datafree.data.datasets import load_dataset

    test = load_dataset(dataset, train=False)
    test.images = teacher.spec.normalize(test.spec.denormalize(test.images))
    return test


def run_task(task: dict) -> dict:
    """One row: a distill run with a candidate preset, or a KD bound. Runs in a worker process."""
    import torch

    torch.set_num_threads(task["threads"])
    from datafree.base.config import parse_duration
    from datafree.data.datasets import load_dataset
    from datafree.distill.job import build_student, run_distill
    from datafree.distill.module import DistillModule
    from datafree.distill.presets import default_preset, resolve_distill_config
    from datafree.models.inference import accuracy
    from datafree.teachers.formats import load_model, load_teacher

    member, budget = task["member"], task["budget"]
    teacher_path = str(ROOT / member["file"])
    teacher = load_teacher(teacher_path, input_spec=member["input_spec"])
    out = ROOT / "runs" / "bench" / "suite" / member["name"] / f"{task['method']}-{budget}"
    row = {"teacher": member["name"], "form": member["form"], "dataset": member["dataset"], "method": task["method"],
           "budget": budget, "threads": task["threads"], "workers": task["workers"], "run": str(out.relative_to(ROOT))}
    if task["kind"] == "bound":
        student = build_student("lenet5_half", teacher)[0]
        train = load_dataset(member["dataset"], train=True) if task["method"] == "kd-real" else None
        if train is not None:
            train.images = teacher.spec.normalize(train.spec.denormalize(train.images))
        started = time.monotonic()
        steps = kd_baseline(teacher, student, "real" if train is not None else "noise", parse_duration(budget), task["seed"], train)
        row.update(steps=steps, step_is="student step (batch 256)", seconds=round(time.monotonic() - started, 1),
                   student_acc=round(accuracy(student.eval(), test_set_for(teacher, member["dataset"])), 2))
        return row

    curve_states = []
    original = DistillModule._evaluate

    def traced(self, step):  # keep every snapshot for the reporting curve (the module keeps the last 8)
        original(self, step)
        curve_states.append((round(self.elapsed, 1), {k: v.detach().clone() for k, v in self.student.state_dict().items()}))

    DistillModule._evaluate = traced
    overrides = {"teacher": teacher_path, "teacher_input_spec": member["input_spec"], "time_budget": budget, "steps": 10 ** 6,
                 "out": str(out), "seed": task["seed"], "checkpoint_every": 10 ** 6, "eval_every": task["eval_every"]}
    preset, _, variant = task["method"].partition("@")  # "dfq@fixed": the preset with a fixed schedule
    if variant:
        overrides["schedule"] = variant
    if preset == "default":  # the preset a user gets without --preset (it depends on the teacher)
        preset = default_preset(teacher_path, member["input_spec"])[0]
        row["preset"] = preset
    cfg = resolve_distill_config(preset=preset, overrides=overrides)
    try:
        summary = run_distill(cfg, overwrite=True, progress=False, notify=lambda m: None)
    finally:
        DistillModule._evaluate = original
    test = test_set_for(teacher, member["dataset"])
    student, _ = load_model(out / "student.safetensors")
    probe = build_student("lenet5_half", teacher)[0]
    curve = []
    for elapsed, state in curve_states:
        probe.load_state_dict(state)
        curve.append((elapsed, round(accuracy(probe.eval(), test), 2)))
    schedule = summary.get("schedule") or {}
    row.update(steps=summary["steps"], step_is=f"round (1 synthesis step + {schedule.get('student_steps')} student steps)",
               seconds=summary["seconds"], student_acc=round(accuracy(student.eval(), test), 2),
               holdout_agreement=summary["holdout_agreement"], schedule=schedule, curve=curve)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=str(ROOT / "assets" / "suite" / "suite.json"))
    parser.add_argument("--teachers", help="comma-separated suite names (default: all)")
    parser.add_argument("--candidates", default="dfq,dfq@auto,fast", help="presets (PRESET@SCHEDULE for another schedule) "
                        "the data-free signal chooses between; 'default' is the preset a user gets without --preset")
    parser.add_argument("--no-bn-candidates", default="zskd", help="further candidates for teachers without readable BN statistics")
    parser.add_argument("--bounds", default="kd-real,kd-noise", help="kd-real, kd-noise, or none")
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--bound-budget", help="budget of the KD bounds (default: --budget); KD on real data saturates "
                        "within minutes, so a shorter one saves hours on a slow machine, and the table says so")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--eval-every", type=int, default=50, help="rounds between student snapshots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 s per row, first two teachers: checks the script, not the methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "datafree_suite.json"))
    parser.add_argument("--no-markdown", action="store_true", help="write the JSON only, not the table in BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.bound_budget, args.eval_every = "20s", "20s", 10
    import torch

    from datafree.distill.selection import cross_agreement, load_run_candidate, spearman
    from datafree.models.inference import accuracy
    from datafree.teachers.formats import load_teacher

    members = json.loads(Path(args.suite).read_text())["members"]
    if args.teachers:
        members = [m for m in members if m["name"] in args.teachers.split(",")]
    elif args.quick:
        members = members[:2]
    bounds = [] if args.bounds == "none" else args.bounds.split(",")
    extra = [c for c in args.no_bn_candidates.split(",") if c]
    for m in members:  # which candidates each teacher gets: BN-less teachers (TorchScript hides BN too) get the extra ones
        has_bn = load_teacher(ROOT / m["file"], input_spec=m["input_spec"]).has_bn
        m["has_bn"] = has_bn
        m["candidates"] = args.candidates.split(",") + ([] if has_bn else extra)
    candidates = list(dict.fromkeys(c for m in members for c in m["candidates"]))
    tasks = [{"member": m, "kind": "distill", "method": c, "budget": args.budget, "seed": args.seed, "threads": args.threads,
              "workers": args.workers, "eval_every": args.eval_every} for m in members for c in m["candidates"]]
    tasks += [{"member": m, "kind": "bound", "method": b, "budget": args.bound_budget or args.budget, "seed": args.seed, "threads": args.threads,
               "workers": args.workers} for m in members for b in bounds]
    started = time.time()
    rows = []
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
            for row in pool.imap_unordered(run_task, tasks):
                rows.append(row)
                print(_row_text(row), flush=True)
    else:
        for task in tasks:
            rows.append(run_task(task))
            print(_row_text(rows[-1]), flush=True)

    order = [m["name"] for m in members]
    methods = candidates + bounds
    rows.sort(key=lambda r: (order.index(r["teacher"]), methods.index(r["method"])))
    torch.set_num_threads(args.threads)
    teachers = {}
    for m in members:
        # 1. the data-free choice between the candidates (reads no real data)
        mine = [r for r in rows if r["teacher"] == m["name"] and r["method"] in candidates]
        loaded = {r["method"]: load_run_candidate(ROOT / r["run"]) for r in mine}
        scores = cross_agreement({k: v[0] for k, v in loaded.items()}, {k: v[1] for k, v in loaded.items()})
        chosen = max(scores, key=lambda k: (scores[k] if scores[k] is not None else -1.0, -candidates.index(k)))
        # 2. then, for the report only, the teacher's and the students' real test accuracy
        teacher = load_teacher(ROOT / m["file"], input_spec=m["input_spec"])
        teacher_acc = round(accuracy(teacher, test_set_for(teacher, m["dataset"])), 2)
        for r in rows:
            if r["teacher"] == m["name"]:
                r["teacher_acc"] = teacher_acc
                r["ratio"] = round(r["student_acc"] / teacher_acc, 4)
                r["cross_agreement"] = scores.get(r["method"])
                r["chosen"] = r["method"] == chosen
                r["seconds_to_90"] = next((t for t, a in r.get("curve", []) if a >= 90.0), None)
        accs = {r["method"]: r["student_acc"] for r in mine}
        best = max(accs, key=accs.get)
        scores = {k: (v if v is not None else 0.0) for k, v in scores.items()}
        teachers[m["name"]] = {"teacher_acc": teacher_acc, "chosen": chosen, "test_best": best, "scores": scores,
                               "test_acc": accs, "spearman": spearman([scores[k] for k in accs], list(accs.values()))}
    centred_s, centred_a = [], []  # pooled over teachers, each teacher's mean removed
    for t in teachers.values():
        ms, ma = sum(t["scores"].values()) / len(t["scores"]), sum(t["test_acc"].values()) / len(t["test_acc"])
        centred_s += [t["scores"][k] - ms for k in t["test_acc"]]
        centred_a += [t["test_acc"][k] - ma for k in t["test_acc"]]
    selection = {"teachers": len(teachers), "chosen_is_test_best": sum(t["chosen"] == t["test_best"] for t in teachers.values()),
                 "pooled_spearman_within_teacher": spearman(centred_s, centred_a)}
    defaults = {}  # the default for each kind of teacher: most data-free wins, then the highest mean signal
    for kind in ("bn", "no_bn"):
        group = [t for name, t in teachers.items() if next(m for m in members if m["name"] == name)["has_bn"] == (kind == "bn")]
        common = set.intersection(*(set(t["scores"]) for t in group)) if group else set()
        if common:
            wins = {c: sum(t["chosen"] == c for t in group) for c in common}
            mean = {c: round(sum(t["scores"][c] for t in group) / len(group), 3) for c in common}
            defaults[kind] = {"teachers": len(group), "wins": wins, "mean_cross_agreement": mean,
                              "chosen": max(common, key=lambda c: (wins[c], mean[c]))}
    result = {"machine": _machine(args), "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
              "wall_clock_s": round(time.time() - started), "rows": rows, "teachers": teachers, "selection": selection,
              "defaults": defaults}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = _markdown(result)
    print(table)
    if not (args.quick or args.no_markdown):
        _update_benchmarks_md(table)


def _markdown(result) -> str:
    sel = result["selection"]
    lines = [f"Machine: {result['machine']}. Date: {result['date']}. Wall-clock: {result['wall_clock_s']} s. "
             f"Command: `{result['command']}`", "",
             "| teacher | handed over as | teacher % | method | budget | rounds / steps | s | student % | student/teacher "
             "| cross-agreement % (chooses) | chosen | s to 90% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ca = "-" if r.get("cross_agreement") is None else r["cross_agreement"]
        t90 = "-" if r.get("seconds_to_90") is None else r["seconds_to_90"]
        lines.append(f"| {r['teacher']} | {r['form']} | {r['teacher_acc']} | {r['method'] + (' (' + r['preset'] + ')' if r.get('preset') else '')} | {r['budget']} | {r['steps']} | "
                     f"{r['seconds']} | {r['student_acc']} | {r['ratio']:.3f} | {ca} | {'yes' if r.get('chosen') else ''} | {t90} |")
    lines += ["", f"Data-free choice: the chosen method was also the best on the test set for {sel['chosen_is_test_best']} of "
              f"{sel['teachers']} teachers; Spearman rank correlation of cross-agreement with test accuracy (within each "
              f"teacher, pooled): {sel['pooled_spearman_within_teacher']}."]
    for kind, d in result.get("defaults", {}).items():
        lines.append(f"Default for teachers {'with' if kind == 'bn' else 'without'} BN ({d['teachers']} teachers): "
                     f"**{d['chosen']}** (data-free wins {d['wins']}; mean cross-agreement {d['mean_cross_agreement']}).")
    return "\n".join(lines)


def _update_benchmarks_md(table: str) -> None:
    from benchmarks_md import write_block

    write_block("datafree-suite", table, "Data-free distillation")


def _machine(args) -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}; "
            f"{args.workers} worker process(es) x {args.threads} thread(s) running side by side")


def _row_text(r) -> str:
    return f"{r['teacher']:<22} {r['method']:<9} {r['budget']:>5} {r['steps']:>7} {r['seconds']:>7} {r['student_acc']:>6}"


if __name__ == "__main__":
    main()
