"""ONNX handoff: ``student.onnx`` made from ``student.pt2`` and checked with ONNX Runtime.

ONNX Runtime is the common runtime of deployment targets that are not torch. The ONNX file is
exported from the very ``torch.export`` program of the handoff (``torch.onnx.export`` of an
``ExportedProgram``, the dynamo exporter), with the batch axis dynamic and the weights inside the
file, so both files compute the same function: [0, 1] images in, logits out. The check runs both on
synthetic images (uniform noise and, when given, the run's transfer set) and records the largest
logit difference, the argmax agreement and both latencies measured in turns on this CPU.

Example:
    >>> record = export_onnx("handoff/student.pt2", "handoff/student.onnx", check_images=pixels)   # doctest: +SKIP
    >>> record["argmax_agreement"], record["max_abs_logit_diff"] <= 1e-4                           # doctest: +SKIP
    (100.0, True)
"""
from __future__ import annotations

import contextlib
import io
import statistics
import time
import warnings
from pathlib import Path

import torch

from datafree.base.errors import UserError
from datafree.base.io import atomic_path

ONNX_LOAD_SNIPPET = '''import numpy as np, onnxruntime as ort
runtime = ort.InferenceSession("student.onnx")     # no torch needed
logits = runtime.run(None, {{"images": images}})[0]  # images: N x {shape} float32 in [0, 1]'''

TOLERANCE = 1e-4  # the largest logit difference from the .pt2 program a check accepts


def export_onnx(program_path, path, check_images: torch.Tensor | None = None, repeats: int = 20) -> dict:
    """Write ``path`` (ONNX) from the ``.pt2`` program at ``program_path`` and check it; return the record.

    ``check_images`` are [0, 1] images the comparison runs on beside 64 of uniform noise. A file that
    cannot be exported, or that disagrees with the program by more than ``TOLERANCE`` in any logit,
    is a :class:`UserError` and nothing is left at ``path``.

    Example:
        >>> export_onnx("handoff/student.pt2", "handoff/student.onnx")["file"]   # doctest: +SKIP
        'student.onnx'
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError(f"the ONNX export needs onnx, onnxscript and onnxruntime (pip install onnx onnxscript onnxruntime): {e}") from None
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.load(str(program_path))
    module = program.module()
    shape = tuple(int(s) for s in next(n for n in program.graph.nodes if n.op == "placeholder"
                                       and n.name in program.graph_signature.user_inputs).meta["val"].shape[1:])
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
                warnings.simplefilter("ignore")
                onnx_program = torch.onnx.export(program, f=None, dynamo=True, input_names=["images"], output_names=["logits"],
                                                 verbose=False)
                onnx_program.save(str(tmp), external_data=False)
        except Exception as e:  # an op the exporter cannot translate: say which, write nothing
            raise UserError(f"the ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'})") from e
        runtime = _runtime(ort, tmp)
        images = torch.rand(64, *shape, generator=torch.Generator().manual_seed(0))
        if check_images is not None and len(check_images):
            images = torch.cat([images, check_images.float().clamp(0, 1)])
        with torch.no_grad():
            expected = torch.cat([module(x) for x in images.split(256)])
        got = torch.cat([torch.from_numpy(runtime.run(None, {"images": x.numpy()})[0]) for x in images.split(256)])
        diff = (got - expected).abs().max().item()
        agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item() * 100
        if diff > TOLERANCE:
            raise UserError(f"the ONNX file disagrees with student.pt2 by up to {diff:.2g} in a logit (tolerance {TOLERANCE:g})")
    latency = {f"batch_{b}": _compare_latency(module, runtime, shape, b, repeats) for b in (1, 64)}
    return {"file": path.name, "bytes": path.stat().st_size, "opset": _opset(path), "exported_from": Path(program_path).name,
            "checked_on": f"{len(images)} synthetic images ({len(images) - 64} from the transfer set, 64 uniform noise)"
                          if len(images) > 64 else "64 images of uniform noise",
            "max_abs_logit_diff": float(f"{diff:.3g}"), "argmax_agreement": round(agreement, 2),
            "latency_ms": {k: v["onnx"] for k, v in latency.items()}, "pt2_latency_ms": {k: v["pt2"] for k, v in latency.items()},
            "runtime": f"onnxruntime {ort.__version__}, CPUExecutionProvider, {torch.get_num_threads()} threads",
            "load": ONNX_LOAD_SNIPPET.format(shape="x".join(map(str, shape)))}


def _runtime(ort, path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as the torch figures beside it
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _compare_latency(module, runtime, shape, batch: int, repeats: int) -> dict:
    """Median ms per forward of the .pt2 module and the ONNX Runtime model, taking turns on each repeat."""
    x = torch.rand(batch, *shape)
    feed = {"images": x.numpy()}
    times = {"pt2": [], "onnx": []}
    with torch.no_grad():
        for i in range(repeats + 3):
            for name, run in (("pt2", lambda: module(x)), ("onnx", lambda: runtime.run(None, feed))):
                started = time.perf_counter()
                run()
                if i >= 3:
                    times[name].append((time.perf_counter() - started) * 1000)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)

