"""Probe: how should ``datafree compress`` recover a pruned network (learning rate, BatchNorm statistics)?

For each teacher at 2x fewer MACs, one compress run per variant of the recovery; the validation
accuracy (the last 10,000 training images, never the test set) of every snapshot its selection
chooses between, beside their held-out synthetic agreement, and of the model it hands over. The rule
that decides is fixed beforehand in ``bench/rules/2026-12-05-compress-recovery.txt``.

    DATAFREE_DATA=../shared/data python scripts/probe_compress_recovery.py --budget 3m

Writes ``bench/probe_compress_recovery.json`` (with the command and the machine) after every run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

VARIANTS = {  # name: compress config fields (lr_student as a share of the preset's, resolved below)
    "default": {},
    "lr_low": {"lr_scale": 0.05},
    # "freeze_bn" (the student's BN statistics held fixed) diverged at its first round on both teachers in the first
    # round (bench/probe_compress_recovery.json) and was removed from compress afterwards
    "deepinversion": {"preset": "deepinversion"},  # the second round (its own rule file)
}


def main():
    import torch

    from bench_compress import TEACHERS
    from datafree.compress.config import compress_config
    from datafree.compress.job import run_compress
    from datafree.data.datasets import InputSpec
    from datafree.distill.presets import resolve_distill_config
    from datafree.models.inference import accuracy
    from datafree.teachers.formats import load_model
    from probe_distill import scoring_the_candidates, validation_set

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="mnist_resnet20,fmnist_convnet")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--budget", default="3m")
    parser.add_argument("--variants-note", default="", help="which rule file this invocation follows (recorded)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "probe_compress_recovery.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.teachers.split(","):
        file, dataset = TEACHERS[name]
        _, card = load_model(ROOT / file)
        spec = InputSpec.from_dict(card["input_spec"])
        val = validation_set(SimpleNamespace(spec=spec), dataset)
        for variant in args.variants.split(","):
            fields = dict(VARIANTS[variant])
            if "lr_scale" in fields:
                fields["lr_student"] = resolve_distill_config(overrides={"teacher": str(ROOT / file)}).lr_student * fields.pop("lr_scale")
            out = ROOT / "runs" / "probe" / "compress_recovery" / f"{name}-{variant}"
            curve, timing = [], {}
            with scoring_the_candidates(val, curve, timing):
                summary = run_compress(compress_config({"teacher": str(ROOT / file), "target_macs": "2x", "seed": 0,
                                                        "time_budget": args.budget, "out": str(out), **fields}),
                                       overwrite=True, progress=False, notify=lambda m: None)
            handed = accuracy(load_model(out / "recovery" / "student.safetensors")[0].eval(), val)
            pruned = accuracy(load_model(out / "pruned.safetensors")[0].eval(), val)
            rows.append({"teacher": name, "variant": variant, "fields": fields, "validation_pruned": round(pruned, 2),
                         "validation_handed_over": round(handed, 2), "selected_round": summary["recovery"]["selected_step"],
                         "rounds": summary["recovery"]["steps"], "guard": summary["recovery"].get("guard"), "snapshots": curve})
            print(f"{name:<16} {variant:<10} pruned {pruned:6.2f}  handed over {handed:6.2f}  "
                  f"(round {summary['recovery']['selected_step']} of {summary['recovery']['steps']})", flush=True)
            write(args, rows, torch)
    by = {(r["teacher"], r["variant"]): r["validation_handed_over"] for r in rows}
    teachers = args.teachers.split(",")
    verdict = {}
    for variant in args.variants.split(","):
        if variant == "default" or not all((t, variant) in by and (t, "default") in by for t in teachers):
            continue
        gains = [by[(t, variant)] - by[(t, "default")] for t in teachers]
        verdict[variant] = {"gains": gains, "mean_gain": round(sum(gains) / len(gains), 2),
                            "qualifies": all(g > 0 for g in gains) and sum(gains) / len(gains) >= 2}
    write(args, rows, torch, verdict)
    print(json.dumps(verdict))


def write(args, rows, torch, verdict=None):
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, 2 threads, torch {torch.__version__}", "rows": rows, "verdict": verdict}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
