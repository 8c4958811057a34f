"""Benchmark: an ensemble of teachers against the best single teacher, and knowledge beyond logits
(feature hint, attention transfer, relational KD) against logits-only KD, side by side at one time budget.

    DATAFREE_DATA=../shared/data python scripts/bench_knowledge.py --budget 4m --seeds 0,1
    DATAFREE_DATA=../shared/data python scripts/bench_knowledge.py --quick     # a smoke run of the script

Every run is ``run_distill`` with the ``dfq`` preset and the same budget, one after another
(nothing else running). The ensemble rows (best single teacher, two teachers, three teachers) run
once per seed; the knowledge rows once (seed 0). The teachers' and students' real test accuracy and
the student's agreement with the ensemble and with each teacher are measured after training, for
this table only: nothing was chosen on them. "Best single teacher" is the member with the highest
test accuracy, measured here: the strongest single-teacher baseline.
Writes ``bench/knowledge.json`` and the ``knowledge`` block of ``BENCHMARKS.md``.
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

from datafree.config import resolve_distill_config  # noqa: E402
from datafree.data import ImageSet, load_dataset  # noqa: E402, F401
from datafree.distill import run_distill  # noqa: E402
from datafree.ensemble import load_teachers  # noqa: E402
from datafree.teacher import load_model, load_teacher  # noqa: E402
from datafree.training import predict  # noqa: E402

MEMBERS = ["assets/teachers/mnist_lenet5.safetensors", "assets/suite/mnist_owner_resgap.pt2",
           "assets/suite/mnist_convnet_in.safetensors"]  # the two-teacher ensemble is the first two
PAIRS = [("assets/teachers/mnist_lenet5.safetensors", "lenet5_half"), ("assets/suite/mnist_convnet_in.safetensors", "lenet5_half")]
VARIANTS = {"logits": {}, "hint": {"hint": 1.0}, "attention": {"attention": 1.0}, "rkd": {"rkd": 1.0}}


def _agreements(student_dir: Path, test: ImageSet) -> dict:
    """Test accuracy of the run's student, and its agreement with the two- and three-teacher ensembles and each teacher."""
    from datafree.data import InputSpec

    student, card = load_model(student_dir / "student.safetensors")
    pixels = test.spec.denormalize(test.images)
    s_pred = predict(student, InputSpec.from_dict(card["input_spec"]).normalize(pixels)).argmax(1)

    def agree(teacher) -> float:
        return round((s_pred == predict(teacher, teacher.spec.normalize(pixels)).argmax(1)).float().mean().item() * 100, 2)

    out = {"student_test_accuracy": round((s_pred == test.labels).float().mean().item() * 100, 2),
           "agreement_with_ensemble2": agree(load_teachers(MEMBERS[:2])), "agreement_with_ensemble3": agree(load_teachers(MEMBERS))}
    for path in MEMBERS:
        out[f"agreement_with_{Path(path).stem}"] = agree(load_teacher(path))
    return out


def _run(name: str, teachers: list[str], student: str, knowledge: dict, seed: int, args, test: ImageSet) -> dict:
    out = ROOT / "bench" / "knowledge_runs" / f"{name}-s{seed}"
    overrides = {"teacher": teachers if len(teachers) > 1 else teachers[0], "student": student, "out": str(out),
                 "time_budget": args.budget, "steps": 10 ** 6, "knowledge": knowledge, "seed": seed, **args.tiny}
    cfg = resolve_distill_config("dfq", overrides=overrides)
    started = time.monotonic()
    summary = run_distill(cfg, overwrite=True, progress=False)
    row = {"run": name, "seed": seed, "teachers": [Path(t).stem for t in teachers], "student": student,
           "knowledge": summary["knowledge"], "budget": args.budget, "rounds": summary["steps"],
           "seconds": round(time.monotonic() - started, 1), **_agreements(out, test)}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="4m")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the ensemble rows")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the script, not the methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "knowledge.json"))
    args = parser.parse_args()
    args.tiny = {}
    if args.quick:
        args.budget, args.tiny = "10s", {"batch_size": 32, "student_batch": 32, "pool_size": 64, "eval_every": 5,
                                         "checkpoint_every": 5, "grid_every": 0}
        args.out = str(ROOT / "bench" / "knowledge_quick.json")
    test = load_dataset("mnist", train=False)
    from datafree.training import accuracy

    teachers = {t: round(accuracy(load_teacher(t), _in_space(test, load_teacher(t))), 2) for t in MEMBERS}
    best = max(MEMBERS, key=lambda t: teachers[t])
    seeds = [int(v) for v in args.seeds.split(",")]
    plan = [(name, group, {}, seed) for seed in seeds
            for name, group in (("single_best", [best]), ("ensemble2", MEMBERS[:2]), ("ensemble3", MEMBERS))]
    plan += [(f"{Path(teacher).stem}_{variant}", [teacher], knowledge, 0) for teacher, _ in PAIRS
             for variant, knowledge in VARIANTS.items()]
    rows = []
    for name, group, knowledge, seed in plan:
        rows.append(_run(name, group, "lenet5_half", knowledge, seed, args, test))
        write_results(args, teachers, best, rows)  # after every run: a stopped benchmark keeps what it measured


def _in_space(test: ImageSet, teacher) -> ImageSet:
    """The test set in ``teacher``'s input space."""
    return ImageSet(teacher.spec.normalize(test.spec.denormalize(test.images)), test.labels, teacher.spec)


def write_results(args, teachers: dict, best: str, rows: list[dict]) -> None:
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "budget": args.budget,
              "teacher_test_accuracies": {Path(t).stem: a for t, a in teachers.items()}, "best_single": Path(best).stem,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = markdown(result)
    print(table)
    if not args.quick:
        path = ROOT / "BENCHMARKS.md"
        start, end = "<!-- knowledge:start -->", "<!-- knowledge:end -->"
        text = path.read_text()
        block = f"{start}\n{table}\n{end}"
        text = (text[: text.index(start)] + block + text[text.index(end) + len(end):]) if start in text else \
            text + f"\n## Ensembles and knowledge beyond logits\n\n{block}\n"
        path.write_text(text)


def markdown(result: dict) -> str:
    names = [Path(t).stem for t in MEMBERS]
    accs = ", ".join(f"{n} {a}" for n, a in result["teacher_test_accuracies"].items())
    lines = [f"Machine: {result['machine']}. Date: {result['date']}. Budget {result['budget']} a run, dfq preset, "
             f"runs one after another. Command: `{result['command']}`. Teachers' test accuracy: {accs}; best single: "
             f"{result['best_single']}. ensemble2 = the first two teachers, ensemble3 = all three.", "",
             "| run | seed | teachers | knowledge | rounds | test % | agree ens2 % | agree ens3 % | " +
             " | ".join(f"agree {n} %" for n in names) + " |", "|" + "---|" * (8 + len(names))]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {r['seed']} | {' + '.join(r['teachers'])} | {', '.join(r['knowledge'])} | {r['rounds']} | "
                     f"{r['student_test_accuracy']} | {r['agreement_with_ensemble2']} | {r['agreement_with_ensemble3']} | " +
                     " | ".join(str(r[f'agreement_with_{n}']) for n in names) + " |")
    lines += ["", "Mean over seeds:", "", "| run | seeds | rounds | test % | agree own ensemble % | best agreement with one member % |",
              "|---|---|---|---|---|---|"]
    for run in dict.fromkeys(r["run"] for r in result["rows"]):
        got = [r for r in result["rows"] if r["run"] == run]
        own = "agreement_with_ensemble3" if run == "ensemble3" else "agreement_with_ensemble2"
        mean = lambda key: round(sum(r[key] for r in got) / len(got), 2)  # noqa: E731
        best_member = max(mean(f"agreement_with_{Path(t).stem}") for t in (MEMBERS if run == "ensemble3" else MEMBERS[:2]))
        lines.append(f"| {run} | {len(got)} | {mean('rounds')} | {mean('student_test_accuracy')} | {mean(own)} | {best_member} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
