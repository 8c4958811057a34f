"""The ``compress`` job: a teacher in, a smaller int8 model of the same architecture out, with no data.

Three stages, each a piece the project already has or a maintained library:

1. **prune** the teacher's channels (:mod:`datafree.compress.prune`, Torch-Pruning's dependency
   graph) to a sparsity or a MACs target; the pruned network keeps the teacher's remaining weights;
2. **recover** by data-free distillation from the *original* teacher into the pruned network: the
   distill job as it is (its preset for the teacher, schedule, pool, and the student selected on
   held-out synthetic samples), started from the pruned weights at a fine-tuning learning rate;
3. **hand off**: the handoff package of the recovered model (:func:`~datafree.outputs.handoff.export_student`):
   ``.pt2``, static int8 calibrated on the recovery's transfer set, ``student.onnx``.

``OUT/``::

    pruned.safetensors, pruned.json   the pruned teacher before recovery (layer sizes in the card)
    recovery/                         the distill run folder (transfer set, held-out set, report.html)
    handoff/                          student.safetensors, student.pt2, student_int8.pt2, student.onnx, MODEL_CARD.md
    compress.json, COMPRESS.md        one row per stage: teacher, pruned, recovered, int8

The stage table gives parameters, MACs, weight and file bytes, latency on this CPU and agreement with the
teacher on the recovery's held-out synthetic samples; real test accuracy only when evaluation data
is given, read after every stage is done. Nothing before that reads real data.

Example:
    >>> summary = run_compress(compress_config({"teacher": "assets/teachers/mnist_lenet5.safetensors", "steps": 50}))   # doctest: +SKIP
    >>> [row["stage"] for row in summary["stages"]]                                                                       # doctest: +SKIP
    ['teacher', 'pruned', 'recovered', 'int8']
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from datafree.base.errors import UserError
from datafree.base.io import check_writable_dir, save_tensors, write_json, write_text
from datafree.compress.config import RECOVERY_LR_SCALE, CompressConfig

PRUNABLE_FORMS = "a .safetensors file with its .json card (an architecture of the zoo)"
SYNTHETIC_IMAGES = 256  # images made from noise against the teacher, for Taylor importance and BN re-estimation
GUARD_IMAGES = 256  # images made the same way (another seed): int8 calibration when recovery made none, and --check-recovery


def check_prunable(path) -> None:
    """Refuse, in one sentence, a teacher file in a form that cannot be pruned (reads its first bytes only).

    Example:
        >>> check_prunable("assets/suite/fmnist_resnet8.ts")
        Traceback (most recent call last):
        datafree.base.errors.UserError: 'assets/suite/fmnist_resnet8.ts' is TorchScript, whose layers cannot be rewritten; compress needs a .safetensors file with its .json card (an architecture of the zoo)
    """
    from datafree.teachers.formats import sniff_format

    form = sniff_format(path)
    if form == "pickle":
        raise UserError(f"{str(path)!r} is a pickle file (torch.save); datafree never unpickles a file it is handed, "
                        f"and only {PRUNABLE_FORMS} can be compressed")
    if form != "safetensors":
        name = {"pt2": "a torch.export .pt2 program", "torchscript": "TorchScript"}[form]
        raise UserError(f"{str(path)!r} is {name}, whose layers cannot be rewritten; compress needs {PRUNABLE_FORMS}")
    if not Path(path).with_suffix(".json").is_file():
        raise UserError(f"{str(path)!r} has no card ({Path(path).with_suffix('.json').name}); compress needs {PRUNABLE_FORMS}")


def load_prunable_teacher(path) -> tuple[torch.nn.Module, dict]:
    """The teacher as a zoo model that can be pruned, with its card; any other form gets one sentence.

    Example:
        >>> model, card = load_prunable_teacher("assets/teachers/mnist_lenet5.safetensors")
        >>> card["arch"]
        'lenet5'
    """
    from datafree.teachers.formats import load_model

    check_prunable(path)
    model, card = load_model(path)
    return model.eval(), card


def run_compress(cfg: CompressConfig, overwrite: bool = False, resume: bool = False, progress: bool = True, notify=None) -> dict:
    """Prune, recover and hand off ``cfg.teacher`` into ``cfg.out``; return the summary (``compress.json``).

    Bad input raises :class:`UserError` before anything is written. ``resume`` continues the recovery
    of an interrupted run in ``cfg.out`` from its checkpoint.
    """
    import lightning as L

    from datafree.compress.prune import (
        count_macs,
        parse_macs_target,
        prune_model,
        prune_summary,
        recalibrate_bn,
        synthetic_batches,
    )
    from datafree.data.datasets import InputSpec, no_real_data
    from datafree.teachers.formats import load_model, save_model

    notify = notify or (lambda msg: print(msg, file=sys.stderr))
    out = Path(cfg.out)
    pruned_path = out / "pruned.safetensors"
    teacher_model, card = load_prunable_teacher(cfg.teacher)
    spec = InputSpec.from_dict(card["input_spec"])
    shape = (spec.channels, spec.size, spec.size)
    started = time.monotonic()
    if out.exists() and not resume:
        check_writable_dir(out, overwrite)  # a non-empty folder is refused before any work
    if resume:
        if not pruned_path.is_file() or not (out / "recovery" / "checkpoints" / "last.ckpt").is_file():
            raise UserError(f"nothing to resume: {str(out)!r} holds no pruned model with a recovery checkpoint")
        load_model(pruned_path)  # still a readable model with its card
        prune_record = json.loads((out / "prune.json").read_text())
    else:
        with no_real_data("pruning"):
            L.seed_everything(cfg.seed, verbose=False)
            kind, value = cfg.target()
            teacher_macs = count_macs(teacher_model, shape)
            target = parse_macs_target(value, teacher_macs) if kind == "target_macs" else None
            batches = (synthetic_batches(teacher_model, shape, spec.num_classes, images=SYNTHETIC_IMAGES, seed=cfg.seed)[0]
                       if cfg.importance == "taylor" or cfg.recalibrate_bn else None)
            pruned = prune_model(teacher_model, shape, sparsity=value if kind == "sparsity" else None, target_macs=target,
                                 importance=cfg.importance, batches=batches)
            recalibrated = recalibrate_bn(pruned, batches) if cfg.recalibrate_bn else 0
        prune_record = prune_summary(teacher_model, pruned, shape, time.monotonic() - started)
        prune_record |= {"importance": cfg.importance, kind: value, "target_macs_count": target,
                         "bn_recalibrated": f"{recalibrated} BatchNorm layers on {len(batches)} synthetic images"
                                            if recalibrated else None}
        notify(f"pruned {card['arch']}: {prune_record['teacher_macs']:,} -> {prune_record['macs']:,} MACs "
               f"({prune_record['macs_ratio']}x fewer), {prune_record['teacher_parameters']:,} -> {prune_record['parameters']:,} parameters")
        check_writable_dir(out, overwrite)  # only now: every refusal above left nothing behind
        save_model(pruned, pruned_path, card["arch"], spec, card.get("arch_kwargs", {}), trained_by="datafree compress (pruned, "
                   "before recovery)", teacher_sha256=card.get("sha256"), pruning=prune_record)
        write_json(out / "prune.json", prune_record)
        guard_images(out, teacher_model, spec, cfg.seed)
    summary_recovery = _recover(cfg, out, pruned_path, started, resume, progress, notify)
    if cfg.check_recovery:
        summary_recovery["guard"] = keep_the_better(out, teacher_model, card, spec, notify, cfg.seed)
        if summary_recovery["guard"]["kept"] == "pruned":
            summary_recovery["selected_step"] = 0
    return _hand_off(cfg, out, teacher_model, card, spec, prune_record, summary_recovery, progress)


def guard_images(out: Path, teacher_model, spec, seed: int) -> torch.Tensor:
    """``out/guard.safetensors``, made once (before recovery; a run begun before it existed gets it when
    first needed): images optimised from noise against the teacher, a class each, another seed than
    the BN re-estimation's. No real data."""
    from datafree.base.io import load_tensors
    from datafree.compress.prune import synthetic_batches
    from datafree.data.datasets import no_real_data

    path = out / "guard.safetensors"
    if not path.is_file():
        with no_real_data("the recovery check's images"):
            images, _ = synthetic_batches(teacher_model, (spec.channels, spec.size, spec.size), spec.num_classes,
                                          images=GUARD_IMAGES, seed=seed + 1)
        save_tensors(path, {"images": images})
    return load_tensors(path)["images"]


def keep_the_better(out: Path, teacher_model, card: dict, spec, notify, seed: int = 0) -> dict:
    """The recovery's check (``check_recovery``): the pruned and the recovered network's class-balanced
    agreement with the teacher on synthetic images made apart from the recovery (``guard.safetensors``:
    from noise against the teacher, a class each, before recovery began). The recovery's own held-out
    samples come from its generator, and a generator that collapses onto a few classes makes them
    useless for this: a network that calls everything one class then agrees with them. When the pruned
    network agrees more, it is what the recovery hands over (``recovery/student.safetensors``, with a
    note in its card). Measured (BENCHMARKS.md): it caught a collapsed ResNet-20 recovery (10% on a
    validation split, the pruned network 67%) but also discarded a better one (90%): the pruned
    network's BN statistics were re-estimated on images made the same way, which favours it here."""
    from datafree.distill.selection import agreement_on
    from datafree.models.inference import predict
    from datafree.outputs.export import export_program
    from datafree.teachers.formats import load_model, save_model

    images = guard_images(out, teacher_model, spec, seed)
    t_logits = predict(teacher_model, images)
    pruned, _ = load_model(out / "pruned.safetensors")
    recovered, recovered_card = load_model(out / "recovery" / "student.safetensors")
    scores = {name: round(agreement_on(model.eval(), images, t_logits), 2) for name, model in (("pruned", pruned), ("recovered", recovered))}
    kept = "pruned" if scores["pruned"] > scores["recovered"] else "recovered"
    if kept == "pruned":
        notify(f"the recovered network agrees less with the teacher than the pruned one on independent synthetic images "
               f"({scores['recovered']}% against {scores['pruned']}%): the pruned network is handed over")
        path = out / "recovery" / "student.safetensors"
        written = save_model(pruned, path, card["arch"], spec, card.get("arch_kwargs", {}),
                             **{k: v for k, v in recovered_card.items() if k in ("trained_by", "teacher_sha256", "preset")},
                             kept="the pruned network: recovery agreed less with the teacher on independent synthetic images",
                             selected_step=0)
        export_program(pruned.eval(), spec, out / "recovery" / "student.pt2", written)
    return {"agreement": scores, "kept": kept, "images": len(images),
            "images_from": "noise optimised against the teacher (a class each, BN statistics), apart from the recovery"}


def _recover(cfg: CompressConfig, out: Path, pruned_path: Path, started: float, resume: bool, progress: bool, notify) -> dict:
    """The distill job from the original teacher into the pruned network (``out/recovery``)."""
    from datafree.base.config import parse_duration
    from datafree.distill.job import run_distill
    from datafree.distill.presets import resolve_distill_config

    budget = parse_duration(cfg.time_budget) if cfg.steps is None else None
    overrides = {"teacher": cfg.teacher, "student": str(pruned_path), "out": str(out / "recovery"), "seed": cfg.seed,
                 "precision": cfg.precision, "accelerator": cfg.accelerator, "steps": cfg.steps,
                 "time_budget": None if budget is None else max(1.0, budget - (time.monotonic() - started))}
    fresh = resolve_distill_config(preset=cfg.preset, overrides=overrides)  # the preset's rate, for a fresh student
    distill_cfg = resolve_distill_config(preset=fresh.preset, overrides=overrides | {
        "lr_student": cfg.lr_student or fresh.lr_student * RECOVERY_LR_SCALE, "preset_note": fresh.preset_note})
    return run_distill(distill_cfg, resume=resume, overwrite=True, progress=progress, notify=notify)


def _hand_off(cfg: CompressConfig, out: Path, teacher_model, card: dict, spec, prune_record: dict, recovery: dict,
              progress: bool) -> dict:
    """The handoff package, then the stage table (held-out agreement, sizes, latency; test accuracy last)."""
    from datafree.outputs.handoff import export_student, render_card

    handoff = out / "handoff"
    guard_pixels = spec.denormalize(guard_images(out, teacher_model, spec, cfg.seed)).clamp(0, 1)  # for an empty transfer set
    model_card = export_student(out / "recovery", handoff, int8=cfg.int8, onnx=cfg.onnx, overwrite=True, progress=progress,
                                fallback_images=guard_pixels)
    stages = stage_table(cfg, out, teacher_model, spec)
    summary = {"schema": "datafree-compress/1", "teacher": cfg.teacher, "teacher_sha256": card.get("sha256"),
               "architecture": card["arch"], "config": asdict(cfg), "pruning": prune_record,
               "recovery": {k: recovery.get(k) for k in ("steps", "seconds", "selected_step", "holdout_agreement", "preset",
                                                         "precision", "transfer_set_size", "guard")},
               "stages": stages, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    model_card["compression"] = {"stages": stages, "pruning": {k: prune_record[k] for k in ("importance", "macs_ratio", "seconds")},
                                 "recovery": summary["recovery"]}
    write_json(handoff / "model_card.json", model_card)
    write_text(handoff / "MODEL_CARD.md", render_card(model_card))
    write_json(out / "compress.json", summary)
    write_text(out / "COMPRESS.md", render_stages(summary))
    return summary


STAGES = ("teacher", "pruned", "recovered", "int8")


def stage_table(cfg: CompressConfig, out: Path, teacher_model, spec) -> list[dict]:
    """One row per stage: parameters, MACs, file bytes, latency (ms at batch 1 and 64, taking turns),
    agreement with the teacher on the recovery's held-out synthetic samples, and real test accuracy
    when ``cfg.eval_data`` (or the teacher card's data set) names one."""
    from datafree.base.io import load_tensors
    from datafree.compress.prune import count_macs
    from datafree.models.zoo import count_parameters
    from datafree.outputs.export import PixelModel
    from datafree.outputs.handoff import compare_latency, predicted_classes, program_tensor_bytes
    from datafree.teachers.formats import load_model

    shape = (spec.channels, spec.size, spec.size)
    pruned, _ = load_model(out / "pruned.safetensors")
    recovered, _ = load_model(out / "recovery" / "student.safetensors")
    floats = {"teacher": teacher_model.eval(), "pruned": pruned.eval(), "recovered": recovered.eval()}
    programs = {name: PixelModel(model, spec).eval() for name, model in floats.items()}  # all take [0, 1] images
    files = {"teacher": Path(cfg.teacher), "pruned": out / "pruned.safetensors", "recovered": out / "recovery" / "student.safetensors"}
    int8_path = out / "handoff" / "student_int8.pt2"
    if int8_path.is_file():
        import torch.ao.quantization.fx._decomposed

        int8_program = torch.export.load(str(int8_path))
        programs["int8"], files["int8"] = int8_program.module(), int8_path
    held = load_tensors(out / "recovery" / "holdout.safetensors")
    held_pixels = spec.denormalize(held["images"]).clamp(0, 1)  # every stage sees the same [0, 1] images
    teacher_classes = predicted_classes(programs["teacher"], held_pixels)
    latency = {b: compare_latency(programs, shape, b, repeats=20) for b in (1, 64)}
    test = _test_set(cfg, spec)
    rows = []
    for name, program in programs.items():
        float_model = floats.get(name, recovered)  # int8 keeps the recovered model's layers and MACs
        predicted = predicted_classes(program, held_pixels)
        row = {"stage": name, "parameters": count_parameters(float_model), "macs": count_macs(float_model, shape),
               "file_bytes": files[name].stat().st_size,
               "weight_bytes": program_tensor_bytes(int8_program) if name == "int8" else _tensor_bytes(float_model),
               "latency_ms": {f"batch_{b}": latency[b][name] for b in latency},
               "holdout_agreement": round((predicted == teacher_classes).float().mean().item() * 100, 2) if len(predicted) else None}
        if test is not None:
            row["test_accuracy"] = round((predicted_classes(program, test[0]) == test[1]).float().mean().item() * 100, 2)
        rows.append(row)
    return rows


def _tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _test_set(cfg: CompressConfig, spec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Real test images as [0, 1] pixels with labels, when evaluation data is named (report only)."""
    if not cfg.eval_data:
        return None
    from datafree.data.datasets import load_dataset

    test = load_dataset(cfg.eval_data, train=False, data_dir=cfg.data_dir)
    if (test.spec.channels, test.spec.size) != (spec.channels, spec.size):
        raise UserError(f"the evaluation data {cfg.eval_data!r} is {test.spec.describe()} but the teacher takes {spec.describe()}")
    return test.spec.denormalize(test.images).clamp(0, 1), test.labels


def render_stages(summary: dict) -> str:
    """``COMPRESS.md``: the stage table and how each stage was made."""
    stages, prune, recovery = summary["stages"], summary["pruning"], summary["recovery"]
    guard = recovery.get("guard")
    why = (f"by teacher agreement on {guard['images']} synthetic images made apart from it: {guard['agreement']['recovered']}% "
           f"against {guard['agreement']['pruned']}%" if guard else "on the held-out synthetic samples")
    has_test = any("test_accuracy" in r for r in stages)
    lines = [f"# Compression of {summary['architecture']} ({summary['teacher']})", "",
             f"Pruned with Torch-Pruning ({prune['importance']} importance) in {prune['seconds']} s: "
             f"{prune['macs_ratio']}x fewer MACs. Recovered by data-free distillation from the original teacher "
             f"({recovery['preset']} preset, {recovery['steps']} rounds in {recovery['seconds']} s, student chosen at round "
             f"{recovery['selected_step']} by held-out synthetic agreement). Machine: {summary['machine']}.", "",
             *([f"Recovery did not improve on the pruned network ({why}), so the pruned network (round 0) is what is "
                "handed over; a longer `--time-budget` gives recovery more rounds.", ""]
               if recovery["selected_step"] == 0 else []),
             "| stage | parameters | MACs | weight bytes | file bytes | latency ms (batch 1 / 64) | "
             "teacher agreement, held-out synthetic % |" + (" test accuracy % |" if has_test else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if has_test else "")]
    for r in stages:
        lines.append(f"| {r['stage']} | {r['parameters']:,} | {r['macs']:,} | {r['weight_bytes']:,} | {r['file_bytes']:,} | "
                     f"{r['latency_ms']['batch_1']} / {r['latency_ms']['batch_64']} | {r['holdout_agreement']} |"
                     + (f" {r.get('test_accuracy', '-')} |" if has_test else ""))
    lines += ["", "Latencies: every stage as a program taking [0, 1] images, timed in turns in one run (the int8 "
                  "program runs eagerly: smaller, not faster, until compiled). Test accuracy is measured after every "
                  "stage is done and chose nothing.", ""]
    return "\n".join(lines)
