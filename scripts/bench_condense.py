"""Benchmark dataset condensation: each method and baseline at several images per class.

    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --datasets mnist --ipc 1,10 --budget 5m
    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --quick      # a smoke run of the script

Condensation is timed (evaluation is not); each condensed set is scored with the fixed protocol of
``datafree.evaluate`` (mean +- std over ``--models`` fresh ConvNets on the real test set), next to
the published figures. Writes ``bench/condense.json`` and the table into ``BENCHMARKS.md``.
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

from datafree.condense import condense  # noqa: E402
from datafree.config import parse_duration  # noqa: E402
from datafree.data import ImageSet, load_dataset  # noqa: E402
from datafree.evaluate import evaluate_set  # noqa: E402

PUBLISHED = {  # DESIGN.md: ConvNet test accuracy at 1 / 10 / 50 images per class
    ("mnist", "random"): (64.9, 95.1, 97.9), ("mnist", "herding"): (89.2, 93.7, 94.8),
    ("mnist", "dc"): (91.7, 97.4, 98.8), ("mnist", "dsa"): (88.7, 97.8, 99.2), ("mnist", "dm"): (89.7, 97.5, 98.6),
    ("fashion-mnist", "random"): (51.4, 73.8, 82.5), ("fashion-mnist", "herding"): (67.0, 71.1, 71.9),
    ("fashion-mnist", "dc"): (70.5, 82.3, 83.6), ("fashion-mnist", "dsa"): (70.6, 84.6, 88.7),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--ipc", default="1,10,50")
    parser.add_argument("--methods", default="random,herding,kcenter,dm,dc,dsa")
    parser.add_argument("--budget", default="15m", help="condensation wall-clock limit per matching run")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--net-width", type=int, default=128)
    parser.add_argument("--real-per-class", type=int, default=256)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script, not the methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "condense.json"))
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.ipc, args.budget, args.iterations = "mnist", "1", "10s", 3
        args.net_width, args.real_per_class, args.models, args.epochs = 16, 16, 1, 2

    rows = []
    for dataset in args.datasets.split(","):
        train, test = load_dataset(dataset, train=True), load_dataset(dataset, train=False)
        for ipc in map(int, args.ipc.split(",")):
            for method in args.methods.split(","):
                started = time.monotonic()
                result = condense(train, method, ipc, seed=0, iterations=args.iterations, net_width=args.net_width,
                                  real_per_class=args.real_per_class, time_budget=parse_duration(args.budget))
                seconds = time.monotonic() - started
                scored = evaluate_set(ImageSet(result.images, result.labels, train.spec, name=dataset), test,
                                      models=args.models, epochs=args.epochs)
                published = PUBLISHED.get((dataset, method))
                column = {1: 0, 10: 1, 50: 2}.get(ipc)
                rows.append({"dataset": dataset, "ipc": ipc, "method": method, "iterations": len(result.history) or None,
                             "seconds": round(seconds, 1), "mean": scored["mean"], "std": scored["std"],
                             "published": published[column] if published and column is not None else None})
                print(json.dumps(rows[-1]), flush=True)

    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    lines = [f"Machine: {result['machine']}. Date: {result['date']}. Command: `{result['command']}`", "",
             "| data set | ipc | method | iterations | condensation s | accuracy % (mean +- std) | published % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r['iterations'] or '-'} | {r['seconds']} | "
                     f"{r['mean']} +- {r['std']} | {r['published'] if r['published'] is not None else '-'} |")
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        path = ROOT / "BENCHMARKS.md"
        start, end = "<!-- condense:start -->", "<!-- condense:end -->"
        text = path.read_text()
        block = f"{start}\n{table}\n{end}"
        text = (text[: text.index(start)] + block + text[text.index(end) + len(end):]) if start in text else \
            text + f"\n## Dataset condensation\n\n{block}\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
