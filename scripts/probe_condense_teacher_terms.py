"""Probe the teacher terms and the start of data-free condensation on a validation split of the *training* data.

    DATAFREE_DATA=../shared/data python scripts/probe_condense_teacher_terms.py \\
        --run bench/knowledge_runs/mnist_lenet5_logits-s0 --weights 0:0,1:1,1:10,1:50,1:200 --budget 3m
    DATAFREE_DATA=../shared/data python scripts/probe_condense_teacher_terms.py \\
        --run runs/probe/mnist_lenet5/s27_base-s0 --inits real,kmeans,herding --budget 3m

For each ``CE:BN`` pair of weights and each start (``--inits``: the condensation's ``init``, here on
the transfer images), ``dm`` condenses the distill run's transfer set (no real image
read) to ipc 10 for the same wall-clock budget, with the run's teacher asked about the augmented
synthetic images (``datafree.condense.matching.teacher_terms``). One fresh ConvNet (fixed protocol) is
trained on each set and scored on training images 50,000-59,999 of the run's data set: never the
test set. Appends one JSON line per pair to ``bench/probe_condense_teacher_terms.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datafree.base.config import parse_duration  # noqa: E402
from datafree.condense.condenser import condense  # noqa: E402
from datafree.condense.job import teacher_of_run  # noqa: E402
from datafree.data.datasets import (  # noqa: E402
    TORCHVISION_SETS,
    ImageSet,
    dataset_spec,
    load_dataset,
    load_transfer_set,
    no_real_data,
)
from datafree.models.inference import predict  # noqa: E402
from datafree.outputs.evaluate import evaluate_set  # noqa: E402


def dataset_of(class_names: list[str]) -> str:
    """The one torchvision data set whose class names are ``class_names`` (a transfer set carries its teacher's)."""
    matches = [name for name in TORCHVISION_SETS if list(dataset_spec(name).class_names) == list(class_names)]
    if len(matches) != 1:
        raise SystemExit(f"cannot tell the run's data set from its class names ({len(matches)} data sets match); pass --dataset")
    return matches[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished distill run folder (its transfer set and teacher)")
    parser.add_argument("--dataset", default=None,
                        help="the teacher's data set, for the validation split (default: the torchvision set whose class names the run's transfer set carries)")
    parser.add_argument("--weights", default="0:0,1:10", help="CE:BN weight pairs, comma-separated")
    parser.add_argument("--inits", default="real", help="starts, comma-separated: real (random transfer images), kmeans, herding")
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "probe_condense_teacher_terms.jsonl"))
    args = parser.parse_args()
    source, _ = load_transfer_set(args.run)
    teacher = teacher_of_run(Path(args.run))[0]
    dataset = args.dataset or dataset_of(source.spec.class_names)
    for pair, init in ((p, i) for p in args.weights.split(",") for i in args.inits.split(",")):
        ce, bn = (float(w) for w in pair.split(":"))
        started = time.monotonic()
        with no_real_data("data-free condensation"):
            result = condense(source, "dm", 10, iterations=10 ** 6, time_budget=parse_duration(args.budget), teacher=teacher,
                              teacher_ce=ce, teacher_bn=bn, init=init)
        seconds = time.monotonic() - started
        teacher_agrees = float((predict(teacher, result.images).argmax(1) == result.labels).float().mean()) * 100
        train = load_dataset(dataset, train=True)  # after condensation: the validation split only
        validation = ImageSet(train.images[50000:], train.labels[50000:], train.spec, name=train.name)
        scored = evaluate_set(ImageSet(result.images, result.labels, source.spec, name=train.name), validation, models=args.models)
        row = {"run": args.run, "dataset": dataset, "teacher_ce": ce, "teacher_bn": bn, "init": init, "budget": args.budget, "iterations": len(result.history),
               "seconds": round(seconds, 1), "validation_acc": scored["mean"], "validation_std": scored["std"],
               "teacher_calls_its_class_pct": round(teacher_agrees, 1), "models": args.models,
               "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
