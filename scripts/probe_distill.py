"""Compare distillation settings on a *validation split* of the real training data (never the test set).

A development tool for choosing defaults: each variant is a preset plus config overrides, run for
a fixed number of rounds or a time budget on each named suite teacher; the kept student is scored
on the last 10,000 training images (which no student saw: distillation is data-free) and the
results go to ``bench/probe_distill.jsonl``, one line per run, with the seconds it took. Each row
also lists every snapshot the run's data-free selection chose between (its held-out agreement and
its validation accuracy, read after the run's own choice): how much the selection rule gains or
loses against keeping the final student, measured on validation, never on the test set.

    DATAFREE_DATA=../shared/data python scripts/probe_distill.py \\
        --teachers mnist_resnet20,mnist_lenet5 --budget 2m \\
        --variant base='{"preset": "dfq"}' --variant cond='{"preset": "dfq", "generator": "conditional"}'
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VALIDATION = 10_000  # the last images of the training split


def validation_set(teacher, dataset: str):
    """The last ``VALIDATION`` training images, in the teacher's input space."""
    from datafree.data.datasets import load_dataset

    train = load_dataset(dataset, train=True)
    train.images = teacher.spec.normalize(train.spec.denormalize(train.images[-VALIDATION:]))
    train.labels = train.labels[-VALIDATION:]
    return train


@contextlib.contextmanager
def scoring_the_candidates(val, scores: list, timing: dict):
    """While a run ends, score each snapshot its selection chooses between on the validation split,
    just before the run's own (data-free) choice, which this does not change."""
    from datafree.distill.module import DistillModule
    from datafree.models.inference import accuracy, agreement

    original = DistillModule.select_best

    def select_best(self):
        started = time.monotonic()
        held = self.holdout.contents() if len(self.holdout) else None
        final = copy.deepcopy(self.kept_student().state_dict())
        start = [self.start_snapshot] if self.start_snapshot is not None else []
        for step, state in start + self.snapshots + [(self.rounds, final)]:
            self.student.load_state_dict(state)
            scores.append({"round": step, "holdout_agreement": round(agreement(self.student, *held), 3) if held else None,
                           "val": round(accuracy(self.student.eval(), val), 2)})
        self.kept_student().load_state_dict(final)  # the final student back where the run's own choice reads it
        timing["scoring_s"] = time.monotonic() - started
        return original(self)

    DistillModule.select_best = select_best
    try:
        yield
    finally:
        DistillModule.select_best = original


def run_variant(member: dict, name: str, overrides: dict, budget: str | None, rounds: int, seed: int) -> dict:
    from datafree.distill.job import run_distill
    from datafree.distill.presets import resolve_distill_config
    from datafree.models.inference import accuracy
    from datafree.teachers.formats import load_model, load_teacher

    teacher_path = str(ROOT / member["file"])
    out = ROOT / "runs" / "probe" / member["name"] / f"{name}-s{seed}"
    values = {"teacher": teacher_path, "teacher_input_spec": member["input_spec"], "out": str(out), "seed": seed,
              "steps": rounds, "time_budget": budget, "checkpoint_every": 10 ** 6, "grid_every": 0} | overrides
    preset = values.pop("preset", None)
    cfg = resolve_distill_config(preset=preset, overrides=values)
    teacher = load_teacher(teacher_path, input_spec=member["input_spec"])
    val, candidates, timing = validation_set(teacher, member["dataset"]), [], {"scoring_s": 0.0}
    started = time.monotonic()
    with scoring_the_candidates(val, candidates, timing):
        summary = run_distill(cfg, overwrite=True, progress=False, notify=lambda m: None)
    seconds = time.monotonic() - started - timing["scoring_s"]  # the run alone, as in the rows before candidates were scored
    student, _ = load_model(out / "student.safetensors")
    return {"teacher": member["name"], "variant": name, "overrides": overrides, "seed": seed, "budget": budget,
            "rounds": summary["steps"], "seconds": round(seconds, 1), "kept_round": summary.get("selected_step"),
            "holdout_agreement": summary.get("holdout_agreement"),
            "teacher_val": round(accuracy(teacher, val), 2), "student_val": round(accuracy(student.eval(), val), 2),
            "final_val": candidates[-1]["val"] if candidates else None, "candidates": candidates,
            "scoring_s": round(timing["scoring_s"], 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=str(ROOT / "assets" / "suite" / "suite.json"))
    parser.add_argument("--teachers", required=True, help="comma-separated suite names")
    parser.add_argument("--variant", action="append", required=True, help="NAME=JSON overrides (with 'preset')")
    parser.add_argument("--budget", help="time budget per run, e.g. 2m")
    parser.add_argument("--rounds", type=int, default=10 ** 6)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default=str(ROOT / "bench" / "probe_distill.jsonl"))
    args = parser.parse_args()
    members = {m["name"]: m for m in json.loads(Path(args.suite).read_text())["members"]}
    variants = [(v.split("=", 1)[0], json.loads(v.split("=", 1)[1])) for v in args.variant]
    for teacher in args.teachers.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, overrides in variants:
                row = run_variant(members[teacher], name, overrides, args.budget, args.rounds, seed)
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
