"""Benchmark dataset condensation: each method and baseline at several images per class.

    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --datasets mnist --ipc 1,10 --budget 5m
    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --merge --rows mnist:10:dsa:15m,transfer:runs/d:10:dsa:5m
    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --merge --rows mnist:10:dm:5m --inits real,kmeans,noise --audit
    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --merge --rows - --references ../shared/reference/vico-mnist-ipc10/snap_DM_ipc10_exp0_t01201
    DATAFREE_DATA=../shared/data python scripts/bench_condense.py --quick      # a smoke run of the script

Every set is made by :func:`datafree.condense.job.run_condense` (the job the command line and the
service run, with its no-real-data guard for ``transfer:RUN`` sources) into ``bench/condense_runs/``.
Condensation is timed (evaluation is not); each set is scored with the fixed protocol of
``datafree.outputs.evaluate`` (mean +- std over ``--models`` fresh ConvNets on the real test set), next to
the published figures. ``--references`` scores image folders made by other code (ImageFolder
layout) with the same evaluator in the same run. ``--audit`` adds the privacy audit of each set
against the real training set (near-copies, nearest/second-nearest ratio, images still nearest to
the real image they started from). Writes ``bench/condense.json`` and the tables into ``BENCHMARKS.md``.
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

from benchmarks_md import write_block  # noqa: E402

from datafree.condense.config import TEACHER_TERMS, CondenseJob  # noqa: E402
from datafree.condense.job import run_condense
from datafree.data.datasets import ImageSet, dataset_spec, load_dataset  # noqa: E402
from datafree.outputs.evaluate import PROTOCOL, PROTOCOLS, evaluate_set  # noqa: E402
from datafree.outputs.export import init_sources, read_set  # noqa: E402

PUBLISHED = {  # ConvNet test accuracy at 1 / 10 / 50 images per class: Zhao, Mopuri & Bilen, "Dataset Condensation with
    # Gradient Matching", ICLR 2021, Table 1 (random, herding, DC); Zhao & Bilen, "Dataset Condensation with Differentiable
    # Siamese Augmentation", ICML 2021, Table 1 (DSA); Zhao & Bilen, "Dataset Condensation with Distribution Matching",
    # WACV 2023, Table 1 (DM)
    ("mnist", "random"): (64.9, 95.1, 97.9), ("mnist", "herding"): (89.2, 93.7, 94.8),
    ("mnist", "dc"): (91.7, 97.4, 98.8), ("mnist", "dsa"): (88.7, 97.8, 99.2), ("mnist", "dm"): (89.7, 97.5, 98.6),
    ("fashion-mnist", "random"): (51.4, 73.8, 82.5), ("fashion-mnist", "herding"): (67.0, 71.1, 71.9),
    ("fashion-mnist", "dc"): (70.5, 82.3, 83.6), ("fashion-mnist", "dsa"): (70.6, 84.6, 88.7),
}


ITERATION_IS = {"dc": "one fresh matching network (outer x inner steps by ipc)", "dsa": "one fresh matching network (outer x inner steps by ipc)",
                "dm": "one matching step on a fresh random network",
                "gm_pool": "one matching step against a pool network's cached real gradients",
                "dm_pool": "one matching step against a pool network's cached real mean embeddings"}


def _source(dataset: str) -> tuple[str, str, str]:
    """``(condense source, real test set name, label)``: a real set by name, or ``transfer:RUN`` (no real data)."""
    if dataset.startswith("transfer:"):
        return dataset.removeprefix("transfer:"), "mnist", "mnist (data-free)"
    return dataset, dataset, dataset


def _audit(folder: Path, real: ImageSet) -> dict:
    """Near-copies, the median nearest/second-nearest ratio and traceability of a set against ``real``."""
    from datafree.condense.job import dataset_digest
    from datafree.outputs.audit import audit_set

    images, _, manifest = read_set(folder, spec=real.spec)
    starts = init_sources(folder)
    same_source = manifest.get("source", {}).get("sha256") == dataset_digest(real.images, real.labels)
    report = audit_set(images, real, None, init_source=starts if same_source and starts is not None else None)
    trace = report.get("traceability", {})
    return {"near_copies": report["pixel"]["near_copies"], "ratio_median": round(report["pixel"]["ratio"]["median"], 3),
            "nn1_median": round(report["pixel"]["nn1"]["median"], 3),
            "nearest_is_own_source": trace.get("nearest_is_own_source"), "from_source": trace.get("images_from_source", 0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="DATASET:IPC:METHOD:BUDGET,... (DATASET may be transfer:RUN_FOLDER); overrides the grid")
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--ipc", default="1,10,50")
    parser.add_argument("--methods", default="random,herding,kcenter,dm,dc,dsa")
    parser.add_argument("--budget", default="15m", help="condensation wall-clock limit per matching run")
    parser.add_argument("--iterations", type=int, default=100000)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="training epochs of each evaluation model (default: the protocol's)")
    parser.add_argument("--protocol", default="fixed", choices=sorted(PROTOCOLS),
                        help="evaluation protocol (datafree.outputs.evaluate.PROTOCOLS): fixed (300 epochs) or published (1,001)")
    parser.add_argument("--soft-labels", action="store_true",
                        help="data-free rows keep the teacher's softmax with each image and are also scored training on it "
                             "(KD), in a column of its own beside the hard-label result")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script, not the methods")
    parser.add_argument("--out", default=str(ROOT / "bench" / "condense.json"))
    parser.add_argument("--merge", action="store_true", help="add to (or replace rows in) an existing --out")
    parser.add_argument("--load", default="alone", help="what ran beside this benchmark, recorded with every row")
    parser.add_argument("--inits", default="default",
                        help="initialisations of the matching methods, e.g. real,kmeans,noise; default: the job's own "
                             "(kmeans for a real data set, real in data-free mode)")
    parser.add_argument("--audit", action="store_true", help="audit each set against the real training set")
    parser.add_argument("--factor", type=int, default=1, help="multi-formation factor of the matching methods (rows of their own)")
    parser.add_argument("--references", help="image folders made by other code to score in the same run (comma-separated)")
    parser.add_argument("--reference-test", default="mnist", help="the real test set of the --references")
    parser.add_argument("--teacher-terms", default="default", choices=("default", "off", "both"),
                        help="data-free rows: the job's default teacher terms, none (teacher_ce = teacher_bn = 0), or a row of each")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    args.epochs = args.epochs or PROTOCOLS[args.protocol]["epochs"]
    settings = {}
    if args.quick:
        args.rows, args.iterations, args.models, args.epochs = "mnist:1:dc:10s,mnist:1:random:-", 3, 1, 2
        args.out = str(ROOT / "bench" / "condense_quick.json")
        settings = {"net_width": 8, "real_per_class": 16}
    rows_spec = [] if args.rows == "-" else [r.split(":") for r in args.rows.split(",")] if args.rows else [
        (d, i, m, args.budget) for d in args.datasets.split(",") for i in args.ipc.split(",") for m in args.methods.split(",")]
    rows = []
    for spec in rows_spec:
        *dataset, ipc, method, budget = spec
        dataset = ":".join(dataset)
        source, test_name, label = _source(dataset)
        test = load_dataset(test_name, train=False)
        data_free_matching = "free" in label and method in ITERATION_IS
        terms = {"both": ["default", "off"]}.get(args.teacher_terms, [args.teacher_terms]) if data_free_matching else ["-"]
        for init, term in [(i, t) for i in (args.inits.split(",") if method in ITERATION_IS else ["-"]) for t in terms]:
            factor = args.factor if method in ITERATION_IS else 1
            out = ROOT / "bench" / "condense_runs" / (f"{label.split()[0]}_{'free_' if 'free' in label else ''}ipc{ipc}_{method}_{budget}_{init}"
                                                      + (f"_factor{factor}" if factor > 1 else "") + ("_noteacher" if term == "off" else ""))
            off = {"teacher_ce": 0.0, "teacher_bn": 0.0} if term == "off" else {}
            soft = args.soft_labels and "free" in label
            job = CondenseJob(source=source, out=str(out), ipc=int(ipc), method=method, steps=args.iterations, overwrite=True,
                              time_budget=None if budget == "-" else budget, init=None if init in ("-", "default") else init,
                              progress=not args.no_progress, factor=factor, soft_labels=soft, **settings, **off)
            started = time.monotonic()
            run_condense(job)
            seconds = time.monotonic() - started
            condensed, soft_labels, manifest = read_set(out)
            as_test = ImageSet(condensed.images, condensed.labels, condensed.spec, name=test.name)
            scored = evaluate_set(as_test, test, models=args.models, epochs=args.epochs, protocol=args.protocol)
            kd = evaluate_set(as_test, test, models=args.models, epochs=args.epochs, protocol=args.protocol,
                              soft_labels=soft_labels) if soft else {}
            published = None if "free" in label else PUBLISHED.get((dataset, method))  # no published data-free row
            column = {1: 0, 10: 1, 50: 2}.get(int(ipc))
            used = {k: manifest["settings"].get(k) for k in TEACHER_TERMS}
            init = manifest["settings"].get("init", "-")  # what ran: the job's default resolved, or "-" for a selection
            row = {"dataset": label, "ipc": int(ipc), "method": method, "budget": budget, "init": init, "factor": factor,
                   "teacher_terms": (", ".join(f"{k.split('_')[1]} {v:g}" for k, v in used.items()) if any(used.values())
                                     else "off") if data_free_matching else None,
                   "iterations": manifest.get("iterations_done") or None, "seconds": round(seconds, 1), "mean": scored["mean"],
                   "std": scored["std"], "accuracies": scored["accuracies"], "soft_mean": kd.get("mean"), "soft_std": kd.get("std"),
                   "published": published[column] if published and column is not None else None,
                   "iteration_is": ITERATION_IS.get(method, "-"), **_common(args)}
            if args.audit:
                row["audit"] = _audit(out, load_dataset(test_name, train=True))
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            write_results(args, rows)  # after every row: a stopped run keeps what it measured
    for folder in args.references.split(",") if args.references else []:
        folder = Path(folder)
        test_name = args.reference_test
        test = load_dataset(test_name, train=False)
        condensed, _, manifest = read_set(folder, spec=dataset_spec(test_name))
        scored = evaluate_set(ImageSet(condensed.images, condensed.labels, condensed.spec, name=test.name), test,
                              models=args.models, epochs=args.epochs, protocol=args.protocol)
        ipc = len(condensed) // condensed.spec.num_classes
        row = {"dataset": test_name, "ipc": ipc, "method": f"reference:{folder.name}", "budget": folder.name.rsplit("_t", 1)[-1] + " s",
               "init": "-", "iterations": None, "seconds": None, "mean": scored["mean"], "std": scored["std"],
               "accuracies": scored["accuracies"], "published": None, "iteration_is": "made by other code: see ../shared/reference/README.md",
               **_common(args)}
        if args.audit:
            row["audit"] = _audit(folder, load_dataset(test_name, train=True))
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
        write_results(args, rows)


def _common(args) -> dict:
    return {"load": args.load, "command": " ".join(["python", *sys.argv]),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "run_date": time.strftime("%Y-%m-%d"),
            "protocol": f"datafree {args.protocol} protocol, {args.models} models x {args.epochs} epochs"}


def write_results(args, rows):
    out = Path(args.out)
    old = json.loads(out.read_text())["rows"] if args.merge and out.is_file() else []
    key = lambda r: (r["dataset"], r["ipc"], r["method"], r.get("budget"), r.get("init", "real"), r.get("factor", 1),  # noqa: E731
                     r.get("teacher_terms"))
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "protocol": PROTOCOL,
              "evaluation": f"{args.models} models x {args.epochs} epochs ({args.protocol} protocol)", "rows": list(merged.values())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [f"Machine: {result['machine']}. Date: {result['date']}. Evaluation: {result['evaluation']}. "
             f"Last command: `{result['command']}`", "",
             "| data set | ipc (stored) | method | init | budget | iterations | condensation s | accuracy % (mean +- std) | "
             "soft labels (KD) % | published % | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        storage = f"{r['ipc']}" + (f" (factor {r['factor']}: {r['ipc'] * r['factor'] ** 2} decoded)" if r.get("factor", 1) > 1 else "")
        soft = f"{r['soft_mean']} +- {r['soft_std']}" if r.get("soft_mean") is not None else "-"
        method = r["method"] + (f" + teacher ({r['teacher_terms']})" if r.get("teacher_terms") not in (None, "off") else "")
        lines.append(f"| {r['dataset']} | {storage} | {method} | {r.get('init', 'real')} | {r.get('budget', '-')} | "
                     f"{r['iterations'] or '-'} | {r['seconds'] if r['seconds'] is not None else '-'} | {r['mean']} +- {r['std']} | "
                     f"{soft} | "
                     f"{r['published'] if r['published'] is not None else '-'} | {r.get('load', 'see the notes below')} |")
    audited = [r for r in result["rows"] if r.get("audit")]
    audit_lines = ["| data set | ipc | method | init | budget | accuracy % | near-copies | median nn1/nn2 ratio | median nn1 | "
                   "still nearest to own start |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in audited:
        a = r["audit"]
        trace = f"{a['nearest_is_own_source']} of {a['from_source']}" if a.get("from_source") else "- (no real start)"
        audit_lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r.get('init', 'real')} | {r.get('budget', '-')} | "
                           f"{r['mean']} +- {r['std']} | {a['near_copies']} | {a['ratio_median']} | {a['nn1_median']} | {trace} |")
    print("\n".join(lines + [""] + (audit_lines if audited else [])))
    if not args.quick:
        # the block is named after --out, so a side benchmark with its own --out never replaces the main table
        write_block(Path(args.out).stem.replace("_", "-"), "\n".join(lines), "Dataset condensation")
        if audited:
            write_block("condense-audit", "\n".join(audit_lines), "Condensation: initialisation, accuracy and privacy")



if __name__ == "__main__":
    main()
