"""Benchmark dataset condensation: each method and baseline at several images per class.

    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --datasets mnist --ipc 1,10 --budget 5m
    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --merge --rows mnist:10:dsa:15m,transfer:runs/d:10:dsa:5m
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
from datafree.evaluate import PROTOCOL, evaluate_set  # noqa: E402

PUBLISHED = {  # DESIGN.md: ConvNet test accuracy at 1 / 10 / 50 images per class
    ("mnist", "random"): (64.9, 95.1, 97.9), ("mnist", "herding"): (89.2, 93.7, 94.8),
    ("mnist", "dc"): (91.7, 97.4, 98.8), ("mnist", "dsa"): (88.7, 97.8, 99.2), ("mnist", "dm"): (89.7, 97.5, 98.6),
    ("fashion-mnist", "random"): (51.4, 73.8, 82.5), ("fashion-mnist", "herding"): (67.0, 71.1, 71.9),
    ("fashion-mnist", "dc"): (70.5, 82.3, 83.6), ("fashion-mnist", "dsa"): (70.6, 84.6, 88.7),
}


ITERATION_IS = {"dc": "one fresh matching network (outer x inner steps by ipc)", "dsa": "one fresh matching network (outer x inner steps by ipc)",
                "dm": "one matching step on a fresh random network"}


def _source(dataset: str):
    """A real training set by name, or ``transfer:RUN`` for a distill run's transfer set (no real data)."""
    if dataset.startswith("transfer:"):
        from datafree.data import load_transfer_set

        run = dataset.removeprefix("transfer:")
        images, _ = load_transfer_set(run)
        return images, load_dataset("mnist", train=False), "mnist (data-free)"
    return load_dataset(dataset, train=True), load_dataset(dataset, train=False), dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="DATASET:IPC:METHOD:BUDGET,... (DATASET may be transfer:RUN_FOLDER); overrides the grid")
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--ipc", default="1,10,50")
    parser.add_argument("--methods", default="random,herding,kcenter,dm,dc,dsa")
    parser.add_argument("--budget", default="15m", help="condensation wall-clock limit per matching run")
    parser.add_argument("--iterations", type=int, default=100000)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script, not the methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "condense.json"))
    parser.add_argument("--merge", action="store_true", help="add to (or replace rows in) an existing --out")
    parser.add_argument("--load", default="alone", help="what ran beside this benchmark, recorded with every row")
    args = parser.parse_args()
    settings = {}
    if args.quick:
        args.rows, args.iterations, args.models, args.epochs = "mnist:1:dc:10s,mnist:1:random:-", 3, 1, 2
        settings = {"net_width": 8, "real_per_class": 16}
    rows_spec = [r.split(":") for r in args.rows.split(",")] if args.rows else [
        (d, i, m, args.budget) for d in args.datasets.split(",") for i in args.ipc.split(",") for m in args.methods.split(",")]
    rows = []
    for spec in rows_spec:
        *dataset, ipc, method, budget = spec
        dataset = ":".join(dataset)
        train, test, label = _source(dataset)
        started = time.monotonic()
        result = condense(train, method, int(ipc), seed=0, iterations=args.iterations, time_budget=None if budget == "-" else parse_duration(budget),
                          **settings)
        seconds = time.monotonic() - started
        scored = evaluate_set(ImageSet(result.images, result.labels, train.spec, name=test.name), test,
                              models=args.models, epochs=args.epochs)
        published = None if label.endswith("(data-free)") else PUBLISHED.get((dataset, method))  # no published data-free row
        column = {1: 0, 10: 1, 50: 2}.get(int(ipc))
        rows.append({"dataset": label, "ipc": int(ipc), "method": method, "budget": budget,
                     "iterations": len(result.history) or None, "seconds": round(seconds, 1), "mean": scored["mean"],
                     "std": scored["std"], "accuracies": scored["accuracies"],
                     "published": published[column] if published and column is not None else None,
                     "iteration_is": ITERATION_IS.get(method, "-"), "load": args.load, "command": " ".join(["python", *sys.argv]),
                     "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "run_date": time.strftime("%Y-%m-%d"),
                     "protocol": f"datafree fixed protocol, {args.models} models x {args.epochs} epochs"})
        print(json.dumps(rows[-1]), flush=True)
        write_results(args, rows)  # after every row: a stopped run keeps what it measured


def write_results(args, rows):
    out = Path(args.out)
    old = json.loads(out.read_text())["rows"] if args.merge and out.is_file() else []
    key = lambda r: (r["dataset"], r["ipc"], r["method"], r.get("budget"))  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "protocol": PROTOCOL,
              "evaluation": f"{args.models} models x {args.epochs} epochs", "rows": list(merged.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [f"Machine: {result['machine']}. Date: {result['date']}. Evaluation: {result['evaluation']} (fixed protocol). "
             f"Last command: `{result['command']}`", "",
             "| data set | ipc | method | budget | iterations | condensation s | accuracy % (mean +- std) | published % | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r.get('budget', '-')} | {r['iterations'] or '-'} | "
                     f"{r['seconds']} | {r['mean']} +- {r['std']} | {r['published'] if r['published'] is not None else '-'} | "
                     f"{r.get('load', 'see the notes below')} |")
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
