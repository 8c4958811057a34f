"""Probe: the images' learning rate (Adam) and the sample rate of DP condensation, on a validation split.

The private set is the first 50,000 MNIST training images; each condensed set (epsilon 1, ipc 10)
trains one ConvNet with the fixed protocol, scored on the last 10,000 training images (never the
test set). Each variant is ``RATE:PER_CLASS`` (the images' Adam rate, and the private images of an
average class sampled per step). The rules that decide are fixed beforehand in
``bench/rules/2026-12-05-dp-image-rate.txt`` (first round) and ``bench/rules/2026-12-05-dp-second-round.txt``.

    DATAFREE_DATA=../shared/data python scripts/probe_dp_condense.py --variants 0.003:128,0.01:128,0.03:128 --budget 3m

Writes ``bench/probe_dp_condense.json`` (with the command and the machine) after every variant.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    import torch

    from datafree.base.config import parse_duration
    from datafree.condense.condenser import condense
    from datafree.data.datasets import ImageSet, load_dataset
    from datafree.outputs.evaluate import evaluate_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="0.03:128,0.1:128,0.03:512,0.1:512", help="comma-separated RATE:PER_CLASS")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--out", default=str(ROOT / "bench" / "probe_dp_condense_2.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    train = load_dataset(args.dataset, train=True)
    private = ImageSet(train.images[:50000], train.labels[:50000], train.spec, name=train.name)
    validation = ImageSet(train.images[50000:], train.labels[50000:], train.spec, name=train.name)
    rows = []
    for variant in args.variants.split(","):
        rate, per_class = float(variant.split(":")[0]), int(variant.split(":")[1])
        started = time.monotonic()
        result = condense(private, "dm", args.ipc, seed=0, init="noise", iterations=None, time_budget=parse_duration(args.budget),
                          real_per_class=per_class,
                          extra={"dp": {"epsilon": args.epsilon, "delta": 1e-5, "clip": None}, "lr_dp_images": rate})
        seconds = time.monotonic() - started
        score = evaluate_set(ImageSet(result.images, result.labels, train.spec, name=train.name), validation, models=1)
        rows.append({"rate": rate, "per_class": per_class, "sample_rate": round(result.privacy["sample_rate"], 5), "validation": score["mean"], "steps": result.privacy["steps"], "sigma": result.privacy["sigma"],
                     "seconds": round(seconds, 1), "pixel_std": round(result.images.std().item(), 4)})
        print(json.dumps(rows[-1]), flush=True)
        out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, 2 threads, torch {torch.__version__}", "dataset": args.dataset, "rows": rows,
               "best": max(rows, key=lambda r: r["validation"])}
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
