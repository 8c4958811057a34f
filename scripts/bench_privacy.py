"""Benchmark privacy, in one run: differentially private condensation beside its baselines, and the
membership audit of everything the project hands over.

Condensation rows (per data set, ipc and epsilon; each set within ``--budget``):
- ``dp``: ``datafree condense --dp-epsilon E`` (DP distribution matching, noise start);
- ``non-private``: the default condensation (dm, k-means start) for the same budget;
- ``dp-sgd``: the evaluator's ConvNet trained on the real data with DP-SGD (opacus, PRV accountant) at
  the same epsilon and delta, for the same budget (epochs fixed from a timed start, as the DP sets);
each set scored with the fixed protocol (mean over ``--models`` ConvNets on the real test set).

Membership rows (``--audit``; members: the training split, non-members: the test split): the
teacher (the reference point), a data-free student distilled from it for ``--distill-budget``, and
ConvNets trained on sets started from real images, from k-means centres, and made under DP.

Canary rows (``--canaries N``, the worst case): 2N training images beyond the first
``--canary-clean`` get a random wrong label; a random half of them is planted into those clean
images, the other half is not. A teacher of the shipped teacher's architecture trains on the clean
images and the planted canaries for a number of epochs fixed here (``CANARY_TEACHER_EPOCHS``), and
the same targets as above are made from it and its data; each is audited with the planted canaries
as members and the others as non-members (LiRA's reference models train on the test split). A
mislabelled image can only be recognised by a model that saw it, so this is where leakage shows.

    DATAFREE_DATA=../shared/data python scripts/bench_privacy.py --datasets mnist,fashion-mnist --ipc 10,50 --epsilons 1,10 --budget 15m --audit
    DATAFREE_DATA=../shared/data python scripts/bench_privacy.py --datasets mnist --ipc 10 --epsilons 1,10 --budget 3m --skip-condensation --canaries 500 --merge
    DATAFREE_DATA=../shared/data python scripts/bench_privacy.py --quick      # a smoke run of the script

Writes ``bench/privacy.json`` (after every row, with the command and the machine) and the tables into
``BENCHMARKS.md``. Real test data is read only to score finished models; nothing is chosen on it.
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

PUBLISHED = {  # (data set, ipc, epsilon): (method, accuracy), from the anchors (delta 1e-5, ConvNet, real test set)
    ("mnist", 10, 1.0): "NDPDC 93.1, PSG 78.6, Dosser 95.3 (auxiliary images)",
    ("mnist", 50, 1.0): "NDPDC 94.1, Dosser 96.4 (auxiliary images)",
    ("fashion-mnist", 10, 1.0): "NDPDC 77.7, PSG 68.5, Dosser 81.6 (auxiliary images)",
    ("fashion-mnist", 50, 1.0): "NDPDC 78.8, Dosser 81.8 (auxiliary images)",
}
TEACHERS = {"mnist": "assets/teachers/mnist_lenet5.safetensors", "fashion-mnist": "assets/teachers/fmnist_convnet.safetensors"}
CANARY_TEACHER_EPOCHS = 30  # fixed before any canary run: enough for the clean images, long enough to memorise some canaries


def condense_row(source: str, ipc: int, epsilon: float | None, budget: str, models: int, epochs: int, out: Path, init=None) -> dict:
    """One condensed set of ``source`` (a data set name or an .npz), scored by ``models`` ConvNets (0: not scored)."""
    from datafree.condense.config import job_from_dict
    from datafree.condense.job import run_condense

    fields = {"source": source, "ipc": ipc, "time_budget": budget, "out": str(out), "overwrite": True, "progress": False,
              "evaluate": models, "epochs": epochs}
    if epsilon is not None:
        fields["dp_epsilon"] = epsilon
    if init is not None:
        fields["init"] = init
    started = time.monotonic()
    summary = run_condense(job_from_dict(fields))
    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = manifest.get("evaluation", {})
    row = {"accuracy": evaluation.get("mean"), "std": evaluation.get("std"),
           "condense_s": manifest["seconds"], "wall_s": round(time.monotonic() - started, 1), "iterations": summary["iterations"],
           "init": manifest["init"]["method"], "out": str(out.relative_to(ROOT))}
    if "privacy" in manifest:
        p = manifest["privacy"]
        row["privacy"] = {k: p[k] for k in ("epsilon_spent", "delta", "sigma", "sample_rate", "steps", "step_seconds")}
    return row


def dp_sgd_row(dataset: str, epsilon: float, budget_s: float, delta: float = 1e-5, seed: int = 0) -> dict:
    """The evaluator's ConvNet (width 32, instance norm) trained with DP-SGD on the whole training split."""
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    from datafree.data.datasets import load_dataset
    from datafree.models.inference import accuracy
    from datafree.models.zoo import create_model
    from datafree.outputs.evaluate import reference_padding

    train, test = load_dataset(dataset, train=True), load_dataset(dataset, train=False)
    torch.manual_seed(seed)
    spec = train.spec
    model = create_model("convnet", spec.num_classes, spec.channels, spec.size, width=32, depth=3, norm="instance",
                         first_padding=reference_padding(spec.channels, spec.size))
    for module in model.modules():  # opacus's per-sample hooks cannot follow an in-place activation
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    batch = 256
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train.images, train.labels), batch_size=batch, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                                                   max_grad_norm=1.0)
    # time a few private steps on noise images (not private data), then put the weights and the accountant back
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    steps_timed, g = 5, torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for _ in range(steps_timed):
        x = torch.randn(batch, spec.channels, spec.size, spec.size, generator=g)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.randint(spec.num_classes, (batch,), generator=g)).backward()
        optimizer.step()
    per_step = (time.monotonic() - started) / steps_timed
    model.load_state_dict(saved)
    optimizer.original_optimizer.state.clear()
    steps = max(1, int(budget_s * 0.95 / per_step))
    rate = 1 / len(loader)  # opacus's Poisson loader samples each image with this rate
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps,
                                 accountant="prv", epsilon_tolerance=0.005 * epsilon, eps_error=1e-3)
    optimizer.noise_multiplier = sigma
    engine.accountant.history = []  # the timing steps read no private image
    started = time.monotonic()
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
    spent = engine.accountant.get_epsilon(delta=delta, eps_error=1e-3)
    model.eval()
    return {"accuracy": round(accuracy(model._module, test), 2), "std": 0.0, "steps": steps, "sigma": round(sigma, 4),
            "epsilon_spent": round(spent, 4), "seconds": round(time.monotonic() - started, 1), "per_step_s": round(per_step, 4)}


def audit_rows(label: str, teacher: Path, runs: dict[str, Path], distill_budget: str, out: Path, **membership) -> dict:
    """Audit the teacher, a data-free student distilled from it, and the models trained on ``runs``' sets;
    ``membership``: the audit's fields (members, non_members, samples, references, ...)."""
    from datafree.distill.job import run_distill
    from datafree.distill.presets import resolve_distill_config
    from datafree.outputs.membership_job import membership_config, run_membership_audit

    targets = {"teacher": teacher}
    student_run = out / f"{label}-student"
    run_distill(resolve_distill_config(overrides={"teacher": str(teacher), "out": str(student_run),
                                                  "time_budget": distill_budget}), overwrite=True, progress=False, notify=lambda m: None)
    targets["data-free student"] = student_run
    targets.update(runs)
    rows = {}
    for name, target in targets.items():
        cfg = membership_config({"target": str(target), **membership,
                                 "out": str(out / "membership" / f"{label}-{name.replace(' ', '_')}")})
        result = run_membership_audit(cfg, progress=False, notify=lambda m: None)
        rows[name] = {a: {k: v for k, v in r.items() if k != "roc"} for a, r in result["attacks"].items()}
        rows[name]["accuracy"] = result["accuracy"]
        print(f"  audit {label} {name:<22} " + "  ".join(
            f"{a} AUC {r['auc']:.3f} TPR@1% {r['tpr_at_0.01_fpr'] * 100:.2f}% [{r['tpr_at_0.01_fpr_ci'][0] * 100:.2f}, "
            f"{r['tpr_at_0.01_fpr_ci'][1] * 100:.2f}]" for a, r in result["attacks"].items()), flush=True)
    return rows


def plant_canaries(dataset: str, count: int, clean: int, folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write the canary audit's data as .npz files of 8-bit pixels into ``folder``: ``train`` (the first
    ``clean`` training images and ``count`` planted canaries), ``members`` (the planted canaries),
    ``non_members`` (``count`` canaries never planted). A canary is a training image beyond the first
    ``clean`` with a random wrong label."""
    import numpy as np

    from datafree.data.datasets import load_dataset

    train = load_dataset(dataset, train=True)
    if clean + 2 * count > len(train):
        raise SystemExit(f"--canary-clean {clean} and 2 x {count} canaries exceed the {len(train)} training images")
    g = torch.Generator().manual_seed(seed)
    pixels = train.spec.to_uint8(train.images)
    k = train.spec.num_classes
    picked = clean + torch.randperm(len(train) - clean, generator=g)[:2 * count]
    wrong = (train.labels[picked] + torch.randint(1, k, (2 * count,), generator=g)) % k
    planted, kept_out = torch.arange(count), torch.arange(count, 2 * count)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": folder / f"{dataset}-canary-train.npz", "members": folder / f"{dataset}-canaries-planted.npz",
             "non_members": folder / f"{dataset}-canaries-not-planted.npz"}
    arrays = {"train": (torch.cat([pixels[:clean], pixels[picked[planted]]]), torch.cat([train.labels[:clean], wrong[planted]])),
              "members": (pixels[picked[planted]], wrong[planted]), "non_members": (pixels[picked[kept_out]], wrong[kept_out])}
    for name, (x, y) in arrays.items():
        np.savez(files[name], x=x.numpy(), y=y.numpy())
    return files


def canary_teacher(dataset: str, train_file: Path, path: Path, key: str, seed: int = 0) -> Path:
    """A teacher of the shipped teacher's architecture trained on ``train_file`` (clean images and planted
    canaries); one trained before with the same ``key`` (the canaries' settings) is kept."""
    from datafree.data.datasets import load_dataset
    from datafree.models.training import fit_supervised
    from datafree.models.zoo import create_model
    from datafree.teachers.formats import load_model, save_model

    key = f"{key}, {CANARY_TEACHER_EPOCHS} epochs, seed {seed}"
    if path.with_suffix(".json").is_file() and json.loads(path.with_suffix(".json").read_text()).get("canary_key") == key:
        return path
    card = load_model(ROOT / TEACHERS[dataset])[1]
    train = load_dataset(str(train_file))
    torch.manual_seed(seed)
    model = create_model(card["arch"], train.spec.num_classes, train.spec.channels, train.spec.size, **card.get("arch_kwargs", {}))
    fit_supervised(model, train, epochs=CANARY_TEACHER_EPOCHS, seed=seed, progress=False)
    save_model(model.eval(), path, card["arch"], train.spec, card.get("arch_kwargs", {}), dataset=dataset,
               trained_on=f"{train_file.name}: clean training images and planted canaries (bench_privacy.py)", canary_key=key)
    return path


def canary_rows(dataset: str, args, base: Path) -> dict:
    """The canary audit of one data set: plant, train the teacher, make the sets, audit everything."""
    folder = base / f"{dataset}-canaries"
    files = plant_canaries(dataset, args.canaries, args.canary_clean, folder)
    teacher = canary_teacher(dataset, files["train"], folder / "teacher.safetensors",
                             f"{args.canaries} canaries, {args.canary_clean} clean images")
    ipc = int(args.ipc.split(",")[0])
    runs = {}
    for label, epsilon, init in [("real-image start", None, "real"), ("k-means start", None, None),
                                 *[(f"DP eps {float(e):g}", float(e), None) for e in args.epsilons.split(",")]]:
        out = folder / f"set-{label.replace(' ', '-')}"
        condense_row(str(files["train"]), ipc, epsilon, args.budget, 0, args.epochs, out, init=init)
        if init == "real":  # how many canaries the set started from: it can only leak those
            from datafree.outputs.export import init_sources

            label += f", {int((init_sources(out) >= args.canary_clean).sum())} canary starts"
        runs[f"set, {label} (ipc {ipc})"] = out
    return audit_rows(f"{dataset}-canaries", teacher, runs, args.distill_budget, folder, members=str(files["members"]),
                      non_members=str(files["non_members"]), samples=args.canaries, references=args.references,
                      reference_data=f"{dataset}:test")


def audit_table(title: str, audits: dict) -> list[str]:
    lines = ["", title, "", "| data set | model | attack | AUC [95%] | TPR at 1% FPR [95%] | TPR at 0.1% FPR |", "|---|---|---|---|---|---|"]
    for dataset, rows in audits.items():
        for name, attacks in rows.items():
            for attack, r in attacks.items():
                if attack == "accuracy":
                    continue
                lines.append(f"| {dataset} | {name} | {attack} | {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] | "
                             f"{r['tpr_at_0.01_fpr'] * 100:.2f}% [{r['tpr_at_0.01_fpr_ci'][0] * 100:.2f}, "
                             f"{r['tpr_at_0.01_fpr_ci'][1] * 100:.2f}] | {r['tpr_at_0.001_fpr'] * 100:.2f}% |")
    return lines


def tables(result: dict) -> str:
    lines = [*(f"Command: `{r['command']}` ({r['date']}, {r['machine']})." for r in result.get("runs", [result])), "",
             "| data set | ipc | epsilon | DP condensation % | DP-SGD, same epsilon and minutes % | non-private default % | published |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result["condensation"], key=lambda r: (r["dataset"], r["ipc"], r["epsilon"])):
        dp, sgd, plain = r.get("dp", {}), r.get("dp-sgd", {}), r.get("non-private", {})
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['epsilon']:g} | {dp.get('accuracy', '-')} "
                     f"(eps {dp.get('privacy', {}).get('epsilon_spent', '-')}, {dp.get('iterations', '-')} of {dp.get('privacy', {}).get('steps', '-')} steps) | "
                     f"{sgd.get('accuracy', '-')} | {plain.get('accuracy', '-')} | {PUBLISHED.get((r['dataset'], r['ipc'], r['epsilon']), '-')} |")
    if result.get("membership"):
        lines += audit_table("Membership (members: the training split; non-members: the test split):", result["membership"])
    if result.get("canaries"):
        lines += audit_table(f"Canaries (members: {result['canary_count']} mislabelled images planted into the teacher's "
                             "training data; non-members: as many not planted):", result["canaries"])
    return "\n".join(lines)


def main():
    from datafree.base.config import parse_duration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--ipc", default="10,50")
    parser.add_argument("--epsilons", default="1,10")
    parser.add_argument("--budget", default="15m", help="time for each set (and each DP-SGD model)")
    parser.add_argument("--baselines", default="non-private,dp-sgd", help="comma-separated: non-private, dp-sgd (empty: none)")
    parser.add_argument("--models", type=int, default=3, help="evaluation models per set")
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs per model")
    parser.add_argument("--audit", action="store_true", help="the membership audit rows too")
    parser.add_argument("--distill-budget", default="5m", help="--audit: the data-free student's distillation time")
    parser.add_argument("--samples", type=int, default=1000, help="--audit: audited images on each side")
    parser.add_argument("--references", type=int, default=4, help="--audit: LiRA reference models")
    parser.add_argument("--canaries", type=int, default=0, help="the canary audit with this many planted canaries (0: none)")
    parser.add_argument("--canary-clean", type=int, default=20000, help="--canaries: clean training images of the canary teacher")
    parser.add_argument("--skip-condensation", action="store_true", help="no condensation table (e.g. the canary audit only)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of --out that this invocation does not redo")
    parser.add_argument("--render-only", action="store_true", help="run nothing: write the tables of --out into BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="a smoke run: mnist, ipc 1, epsilon 1, 20 s, 1 model x 20 epochs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "privacy.json"))
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.ipc, args.epsilons, args.budget, args.models, args.epochs = "mnist", "1", "1", "20s", 1, 20
        args.distill_budget, args.samples, args.references = "20s", 200, 1
        args.canaries = args.canaries and 50
        args.out, args.no_markdown = str(ROOT / "runs" / "bench" / "privacy_quick.json"), True
    if args.render_only:  # e.g. after an invocation was stopped between rows (each row is saved when it ends)
        write_block("privacy", tables(json.loads(Path(args.out).read_text())), "Privacy: DP condensation and membership inference")
        return
    torch.set_num_threads(2)
    command = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    result = {"runs": [], "condensation": [], "membership": {}, "canaries": {}}
    if args.merge and Path(args.out).is_file():  # rows of earlier invocations stay unless this one redoes them
        earlier = json.loads(Path(args.out).read_text())
        result |= earlier | {"runs": earlier.get("runs", [{k: earlier[k] for k in ("command", "date", "machine", "budget")
                                                             if k in earlier}])}
        for row in result["condensation"]:
            row.setdefault("budget", earlier.get("budget"))
    result["runs"].append(command | {"budget": args.budget})
    result |= command | {"budget": args.budget}
    if args.canaries:
        result |= {"canary_count": args.canaries, "canary_teacher_epochs": CANARY_TEACHER_EPOCHS}
    base = ROOT / "runs" / "bench" / "privacy"
    baselines = [b for b in args.baselines.split(",") if b]

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    for dataset in args.datasets.split(","):
        plain_done: dict[int, dict] = {}
        sgd_done = {r["epsilon"]: r["dp-sgd"] for r in result["condensation"]  # DP-SGD trains on the real data: one model
                    if r["dataset"] == dataset and "dp-sgd" in r and r["budget"] == args.budget}  # for every ipc
        audit_runs: dict[str, Path] = {}
        for ipc in map(int, args.ipc.split(",")) if not args.skip_condensation else ():
            for epsilon in map(float, args.epsilons.split(",")):
                row = {"dataset": dataset, "ipc": ipc, "epsilon": epsilon, "budget": args.budget}
                out = base / f"{dataset}-ipc{ipc}-eps{epsilon:g}"
                row["dp"] = condense_row(dataset, ipc, epsilon, args.budget, args.models, args.epochs, out)
                audit_runs.setdefault(f"set, DP eps {epsilon:g} (ipc {ipc})", out)
                if "non-private" in baselines:
                    if ipc not in plain_done:
                        plain_done[ipc] = condense_row(dataset, ipc, None, args.budget, args.models, args.epochs, base / f"{dataset}-ipc{ipc}-kmeans")
                        audit_runs.setdefault(f"set, k-means start (ipc {ipc})", base / f"{dataset}-ipc{ipc}-kmeans")
                    row["non-private"] = plain_done[ipc]
                if "dp-sgd" in baselines:
                    if epsilon not in sgd_done:
                        sgd_done[epsilon] = dp_sgd_row(dataset, epsilon, parse_duration(args.budget))
                    row["dp-sgd"] = sgd_done[epsilon]
                result["condensation"] = [r for r in result["condensation"]
                                          if (r["dataset"], r["ipc"], r["epsilon"]) != (dataset, ipc, epsilon)] + [row]
                print(f"{dataset} ipc {ipc} eps {epsilon:g}: " + ", ".join(f"{k} {v['accuracy']}" for k, v in row.items()
                                                                           if isinstance(v, dict)), flush=True)
                save()
        if args.audit:
            ipc = int(args.ipc.split(",")[0])
            real_start = base / f"{dataset}-ipc{ipc}-real"
            condense_row(dataset, ipc, None, args.budget, 1, args.epochs, real_start, init="real")
            audit_runs[f"set, real-image start (ipc {ipc})"] = real_start
            result["membership"][dataset] = audit_rows(dataset, ROOT / TEACHERS[dataset], audit_runs, args.distill_budget, base,
                                                       members=dataset, non_members=f"{dataset}:test", samples=args.samples,
                                                       references=args.references)
            save()
        if args.canaries:
            result["canaries"][dataset] = canary_rows(dataset, args, base)
            save()
    print(tables(result))
    if not args.no_markdown:
        write_block("privacy", tables(result), "Privacy: DP condensation and membership inference")


if __name__ == "__main__":
    main()
