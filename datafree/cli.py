"""The ``datafree`` command.

    datafree teacher train --dataset mnist --arch lenet5 --out assets/teachers/mnist_lenet5
    datafree teacher inspect assets/teachers/mnist_lenet5.safetensors
    datafree teacher export assets/teachers/mnist_lenet5.safetensors --to model.pt2
    datafree distill                      # the shipped MNIST teacher -> lenet5_half
    datafree condense --source mnist --ipc 10 --method dsa --time-budget 15m --out runs/mnist-ipc10
    datafree evaluate-set runs/mnist-ipc10 --models 3
    datafree audit runs/mnist-ipc10 --real mnist
    datafree export student runs/distill --out handoff --int8
    datafree compress --teacher assets/suite/mnist_resnet20.safetensors --target-macs 2x --time-budget 20m --out runs/resnet20-2x
    datafree serve --store datafree-store

A user's mistake ends in one sentence on stderr and exit status 2; a bug keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from datafree.base.errors import UserError
from datafree.base.runtime import tune_allocator

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_TEACHER = ASSETS / "teachers" / "mnist_lenet5.safetensors"


def _add_device_options(p: argparse.ArgumentParser) -> None:
    """``--accelerator`` and ``--precision``, on the commands that train a network on one device."""
    from datafree.base.precision import PRECISIONS

    p.add_argument("--accelerator", default="auto", help="auto (a GPU when there is one; default), cpu or gpu (passed to Lightning)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="numeric precision of the training steps: auto (default) times fp32 and bf16 (fp16 too on CUDA), "
                        "with and without channels_last, and keeps the fastest, fp32 unless another is 5%% faster")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--download``, on every command that may read a real data set."""
    p.add_argument("--data-dir", help="folder with torchvision's layout of the data sets (default: $DATAFREE_DATA, "
                                      "else ~/.cache/datafree/data)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download MNIST / Fashion-MNIST / CIFAR-10 into the data folder when missing "
                        "(needs the network; the same as DATAFREE_DOWNLOAD=1)")


def _add_run_options(p: argparse.ArgumentParser, resume_help: str) -> None:
    """``--no-eval``, the data options, ``--resume``, ``--overwrite`` and ``--no-progress``: a job that trains from a teacher."""
    p.add_argument("--no-eval", action="store_true", help="do not measure real test accuracy at the end")
    _add_data_options(p)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--no-progress", action="store_true")


@contextlib.contextmanager
def _downloads(allowed: bool):
    """``--download``: DATAFREE_DOWNLOAD=1 while the command runs, so every data set it loads may be fetched.

    Example:
        >>> with _downloads(True):
        ...     os.environ["DATAFREE_DOWNLOAD"]
        '1'
    """
    from datafree.data.datasets import DOWNLOAD_ENV

    before = os.environ.get(DOWNLOAD_ENV)
    if allowed:
        os.environ[DOWNLOAD_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DOWNLOAD_ENV, None)
        else:
            os.environ[DOWNLOAD_ENV] = before


@contextlib.contextmanager
def _stop_signals(resumable: bool):
    """While a resumable command runs, Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, so the
    run saves its last finished step and exits 130, even when it was started with SIGINT ignored
    (a shell's background job, ``nohup``, a service worker): a stop request is never lost.

    Example:
        >>> import signal
        >>> with _stop_signals(True):
        ...     signal.getsignal(signal.SIGTERM) is signal.default_int_handler
        True
    """
    import signal

    from datafree.base.io import launched_worker

    previous = {}
    if resumable and not launched_worker():  # extra DDP processes stop when rank 0 does
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, signal.default_int_handler)
            except ValueError:  # not the main thread: the caller's handlers stay
                pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(sig, handler)


def interrupted_message(checkpoint: Path | None) -> str:
    """What a stopped command tells its user: how to continue, only when there is something to continue from.

    Example:
        >>> interrupted_message(None)
        'interrupted'
    """
    if checkpoint is None:
        return "interrupted"
    if checkpoint.is_file():
        return f"interrupted; the last checkpoint is {str(checkpoint)!r}: run the same command with --resume to continue"
    return "interrupted before the first checkpoint was written; there is nothing to resume: run the command again to start over"


def _add_teacher_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="zoo architecture, for a safetensors file without a card")
    p.add_argument("--dataset", help="data set whose input spec applies, for a file without a card")
    p.add_argument("--input-spec", help="CxHxW[:mean:std], e.g. 1x28x28:0.1307:0.3081 (overrides the card)")


def cmd_teacher_train(args) -> int:
    from datafree.data.datasets import load_dataset
    from datafree.models.zoo import count_parameters, create_model
    from datafree.teachers.formats import save_model

    out = Path(args.out).with_suffix(".safetensors")
    if out.exists() and not args.overwrite:
        raise UserError(f"{str(out)!r} exists; pass --overwrite to replace it")
    kwargs = json.loads(args.arch_kwargs) if args.arch_kwargs else {}
    train = load_dataset(args.dataset, train=True, data_dir=args.data_dir)
    test = load_dataset(args.dataset, train=False, data_dir=args.data_dir)
    spec = train.spec
    model = create_model(args.arch, spec.num_classes, spec.channels, spec.size, **kwargs)
    from datafree.models.inference import (
        accuracy,  # Lightning: seconds to import, so after the checks
    )
    from datafree.models.training import fit_supervised, make_augment

    print(f"training {args.arch} ({count_parameters(model):,} parameters) on {train.name} ({len(train):,} images), "
          f"{args.epochs} epochs, seed {args.seed}", file=sys.stderr)
    augment = make_augment(args.augment)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.epochs, desc=f"train {args.arch}", unit="epoch")  # one bar with ETA over all epochs
    ran: dict = {}
    fit_supervised(model, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, augment=augment,
                   progress=False, on_epoch=lambda done: bar.update(done - bar.n), accelerator=args.accelerator,
                   precision=args.precision, record=ran)
    bar.close()
    acc = accuracy(model, test)
    card = save_model(model, out, args.arch, spec, kwargs, dataset=train.name, test_accuracy=round(acc, 2),
                      training={"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                                "augment": args.augment, "optimizer": "SGD nesterov 0.9, one-cycle, wd 5e-4", "precision": ran})
    print(json.dumps({"teacher": str(out), "test_accuracy": card["test_accuracy"], "sha256": card["sha256"]}))
    return 0


def cmd_teacher_inspect(args) -> int:
    from datafree.teachers.formats import load_teacher

    teacher = load_teacher(args.file, arch=args.arch, dataset=args.dataset, input_spec=args.input_spec)
    info = teacher.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    spec = teacher.spec
    print(f"file          {args.file}")
    print(f"format        {info['format']}")
    print(f"architecture  {info['arch']}")
    print(f"parameters    {info['parameters']:,}")
    print(f"input         {spec.describe()}, mean {list(spec.mean)}, std {list(spec.std)}")
    print(f"classes       {teacher.num_classes}: {', '.join(spec.class_names)}")
    print(f"BN layers     {len(info['bn_layers'])}: {', '.join(info['bn_layers']) or '-'}")
    if info["bn_note"]:
        print(f"note          {info['bn_note']}")
    print(f"features      {'penultimate features reachable' if teacher.has_features else 'logits only'}")
    if info["dataset"]:
        print(f"trained on    {info['dataset']}")
    if info["test_accuracy"] is not None:
        print(f"test accuracy {info['test_accuracy']}% (from the card)")
    if info["sha256"]:
        print(f"sha256        {info['sha256']}")
    return 0


def cmd_teacher_export(args) -> int:
    from datafree.data.datasets import InputSpec
    from datafree.outputs.export import export_program
    from datafree.teachers.formats import load_model, resolve_spec, sniff_format

    out = Path(args.to)
    if out.exists() and not args.overwrite:
        raise UserError(f"{str(out)!r} exists; pass --overwrite to replace it")
    if sniff_format(args.file) != "safetensors":
        raise UserError("teacher export takes a safetensors + card teacher (a .pt2 or TorchScript file is already exported)")
    model, card = load_model(args.file, args.arch, resolve_spec(args.dataset, args.input_spec))
    spec = InputSpec.from_dict(card["input_spec"])
    export_program(model.eval(), spec, out, card)
    print(f"wrote {out}: takes N x {spec.describe()} images in [0, 1], returns logits")
    return 0


DISTILL_FLAGS = ["teacher", "ensemble_rule", "teacher_input_spec", "student", "student_kwargs", "preset", "steps", "time_budget", "out", "seed",
                 "generator", "batch_size", "synth_steps", "meta_rate", "bn_momentum", "student_steps", "schedule", "student_share", "pool_size", "lr_student",
                 "lr_generator", "kd_temperature", "student_loss", "augment", "final_augment", "mixup", "student_ema", "final_share", "final_pool", "archive_keeps",
                 "knowledge", "checkpoint_every", "eval_every",
                 "eval_data", "precision", "accelerator", "devices", "num_nodes", "strategy"]
CONDENSE_FLAGS = ["source", "ipc", "method", "schedule", "steps", "time_budget", "init", "factor", "pool_size", "refresh_every",
                  "real_per_class", "net_width", "outer_loop",
                  "inner_loop", "soft_labels", "soft_label_model", "teacher_ce", "teacher_bn", "dp_epsilon", "dp_delta", "dp_clip", "resume", "seed", "evaluate", "epochs", "test",
                  "accelerator", "precision", "devices", "num_nodes", "strategy",
                  "out", "overwrite"]


def cmd_distill(args) -> int:
    from datafree.base.config import load_yaml
    from datafree.base.flags import given
    from datafree.distill.job import CHECKPOINT as DISTILL_CHECKPOINT
    from datafree.distill.job import run_distill
    from datafree.distill.presets import resolve_distill_config

    overrides = given(args, [*DISTILL_FLAGS, "data_dir"])
    config_path = args.config
    if args.resume:
        stored = Path(args.out or "runs/distill") / "config.yaml"
        if not stored.is_file():
            raise UserError(f"nothing to resume: no run folder config at {str(stored)!r}")
        config_path = stored
        overrides = {k: v for k, v in overrides.items() if k in ("steps", "time_budget", "accelerator", "devices", "num_nodes", "strategy")}
    elif not args.teacher and not (config_path and load_yaml(config_path).get("teacher")):
        overrides["teacher"] = str(DEFAULT_TEACHER)
    if not args.resume and args.eval_data is None and not args.no_eval:
        teacher = overrides.get("teacher") or (load_yaml(config_path).get("teacher") if config_path else None)
        overrides["eval_data"] = _card_dataset(teacher[0] if isinstance(teacher, list) else teacher)
    cfg = resolve_distill_config(args.preset, config_path, overrides)
    args.checkpoint = Path(cfg.out) / DISTILL_CHECKPOINT  # what an interrupted run can resume from
    summary = run_distill(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def cmd_compress(args) -> int:
    from datafree.base.flags import given
    from datafree.compress.config import COMPRESS_FIELDS, compress_config
    from datafree.compress.job import run_compress

    values = given(args, list(COMPRESS_FIELDS))
    values.setdefault("teacher", str(DEFAULT_TEACHER))
    if args.eval_data is None and not args.no_eval:
        values["eval_data"] = _card_dataset(values["teacher"])
    cfg = compress_config(values)
    args.checkpoint = Path(cfg.out) / "recovery" / "checkpoints" / "last.ckpt"  # what an interrupted run can resume from
    summary = run_compress(cfg, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({"out": cfg.out, "stages": summary["stages"]}))
    return 0


def _card_dataset(teacher_path) -> str | None:
    """Report-only evaluation defaults to the data set named in the teacher's card, when its files are here."""
    from datafree.data.datasets import TORCHVISION_SETS, canonical_name, data_root

    if not teacher_path:
        return None
    card = Path(teacher_path).with_suffix(".json")
    try:
        name = canonical_name(json.loads(card.read_text()).get("dataset") or "")
    except (OSError, ValueError):
        return None
    if name in TORCHVISION_SETS and (data_root() / TORCHVISION_SETS[name][0]).is_dir():
        return name
    return None


def cmd_condense(args) -> int:
    from datafree.condense.config import JOB_FIELDS, job_from_dict
    from datafree.condense.job import CHECKPOINT, run_condense

    values = {name: getattr(args, name) for name in JOB_FIELDS if hasattr(args, name)}
    values["progress"] = not args.no_progress
    job = job_from_dict(values)
    args.checkpoint = Path(job.out) / CHECKPOINT  # what an interrupted run can resume from
    summary = run_condense(job)
    if "rank" not in summary:  # the other processes of a scaled-out run print nothing
        print(json.dumps(summary))
    return 0


def cmd_evaluate_set(args) -> int:
    from datafree.base.io import write_json
    from datafree.data.datasets import ImageSet, dataset_spec, load_dataset
    from datafree.outputs.evaluate import evaluate_set
    from datafree.outputs.export import read_set

    own = (Path(args.path) / "dataset.safetensors").is_file()
    manifest = json.loads((Path(args.path) / "manifest.json").read_text()) if own else {}
    test_name = args.test or manifest.get("source", {}).get("name")
    if not args.test and (not test_name or test_name.startswith("runs") or "/" in test_name):  # a data-free set's source
        raise UserError("say which real test set to score on with --test (e.g. --test mnist)")
    condensed, soft, manifest = read_set(args.path, spec=None if own else dataset_spec(test_name))
    if args.soft_labels and soft is None:
        raise UserError("this set carries no soft labels; condense a distill run's transfer set with --soft-labels to get them")
    test = load_dataset(test_name, train=False, data_dir=args.data_dir, download=getattr(args, "download", False))
    if (condensed.spec.channels, condensed.spec.size) != (test.spec.channels, test.spec.size):
        raise UserError(f"the set holds {condensed.spec.describe()} images but {test_name} is {test.spec.describe()}")
    result = evaluate_set(ImageSet(condensed.images, condensed.labels, condensed.spec, name=test.name), test,
                          arch=args.arch, models=args.models, epochs=args.epochs, seed=args.seed, progress=not args.no_progress,
                          protocol=args.protocol, soft_labels=soft if args.soft_labels else None,
                          accelerator=args.accelerator, precision=args.precision)
    print(f"{args.arch}: {result['mean']:.2f} +- {result['std']:.2f} % over {result['protocol']['models']} models "
          f"({args.protocol} protocol, {'soft' if args.soft_labels else 'hard'} labels) on the {test_name} test set")
    if args.record:
        if not own:
            raise UserError("--record writes into a datafree set's manifest.json; this folder has none (use --out)")
        manifest.setdefault("evaluations", []).append(result)
        write_json(Path(args.path) / "manifest.json", manifest)
    if args.out:
        write_json(Path(args.out) / "evaluation.json", dict(result, set=manifest.get("method"), ipc=manifest.get("ipc")))
    return 0


def load_synthetic(path, spec=None):
    """A condensed set folder, a plain image folder (read with ``spec``), or a distill run's transfer
    set: ``(images, the run's teacher or None, manifest)``."""
    from datafree.condense.job import teacher_of_run
    from datafree.data.datasets import load_transfer_set
    from datafree.outputs.export import read_set

    path = Path(path)
    if (path / "transfer.safetensors").is_file():
        images, _ = load_transfer_set(path)
        teacher = teacher_of_run(path)[0] if (path / "config.yaml").is_file() else None
        return images, teacher, {"source": {"kind": "transfer set of a distill run", "name": str(path)}}
    images, _, manifest = read_set(path, spec)
    source = manifest.get("source", {})
    run = Path(source.get("name", ""))
    teacher = None
    if source.get("kind", "").startswith("transfer set") and (run / "config.yaml").is_file():
        teacher = teacher_of_run(run)[0]
    return images, teacher, manifest


def _traceable_sources(folder: Path, manifest: dict, real):
    """The set's per-image source indices when ``real`` is the very set it was condensed from, else (None, reason)."""
    from datafree.condense.job import dataset_digest
    from datafree.outputs.export import init_sources

    starts = init_sources(folder) if manifest.get("source", {}).get("kind") == "real data" else None
    if starts is None or int((starts >= 0).sum()) == 0:
        return None, "the set records no real image it started from"
    if manifest["source"].get("sha256") != dataset_digest(real.images, real.labels):
        return None, f"the set was condensed from another source than {real.name!r} (sha256 differs)"
    return starts, None


def cmd_audit(args) -> int:
    if args.membership:
        return cmd_membership_audit(args)
    from datafree.base.io import read_json, write_json
    from datafree.data.datasets import load_dataset
    from datafree.outputs.audit import audit_set

    real = load_dataset(args.real, train=True, data_dir=args.data_dir, download=getattr(args, "download", False)) if args.real else None
    folder = Path(args.synthetic)
    synthetic, teacher, manifest = load_synthetic(folder, real.spec if real is not None else None)
    own_manifest = (folder / "manifest.json").is_file() and (folder / "dataset.safetensors").is_file()
    out = Path(args.out) if args.out else folder / "audit.json"
    if not args.out and not own_manifest and not (folder / "transfer.safetensors").is_file() and out.exists():
        raise UserError(f"{str(out)!r} exists in a folder this project did not write; say where the audit goes with --out")
    if args.teacher:
        from datafree.teachers.formats import load_teacher

        teacher = load_teacher(args.teacher)
    if args.no_teacher:
        teacher = None
    starts, why_not = _traceable_sources(folder, manifest, real) if real is not None else (None, None)
    report = audit_set(synthetic, real, teacher, quantile=args.quantile, init_source=starts, progress=not args.no_progress)
    if why_not and real is not None:
        report["traceability"] = {"measured": False, "reason": why_not}
    write_json(out, report)
    if not args.out and own_manifest:  # audited in place: the set's manifest and report say so
        manifest = read_json(folder / "manifest.json")
        manifest["audit"] = {"verdict": report["verdict"], "real": report.get("real"),
                             "pixel_near_copies": report.get("pixel", {}).get("near_copies"),
                             "feature_near_copies": report.get("feature", {}).get("near_copies"),
                             "nearest_is_own_source": report.get("traceability", {}).get("nearest_is_own_source"), "file": out.name}
        write_json(folder / "manifest.json", manifest)
        from datafree.outputs.report import write_report

        write_report(folder)
    pixel, trace = report.get("pixel", {}), report.get("traceability", {})
    print(f"{report['verdict']}: {pixel.get('near_copies', '-')} near-copies in pixel space"
          + (f", {report['feature']['near_copies']} in feature space" if "feature" in report else "")
          + f" among {report['synthetic']['count']} synthetic images"
          + (f"; {trace['nearest_is_own_source']} of {trace['images_from_source']} still nearest to the real image they started from"
             if "nearest_is_own_source" in trace else "") + f"; written to {out}")
    return 0 if report["verdict"] != "fail" or not args.strict else 1


MEMBERSHIP_FLAGS = ["members", "non_members", "samples", "references", "reference_epochs", "reference_pool", "reference_data",
                    "set_epochs", "seed"]


def cmd_membership_audit(args) -> int:
    from datafree.base.flags import given
    from datafree.outputs.membership_job import membership_config, run_membership_audit

    cfg = membership_config(given(args, MEMBERSHIP_FLAGS) | {"target": args.synthetic, "out": args.out, "data_dir": args.data_dir})
    result = run_membership_audit(cfg, progress=not args.no_progress)
    for name, attack in result["attacks"].items():
        print(f"{name:<5} AUC {attack['auc']:.3f} [{attack['auc_ci'][0]:.3f}, {attack['auc_ci'][1]:.3f}]  "
              f"TPR at 1% FPR {attack['tpr_at_0.01_fpr'] * 100:.2f}% [{attack['tpr_at_0.01_fpr_ci'][0] * 100:.2f}, "
              f"{attack['tpr_at_0.01_fpr_ci'][1] * 100:.2f}]  at 0.1% FPR {attack['tpr_at_0.001_fpr'] * 100:.2f}%")
    print(f"{result['members']} members and {result['non_members']} non-members, {result['kind']}; written to {result['written_to']}")
    return 0


def cmd_export_student(args) -> int:
    from datafree.condense.job import teacher_of_run
    from datafree.data.datasets import load_dataset
    from datafree.outputs.handoff import export_student

    run = Path(args.run)
    teacher = teacher_of_run(run)[0] if (run / "config.yaml").is_file() and (run / "manifest.json").is_file() else None
    test = load_dataset(args.test, train=False, data_dir=args.data_dir) if args.test else None
    card = export_student(run, args.out, test=test, teacher=teacher, int8=args.int8, onnx=args.onnx, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(json.dumps({"out": args.out, "accuracy": card["accuracy"], "latency_ms": card["latency_ms"],
                      "int8": {k: card["int8"][k] for k in ("size_bytes", "accuracy")} if "int8" in card else None,
                      "onnx": {k: card["onnx"][k] for k in ("max_abs_logit_diff", "argmax_agreement")} if "onnx" in card else None}))
    return 0


def cmd_serve(args) -> int:
    from datafree.service.app import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"datafree: warning: listening on {args.host}, reachable from other machines; keep the token secret",
              file=sys.stderr)
    return serve(args.host, args.port, args.store, args.workers, args.max_upload_mb, args.accelerator, args.precision)


def build_parser() -> argparse.ArgumentParser:
    from datafree.base.flags import add_config_flags
    from datafree.compress.config import COMPRESS_FIELDS, CompressConfig
    from datafree.condense.config import CondenseJob
    from datafree.distill.config import DistillConfig
    from datafree.distill.presets import NO_BN_PRESET, PRESETS

    parser = argparse.ArgumentParser(prog="datafree", description="Data-free knowledge distillation and dataset condensation.")
    sub = parser.add_subparsers(dest="command", required=True)

    teacher = sub.add_parser("teacher", help="train, inspect and export teachers").add_subparsers(dest="action", required=True)
    p = teacher.add_parser("train", help="train a zoo model on a real data set and write safetensors + card")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--arch", default="lenet5")
    p.add_argument("--arch-kwargs", help='JSON, e.g. \'{"width": 64, "norm": "batch"}\'')
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", default="affine", help="affine (digits, default), flip-shift (clothes, photos), none")
    _add_data_options(p)
    _add_device_options(p)
    p.add_argument("--out", required=True, help="path without suffix; NAME.safetensors and NAME.json are written")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_teacher_train)

    p = teacher.add_parser("inspect", help="print a teacher's architecture, BN layers, input spec and card")
    p.add_argument("file")
    _add_teacher_source(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_teacher_inspect)

    p = teacher.add_parser("export", help="write a self-contained .pt2 (or .ts) program taking [0, 1] images")
    p.add_argument("file")
    p.add_argument("--to", required=True)
    _add_teacher_source(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_teacher_export)

    p = sub.add_parser("distill", help="train a student from a teacher alone (no real data)",
                       description="Synthesise a transfer set with a generator trained against the teacher and distil a "
                                   "student on it. With no arguments: the shipped MNIST teacher into lenet5_half.")
    add_config_flags(p, DistillConfig, DISTILL_FLAGS, preset=(DistillConfig.preset, PRESETS[DistillConfig.preset]),
                     flag_names={"teacher_input_spec": "input-spec"},
                     notes={"teacher": f"default: {DEFAULT_TEACHER.relative_to(ASSETS.parent)}",
                            "preset": f"default: {DistillConfig.preset} for a teacher with BN statistics, {NO_BN_PRESET} for one without"})
    p.add_argument("--config", help="YAML file of config fields (any field of the distill config; flags override it)")
    _add_run_options(p, "continue the run in --out from its last checkpoint")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("compress", help="prune a teacher, recover it by data-free distillation, quantise to int8 (no data)",
                       description="Structured pruning of the teacher's channels (Torch-Pruning), recovery by data-free "
                                   "distillation from the original teacher, static int8 and ONNX: OUT/handoff, with a "
                                   "stage table in OUT/COMPRESS.md. With no arguments: the shipped MNIST teacher, 2x fewer MACs.")
    add_config_flags(p, CompressConfig, [f for f in COMPRESS_FIELDS if f != "data_dir"],
                     notes={"teacher": f"default: {DEFAULT_TEACHER.relative_to(ASSETS.parent)}"})
    _add_run_options(p, "continue the recovery of the run in --out from its checkpoint")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("condense", help="condense a data set (or a distill run's transfer set) to a few images per class")
    add_config_flags(p, CondenseJob, CONDENSE_FLAGS, required=("out",))
    _add_data_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_condense)

    p = sub.add_parser("evaluate-set", help="train fresh models on a condensed set (or any image folder) with a named protocol")
    p.add_argument("path", help="a condensed set folder, or an image folder (<class>/<image>) made by any tool")
    p.add_argument("--arch", default="convnet", help="convnet (protocol), lenet5, resnet8, ...")
    p.add_argument("--protocol", default="fixed", choices=["fixed", "published"],
                   help="fixed: 3 models x 300 epochs (default); published: the reference code's 20 models x 1000 epochs")
    p.add_argument("--models", type=int, help="fresh models to train (default: the protocol's)")
    p.add_argument("--soft-labels", action="store_true",
                   help="train on the soft labels the set carries (KD at T=1); report beside the hard-label result")
    p.add_argument("--epochs", type=int, help="epochs per model (default: the protocol's)")
    p.add_argument("--test", help="real test set (default: the set's source)")
    p.add_argument("--seed", type=int, default=0)
    _add_data_options(p)
    _add_device_options(p)
    p.add_argument("--record", action="store_true", help="append the result to the set's manifest.json")
    p.add_argument("--out", help="also write the result to OUT/evaluation.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate_set)

    p = sub.add_parser("audit", help="check a synthetic set for leaked real images (faiss nearest neighbours), or with "
                                     "--membership attack a model, student or set for its training data's membership")
    p.add_argument("synthetic", help="condensed set folder or distill run folder (with --membership: a model file too)")
    p.add_argument("--membership", action="store_true",
                   help="membership-inference audit (loss threshold and offline LiRA): ROC AUC and TPR at 0.1%% and 1%% FPR")
    from datafree.outputs.membership_job import MembershipConfig

    add_config_flags(p, MembershipConfig, MEMBERSHIP_FLAGS, notes={name: "with --membership" for name in MEMBERSHIP_FLAGS})
    p.add_argument("--real", help="real data set to compare with (name, folder or .npz); without it only diversity is measured")
    p.add_argument("--teacher", help="teacher for the feature-space audit (default: the run's own, when known)")
    p.add_argument("--no-teacher", action="store_true", help="pixel space only")
    p.add_argument("--quantile", type=float, default=0.01, help="near-copy threshold: this quantile of real-to-real distances")
    p.add_argument("--out", help="where to write the audit (default SYNTHETIC/audit.json)")
    p.add_argument("--strict", action="store_true", help="exit 1 when near-copies are found")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_data_options(p)
    p.set_defaults(func=cmd_audit)

    export = sub.add_parser("export", help="package results for handoff").add_subparsers(dest="action", required=True)
    p = export.add_parser("student", help="the student of a distill run with its model card, .pt2 program and optional int8")
    p.add_argument("run")
    p.add_argument("--out", required=True)
    p.add_argument("--test", help="real test set for the card's accuracy (default: the figures the run recorded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--int8", action="store_true", help="also post-training int8 quantisation, with its size and accuracy")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                   help="student.onnx beside student.pt2, checked with ONNX Runtime (default: on; --no-onnx leaves it out)")
    _add_data_options(p)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export_student)

    p = sub.add_parser("serve", help="the HTTP job service (FastAPI); token from DATAFREE_TOKEN or made on first start",
                       description="The HTTP job service. SIGTERM or Ctrl-C stops it cleanly: each running job saves a "
                                   "checkpoint then (60 s at most) and resumes from it on the next start.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", default="datafree-store", help="folder for the SQLite job store, teachers and artifacts")
    p.add_argument("--workers", type=int, default=1, help="jobs run at once, each in its own process")
    p.add_argument("--max-upload-mb", type=int, default=200)
    _add_device_options(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tune_allocator()
    try:
        with _downloads(getattr(args, "download", False)), _stop_signals(hasattr(args, "resume")):
            return args.func(args)
    except UserError as e:
        print(f"datafree: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"datafree: {interrupted_message(getattr(args, 'checkpoint', None))}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
