"""The handoff package: a distilled student ready for someone else, with its model card.

``export_student(run, out)`` writes into ``out``:

- ``student.safetensors`` + ``student.json`` (weights and card; load with ``datafree.teachers.formats.load_model``);
- ``student.pt2``: a self-contained ``torch.export`` program taking [0, 1] images;
- ``student.onnx`` (unless ``onnx=False``): the same program as ONNX, for ONNX Runtime and other
  runtimes without torch, checked against ``student.pt2`` (largest logit difference, argmax
  agreement and both latencies in the card);
- ``model_card.json`` and ``MODEL_CARD.md``: architecture, size, latency on this CPU, accuracy and
  teacher agreement, how it was trained, the privacy audit when the run was audited;
- with ``int8=True``: ``student_int8.pt2``, a ``torch.export`` program whose convolutions and linear
  layers are statically quantised to int8 after training (PT2E flow of torchao: int8 per-channel
  weights, uint8 per-tensor activations), calibrated on the run's *transfer set*, so no real image
  is seen (data-free quantisation). Its card entry gives file and weight sizes, latency at batch 1
  and 64, test accuracy and teacher agreement beside the float program's, measured in the same run.
  Loading it needs plain torch plus ``import torch.ao.quantization.fx._decomposed`` (registers the
  quantize/dequantize ops). A failed quantisation is a ``UserError``, never a missing file.

Example:
    >>> card = export_student("runs/distill", "handoff", test=load_dataset("mnist", train=False), int8=True)   # doctest: +SKIP
    >>> card["latency_ms"]["batch_1"], card["int8"]["weight_ratio"]                                         # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from datafree.base.errors import UserError
from datafree.base.io import write_json, write_text
from datafree.base.progress import Stages
from datafree.data.datasets import ImageSet, InputSpec

LOAD_SNIPPET = '''import torch
model = torch.export.load("student.pt2").module()      # plain torch, no datafree needed
probabilities = model(images).softmax(1)              # images: N x {shape} floats in [0, 1]'''

INT8_LOAD_SNIPPET = '''import torch
import torch.ao.quantization.fx._decomposed             # registers the int8 quantize/dequantize ops (plain torch)
model = torch.export.load("student_int8.pt2").module()
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


def _import_pt2e():
    """torchao's PT2E entry points; importing torchao logs one harmless line about an Enum it registers."""
    import logging

    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)  # only for the import: torchao 0.18 registers an Enum as a pytree constant
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        raise UserError(f"int8 export needs torchao (pip install 'torchao>=0.18'): {e}") from None
    finally:
        pytree_log.setLevel(level)
    return prepare_pt2e, convert_pt2e, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())


def quantize_int8(model: torch.nn.Module, spec: InputSpec, calibration: torch.Tensor, batch_size: int = 256) -> torch.fx.GraphModule:
    """Post-training static int8 quantisation of the convolutions and linear layers of ``model``.

    The PT2E flow of torchao (``torch.export`` capture, ``X86InductorQuantizer``: int8 symmetric
    per-channel weights, uint8 per-tensor activations, BatchNorm folded into the layer before it),
    with the activation ranges observed on ``calibration``: [0, 1] images, N x C x H x W (use the
    run's transfer set for a data-free quantisation). The result takes [0, 1] images, like
    ``student.pt2``, and holds its weights as int8 tensors (quantize/dequantize ops around float
    aten ops: the reference form that inductor, through ``torch.compile``, fuses into int8 kernels;
    run eagerly it is smaller than the float model, not faster).

    Example:
        >>> q = quantize_int8(create_model("lenet5_half"), spec, torch.rand(64, 1, 28, 28))   # doctest: +SKIP
        >>> q(torch.rand(2, 1, 28, 28)).shape                                                  # doctest: +SKIP
        torch.Size([2, 10])
    """
    from datafree.outputs.export import PixelModel

    if calibration.dim() != 4 or len(calibration) == 0:
        raise UserError(f"int8 calibration needs a non-empty N x C x H x W batch of images, not {tuple(calibration.shape)}")
    prepare_pt2e, convert_pt2e, quantizer = _import_pt2e()
    wrapped = PixelModel(copy.deepcopy(model), spec).eval()
    example = (calibration[:2].float(),)
    captured = torch.export.export(wrapped, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},)).module()
    prepared = prepare_pt2e(captured, quantizer)
    with torch.no_grad():
        for chunk in calibration.float().split(batch_size):
            prepared(chunk)
    quantized = convert_pt2e(prepared)  # folds the weights' quantize op: int8 constants + dequantize
    # the float weights stay behind as attributes the graph no longer reads: drop them, or they travel in the .pt2
    used = {node.target for node in quantized.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in list(quantized.named_parameters()) + list(quantized.named_buffers()) if n not in used]:
        owner, _, leaf = name.rpartition(".")
        delattr(quantized.get_submodule(owner) if owner else quantized, leaf)
    quantized.graph.eliminate_dead_code()
    quantized.recompile()
    return quantized


def program_tensor_bytes(program) -> int:
    """Bytes of every tensor an exported program holds (parameters, buffers, constants: weights, scales, zero points).

    Example:
        >>> program_tensor_bytes(torch.export.load("handoff/student.pt2"))   # doctest: +SKIP
        65312
    """
    tensors = list(program.state_dict.values()) + list(program.constants.values())
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def compare_latency(models: dict, shape: tuple, batch: int, repeats: int = 30) -> dict:
    """Median milliseconds per forward pass of each of ``models`` on a ``batch`` of random inputs, interleaved.

    The models take turns on each repeat, so a load that comes and goes on a shared machine weighs
    on all of them alike and their ratio stays meaningful even when the absolute figures are not.

    Example:
        >>> compare_latency({"float": model, "int8": quantized}, (1, 28, 28), batch=64)   # doctest: +SKIP
        {'float': 1.2, 'int8': 2.9}
    """
    x = torch.rand(batch, *shape)
    times = {name: [] for name in models}
    with torch.no_grad():
        for i in range(repeats + 3):
            for name, model in models.items():
                started = time.perf_counter()
                model(x)
                if i >= 3:  # warm-up first
                    times[name].append((time.perf_counter() - started) * 1000)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def _accuracy_and_agreement(model, test: ImageSet | None, teacher_logits: torch.Tensor | None) -> dict:
    from datafree.models.inference import accuracy, agreement

    if test is None:
        return {}
    result = {"test_accuracy": round(accuracy(model, test), 2), "test_set": test.name}
    if teacher_logits is not None:
        result["teacher_agreement"] = round(agreement(model, test.images, teacher_logits), 2)
    return result


def export_student(run, out, test: ImageSet | None = None, teacher=None, int8: bool = False, onnx: bool = True,
                   overwrite: bool = False, progress: bool = False, fallback_images: torch.Tensor | None = None) -> dict:
    """Write the handoff package of the distill run folder ``run`` into ``out``; return the model card.

    ``test`` (real test data, for the card only) and ``teacher`` (for agreement) are optional; the
    run's own recorded figures are used when they are missing. ``int8=True`` adds
    ``student_int8.pt2``, quantised with :func:`quantize_int8` on the run's transfer set (never on
    ``test``); it is done before anything is written, and a failure raises ``UserError``. ``onnx``
    (the default) adds ``student.onnx``, exported from ``student.pt2`` and checked against it with
    ONNX Runtime on synthetic images (:func:`datafree.outputs.onnx.export_onnx`). With
    ``progress``, a bar counts the stages (the service's progress file follows them either way).
    ``fallback_images`` ([0, 1] pixels) stand in for a run whose transfer set is empty.

    Example:
        >>> card = export_student("runs/distill", "handoff", int8=True)   # doctest: +SKIP
        >>> card["int8"]["file"], card["int8"]["weight_ratio"]            # doctest: +SKIP
        ('student_int8.pt2', 3.7)
    """
    from datafree.base.io import check_writable_dir, read_json
    from datafree.outputs.export import PixelModel, export_program
    from datafree.teachers.formats import load_model

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
    stages = Stages((["int8 quantisation"] if int8 else []) + ["program"] + (["onnx"] if onnx else []) + ["accuracy", "latency"]
                    + (["int8 checks"] if int8 else []), "export", progress)
    transfer = transfer_pixels(run, spec) if int8 or onnx else None  # read once: calibration, the ONNX check, agreement
    if transfer is not None and not len(transfer):
        if fallback_images is None and int8:
            raise UserError(f"the transfer set of {str(run)!r} is empty (its synthesis finished no batch), and int8 is "
                            "calibrated on it: distil for more rounds, or export with --no-int8")
        transfer = fallback_images if fallback_images is not None else transfer
    quantized = _quantize_run(model, spec, transfer[:CALIBRATION_IMAGES], card.get("arch")) if int8 else None  # before writing
    if int8:
        stages.next()
    for name in ("student.safetensors", "student.json"):
        shutil.copyfile(run / name, out / name)
    export_program(model, spec, out / "student.pt2", card)
    stages.next()
    onnx_record = None
    if onnx:
        from datafree.outputs.onnx import export_onnx

        onnx_record = export_onnx(out / "student.pt2", out / "student.onnx", check_images=transfer[:ONNX_CHECK_IMAGES])
        stages.next()
    shape = (spec.channels, spec.size, spec.size)
    teacher_logits = None
    if test is not None and teacher is not None:  # once, for the float and the int8 model
        from datafree.models.inference import predict

        teacher_logits = predict(teacher, teacher.spec.normalize(test.spec.denormalize(test.images)))
    measured = _accuracy_and_agreement(model, test, teacher_logits)
    stages.next()
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
                     "teachers": summary.get("teachers"), "ensemble_rule": summary.get("ensemble_rule"),
                     "knowledge": summary.get("knowledge", ["logits (KD)"]),
                     "selection": f"holdout synthetic agreement {card.get('holdout_agreement')}% at round {card.get('selected_step')}"},
        "audit": _audit_summary(run), "membership": membership_summary(run), "sha256": card.get("sha256"),
        "load": LOAD_SNIPPET.format(shape=spec.describe()),
    }
    if onnx_record:
        model_card["onnx"] = onnx_record
    stages.next()
    if int8:
        model_card["int8"] = _int8_variant(quantized, spec, out, transfer, test, teacher_logits, card)
        stages.next()
    stages.close()
    write_json(out / "model_card.json", model_card)
    write_text(out / "MODEL_CARD.md", render_card(model_card))
    return model_card


CALIBRATION_IMAGES = 2048  # at most, from the run's transfer set
ONNX_CHECK_IMAGES = 512  # transfer images the ONNX file is checked on, beside 64 of noise


def _quantize_run(model, spec: InputSpec, pixels: torch.Tensor, arch) -> torch.fx.GraphModule:
    """:func:`quantize_int8` calibrated on ``pixels`` (transfer images); any failure is a UserError."""
    try:
        return quantize_int8(model, spec, pixels)
    except UserError:
        raise
    except Exception as e:  # an op the quantiser or torch.export cannot handle: say so, write nothing
        raise UserError(f"int8 quantisation of the {arch} student failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})") from e


def transfer_pixels(run: Path, spec: InputSpec) -> torch.Tensor:
    """The run's transfer images as [0, 1] pixels, the programs' input domain.

    Example:
        >>> transfer_pixels(Path("runs/distill"), spec).shape   # doctest: +SKIP
        torch.Size([20000, 1, 28, 28])
    """
    from datafree.data.datasets import load_transfer_set

    transfer, _ = load_transfer_set(run)
    if (transfer.spec.channels, transfer.spec.size) != (spec.channels, spec.size):
        raise UserError(f"the transfer set of {str(run)!r} holds {transfer.spec.describe()} images but the student takes {spec.describe()}")
    return transfer.spec.denormalize(transfer.images).clamp(0, 1)


def predicted_classes(program, pixels: torch.Tensor) -> torch.Tensor:
    """The argmax class of a [0, 1]-input program (an exported ``.module()``, which may refuse ``eval()``) on ``pixels``, in batches.

    Example:
        >>> predicted_classes(torch.export.load("handoff/student.pt2").module(), torch.rand(3, 1, 28, 28))   # doctest: +SKIP
        tensor([7, 7, 3])
    """
    with torch.no_grad():
        return torch.cat([program(x).argmax(1) for x in pixels.split(1024)]) if len(pixels) else torch.empty(0, dtype=torch.long)


def _program_figures(program, pixels: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None,
                     name: str | None) -> tuple[dict, torch.Tensor]:
    """Accuracy and teacher agreement of a [0, 1]-input program, with its predictions."""
    predicted = predicted_classes(program, pixels)
    if labels is None:
        return {}, predicted
    result = {"test_accuracy": round((predicted == labels).float().mean().item() * 100, 2), "test_set": name}
    if teacher_logits is not None:
        result["teacher_agreement"] = round((predicted == teacher_logits.argmax(1)).float().mean().item() * 100, 2)
    return result, predicted


def _int8_variant(quantized, spec: InputSpec, out: Path, transfer: torch.Tensor, test, teacher_logits, card: dict) -> dict:
    """Write ``student_int8.pt2`` and measure it beside ``student.pt2`` (loaded back from disk, both)."""
    from datafree.base.io import atomic_path
    from datafree.outputs.export import pixel_spec

    path = out / "student_int8.pt2"
    shape = (spec.channels, spec.size, spec.size)
    example = (torch.rand(2, *shape),)
    extra = {"datafree_card.json": json.dumps(dict(card, program_input_spec=pixel_spec(spec).to_dict(), int8=True))}
    try:
        program = torch.export.export(quantized, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
        with atomic_path(path) as tmp:
            torch.export.save(program, str(tmp), extra_files=extra)
        int8_program = torch.export.load(str(path))
    except Exception as e:
        raise UserError(f"the int8 student could not be written as a torch.export program ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    int8_module = int8_program.module()
    check = torch.rand(7, *shape)
    with torch.no_grad():
        if not torch.equal(int8_module(check).argmax(1), quantized(check).argmax(1)):
            raise UserError(f"the written {path.name} does not reproduce the quantised model's predictions")
    float_program = torch.export.load(str(out / "student.pt2"))
    float_module = float_program.module()
    int8_tensors = [t for t in int8_program.state_dict.values() if t.dtype == torch.int8]
    batch_1 = compare_latency({"float": float_module, "int8": int8_module}, shape, 1, repeats=20)
    batch_64 = compare_latency({"float": float_module, "int8": int8_module}, shape, 64, repeats=20)
    float_bytes, int8_bytes = program_tensor_bytes(float_program), program_tensor_bytes(int8_program)

    agreement = {"transfer": round((predicted_classes(int8_module, transfer)
                                    == predicted_classes(float_module, transfer)).float().mean().item() * 100, 2)}
    pixels = spec.denormalize(test.images) if test is not None else None
    labels, name = (test.labels, test.name) if test is not None else (None, None)
    int8_accuracy, float_accuracy = {}, {}
    if test is not None:
        int8_accuracy, int8_predicted = _program_figures(int8_module, pixels, labels, teacher_logits, name)
        float_accuracy, float_predicted = _program_figures(float_module, pixels, labels, teacher_logits, name)
        agreement["test"] = round((int8_predicted == float_predicted).float().mean().item() * 100, 2)
    result = {
        "file": path.name,
        "method": "post-training static quantisation (torch.export + torchao PT2E, X86InductorQuantizer): int8 per-channel "
                  "weights of every convolution and linear layer (BatchNorm folded in), uint8 per-tensor activations",
        "calibration": f"{min(len(transfer), CALIBRATION_IMAGES)} images of the run's transfer set (synthetic: no real data seen)",
        "quantised_layers": {"conv": sum(t.dim() == 4 for t in int8_tensors), "linear": sum(t.dim() == 2 for t in int8_tensors)},
        "int8_parameters": sum(t.numel() for t in int8_tensors),
        "size_bytes": int8_bytes, "float_size_bytes": float_bytes, "weight_ratio": round(float_bytes / int8_bytes, 2),
        "file_bytes": path.stat().st_size, "float_file_bytes": (out / "student.pt2").stat().st_size,
        "latency_ms": {"batch_1": batch_1["int8"], "batch_64": batch_64["int8"]},
        "float_latency_ms": {"batch_1": batch_1["float"], "batch_64": batch_64["float"]},
        "latency_note": "student_int8.pt2 and student.pt2 as loaded by torch.export.load, timed in turns in the same run "
                        "(eager: the int8 graph dequantises to float aten ops around each layer, so int8 buys size here, not speed; "
                        "inductor, through torch.compile, fuses that pattern into int8 kernels)",
        "accuracy": int8_accuracy, "float_accuracy": float_accuracy,
        "accuracy_drop": round(float_accuracy["test_accuracy"] - int8_accuracy["test_accuracy"], 2) if test is not None else None,
        "agreement_with_float": agreement,
        "load": INT8_LOAD_SNIPPET.format(shape=spec.describe()),
    }
    return result


def _audit_summary(run: Path) -> dict | None:
    path = run / "audit.json"
    if not path.is_file():
        return None
    audit = json.loads(path.read_text())
    return {"verdict": audit.get("verdict"), "pixel_near_copies": audit.get("pixel", {}).get("near_copies"),
            "feature_near_copies": audit.get("feature", {}).get("near_copies"), "real": audit.get("real")}


def membership_line(summary: dict | None) -> str:
    """One line of the membership audit for a card (or how to run it).

    Example:
        >>> membership_line(None)
        'not measured (datafree audit RUN --membership --members DATA --non-members DATA:test)'
    """
    if not summary:
        return "not measured (datafree audit RUN --membership --members DATA --non-members DATA:test)"
    attacks = {k: v for k, v in summary.items() if isinstance(v, dict)}
    return "; ".join(f"{name}: AUC {a['auc']:.3f}, TPR at 1% FPR {a['tpr_at_0.01_fpr'] * 100:.2f}% "
                     f"[{a['tpr_at_0.01_fpr_ci'][0] * 100:.2f}, {a['tpr_at_0.01_fpr_ci'][1] * 100:.2f}]"
                     for name, a in attacks.items()) + f" (members: {summary['members_from']}, non-members: {summary['non_members_from']})"


def membership_summary(run: Path) -> dict | None:
    """The membership audit's figures (``membership.json`` in the run, from ``datafree audit RUN --membership``), or None."""
    path = run / "membership.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return {"members_from": result.get("members_from"), "non_members_from": result.get("non_members_from"),
            **{name: {k: v for k, v in attack.items() if k != "roc"} for name, attack in result["attacks"].items()}}


def render_card(card: dict) -> str:
    """The model card as Markdown."""
    acc = card["accuracy"] or {}
    lines = [f"# Model card: {card['architecture']} student", "",
             f"- Parameters: {card['parameters']:,} ({card['size_bytes']:,} bytes as safetensors)",
             f"- Input: {card['input']}", f"- Classes: {', '.join(card['classes'])}",
             f"- Latency ({card['latency_ms']['machine']}): {card['latency_ms']['batch_1']} ms at batch 1, "
             f"{card['latency_ms']['batch_64']} ms at batch 64",
             f"- Accuracy: {json.dumps(acc)}", f"- Training: {json.dumps(card['training'])}",
             f"- Privacy audit: {json.dumps(card['audit']) if card['audit'] else 'not audited'}",
             f"- Membership inference: {membership_line(card.get('membership'))}"]
    lines += ["", "## Load it", "", "```python", card["load"], "```", ""]
    if "onnx" in card:
        o = card["onnx"]
        lines += [f"## ONNX (`{o['file']}`)", "",
                  f"Exported from `{o['exported_from']}` with a dynamic batch axis (opset {o['opset']}, {o['bytes']:,} bytes); "
                  f"checked with {o['runtime']} on {o['checked_on']}: argmax agreement {o['argmax_agreement']}%, "
                  f"largest logit difference {o['max_abs_logit_diff']:g}.", "",
                  "| latency (ms) | `student.pt2` (torch) | `student.onnx` (ONNX Runtime) |", "|---|---|---|",
                  *[f"| {k.replace('_', ' ')} | {o['pt2_latency_ms'][k]} | {o['latency_ms'][k]} |" for k in o["latency_ms"]], "",
                  "```python", o["load"], "```", ""]
    if "int8" in card:
        q = card["int8"]
        acc, facc = q["accuracy"] or {}, q["float_accuracy"] or {}
        row = lambda what, i8, fl: f"| {what} | {fl} | {i8} |"
        lines += ["## int8 (`" + q["file"] + "`)", "", f"{q['method']}; calibrated on {q['calibration']}.", "",
                  "| | float (`student.pt2`) | int8 |", "|---|---|---|",
                  row("weights (bytes of tensors held)", f"{q['size_bytes']:,} ({q['weight_ratio']}x smaller)", f"{q['float_size_bytes']:,}"),
                  row("file on disk (bytes)", f"{q['file_bytes']:,}", f"{q['float_file_bytes']:,}"),
                  row("latency, batch 1 (ms)", q["latency_ms"]["batch_1"], q["float_latency_ms"]["batch_1"]),
                  row("latency, batch 64 (ms)", q["latency_ms"]["batch_64"], q["float_latency_ms"]["batch_64"])]
        if acc:
            lines += [row(f"accuracy on {acc.get('test_set')} (%)", acc.get("test_accuracy"), facc.get("test_accuracy")),
                      row("teacher agreement (%)", acc.get("teacher_agreement", "-"), facc.get("teacher_agreement", "-"))]
        lines += ["", f"Agreement with the float program (%): {json.dumps(q['agreement_with_float'])}. "
                      f"Quantised layers: {json.dumps(q['quantised_layers'])}. Latency: {q['latency_note']}.", "",
                  "```python", q["load"], "```", ""]
    return "\n".join(lines)
