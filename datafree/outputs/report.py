"""``report.html`` for a run folder (distill or condense): what was made, how well, and whether it leaks.

Sections: image grid per class, loss and agreement curves, class histogram, accuracy table,
privacy audit summary. Plots are PNG files under ``report/`` (matplotlib, no display needed);
the HTML only links them, so the folder can be zipped and opened anywhere.

Example:
    >>> write_report("runs/distill")          # doctest: +SKIP
    PosixPath('runs/distill/report.html')
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from datafree.base.io import write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed run
    return rows


def _curves(rows: list[dict], keys: list[str], title: str, path: Path, x: str = "step") -> str | None:
    series = {k: [(r[x], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for k, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=k, linewidth=1)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def _histogram(counts: list[int], names: list[str], path: Path) -> str | None:
    if not counts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=100)
    ax.bar(range(len(counts)), counts)
    ax.set_xticks(range(len(counts)), [n[:8] for n in names] if len(names) == len(counts) else None, fontsize=7)
    ax.set_title("images per class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def class_grid(images: torch.Tensor, labels: torch.Tensor, spec, path: Path, per_class: int = 10) -> str | None:
    """One row per class, up to ``per_class`` images each, as a PNG."""
    from torchvision.utils import save_image

    if not len(images):
        return None
    rows = []
    for c in range(spec.num_classes):
        chosen = images[labels == c][:per_class]
        row = torch.zeros(per_class, *images.shape[1:])  # black where a class has fewer images
        if len(chosen):
            row[: len(chosen)] = spec.denormalize(chosen).clamp(0, 1)
        rows.append(row)
    save_image(torch.cat(rows), path, nrow=per_class, padding=1)
    return path.name


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v is not None)
    return f"<table>{cells}</table>" if cells else "<p>none recorded</p>"


def _audit_section(run: Path) -> str:
    path = run / "audit.json"
    if not path.is_file():
        return "<p>Not audited. Run <code>datafree audit RUN --real DATA</code>.</p>"
    a = json.loads(path.read_text())
    rows = [("verdict", a.get("verdict")), ("real set", (a.get("real") or {}).get("name"))]
    for space in ("pixel", "feature"):
        if space in a:
            rows += [(f"{space}: near-copies", a[space]["near_copies"]), (f"{space}: threshold", round(a[space]["threshold"], 4)),
                     (f"{space}: nearest real distance (min / median)",
                      f"{a[space]['nn1'].get('min', 0):.4f} / {a[space]['nn1'].get('median', 0):.4f}")]
    d = a.get("diversity", {}).get("pixel", {})
    rows += [("class coverage", d.get("class_coverage")), ("class balance (entropy ratio)", round(d.get("class_balance", 0), 3)),
             ("exact duplicates inside the set", d.get("exact_duplicates"))]
    return _table(rows)


def _precision_name(choice: dict | None) -> str | None:
    if not choice:
        return None
    return choice.get("dtype", "fp32") + (" + channels_last" if choice.get("channels_last") else "")


def write_report(run) -> Path:
    """Write ``report.html`` (and ``report/*.png``) for a distill or condense run folder.

    Example:
        >>> write_report("runs/condensed").name   # doctest: +SKIP
        'report.html'
    """
    from datafree.base.io import load_tensors
    from datafree.data.datasets import InputSpec

    run = Path(run)
    plots = run / "report"
    plots.mkdir(exist_ok=True)
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    spec = InputSpec.from_dict(manifest["input_spec"]) if "input_spec" in manifest else None
    figures, accuracy, kind = [], [], "run"
    if (run / "transfer.safetensors").is_file():  # distill run
        kind = "data-free distillation"
        tensors = load_tensors(run / "transfer.safetensors")
        images, labels = tensors["images"], tensors["labels"]
        rows = _read_jsonl(run / "metrics.jsonl")
        rounds = [r for r in rows if r.get("kind") == "round"]
        figures += [("losses", _curves(rounds, ["loss_student", "loss_synthesis", "loss_bn", "loss_adv"], "losses", plots / "losses.png")),
                    ("agreement", _curves([r for r in rows if r.get("kind") == "eval"], ["holdout_agreement"],
                                          "held-out synthetic agreement with the teacher (%)", plots / "agreement.png"))]
        accuracy = [("teacher test accuracy %", summary.get("teacher_test_accuracy")),
                    ("student test accuracy %", summary.get("student_test_accuracy")),
                    ("student-teacher agreement on test %", summary.get("student_teacher_agreement_on_test")),
                    ("held-out synthetic agreement %", summary.get("holdout_agreement")),
                    ("rounds", summary.get("steps")), ("seconds", summary.get("seconds"))]
        schedule = summary.get("schedule") or {}
        if schedule:
            measured = schedule.get("measured") or {}
            accuracy += [("schedule", schedule.get("mode")), ("student steps per round", schedule.get("student_steps")),
                         ("pool size", schedule.get("pool_size"))]
            accuracy += [(f"measured {k.replace('_', ' ')}", v) for k, v in measured.items()]
        precision = summary.get("precision") or {}
        if precision:
            accuracy += [(f"{who} precision (asked {precision.get('requested')}, on {precision.get('device')})",
                          _precision_name(precision.get(who))) for who in ("teacher", "student")]
            accuracy += [(f"measured ms per {what.replace('_', ' ')}", ", ".join(f"{k}: {v}" for k, v in ms.items()))
                         for what, ms in (precision.get("measured_ms") or {}).items() if ms]
        final = summary.get("final_share") or {}
        if final:
            accuracy += [("student-only last share from round", final.get("round")),
                         ("its transfer set", f"{final.get('pool_size')} images from {final.get('drawn_from')}")]
    elif (run / "dataset.safetensors").is_file():  # condensed set
        kind = f"condensed set ({manifest.get('method')}, ipc {manifest.get('ipc')})"
        tensors = load_tensors(run / "dataset.safetensors")
        images, labels = tensors["images"], tensors["labels"]
        history = _read_jsonl(run / "history.jsonl")
        figures.append(("matching loss", _curves(history, ["match_loss"], "matching loss per iteration", plots / "losses.png", x="iteration")))
        evaluation = manifest.get("evaluation") or {}
        accuracy = [("protocol accuracy % (mean +- std)", f"{evaluation['mean']} +- {evaluation['std']}" if evaluation else None),
                    ("models", evaluation.get("protocol", {}).get("models")),
                    ("iterations", manifest.get("iterations_done")), ("condensation seconds", manifest.get("seconds"))]
        accuracy += [(f"{e['protocol']['arch']} accuracy %", f"{e['mean']} +- {e['std']}") for e in manifest.get("evaluations", [])]
    else:
        images, labels = torch.empty(0), torch.empty(0, dtype=torch.long)
    if spec is not None and len(images):
        figures.insert(0, ("images per class (one row per class)", class_grid(images, labels, spec, plots / "grid.png")))
        figures.append(("class histogram", _histogram(torch.bincount(labels, minlength=spec.num_classes).tolist(),
                                                       spec.class_names, plots / "classes.png")))
    body = [f"<h1>{html.escape(run.name)}: {html.escape(kind)}</h1>", "<h2>Accuracy</h2>", _table(accuracy)]
    for title, name in figures:
        if name:
            body.append(f"<h2>{html.escape(title)}</h2><img src='report/{name}' alt='{html.escape(title)}'>")
    if manifest.get("privacy"):
        p = manifest["privacy"]
        body += ["<h2>Differential privacy</h2>", f"<p>{html.escape(p['guarantee'])}. Not guaranteed: "
                 f"{html.escape('; '.join(p['not_guaranteed']))}.</p>",
                 _table([("epsilon (spent)", p["epsilon_spent"]), ("delta", p["delta"]), ("noise multiplier", round(p["sigma"], 4)),
                         ("sample rate", round(p["sample_rate"], 6)), ("steps", f"{p['steps_done']} of {p['steps']}"),
                         ("clip", p["clip"] or "embeddings scaled to norm 1"),
                         ("accountant", f"{p['accountant']} {p['accountant_version']}")])]
    if (run / "membership.json").is_file():
        m = json.loads((run / "membership.json").read_text())
        body += ["<h2>Membership inference</h2>", _table([(f"{name}: AUC / TPR at 1% FPR / at 0.1% FPR",
                                                          f"{a['auc']:.3f} / {a['tpr_at_0.01_fpr'] * 100:.2f}% / "
                                                          f"{a['tpr_at_0.001_fpr'] * 100:.2f}%") for name, a in m["attacks"].items()]),
                 "<img src='membership_roc.png' alt='membership ROC'>" if (run / "membership_roc.png").is_file() else ""]
    body += ["<h2>Privacy audit</h2>", _audit_section(run)]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>datafree report</title><style>"
            "body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%;image-rendering:pixelated}"
            "</style></head><body>" + "\n".join(body) + "</body></html>\n")
    write_text(run / "report.html", page)
    return run / "report.html"
