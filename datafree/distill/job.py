"""The ``distill`` job: teacher file in, run folder out.

    runs/NAME/
      config.yaml            the resolved config
      metrics.jsonl          one JSON object a line: every loss term, BN loss per layer, class
                             histogram, pool size, held-out agreement
      checkpoints/last.ckpt  everything a ``--resume`` needs (Lightning checkpoint + pool + RNG)
      grids/step_*.png       synthetic samples, one row per teacher class
      student.safetensors    + student.json card, and student.pt2 ([0, 1] images in, logits out)
      generator.safetensors  + generator.json
      transfer.safetensors   images in the teacher's input space + teacher logits; manifest.json
      holdout.safetensors    the held-out synthetic samples (and teacher logits) that chose the student
      summary.json           what was selected and, if asked, real test accuracy (report only)
      report.html, report/   image grid per class, curves, class histogram, accuracy table, audit

Example:
    >>> from datafree.distill.presets import resolve_distill_config
    >>> cfg = resolve_distill_config(overrides={"teacher": "assets/teachers/mnist_lenet5.safetensors", "steps": 50})
    >>> summary = run_distill(cfg)   # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch

from datafree.base.config import to_yaml
from datafree.base.errors import UserError
from datafree.base.io import (
    atomic_path,
    check_writable_dir,
    launched_worker,
    save_tensors,
    sha256_file,
    write_json,
    write_text,
)
from datafree.base.precision import notify_device
from datafree.base.progress import ProgressFile
from datafree.base.runtime import tune_allocator
from datafree.data.datasets import ImageSet, InputSpec, dataset_spec, no_real_data
from datafree.distill.config import DistillConfig
from datafree.distill.module import DistillModule, Rounds
from datafree.models.inference import agreement
from datafree.models.training import quiet_lightning
from datafree.models.zoo import Classifier, count_parameters, create_model
from datafree.teachers.ensemble import load_teachers, teacher_list
from datafree.teachers.formats import load_model, save_model
from datafree.teachers.teacher import Teacher
from generators import create_generator

CHECKPOINT = "checkpoints/last.ckpt"


def build_student(name: str, teacher: Teacher, kwargs: dict | None = None) -> tuple[Classifier, str, dict]:
    """A fresh zoo student for the teacher's classes and input, or an initial student from a safetensors file."""
    spec = teacher.spec
    if name.endswith(".safetensors"):
        model, card = load_model(name)
        student_spec = InputSpec.from_dict(card["input_spec"])
        if student_spec.num_classes != spec.num_classes:
            raise UserError(f"the student {name!r} has {student_spec.num_classes} classes but the teacher has {spec.num_classes}")
        if (student_spec.channels, student_spec.size) != (spec.channels, spec.size):
            raise UserError(f"the student {name!r} takes {student_spec.describe()} images but the teacher takes {spec.describe()}")
        return model, card["arch"], card.get("arch_kwargs", {})
    kwargs = dict(kwargs or {})
    return create_model(name, spec.num_classes, spec.channels, spec.size, **kwargs), name, kwargs


class RunControl(L.Callback):
    """Stops cleanly at the end of a round on Ctrl-C / SIGTERM, and saves sample grids."""

    def __init__(self, out: Path, cfg: DistillConfig, progress: bool = True):
        self.out, self.cfg, self.stop_requested = out, cfg, False
        self._previous = {}
        self.show_progress, self.bar = progress, None
        self.report = ProgressFile()
        self.kd: float | None = None  # the student's latest loss read (every 10th round)

    def on_train_start(self, trainer, pl_module):
        if self.show_progress and trainer.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.round_cap(), initial=pl_module.rounds, desc="distill", unit="round", dynamic_ncols=True)

    @contextlib.contextmanager
    def stop_signals(self):
        """Around ``trainer.fit``: from its first moment, Ctrl-C / SIGTERM ask for a stop at the end of the
        round, so a stop during start-up saves and exits 130 as one during training does (Lightning turns
        a KeyboardInterrupt inside ``fit`` into exit status 1).

        Example:
            >>> with control.stop_signals():   # doctest: +SKIP
            ...     trainer.fit(module, rounds)
        """
        if not launched_worker():  # rank 0 owns the stop signals; the other processes stop with it
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._request_stop)
                except ValueError:  # not the main thread (e.g. inside a service worker thread)
                    pass
        try:
            yield
        except SystemExit:  # a second Ctrl-C gave up at once inside fit: still a stop, not a failure
            if self.stop_requested:
                raise KeyboardInterrupt from None
            raise
        finally:
            for sig, handler in self._previous.items():
                if handler is not None:  # None: installed outside Python, cannot be put back
                    signal.signal(sig, handler)
            self._previous.clear()

    def _request_stop(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nstopping at the end of this round; the run can be continued with --resume", file=sys.stderr)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.rounds
        last = self.stop_requested or pl_module.progress() >= 1.0  # the last round is always reported
        if outputs and (step % 10 == 1 or last):  # the student's loss waits for the device: read it every 10th round
            self.kd = float(outputs["kd"])
        if self.bar is not None:
            done = pl_module.progress()
            if pl_module.budget_seconds and done > 0:  # a time budget binds first: re-estimate the total
                self.bar.total = max(step, round(step / done))
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(kd=f"{self.kd or 0:.3f}", pool=len(pl_module.pool), refresh=False)
        if trainer.is_global_zero:
            metrics = {"loss_student": self.kd, "pool_size": len(pl_module.pool),
                       "holdout_agreement": getattr(pl_module, "last_agreement", None)}
            self.report.update(pl_module.progress(), step, self.cfg.round_cap(), metrics, force=last)
        if self.stop_requested or pl_module.progress() >= 1.0:
            trainer.should_stop = True
        if step % self.cfg.checkpoint_every == 0:
            trainer.save_checkpoint(self.out / CHECKPOINT)
        if trainer.is_global_zero and self.cfg.grid_every and pl_module.last_batch is not None and (step % self.cfg.grid_every == 0 or step == 1):
            save_grid(pl_module.last_batch, pl_module.last_logits, pl_module.teacher.spec, self.out / "grids" / f"step_{step:06d}.png")

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()


def save_grid(images: torch.Tensor, logits: torch.Tensor, spec: InputSpec, path: Path, per_class: int = 8) -> None:
    """One row per teacher class, up to ``per_class`` samples each, pixels denormalised to [0, 1]."""
    from torchvision.utils import make_grid, save_image

    images, pred = images.detach().cpu(), logits.argmax(1).cpu()
    blank = torch.zeros(spec.channels, spec.size, spec.size)
    tiles = []
    for c in range(spec.num_classes):
        chosen = spec.denormalize(images[pred == c][:per_class]).clamp(0, 1)
        tiles += list(chosen) + [blank] * (per_class - len(chosen))
    grid = make_grid(torch.stack(tiles), nrow=per_class, padding=1, pad_value=0.5)
    with atomic_path(path) as tmp:
        save_image(grid, str(tmp), format="png")


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (rank 0 only; flushed on every line)."""

    def __init__(self, path: Path):
        self.path = path
        self.rank0 = True

    def __call__(self, record: dict) -> None:
        if self.rank0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines the killed run wrote after its last checkpoint."""
        if self.path.is_file():
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
            write_text(self.path, "".join(l + "\n" for l in keep))


def run_distill(cfg: DistillConfig, resume: bool = False, overwrite: bool = False, progress: bool = True, notify=None) -> dict:
    """Run (or resume) a distillation job into ``cfg.out``; return the summary.

    Raises :class:`UserError` for bad input before any file is written.
    """
    notify = notify or (lambda msg: print(msg, file=sys.stderr))
    out = Path(cfg.out)
    ckpt = out / CHECKPOINT
    if resume and not ckpt.is_file():
        raise UserError(f"nothing to resume: no checkpoint at {str(ckpt)!r}")
    if not cfg.teacher:
        raise UserError("no teacher given: pass --teacher FILE")
    if cfg.preset_note and not resume:
        notify(cfg.preset_note)
    quiet_lightning()
    tune_allocator()
    L.seed_everything(cfg.seed, verbose=False)  # before any model is built: the same seed, the same run
    teacher = load_teachers(cfg.teacher, input_spec=cfg.teacher_input_spec, rule=cfg.ensemble_rule)
    if getattr(teacher, "bn_note", "") and not resume:
        notify(f"note: {teacher.bn_note}")
    student, student_arch, student_kwargs = build_student(cfg.student, teacher, cfg.student_kwargs)
    if cfg.eval_data and not Path(cfg.eval_data).exists():  # a named data set: check its shape before training
        eval_spec = dataset_spec(cfg.eval_data)
        if (eval_spec.channels, eval_spec.size) != (teacher.spec.channels, teacher.spec.size):
            raise UserError(f"the evaluation data {cfg.eval_data!r} is {eval_spec.describe()} but the teacher takes {teacher.spec.describe()}")
    gen_kwargs = dict(cfg.generator_kwargs)
    if cfg.generator == "pixels":
        gen_kwargs.setdefault("batch_size", cfg.batch_size)
    generator = create_generator(cfg.generator, teacher.spec.channels, teacher.spec.size, teacher.num_classes, **gen_kwargs)
    if not launched_worker():  # DDP worker processes re-run this command: rank 0 owns the folder
        if not resume:
            check_writable_dir(out, overwrite)
            for stale in (out / "metrics.jsonl", out / CHECKPOINT, *sorted((out / "grids").glob("step_*.png"))):
                stale.unlink(missing_ok=True)  # an overwritten run starts its log and grids afresh
        write_text(out / "config.yaml", to_yaml(cfg))
    log = MetricsLog(out / "metrics.jsonl")
    if resume:
        log.truncate_after(int(torch.load(ckpt, map_location="cpu", weights_only=True)["datafree"]["rounds"]))
    module = DistillModule(teacher, student, generator, cfg, log=log, notify=notify)
    control = RunControl(out, cfg, progress)
    trainer = L.Trainer(max_steps=-1, max_epochs=-1,
                        accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                        callbacks=[control], logger=False, enable_progress_bar=False, enable_checkpointing=False, default_root_dir=out,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    log.rank0 = trainer.is_global_zero
    if trainer.is_global_zero and not resume:
        notify_device(cfg.accelerator, trainer.strategy.root_device, notify)
    started = time.time()
    with no_real_data("data-free distillation"), control.stop_signals():
        trainer.fit(module, torch.utils.data.DataLoader(Rounds(), batch_size=None), ckpt_path=str(ckpt) if resume else None)
    trainer.save_checkpoint(ckpt)
    if control.stop_requested:
        raise KeyboardInterrupt
    if not trainer.is_global_zero:
        return {}
    return write_outputs(module, teacher, cfg, student_arch, student_kwargs, out, time.time() - started, notify)


def write_outputs(module: DistillModule, teacher: Teacher, cfg: DistillConfig, student_arch, student_kwargs, out: Path,
                  seconds: float, notify) -> dict:
    from datafree.outputs.export import export_program

    best_step, best_agreement = module.select_best()
    student = module.student.eval().cpu()  # outputs are written and scored on the CPU, whatever trained them
    teacher = teacher.cpu()
    teachers = teacher_records(cfg.teacher, teacher)
    teacher_hash = teachers[0]["sha256"] if len(teachers) == 1 else ensemble_hash(teachers)
    card = save_model(student, out / "student.safetensors", student_arch, teacher.spec, student_kwargs,
                      trained_by="datafree distill", preset=cfg.preset, teacher_sha256=teacher_hash,
                      selected_step=best_step, holdout_agreement=_round(best_agreement))
    export_program(student, teacher.spec, out / "student.pt2", card)
    save_tensors(out / "generator.safetensors", module.generator.state_dict())
    write_json(out / "generator.json", {"generator": cfg.generator, "kwargs": cfg.generator_kwargs,
                                        "input_spec": teacher.spec.to_dict()})
    images, logits = (t.cpu() for t in module.pool.contents())
    if not len(images):
        images = torch.empty(0, *teacher.input_shape)
        logits = torch.empty(0, teacher.num_classes)
    save_tensors(out / "transfer.safetensors", {"images": images, "teacher_logits": logits, "labels": logits.argmax(1)})
    held_images, held_logits = (t.cpu() for t in module.holdout.contents())
    save_tensors(out / "holdout.safetensors", {"images": held_images.reshape(-1, *teacher.input_shape),
                                               "teacher_logits": held_logits.reshape(-1, teacher.num_classes)})
    write_json(out / "manifest.json", {
        "schema": "datafree-transfer/1", "kind": "transfer set", "count": len(images),
        "space": "the teacher's input space: pixels = images * std + mean", "input_spec": teacher.spec.to_dict(),
        "class_names": teacher.spec.class_names, "class_counts": torch.bincount(logits.argmax(1), minlength=teacher.num_classes).tolist(),
        "teacher_sha256": teacher_hash, "teachers": teachers, "preset": cfg.preset, "seed": cfg.seed, "steps": module.rounds,
        "precision": module.precision,
        "tensors": {"images": "float32 N x C x H x W", "teacher_logits": "float32 N x classes", "labels": "int64 teacher argmax"}})
    summary = {"steps": module.rounds, "seconds": round(seconds, 1), "selected_step": best_step,
               "holdout_agreement": _round(best_agreement), "student": student_arch,
               "student_parameters": count_parameters(student), "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
               "preset": cfg.preset, "transfer_set_size": len(images), "schedule": module.schedule, "final_share": module.final_start,
               "precision": module.precision, "diverged": module.diverged,
               "teachers": teachers, "knowledge": ["logits (KD)"] + [f"{k} x{w:g}" for k, w in sorted(module.knowledge.items())]}
    if len(teachers) > 1:
        summary["ensemble_rule"] = teacher.rule
    if cfg.eval_data:  # report only: nothing above looked at real data
        from datafree.data.datasets import load_dataset
        from datafree.models.inference import accuracy, predict

        test = load_dataset(cfg.eval_data, train=False, data_dir=cfg.data_dir)
        if (test.spec.channels, test.spec.size) != (teacher.spec.channels, teacher.spec.size):
            raise UserError(f"the evaluation data {cfg.eval_data!r} is {test.spec.describe()} but the teacher takes {teacher.spec.describe()}")
        test.images = teacher.spec.normalize(test.spec.denormalize(test.images))  # into the teacher's input space
        summary["student_test_accuracy"] = round(accuracy(student, test), 2)
        summary["teacher_test_accuracy"] = round(accuracy(teacher, test), 2)
        if len(teachers) > 1:  # each member, converted into its own input space
            for record, member in zip(teachers, teacher.members):
                mine = ImageSet(member.spec.normalize(teacher.spec.denormalize(test.images)), test.labels, member.spec)
                record["test_accuracy_measured"] = round(accuracy(member, mine), 2)
                record["student_agreement_on_test"] = round(agreement(student, test.images, predict(member, mine.images)), 2)
        summary["student_teacher_agreement_on_test"] = round(agreement(student, test.images, predict(teacher, test.images)), 2)
    write_json(out / "summary.json", summary)
    from datafree.outputs.report import write_report

    write_report(out)
    return summary


def teacher_records(paths, teacher) -> list[dict]:
    """Per teacher file: path, sha256, form, architecture and the accuracy its card states."""
    members = teacher.members if len(teacher_list(paths)) > 1 else [teacher]
    return [{"path": str(path), "sha256": sha256_file(path), "format": m.format, "arch": m.arch or "(unknown)",
             "card_test_accuracy": m.card.get("test_accuracy")} for path, m in zip(teacher_list(paths), members)]


def ensemble_hash(teachers: list[dict]) -> str:
    """One hash for an ensemble: sha256 of its members' sha256 values, in order."""
    import hashlib

    return hashlib.sha256("".join(t["sha256"] for t in teachers).encode()).hexdigest()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

