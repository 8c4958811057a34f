"""Choose the condensation defaults (method, matching-network width) on a validation split of the
*training* data; the test set is scored afterwards, for the report only.

    DATAFREE_DATA=../shared/data python scripts/choose_condense_defaults.py --budget 3m

Each candidate condenses MNIST training images 0-49,999 (ipc 10) for the same wall-clock budget;
``--models`` fresh ConvNets per candidate are then trained on the condensed set with the fixed
protocol and scored on training images 50,000-59,999, which no candidate read. The candidate with
the highest validation accuracy is the default; the same trained models are also scored on the real
test set (read only after the choice), and both columns go to ``bench/condense_defaults.json`` and
the table printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datafree.base.config import parse_duration  # noqa: E402
from datafree.condense.condenser import condense  # noqa: E402
from datafree.data.datasets import ImageSet, load_dataset  # noqa: E402
from datafree.outputs.evaluate import evaluate_set  # noqa: E402


def split(data: ImageSet, start: int, stop: int) -> ImageSet:
    return ImageSet(data.images[start:stop], data.labels[start:stop], data.spec, data.name)


def _setting(item: str) -> tuple[str, object]:
    """``"refresh_every=5"`` -> ``("refresh_every", 5)``: a condense setting with an int, float or text value."""
    key, value = item.split("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def _settings(text: str) -> dict:
    """``"init=kmeans+extra.lr_dm=3"`` -> ``{"init": "kmeans", "extra": {"lr_dm": 3}}``: ``extra.`` names go to
    the method-specific ``CondenseSettings.extra`` (e.g. ``lr_dm``, the image learning rate of ``dm``)."""
    settings, extra = {}, {}
    for key, value in map(_setting, text.split("+")):
        if key.startswith("extra."):
            extra[key.removeprefix("extra.")] = value
        else:
            settings[key] = value
    return settings | ({"extra": extra} if extra else {})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--candidates", default="dsa:32,dsa:64,dm:32,dm:64",
                        help="METHOD:NET_WIDTH[:SETTING=VALUE+SETTING=VALUE],... e.g. dm_pool:32:refresh_every=5+init=kmeans or dm:32:extra.lr_dm=3")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--models", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "condense_defaults.json"))
    args = parser.parse_args()
    full = load_dataset(args.dataset, train=True)
    source, validation = split(full, 0, 50000), split(full, 50000, 60000)
    test = load_dataset(args.dataset, train=False)
    rows, held_out_tests = [], []
    for candidate in args.candidates.split(","):
        method, width, *extra = candidate.split(":")
        settings = _settings(extra[0]) if extra else {}
        started = time.monotonic()
        result = condense(source, method, args.ipc, seed=0, iterations=10 ** 6, time_budget=parse_duration(args.budget),
                          net_width=int(width), **settings)
        seconds = time.monotonic() - started
        condensed = ImageSet(result.images, result.labels, source.spec, source.name)
        # the same models are scored on the test set too; that column is read only after the choice
        val = evaluate_set(condensed, validation, models=args.models, epochs=args.epochs, also={"test": test})
        rows.append({"method": method, "net_width": int(width), "settings": settings, "budget": args.budget, "iterations": len(result.history),
                     "seconds": round(seconds, 1), "validation_acc": val["mean"], "validation_std": val["std"],
                     "validation_accuracies": val["accuracies"]})
        held_out_tests.append(val["also"]["test"])
        print(json.dumps(rows[-1]), flush=True)
    chosen = max(rows, key=lambda r: r["validation_acc"])
    for r, test_result in zip(rows, held_out_tests):  # report only, after the choice
        r["chosen"] = r is chosen
        r["test_acc"], r["test_std"] = test_result["mean"], test_result["std"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    out = {"machine": machine, "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "source": f"{args.dataset} train[0:50000]", "validation": f"{args.dataset} train[50000:60000]", "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| method | net width | settings | budget | iterations | validation % | test % (after) | chosen |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = " ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
        print(f"| {r['method']} | {r['net_width']} | {extra} | {r['budget']} | {r['iterations']} | {r['validation_acc']} | {r['test_acc']} | "
              f"{'yes' if r['chosen'] else ''} |")


if __name__ == "__main__":
    main()
