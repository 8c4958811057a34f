"""Benchmark: an ensemble of teachers against the best single teacher, and knowledge beyond logits
(feature hint, relational KD) against logits-only KD, each side by side at one time budget.

    DATAFREE_DATA=../shared/data python scripts/bench_knowledge.py --budget 3m
    DATAFREE_DATA=../shared/data python scripts/bench_knowledge.py --quick     # a smoke run of the script

Every run is ``run_distill`` with the ``dfq`` preset, the same seed and budget, one after another
(nothing else running). The student's real test accuracy and its agreement with the ensemble and
with each teacher are measured after training, for this table only: nothing was chosen on them.
"Best single teacher" is the member with the highest accuracy on its card (the owner's figure).
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

MEMBERS = ["assets/teachers/mnist_lenet5.safetensors", "assets/suite/mnist_convnet_in.safetensors",
           "assets/suite/mnist_owner_resgap.pt2"]
PAIRS = [("assets/teachers/mnist_lenet5.safetensors", "lenet5_half"), ("assets/suite/mnist_convnet_in.safetensors", "lenet5_half")]
VARIANTS = {"logits": {}, "hint": {"hint": 1.0}, "rkd": {"rkd": 1.0}}


def _agreements(student_dir: Path, test: ImageSet) -> dict:
    """Test accuracy of the run's student, and its agreement with the three-teacher ensemble and with each teacher."""
    from datafree.data import InputSpec

    student, card = load_model(student_dir / "student.safetensors")
    pixels = test.spec.denormalize(test.images)
    s_pred = predict(student, InputSpec.from_dict(card["input_spec"]).normalize(pixels)).argmax(1)

    def agree(teacher) -> float:
        return round((s_pred == predict(teacher, teacher.spec.normalize(pixels)).argmax(1)).float().mean().item() * 100, 2)

    out = {"student_test_accuracy": round((s_pred == test.labels).float().mean().item() * 100, 2),
           "agreement_with_ensemble": agree(load_teachers(MEMBERS))}
    for path in MEMBERS:
        out[f"agreement_with_{Path(path).stem}"] = agree(load_teacher(path))
    return out


def _run(name: str, teachers: list[str], student: str, knowledge: dict, args, test: ImageSet) -> dict:
    out = ROOT / "bench" / "knowledge_runs" / name
    overrides = {"teacher": teachers if len(teachers) > 1 else teachers[0], "student": student, "out": str(out),
                 "time_budget": args.budget, "steps": 10 ** 6, "knowledge": knowledge, "seed": 0, **args.tiny}
    cfg = resolve_distill_config("dfq", overrides=overrides)
    started = time.monotonic()
    summary = run_distill(cfg, overwrite=True, progress=False)
    row = {"run": name, "teachers": [Path(t).stem for t in teachers], "student": student,
           "knowledge": summary["knowledge"], "budget": args.budget, "rounds": summary["steps"],
           "seconds": round(time.monotonic() - started, 1), **_agreements(out, test)}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the script, not the methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "knowledge.json"))
    args = parser.parse_args()
    args.tiny = {}
    if args.quick:
        args.budget, args.tiny = "10s", {"batch_size": 32, "student_batch": 32, "pool_size": 64, "eval_every": 5,
                                         "checkpoint_every": 5, "grid_every": 0}
        args.out = str(ROOT / "bench" / "knowledge_quick.json")
    test = load_dataset("mnist", train=False)
    cards = {t: load_teacher(t).card.get("test_accuracy") or 0 for t in MEMBERS}
    best = max(MEMBERS, key=lambda t: cards[t])
    plan = [("single_best", [best], {}), ("ensemble3", MEMBERS, {})] + [
        (f"{Path(teacher).stem}_{variant}", [teacher], knowledge) for teacher, _ in PAIRS for variant, knowledge in VARIANTS.items()]
    rows = []
    for name, teachers, knowledge in plan:
        rows.append(_run(name, teachers, "lenet5_half", knowledge, args, test))
        write_results(args, cards, best, rows)  # after every run: a stopped benchmark keeps what it measured


def write_results(args, cards: dict, best: str, rows: list[dict]) -> None:
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "budget": args.budget,
              "card_accuracies": {Path(t).stem: a for t, a in cards.items()}, "best_single": Path(best).stem, "rows": rows}
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
    lines = [f"Machine: {result['machine']}. Date: {result['date']}. Budget {result['budget']} a run, dfq preset, seed 0, "
             f"runs one after another. Command: `{result['command']}`. Best single teacher (highest card accuracy): "
             f"{result['best_single']}.", "",
             "| run | teachers | student | knowledge | rounds | test % | agree ensemble % | " +
             " | ".join(f"agree {n} %" for n in names) + " |", "|" + "---|" * (7 + len(names))]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {' + '.join(r['teachers'])} | {r['student']} | {', '.join(r['knowledge'])} | {r['rounds']} | "
                     f"{r['student_test_accuracy']} | {r['agreement_with_ensemble']} | " +
                     " | ".join(str(r[f'agreement_with_{n}']) for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
