"""Benchmark ``datafree compress`` against its two baselines, in one run, per teacher and MACs reduction:

- ``compress``: prune the teacher to the MACs target, recover by data-free distillation from the
  teacher (the budget), int8 and ONNX (the handoff);
- ``scratch``: the same pruned architecture (same MACs) with fresh weights, distilled data-free from
  the teacher for the same budget (the student a user gets without ``compress``);
- ``floor``: the pruned network with no recovery (read from the compress run's ``pruned.safetensors``).

    DATAFREE_DATA=../shared/data python scripts/bench_compress.py --budget 20m
    DATAFREE_DATA=../shared/data python scripts/bench_compress.py --quick      # a smoke run: 20 s a row, one teacher

Every row runs alone with ``--threads`` threads, one after the other. Real test data is read only
after each run, to score it (choosing nothing). Writes ``bench/compress.json`` (with the command and
the machine) and the table into ``BENCHMARKS.md`` between the ``compress`` markers.
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

TEACHERS = {  # name: (file, data set)
    "mnist_lenet5": ("assets/teachers/mnist_lenet5.safetensors", "mnist"),
    "fmnist_convnet": ("assets/teachers/fmnist_convnet.safetensors", "fashion-mnist"),
    "mnist_resnet20": ("assets/suite/mnist_resnet20.safetensors", "mnist"),
}


def real_accuracy(program, test) -> float:
    """Test accuracy in percent of a program taking [0, 1] images (``test`` in the teacher's input space)."""
    from datafree.outputs.handoff import predicted_classes

    predicted = predicted_classes(program, test.spec.denormalize(test.images).clamp(0, 1))
    return round((predicted == test.labels).float().mean().item() * 100, 2)


def fresh_copy(path: Path, out: Path, seed: int) -> Path:
    """The pruned architecture at ``path`` with freshly initialised weights (the from-scratch student of the same MACs)."""
    import torch

    from datafree.data.datasets import InputSpec
    from datafree.teachers.formats import load_model, save_model

    model, card = load_model(path)
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    save_model(model, out, card["arch"], InputSpec.from_dict(card["input_spec"]), card.get("arch_kwargs", {}))
    return out


def run_row(name: str, reduction: str, budget: str, seed: int) -> dict:
    """compress, then the scratch baseline, for one teacher and reduction; the floor from the compress run."""
    import torch

    from datafree.compress.config import compress_config
    from datafree.compress.job import run_compress
    from datafree.data.datasets import load_dataset
    from datafree.distill.job import run_distill
    from datafree.distill.presets import resolve_distill_config
    from datafree.models.inference import accuracy
    from datafree.teachers.formats import load_model, load_teacher

    file, dataset = TEACHERS[name]
    teacher_path = ROOT / file
    base = ROOT / "runs" / "bench" / "compress" / f"{name}-{reduction}-{budget}"
    started = time.monotonic()
    summary = run_compress(compress_config({"teacher": str(teacher_path), "target_macs": reduction, "time_budget": budget,
                                            "out": str(base / "compress"), "seed": seed}), overwrite=True, progress=False,
                           notify=lambda m: None)
    compress_seconds = time.monotonic() - started
    scratch_path = fresh_copy(base / "compress" / "pruned.safetensors", base / "scratch.safetensors", seed)
    started = time.monotonic()
    scratch = run_distill(resolve_distill_config(overrides={"teacher": str(teacher_path), "student": str(scratch_path),
                                                             "out": str(base / "scratch"), "time_budget": budget, "seed": seed,
                                                             "steps": 10 ** 6}), overwrite=True, progress=False, notify=lambda m: None)
    scratch_seconds = time.monotonic() - started

    teacher = load_teacher(teacher_path)
    test = load_dataset(dataset, train=False)
    test.images = teacher.spec.normalize(test.spec.denormalize(test.images))
    import torch.ao.quantization.fx._decomposed

    handoff = json.loads((base / "compress" / "handoff" / "model_card.json").read_text())
    int8 = torch.export.load(str(base / "compress" / "handoff" / "student_int8.pt2")).module()
    stages = {r["stage"]: r for r in summary["stages"]}
    score = lambda path: round(accuracy(load_model(path)[0], test), 2)  # noqa: E731
    accuracy_of = {"teacher": round(accuracy(teacher, test), 2), "floor": score(base / "compress" / "pruned.safetensors"),
                   "compress": score(base / "compress" / "recovery" / "student.safetensors"),
                   "int8": real_accuracy(int8, test), "scratch": score(base / "scratch" / "student.safetensors")}
    return {"teacher": name, "reduction": reduction, "budget": budget, "run": str(base.relative_to(ROOT)),
            "teacher_macs": stages["teacher"]["macs"], "macs": stages["pruned"]["macs"],
            "parameters": stages["pruned"]["parameters"], "teacher_parameters": stages["teacher"]["parameters"],
            "accuracy": accuracy_of, "ratio": {k: round(v / accuracy_of["teacher"], 4) for k, v in accuracy_of.items()},
            "rounds": {"compress": summary["recovery"]["steps"], "scratch": scratch["steps"]},
            "seconds": {"compress_total": round(compress_seconds, 1), "recovery": summary["recovery"]["seconds"],
                        "scratch": round(scratch_seconds, 1), "pruning": summary["pruning"]["seconds"]},
            "holdout_agreement": {s: r["holdout_agreement"] for s, r in stages.items()},
            "int8_weight_ratio": handoff["int8"]["weight_ratio"],
            "onnx": {k: handoff["onnx"][k] for k in ("argmax_agreement", "max_abs_logit_diff")},
            "latency_ms_batch_64": {s: r["latency_ms"]["batch_64"] for s, r in stages.items()}}


def table(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; every row alone, {result['threads']} threads. Date: {result['date']}. "
             f"Wall-clock: {result['wall_clock_s']} s. Command: `{result['command']}`", "",
             "| teacher | teacher % | MACs fewer | budget | floor (pruned, no recovery) % | scratch (same MACs, data-free KD) % | "
             "compress % | x teacher | int8 % | int8 weights smaller | ONNX argmax agreement % / max logit diff | rounds compress / scratch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a = r["accuracy"]
        lines.append(f"| {r['teacher']} | {a['teacher']} | {r['teacher_macs'] / r['macs']:.2f}x ({r['reduction']} asked) | "
                     f"{r['budget']} | {a['floor']} | {a['scratch']} | **{a['compress']}** | {r['ratio']['compress']} | "
                     f"{a['int8']} | {r['int8_weight_ratio']}x | {r['onnx']['argmax_agreement']} / {r['onnx']['max_abs_logit_diff']:g} | "
                     f"{r['rounds']['compress']} / {r['rounds']['scratch']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", default=",".join(TEACHERS), help="comma-separated: " + ", ".join(TEACHERS))
    parser.add_argument("--reductions", default="2x,4x", help="MACs reductions, comma-separated")
    parser.add_argument("--budget", default="20m", help="time for each compress run and each scratch run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="20 s a row, the first teacher at 2x: checks the script")
    parser.add_argument("--out", default=str(ROOT / "bench" / "compress.json"))
    parser.add_argument("--no-markdown", action="store_true", help="write the JSON only")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.teachers, args.reductions = "20s", args.teachers.split(",")[0], "2x"
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    result = {"command": " ".join(["python", *sys.argv]),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "rows": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.teachers.split(","):
        for reduction in args.reductions.split(","):
            row = run_row(name, reduction, args.budget, args.seed)
            result["rows"].append(row)
            result["wall_clock_s"] = round(time.time() - started)
            Path(args.out).write_text(json.dumps(result, indent=2))  # after every row: a stopped run keeps what it measured
            a = row["accuracy"]
            print(f"{name:<16} {reduction:>4} floor {a['floor']:>6} scratch {a['scratch']:>6} compress {a['compress']:>6} "
                  f"int8 {a['int8']:>6} (teacher {a['teacher']})", flush=True)
    print(table(result))
    if not args.no_markdown:
        sys.path.insert(0, str(ROOT / "scripts"))
        from benchmarks_md import write_block

        write_block("compress", table(result), "Compression: prune, recover data-free, int8")


if __name__ == "__main__":
    main()
