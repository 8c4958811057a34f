"""The handoff package: a distilled student ready for someone else, with its model card.

``export_student(run, out)`` writes into ``out``:

- ``student.safetensors`` + ``student.json`` (weights and card; load with ``datafree.teacher.load_model``);
- ``student.pt2``: a self-contained ``torch.export`` program taking [0, 1] images;
- ``model_card.json`` and ``MODEL_CARD.md``: architecture, size, latency on this CPU, accuracy and
  teacher agreement, how it was trained, the privacy audit when the run was audited;
- with ``int8=True``: ``student_int8.pt2``, the linear layers quantised to int8 after training
  (dynamic quantisation: int8 weights, activations quantised on the fly), with its size and
  accuracy beside the float model's.

Example:
    >>> card = export_student("runs/distill", "handoff", test=load_dataset("mnist", train=False))   # doctest: +SKIP
    >>> card["latency_ms"]["batch_1"]                                                            # doctest: +SKIP
"""
from __future__ import annotations

import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from datafree.data import ImageSet, InputSpec
from datafree.errors import UserError
from datafree.io import write_json, write_text

LOAD_SNIPPET = '''import torch
model = torch.export.load("student.pt2").module()      # plain torch, no datafree needed
probabilities = model(images).softmax(1)              # images: N x {shape} floats in [0, 1]'''


def measure_latency(model: torch.nn.Module, shape: tuple, batch: int, repeats: int = 30) -> float:
    """Median milliseconds per forward pass of a ``batch`` of random inputs on this CPU.

    Example:
        >>> measure_latency(create_model("lenet5"), (1, 28, 28), batch=1) < 50   # doctest: +SKIP
        True
    """
    x = torch.rand(batch, *shape)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            started = time.perf_counter()
            model(x)
            if i >= 3:  # warm-up first
                times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Post-training dynamic int8 quantisation of the linear layers (weights int8, activations on the fly)."""
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao (not a dependency here)
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8)  # returns a copy


def _size_bytes(model: torch.nn.Module) -> int:
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _accuracy_and_agreement(model, test: ImageSet | None, teacher_logits: torch.Tensor | None) -> dict:
    from datafree.student import agreement
    from datafree.training import accuracy

    if test is None:
        return {}
    result = {"test_accuracy": round(accuracy(model, test), 2), "test_set": test.name}
    if teacher_logits is not None:
        result["teacher_agreement"] = round(agreement(model, test.images, teacher_logits), 2)
    return result


def export_student(run, out, test: ImageSet | None = None, teacher=None, int8: bool = False, overwrite: bool = False) -> dict:
    """Write the handoff package of the distill run folder ``run`` into ``out``; return the model card.

    ``test`` (real test data, for the card only) and ``teacher`` (for agreement) are optional; the
    run's own recorded figures are used when they are missing.
    """
    from datafree.export import PixelModel, export_program
    from datafree.io import check_writable_dir, read_json
    from datafree.teacher import load_model

    run = Path(run)
    weights = run / "student.safetensors"
    if not weights.is_file():
        raise UserError(f"{str(run)!r} is not a finished distill run (no student.safetensors)")
    out = check_writable_dir(out, overwrite)
    model, card = load_model(weights)
    model.eval()
    spec = InputSpec.from_dict(card["input_spec"])
    summary = read_json(run / "summary.json") if (run / "summary.json").is_file() else {}
    if test is not None and (test.spec.channels, test.spec.size) != (spec.channels, spec.size):
        raise UserError(f"the student takes {spec.describe()} images but {test.name} is {test.spec.describe()}")
    if test is not None:
        test = ImageSet(spec.normalize(test.spec.denormalize(test.images)), test.labels, spec, name=test.name)
    for name in ("student.safetensors", "student.json"):
        shutil.copyfile(run / name, out / name)
    export_program(model, spec, out / "student.pt2", card)
    shape = (spec.channels, spec.size, spec.size)
    teacher_logits = None
    if test is not None and teacher is not None:  # once, for the float and the int8 model
        from datafree.training import predict

        teacher_logits = predict(teacher, teacher.spec.normalize(test.spec.denormalize(test.images)))
    measured = _accuracy_and_agreement(model, test, teacher_logits)
    pixel_model = PixelModel(model, spec).eval()
    model_card = {
        "schema": "datafree-model-card/1", "architecture": card["arch"], "arch_kwargs": card.get("arch_kwargs", {}),
        "parameters": sum(p.numel() for p in model.parameters()), "size_bytes": (out / "student.safetensors").stat().st_size,
        "input": f"N x {spec.describe()} floats in [0, 1] for student.pt2 (normalisation inside); "
                 f"normalised by mean {list(spec.mean)}, std {list(spec.std)} for student.safetensors",
        "classes": spec.class_names,
        "latency_ms": {"batch_1": measure_latency(pixel_model, shape, 1), "batch_64": measure_latency(pixel_model, shape, 64),
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"},
        "accuracy": measured or {k: summary.get(k) for k in ("student_test_accuracy", "student_teacher_agreement_on_test")},
        "training": {"method": "data-free knowledge distillation (datafree distill): no real data seen in training",
                     "preset": card.get("preset"), "rounds": summary.get("steps"), "seconds": summary.get("seconds"),
                     "teacher_sha256": card.get("teacher_sha256"), "teacher_test_accuracy": summary.get("teacher_test_accuracy"),
                     "selection": f"holdout synthetic agreement {card.get('holdout_agreement')}% at round {card.get('selected_step')}"},
        "audit": _audit_summary(run), "sha256": card.get("sha256"),
        "load": LOAD_SNIPPET.format(shape=spec.describe()),
    }
    if int8:
        model_card["int8"] = _int8_variant(model, spec, out, test, teacher_logits, shape)
    write_json(out / "model_card.json", model_card)
    write_text(out / "MODEL_CARD.md", render_card(model_card))
    return model_card


def _int8_variant(model, spec, out: Path, test, teacher_logits, shape) -> dict:
    from datafree.export import PixelModel

    quantized = quantize_int8(model)
    wrapped = PixelModel(quantized, spec).eval()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.trace(wrapped, torch.rand(2, *shape))
            torch.jit.save(scripted, str(out / "student_int8.ts"))
        saved = "student_int8.ts (TorchScript; torch.jit.load)"
    except Exception as e:  # quantised ops that TorchScript cannot trace on this build
        saved = f"not saved ({type(e).__name__})"
    return {"file": saved, "size_bytes": _size_bytes(quantized), "float_size_bytes": _size_bytes(model),
            "latency_ms": {"batch_1": measure_latency(wrapped, shape, 1), "batch_64": measure_latency(wrapped, shape, 64)},
            "accuracy": _accuracy_and_agreement(quantized, test, teacher_logits),
            "method": "post-training dynamic quantisation of Linear layers to int8 (torch.ao.quantization.quantize_dynamic)"}


def _audit_summary(run: Path) -> dict | None:
    path = run / "audit.json"
    if not path.is_file():
        return None
    audit = json.loads(path.read_text())
    return {"verdict": audit.get("verdict"), "pixel_near_copies": audit.get("pixel", {}).get("near_copies"),
            "feature_near_copies": audit.get("feature", {}).get("near_copies"), "real": audit.get("real")}


def render_card(card: dict) -> str:
    """The model card as Markdown."""
    acc = card["accuracy"] or {}
    lines = [f"# Model card: {card['architecture']} student", "",
             f"- Parameters: {card['parameters']:,} ({card['size_bytes']:,} bytes as safetensors)",
             f"- Input: {card['input']}", f"- Classes: {', '.join(card['classes'])}",
             f"- Latency ({card['latency_ms']['machine']}): {card['latency_ms']['batch_1']} ms at batch 1, "
             f"{card['latency_ms']['batch_64']} ms at batch 64",
             f"- Accuracy: {json.dumps(acc)}", f"- Training: {json.dumps(card['training'])}",
             f"- Privacy audit: {json.dumps(card['audit']) if card['audit'] else 'not audited'}"]
    if "int8" in card:
        q = card["int8"]
        lines.append(f"- int8: {q['size_bytes']:,} bytes (float {q['float_size_bytes']:,}), accuracy {json.dumps(q['accuracy'])}, "
                     f"latency {q['latency_ms']['batch_1']} ms at batch 1; {q['file']}")
    lines += ["", "## Load it", "", "```python", card["load"], "```", ""]
    return "\n".join(lines)
