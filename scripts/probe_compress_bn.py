"""Probe: does re-estimating a pruned network's BatchNorm statistics on synthetic images help before recovery?

For each teacher and MACs reduction: the pruned network's accuracy on a *validation split* (the last
10,000 training images, never the test set) as pruned, and after :func:`datafree.compress.prune.recalibrate_bn`
on 256 synthetic images of the teacher. The rule that decides is fixed beforehand in
``bench/rules/2026-12-05-compress-bn-recalibration.txt``.

    DATAFREE_DATA=../shared/data python scripts/probe_compress_bn.py

Writes ``bench/probe_compress_bn.json`` (with the command and the machine).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main():
    import torch

    from bench_compress import TEACHERS
    from datafree.compress.job import load_prunable_teacher
    from datafree.compress.prune import count_macs, parse_macs_target, prune_model, recalibrate_bn, synthetic_batches
    from datafree.data.datasets import InputSpec
    from datafree.models.inference import accuracy
    from probe_distill import validation_set

    torch.set_num_threads(2)
    rows = []
    for name, (file, dataset) in TEACHERS.items():
        model, card = load_prunable_teacher(ROOT / file)
        spec = InputSpec.from_dict(card["input_spec"])
        shape = (spec.channels, spec.size, spec.size)
        val = validation_set(SimpleNamespace(spec=spec), dataset)  # needs the input spec only
        started = time.monotonic()
        images, _ = synthetic_batches(model, shape, spec.num_classes, images=256, seed=0)
        synthesis_s = time.monotonic() - started
        for reduction in ("2x", "4x"):
            pruned = prune_model(model, shape, target_macs=parse_macs_target(reduction, count_macs(model, shape)))
            before = accuracy(pruned.eval(), val)
            recalibrate_bn(pruned, images)
            after = accuracy(pruned.eval(), val)
            rows.append({"teacher": name, "reduction": reduction, "validation_pruned": round(before, 2),
                         "validation_recalibrated": round(after, 2), "synthesis_s": round(synthesis_s, 1)})
            print(f"{name:<16} {reduction}  pruned {before:6.2f}  recalibrated {after:6.2f}", flush=True)
    gains = [r["validation_recalibrated"] - r["validation_pruned"] for r in rows]
    verdict = {"rows_up": sum(g > 0 for g in gains), "mean_gain": round(sum(gains) / len(gains), 2)}
    verdict["adopt"] = verdict["rows_up"] >= 5 and verdict["mean_gain"] >= 5
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, 2 threads, torch {torch.__version__}", "rows": rows, "verdict": verdict}
    (ROOT / "bench" / "probe_compress_bn.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(verdict))


if __name__ == "__main__":
    main()
