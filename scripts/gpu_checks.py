"""The assertions of ``scripts/gpu_check.sh``: ``python scripts/gpu_checks.py CHECK OUT_DIR [TOLERANCE]``
prints one line of what the check found and exits 1 (with the reason on the last line) when it fails.

    python scripts/gpu_checks.py resume-on-gpu /tmp/gpu_check
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(out: Path, run: str) -> dict:
    return json.loads((out / run / "summary.json").read_text())


def on_gpu(record: dict | None, what: str) -> str:
    device = (record or {}).get("device", "?")
    assert device.startswith("cuda"), f"{what} ran on {device}, not on the GPU"
    return device


def resume_on_gpu(out: Path, tolerance: float) -> str:
    s = summary(out, "gpu-dfq")
    assert s["steps"] == 80, f"the resumed run made {s['steps']} rounds, 80 were asked"
    p = s["precision"]
    return f"80 rounds on {on_gpu(p, 'distill')}, teacher {p['teacher']}, student {p['student']}, measured {p['measured_ms']}"


def gpu_vs_cpu(out: Path, tolerance: float) -> str:
    g, c = summary(out, "gpu-dfq")["holdout_agreement"], summary(out, "cpu-dfq")["holdout_agreement"]
    assert abs(g - c) <= tolerance, f"held-out agreement GPU {g}% vs CPU {c}%: more than {tolerance} points apart"
    return f"held-out agreement GPU {g}% vs CPU {c}% (80 rounds each; tolerance {tolerance} points)"


def pixels_schedule_auto(out: Path, tolerance: float) -> str:
    s = summary(out, "gpu-fast-auto")
    assert s["schedule"]["mode"] == "auto", f"schedule {s['schedule']['mode']}"
    return (f"{s['steps']} rounds on {on_gpu(s['precision'], 'the fast preset')}, schedule auto chose "
            f"{s['schedule']['student_steps']} student steps from {s['schedule']['measured']}")


def pt2_teacher(out: Path, tolerance: float) -> str:
    s = summary(out, "gpu-pt2")
    assert s["teachers"][0]["format"] == "pt2", f"teacher form {s['teachers'][0]['format']}"
    return f"a .pt2 teacher on {on_gpu(s['precision'], 'distill')}: held-out agreement {s['holdout_agreement']}%"


def condense_evaluate(out: Path, tolerance: float) -> str:
    manifest = json.loads((out / "gpu-condense" / "manifest.json").read_text())
    result = json.loads((out / "gpu-evaluate" / "evaluation.json").read_text())
    where = on_gpu(manifest["precision"], "condense")
    evaluated = on_gpu(result["protocol"]["precision"], "evaluate-set")
    return (f"condensed on {where} ({manifest['precision']['chosen']}, {manifest['iterations_done']} iterations), "
            f"evaluated on {evaluated}: {result['mean']:.1f}% on the held-out synthetic images")


def ddp_2_gpus(out: Path, tolerance: float) -> str:
    s = summary(out, "gpu-ddp")
    return f"2-GPU DDP on {on_gpu(s['precision'], 'DDP')}: {s['steps']} rounds, held-out agreement {s['holdout_agreement']}%"


def holdout_test_set(out: Path, tolerance: float) -> str:
    """Not a check: the GPU run's held-out synthetic images, labelled by the teacher, as an .npz test set."""
    import numpy as np
    from safetensors.torch import load_file

    held = load_file(str(out / "gpu-dfq" / "holdout.safetensors"))
    # in the teacher's input space, as the condensed set is: the .npz reader's default spec leaves them as they are
    np.savez(out / "holdout_test.npz", x=held["images"].numpy(), y=held["teacher_logits"].argmax(1).numpy())
    return f"{len(held['images'])} held-out synthetic images written as a test set"


CHECKS = {f.__name__.replace("_", "-"): f for f in (resume_on_gpu, gpu_vs_cpu, pixels_schedule_auto, pt2_teacher,
                                                     condense_evaluate, ddp_2_gpus, holdout_test_set)}

if __name__ == "__main__":
    name, folder = sys.argv[1], Path(sys.argv[2])
    try:
        print(CHECKS[name](folder, float(sys.argv[3]) if len(sys.argv) > 3 else 10.0))
    except (AssertionError, OSError, KeyError, ValueError) as e:
        print(f"{type(e).__name__}: {e}")
        sys.exit(1)
