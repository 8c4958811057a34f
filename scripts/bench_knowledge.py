"""Benchmark: ensembles of teachers against every member alone, and knowledge beyond logits
(feature hint, attention transfer, relational KD) against logits-only KD, side by side at one time budget.

    DATAFREE_DATA=../shared/data python scripts/bench_knowledge.py --part ensemble --budget 3m --seeds 0,1
    DATAFREE_DATA=../shared/data python scripts/bench_knowledge.py --part knowledge --budget 3m
    DATAFREE_DATA=../shared/data python scripts/bench_knowledge.py --quick     # a smoke run of the script

Every run is ``run_distill`` with the ``dfq`` preset (the default) and the same budget, one after
another (nothing else running). The ensemble part runs every member alone (the best of these
students is the baseline an ensemble must match) and each ensemble, once per seed; the knowledge
part runs each term on two teacher/student pairs (seed 0). One member of the ensembles is handed
over as ``.pt2`` only: the ConvNet exported here (normalisation inside, [0, 1] inputs), and the
owner's residual GAP network, which was trained and exported that way. The students' real test
accuracy and their agreement with each ensemble and member are measured after training, for this
table only: nothing was chosen on them. Agreement is given on the whole test set and on the
*contested* test images, those on which the ensemble's members disagree: there, and only there, an
ensemble's student can agree with the ensemble more than with a member.
Writes ``bench/knowledge.json`` (``bench/ensemble.json``) and a block of ``BENCHMARKS.md``.
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

from datafree.data.datasets import ImageSet, load_dataset  # noqa: E402
from datafree.distill.job import run_distill  # noqa: E402
from datafree.distill.presets import resolve_distill_config  # noqa: E402
from datafree.models.inference import predict  # noqa: E402
from datafree.teachers.ensemble import load_teachers  # noqa: E402
from datafree.teachers.formats import load_model, load_teacher  # noqa: E402

LENET, NOBN = "assets/teachers/mnist_lenet5.safetensors", "assets/teachers/mnist_lenet5_nobn.safetensors"
CONVNET_PT2 = "bench/knowledge_runs/mnist_convnet_in.pt2"  # exported from assets/suite/mnist_convnet_in.safetensors
RESGAP_PT2 = "assets/suite/mnist_owner_resgap.pt2"
ENSEMBLES = {"ens_lenet5_convnet": [LENET, CONVNET_PT2], "ens_lenet5_convnet_nobn": [LENET, CONVNET_PT2, NOBN],
             "ens_lenet5_resgap": [LENET, RESGAP_PT2]}
MEMBERS = list(dict.fromkeys(t for group in ENSEMBLES.values() for t in group))
PAIRS = [(LENET, "lenet5_half"), ("assets/suite/mnist_convnet_in.safetensors", "lenet5_half")]
VARIANTS = {"logits": {}, "hint": {"hint": 1.0}, "attention": {"attention": 1.0}, "rkd": {"rkd": 1.0}}


def export_convnet_pt2() -> None:
    """The instance-norm ConvNet handed over as a ``.pt2`` program only (as an owner would)."""
    from datafree.data.datasets import InputSpec
    from datafree.outputs.export import export_program

    model, card = load_model(ROOT / "assets/suite/mnist_convnet_in.safetensors")
    path = ROOT / CONVNET_PT2
    path.parent.mkdir(parents=True, exist_ok=True)
    export_program(model.eval(), InputSpec.from_dict(card["input_spec"]), path, {"arch": card.get("arch")})


def _predictions(student_dir: Path, test: ImageSet):
    """The run's student's test predictions, and a function giving any teacher's (in its own input space)."""
    from datafree.data.datasets import InputSpec

    student, card = load_model(student_dir / "student.safetensors")
    pixels = test.spec.denormalize(test.images)
    predict_in_space = lambda t: predict(t, t.spec.normalize(pixels)).argmax(1)  # noqa: E731
    return predict(student, InputSpec.from_dict(card["input_spec"]).normalize(pixels)).argmax(1), predict_in_space


def _scores(student_dir: Path, teachers: list[str], test: ImageSet) -> dict:
    """Test accuracy; for an ensemble, agreement with it and each member on all and on the contested test images."""
    s_pred, teacher_pred = _predictions(student_dir, test)
    out = {"student_test_accuracy": round((s_pred == test.labels).float().mean().item() * 100, 2)}
    if len(teachers) == 1:
        return out
    members = {Path(t).stem: teacher_pred(load_teacher(str(ROOT / t))) for t in teachers}
    ensemble = teacher_pred(load_teachers([str(ROOT / t) for t in teachers]))
    first = next(iter(members.values()))
    contested = torch.stack([p != first for p in members.values()]).any(0)
    pct = lambda mask, other: round((s_pred[mask] == other[mask]).float().mean().item() * 100, 2)  # noqa: E731
    everywhere = torch.ones_like(contested)
    out |= {"contested": int(contested.sum()), "agree_ensemble": pct(everywhere, ensemble),
            "agree_ensemble_contested": pct(contested, ensemble),
            "agree_members": {n: pct(everywhere, p) for n, p in members.items()},
            "agree_members_contested": {n: pct(contested, p) for n, p in members.items()}}
    return out


def _run(name: str, teachers: list[str], student: str, knowledge: dict, seed: int, args, test: ImageSet) -> dict:
    out = ROOT / "bench" / "knowledge_runs" / f"{name}-s{seed}"
    paths = [str(ROOT / t) for t in teachers]
    overrides = {"teacher": paths if len(paths) > 1 else paths[0], "student": student, "out": str(out),
                 "time_budget": args.budget, "steps": 10 ** 6, "knowledge": knowledge, "seed": seed, **args.tiny}
    cfg = resolve_distill_config("dfq", overrides=overrides)
    started = time.monotonic()
    summary = run_distill(cfg, overwrite=True, progress=False)
    row = {"run": name, "seed": seed, "teachers": [Path(t).name for t in teachers], "student": student,
           "knowledge": summary["knowledge"], "budget": args.budget, "rounds": summary["steps"],
           "seconds": round(time.monotonic() - started, 1), **_scores(out, teachers, test)}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("ensemble", "knowledge"), default="ensemble")
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of the ensemble part's rows")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the script, not the methods")
    args = parser.parse_args()
    args.tiny, args.out = {}, ROOT / "bench" / f"{args.part}.json"
    if args.quick:
        args.budget, args.tiny = "10s", {"batch_size": 32, "student_batch": 32, "pool_size": 64, "eval_every": 5,
                                         "checkpoint_every": 5, "grid_every": 0, "final_pool": 256}
        args.out = ROOT / "bench" / f"{args.part}_quick.json"
    test = load_dataset("mnist", train=False)
    seeds = [int(v) for v in args.seeds.split(",")]
    if args.part == "ensemble":
        export_convnet_pt2()
        plan = [(Path(t).stem, [t], {}, seed) for seed in seeds for t in MEMBERS]
        plan += [(name, group, {}, seed) for seed in seeds for name, group in ENSEMBLES.items()]
    else:
        plan = [(f"{Path(teacher).stem}_{variant}", [teacher], knowledge, 0) for teacher, _ in PAIRS
                for variant, knowledge in VARIANTS.items()]
    teachers = {Path(t).name: round(accuracy_of(t, test), 2) for t in dict.fromkeys(t for _, g, _, _ in plan for t in g)}
    rows = []
    for name, group, knowledge, _seed in plan:
        rows.append(_run(name, group, "lenet5_half", knowledge, _seed, args, test))
        write_results(args, teachers, rows)  # after every run: a stopped benchmark keeps what it measured


def accuracy_of(teacher: str, test: ImageSet) -> float:
    """A teacher's real test accuracy (for the table)."""
    from datafree.models.inference import accuracy

    t = load_teacher(str(ROOT / teacher))
    return accuracy(t, ImageSet(t.spec.normalize(test.spec.denormalize(test.images)), test.labels, t.spec))


def write_results(args, teachers: dict, rows: list[dict]) -> None:
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"), "budget": args.budget,
              "teacher_test_accuracies": teachers, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    table = (ensemble_markdown if args.part == "ensemble" else knowledge_markdown)(result)
    print(table)
    if not args.quick:
        from benchmarks_md import write_block

        write_block(args.part, table, "Ensembles and knowledge beyond logits")


def _header(result: dict) -> str:
    accs = ", ".join(f"{n} {a}" for n, a in result["teacher_test_accuracies"].items())
    return (f"Machine: {result['machine']}. Date: {result['date']}. Budget {result['budget']} a run, dfq preset, student "
            f"lenet5_half, runs one after another. Command: `{result['command']}`. Teachers' test accuracy: {accs}.")


def _mean(rows: list[dict], key) -> float:
    return round(sum(key(r) for r in rows) / len(rows), 2)


def ensemble_markdown(result: dict) -> str:
    rows = result["rows"]
    singles = [r for r in rows if len(r["teachers"]) == 1]
    by_run = {run: [r for r in rows if r["run"] == run] for run in dict.fromkeys(r["run"] for r in rows)}
    lines = [_header(result), "", "| run | teachers | seeds | rounds | test % (mean) | per seed | best member alone % | "
             "agree ensemble % | agree best member % | contested images | agree ensemble there % | agree best member there % |",
             "|" + "---|" * 12]
    for run, got in by_run.items():
        per_seed = " / ".join(str(r["student_test_accuracy"]) for r in got)
        cells = [run, " + ".join(got[0]["teachers"]), str(len(got)), str(_mean(got, lambda r: r["rounds"])),
                 str(_mean(got, lambda r: r["student_test_accuracy"])), per_seed]
        if len(got[0]["teachers"]) == 1:
            lines.append("| " + " | ".join(cells + ["", "", "", "", "", ""]) + " |")
            continue
        alone = {t: [r for r in singles if r["teachers"] == [t]] for t in got[0]["teachers"]}
        best_alone = max(_mean(v, lambda r: r["student_test_accuracy"]) for v in alone.values() if v) if all(alone.values()) else "-"
        member = lambda key: max(_mean(got, lambda r, n=n: r[key][n]) for n in got[0][key])  # noqa: E731
        cells += [str(best_alone), str(_mean(got, lambda r: r["agree_ensemble"])), str(member("agree_members")),
                  str(got[0]["contested"]), str(_mean(got, lambda r: r["agree_ensemble_contested"])),
                  str(member("agree_members_contested"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def knowledge_markdown(result: dict) -> str:
    lines = [_header(result), "", "| run | teacher | knowledge | rounds | test % |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['run']} | {r['teachers'][0]} | {', '.join(r['knowledge'])} | {r['rounds']} | {r['student_test_accuracy']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
