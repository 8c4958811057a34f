"""Knowledge distillation of a student on synthetic data only, run by Lightning.

Each training step is one *round*: the synthesizer updates the generator and puts its batch in
the sample pool (every Nth batch goes to a held-out set instead); then the student takes
``student_steps`` KD steps on (augmented) pool samples, re-labelled by the frozen teacher.

Model selection never looks at real data: snapshots of the student are scored at the end by
their agreement with the teacher on the held-out synthetic set, and the best one is kept.

Example:
    >>> module = DistillModule(teacher, create_model("lenet5_half"), generator, cfg)   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import json
import math
import time

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datafree.base.config import parse_duration
from datafree.base.errors import UserError
from datafree.base.precision import FP32, Precision
from datafree.distill.config import DistillConfig
from datafree.distill.knowledge import Hint, knowledge_terms
from datafree.distill.losses import kd_loss
from datafree.distill.synthesis import SamplePool, Synthesizer
from datafree.models.inference import agreement
from datafree.teachers.taps import SpatialTap
from datafree.teachers.teacher import Teacher


def student_augment():
    """Random affine jitter for pool samples (border padding keeps the background value)."""
    import kornia.augmentation as K

    return K.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), padding_mode="border", p=1.0)


def mixup(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Each image mixed with a random partner of the batch, weight ~ U(0, 1) per image (drawn with
    ``rng`` on the CPU, then moved to ``x``'s device).

    Example:
        >>> mixup(torch.ones(4, 1, 2, 2), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 1, 2, 2])
    """
    lam = torch.rand((len(x), 1, 1, 1), generator=rng).to(x.device)
    partner = torch.randperm(len(x), generator=rng).to(x.device)
    return lam * x + (1 - lam) * x[partner]


def class_histogram(logits: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(logits.argmax(1), minlength=num_classes).tolist()


# Student steps of a last-share round per preset student step: a synthesis step costs a few student
# steps on a LeNet teacher, so a round of the last share takes about as long as one before it.
# Set by that reasoning, not tuned; the measured default (BENCHMARKS.md) used it.
FINAL_STEPS_FACTOR = 4


class DistillModule(L.LightningModule):
    """The generator, the student and the pool; the teacher rides along frozen."""

    def __init__(self, teacher: Teacher, student: nn.Module, generator: nn.Module, cfg: DistillConfig, log=None, notify=print):
        super().__init__()
        self.automatic_optimization = False
        self.teacher, self.student, self.cfg = teacher, student, cfg
        self.synth = Synthesizer(teacher, generator, cfg, notify)
        self.generator = generator
        self.pool = SamplePool(cfg.pool_size)
        self.holdout = SamplePool(cfg.holdout_size)
        # every synthesised batch, for the student-only last share (labels stay valid: the teacher is frozen)
        self.archive = SamplePool(cfg.final_pool, keep=cfg.archive_keeps) if cfg.final_share else None
        self.snapshots: list[tuple[int, dict]] = []
        self.diverged: dict | None = None  # where a loss or the teacher's logits stopped being finite (the run stops there)
        self.start_snapshot: tuple[int, dict] | None = None  # the student before round 1: a candidate too (a pruned teacher starts strong)
        self.augment = student_augment() if cfg.augment or cfg.final_augment else None
        self.ema = None  # torch's AveragedModel of the student (a submodule: checkpoints carry it)
        if cfg.student_ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(cfg.student_ema), use_buffers=True)
            self.ema.requires_grad_(False)
        self.knowledge, self.hint, self.student_spatial = self._knowledge_terms(teacher, student, cfg, notify)
        self.rng = torch.Generator()
        self.rng.manual_seed(cfg.seed)
        self.log_fn = log or (lambda record: None)
        self.notify = notify
        self.last_batch: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self.rounds = 0  # Lightning's global_step counts optimizer steps (several per round)
        self.batches = 0  # synthetic batches finished (pool + held out)
        self.elapsed = 0.0  # seconds spent in rounds, carried across resumes
        self.budget_seconds = parse_duration(cfg.time_budget)
        self.student_steps = cfg.student_steps
        self.schedule: dict | None = None  # what fit_schedule measured and chose (or "fixed"), kept in checkpoints
        self.final_start: dict | None = None  # where the student-only last share began (round, progress, pool size)
        self.precision: dict | None = None  # what was measured and chosen for the teacher's and the student's passes
        self.teacher_precision = self.student_precision = FP32

    @staticmethod
    def _knowledge_terms(teacher, student, cfg, notify) -> tuple[dict, Hint | None, SpatialTap | None]:
        """The knowledge terms this teacher and student allow, the hint's projection (sized by a dry
        pass) and the tap on the student's spatial map (for attention transfer)."""
        wanted = {k: w for k, w in cfg.knowledge.items() if w}
        if not wanted:
            return {}, None, None
        if not teacher.has_features or not hasattr(student, "forward_features"):
            who = "the teacher hides its features (TorchScript)" if not teacher.has_features else "the student exposes no features"
            notify(f"note: {who}; the knowledge terms {', '.join(sorted(wanted))} are off, logits only")
            return {}, None, None
        tap = SpatialTap(student) if "attention" in wanted else None
        with torch.no_grad():
            probe = torch.zeros(2, *teacher.input_shape)
            t_dim = teacher.forward_with_features(probe)[0].flatten(1).shape[1]
            s_dim = student.forward_features(probe).flatten(1).shape[1]
            if tap is not None and (teacher.spatial_map() is None or tap.value is None):
                who = "the teacher" if teacher.spatial_map() is None else "the student"
                notify(f"note: {who} has no spatial layer (4-D, at least 2 x 2); attention transfer is off")
                wanted.pop("attention")
                tap = None
        if not wanted:
            return {}, None, None
        return wanted, Hint(s_dim, t_dim) if "hint" in wanted else None, tap

    # --- optimisers ------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.cfg
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_generator, betas=(0.5, 0.999))
        if cfg.student_optimizer == "adam":
            opt_s = torch.optim.Adam(self._student_side().parameters(), lr=cfg.lr_student)
        else:
            opt_s = torch.optim.SGD(self._student_side().parameters(), lr=cfg.lr_student, momentum=0.9, weight_decay=1e-4,
                                    nesterov=True)
        return [opt_g, opt_s]

    def progress(self) -> float:
        """Fraction of the run done: by rounds, or by the time budget when that comes first."""
        cap = self.cfg.round_cap()
        done = self.rounds / cap if cap else 0.0
        if self.budget_seconds:
            done = max(done, self.elapsed / self.budget_seconds)
        return min(1.0, done)

    def _phase_progress(self) -> float:
        """Fraction done of the current phase: the synthesis rounds, or the student-only last share."""
        done, share = self.progress(), self.cfg.final_share
        if self.final_start is not None:
            start = self.final_start["progress"]
            return min(1.0, (done - start) / max(1e-9, 1 - start))
        return min(1.0, done / (1 - share)) if share else done

    def _set_student_lr(self, opt_s) -> float:
        """Cosine decay of the student's learning rate over each phase (steps or time): the last,
        student-only share restarts it, as its transfer set is new."""
        lr = self.cfg.lr_student * 0.5 * (1 + math.cos(math.pi * self._phase_progress()))
        for group in opt_s.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def setup(self, stage):
        # each process synthesises its own samples; a resume overwrites this in on_load_checkpoint
        self.rng.manual_seed(self.cfg.seed + 1000 * self.global_rank)

    def on_train_start(self):
        """Choose the passes' precision, then fit the round's schedule to this teacher's measured cost
        (each once, on this device: a resume keeps the first choice, and moves its state here)."""
        self.move_state(self.device)
        if self.start_snapshot is None and self.rounds == 0:
            self.start_snapshot = (0, copy.deepcopy(self.kept_student().state_dict()))
        if self.precision is None or torch.device(self.precision["device"]).type != self.device.type:
            started = time.monotonic()  # (a run resumed on another kind of device measures again)
            self.precision = self._measure_precision()
            self.elapsed += time.monotonic() - started  # measuring is part of the run's budget
            if self.trainer.world_size > 1:  # every rank runs as rank 0 measured
                self.precision = self.trainer.strategy.broadcast(self.precision, src=0)
        self._apply_precision()
        if self.schedule is None:
            if self.cfg.schedule == "auto":
                from datafree.distill.schedule import fit_schedule

                started = time.monotonic()
                self.schedule = fit_schedule(self)
                self.elapsed += time.monotonic() - started  # measuring is part of the run's budget
                if self.trainer.world_size > 1:  # every rank must take the same number of steps
                    self.schedule = self.trainer.strategy.broadcast(self.schedule, src=0)
            else:
                self.schedule = {"mode": "fixed", "student_steps": self.cfg.student_steps, "pool_size": self.cfg.pool_size}
        self._apply_schedule()
        if self.trainer.world_size > 1:  # one clock for every rank from the first round (the measurements took each its own time)
            self.elapsed = float(self.trainer.strategy.reduce(torch.tensor(self.elapsed, device=self.device), reduce_op="max"))

    def _measure_precision(self) -> dict:
        """Time a synthesis batch's teacher pass (forward and backward to the images) and a student
        step in each candidate precision and layout (``base.precision.choose``); the record says
        what was asked, measured and chosen. Measured on copies and random images: the run is not
        changed by measuring it."""
        from datafree.base.precision import choose

        cfg, device = self.cfg, self.device
        rng = torch.Generator().manual_seed(12345)
        images = torch.randn(cfg.batch_size, *self.teacher.input_shape, generator=rng).to(device)
        inputs = torch.randn(cfg.student_batch, *self.teacher.input_shape, generator=rng).to(device)
        targets = torch.randn(cfg.student_batch, self.teacher.num_classes, generator=rng).to(device)
        student = copy.deepcopy(self.student)

        def teacher_step(p: Precision):
            x = images.clone().requires_grad_(True)
            with p.autocast(device.type):
                logits = self.teacher.forward_with_features(p.images(x))[1]
            logits.float().logsumexp(1).sum().backward()

        def student_step(p: Precision):
            with p.autocast(device.type):
                logits = student(p.images(inputs))
            kd_loss(logits.float(), targets, cfg.kd_temperature).backward()
            student.zero_grad(set_to_none=True)

        torch_state = torch.get_rng_state()
        try:
            teacher_choice, teacher_ms = choose(cfg.precision, device, teacher_step)
            student_choice, student_ms = choose(cfg.precision, device, student_step)
        finally:
            torch.set_rng_state(torch_state)
        return {"requested": cfg.precision, "device": str(device), "teacher": teacher_choice.as_dict(),
                "student": student_choice.as_dict(),
                "measured_ms": {"teacher_pass": teacher_ms["ms"], "student_step": student_ms["ms"]},
                "failed": teacher_ms["failed"] | student_ms["failed"],
                **({"cpu_matmul_gflops": teacher_ms["cpu_matmul_gflops"]} if "cpu_matmul_gflops" in teacher_ms else {})}

    def _apply_precision(self) -> None:
        self.teacher_precision = Precision(**self.precision["teacher"])
        self.student_precision = Precision(**self.precision["student"])
        self.synth.teacher_precision, self.synth.student_precision = self.teacher_precision, self.student_precision

    def state_tensors(self) -> dict:
        """Every tensor of the run's state that is not a module's parameter or buffer (the pools, the
        BN prior's momentum statistics, the soft targets), by name."""
        found = {}
        for name, pool in (("pool", self.pool), ("holdout", self.holdout), ("archive", self.archive)):
            if pool is not None and pool.images is not None:
                found[f"{name}.images"], found[f"{name}.logits"] = pool.images, pool.logits
        for key, (mean, var) in self.synth.bn_prior.previous.items():
            found[f"bn_previous.{key}.mean"], found[f"bn_previous.{key}.var"] = mean, var
        if self.synth.soft_targets is not None:
            found["soft_targets"] = self.synth.soft_targets
        return found

    def move_state(self, device) -> None:
        """Move :meth:`state_tensors` to ``device``: Lightning moves the modules, but restores a
        checkpoint before it does, so a resumed run's state would otherwise stay on the CPU."""
        for pool in (self.pool, self.holdout, self.archive):
            if pool is not None and pool.images is not None:
                pool.images, pool.logits = pool.images.to(device), pool.logits.to(device)
        prior = self.synth.bn_prior
        prior.previous = {k: (m.to(device), v.to(device)) for k, (m, v) in prior.previous.items()}
        if self.synth.soft_targets is not None:
            self.synth.soft_targets = self.synth.soft_targets.to(device)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits (fp32) at the chosen precision, without a graph."""
        p = self.teacher_precision
        with torch.no_grad(), p.autocast(images.device.type):
            return self.teacher(p.images(images)).float()

    def _apply_schedule(self) -> None:
        self.student_steps = int(self.schedule["student_steps"])
        if self.pool.capacity != int(self.schedule["pool_size"]):
            state = self.pool.state_dict()
            self.pool = SamplePool(int(self.schedule["pool_size"]))
            self.pool.load_state_dict(state)

    def on_train_batch_start(self, batch, batch_idx):
        if self.progress() >= 1.0:  # e.g. resuming a run that had already finished
            self.trainer.should_stop = True
            return -1

    # --- one round -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        cfg, step = self.cfg, self.rounds
        started = time.monotonic()
        # everything random in a round (kornia's augmentation too) follows from self.rng, which the
        # checkpoint carries: a resumed run repeats the uninterrupted one exactly
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=self.rng)))
        opt_g, opt_s = self.optimizers()
        if self.final_start is None and cfg.final_share and self.progress() >= 1 - cfg.final_share:
            self._start_final_share(step)
        lr = self._set_student_lr(opt_s)
        if self.final_start is not None:  # the last share: student steps only, on the archive
            stats, steps, logits = {}, FINAL_STEPS_FACTOR * max(1, self.student_steps), self.pool.contents()[1]
        else:
            stats, steps, logits = self._synthesis_step(step, opt_g), self.student_steps, self.last_logits

        s_loss = torch.zeros((), device=self.device)
        if len(self.pool) and self.diverged is None:
            for _ in range(steps):
                s_loss = self._student_step(opt_s)
            if not bool(torch.isfinite(s_loss)):
                self._diverge(step, "the student's loss")

        self.elapsed += time.monotonic() - started
        if self.trainer.world_size > 1:  # one clock for every rank: the stop and the last share come in the same round
            self.elapsed = float(self.trainer.strategy.reduce(torch.tensor(self.elapsed, device=self.device), reduce_op="max"))
        last = step == (cfg.round_cap() or 0) - 1 or bool(self.budget_seconds and self.elapsed >= self.budget_seconds)
        if (step % 10 == 0 or last) and logits is not None:
            self._log_round(step, stats | {"lr_student": lr}, s_loss, logits)
        if (step + 1) % cfg.eval_every == 0:
            self._evaluate(step)
        self.rounds += 1
        return {"kd": s_loss}

    def _diverge(self, step: int, what: str) -> None:
        """Stop the run at a value that is no longer finite; the selection keeps the best finite student."""
        self.diverged = {"round": step + 1, "what": what}
        self.log_fn({"step": step + 1, "kind": "diverged", "what": what})
        self.notify(f"the run diverged at round {step + 1} ({what} stopped being finite): it stops here and keeps the "
                    f"best finite student so far; a lower lr_student or lr_generator may help")
        if self._trainer is not None:
            self.trainer.should_stop = True

    def _synthesis_step(self, step: int, opt_g) -> dict:
        """The generator's update(s); a finished batch joins the pool (or the held-out set) and the
        archive. Returns the priors' values for the log."""
        cfg = self.cfg
        if self.synth.is_pixels and cfg.reset_every and step % cfg.reset_every == 0:
            self.generator.reset(self.rng)
            self.synth.on_reset()
            opt_g.optimizer.state.clear()
        stats = {}
        meta = cfg.meta_rate < 1 and not self.synth.is_pixels
        start = [p.detach().clone() for p in self.generator.parameters()] if meta else None
        for _ in range(cfg.synth_steps):
            images, targets = self.synth.sample(cfg.batch_size, self.rng)
            loss, stats = self.synth.losses(images, targets, self.student)
            opt_g.zero_grad()
            self._backward(loss, self.generator)
            opt_g.step()
        if meta:  # Fast-DFKD: the batch was made by the adapted generator; the meta one keeps a share of it
            with torch.no_grad():
                for p, p0 in zip(self.generator.parameters(), start):
                    p.lerp_(p0, 1 - cfg.meta_rate)
        t_logits = stats.pop("_t_logits").detach()
        if not bool(torch.isfinite(t_logits).all()) or not bool(torch.isfinite(images).all()):
            self._diverge(step, "the generator's images or the teacher's logits on them")
            return stats
        batch_done = not (self.synth.is_pixels and cfg.reset_every) or (step + 1) % cfg.reset_every == 0
        if batch_done:  # optimised pixels enter the pool only when their batch is finished
            images = images.detach()
            if self.synth.is_pixels or cfg.jitter:  # the scored images were shifted, or the pixels moved since
                t_logits = self.teacher_logits(images)
            held_out = cfg.holdout_every and self.batches % cfg.holdout_every == cfg.holdout_every - 1
            (self.holdout if held_out else self.pool).add(images, t_logits)
            if self.archive is not None and not held_out:
                self.archive.add(images, t_logits, self.rng)
            self.last_batch, self.last_logits = images, t_logits
            self.batches += 1
        return stats

    def _start_final_share(self, step: int) -> None:
        """Stop synthesis; the student's pool becomes the archive: ``final_pool`` images of the batches
        synthesised so far, the newest or a uniform sample of all of them (``archive_keeps``)."""
        self.pool, self.archive = self.archive, None
        self.final_start = {"round": step, "progress": round(self.progress(), 5), "pool_size": len(self.pool),
                            "drawn_from": f"{self.pool.seen} synthesised images ({self.pool.keep} kept, labelled when made)"}
        self.log_fn({"step": step, "kind": "final_share"} | self.final_start)

    def _student_step(self, opt_s) -> torch.Tensor:
        """One KD step on pool samples. Samples changed by augmentation or mixup are re-labelled by
        the teacher; unchanged ones reuse the logits the pool stored (no teacher pass)."""
        cfg = self.cfg
        x, t = self.pool.sample(cfg.student_batch, self.rng)
        changed = False
        if self.augment is not None and (cfg.augment or self.final_start is not None):
            x, changed = self.augment(x), True
        if cfg.mixup and torch.rand((), generator=self.rng) < cfg.mixup:
            x, changed = mixup(x, self.rng), True
        sp, device_type = self.student_precision, x.device.type
        if self.knowledge:  # features of both: one teacher pass gives its logits too
            with torch.no_grad():
                t_feats, t = self.synth.teacher_pass(x)
                t_map = self.teacher.spatial_map()
            with sp.autocast(device_type):
                s_feats = self.student.forward_features(sp.images(x))
                s_logits = self.student.head(s_feats)
            loss = kd_loss(s_logits.float(), t, cfg.kd_temperature, cfg.kd_alpha, cfg.student_loss)
            s_map = self.student_spatial.value if self.student_spatial is not None else None
            loss = loss + sum(knowledge_terms(self.knowledge, s_feats.float(), t_feats, self.hint,
                                              s_map.float() if s_map is not None else None,
                                              t_map.float() if t_map is not None else None).values())
        else:
            if changed:
                t = self.teacher_logits(x)
            with sp.autocast(device_type):
                s_logits = self.student(sp.images(x))
            loss = kd_loss(s_logits.float(), t, cfg.kd_temperature, cfg.kd_alpha, cfg.student_loss)
        opt_s.zero_grad()
        self._backward(loss, self._student_side())
        opt_s.step()
        if self.ema is not None:
            self.ema.update_parameters(self.student)
        return loss.detach()

    def kept_student(self) -> nn.Module:
        """The student that is evaluated, snapshotted and kept: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.student

    def _student_side(self) -> nn.Module:
        """What the student's optimiser trains: the student, and the hint's projection when there is one."""
        return nn.ModuleList([self.student] + ([self.hint] if self.hint is not None else []))

    def _backward(self, loss: torch.Tensor, module: nn.Module) -> None:
        """Backward, then average ``module``'s gradients over the processes (DDP).

        A round makes several backward passes over different parts of the module, which DDP's
        one-backward-per-forward reducer does not allow; so its sync is held off (``no_sync``) and
        the gradients of the part being stepped are all-reduced here instead.
        """
        if self._trainer is None:  # used outside a Trainer (a test, a notebook)
            loss.backward()
            return
        wrapper = self.trainer.model
        if not isinstance(wrapper, DistributedDataParallel):
            self.manual_backward(loss)
            return
        with wrapper.no_sync():
            self.manual_backward(loss)
        world = self.trainer.world_size
        for p in self.averaged_parameters(module):
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world

    def averaged_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters of ``module`` whose gradients are averaged across processes: all of them,
        except a pixel batch's: each process optimises images of its own, and the mean gradient of
        other images would move them towards nothing."""
        if module is self.generator and self.synth.is_pixels:
            return []
        return list(module.parameters())

    # --- bookkeeping -----------------------------------------------------------------------------
    def _log_round(self, step, stats, s_loss, t_logits):
        record = {"step": step + 1, "kind": "round", "loss_student": round(float(s_loss), 5),
                  "pool_size": len(self.pool), "holdout_size": len(self.holdout),
                  "class_histogram": class_histogram(t_logits, self.teacher.num_classes),
                  "teacher_confidence": round(F.softmax(t_logits, 1).max(1).values.mean().item(), 4),
                  "elapsed_s": round(self.elapsed, 2)}
        for k, v in stats.items():  # tensors until now: a round that is not logged never waits for their values
            v = v.tolist() if torch.is_tensor(v) else v
            record[k] = [round(x, 5) for x in v] if isinstance(v, list) else round(v, 5)
        self.log_fn(record)

    def _evaluate(self, step):
        if len(self.holdout):
            score = agreement(self.kept_student(), *self.holdout.contents())
            self.last_agreement = round(score, 3)
            self.log_fn({"step": step + 1, "kind": "eval", "holdout_agreement": round(score, 3)})
        self.snapshots.append((step + 1, copy.deepcopy(self.kept_student().state_dict())))
        self.snapshots = self.snapshots[-8:]

    def select_best(self) -> tuple[int, float | None]:
        """Load the snapshot (or the final student) that agrees most with the teacher on held-out synthetic data.

        The student as it started (round 0) is a candidate too: a student that inherits weights (a
        pruned teacher in ``datafree compress``) can start ahead of everything training makes of it.
        """
        start = [self.start_snapshot] if self.start_snapshot is not None else []
        candidates = start + self.snapshots + [(self.rounds, copy.deepcopy(self.kept_student().state_dict()))]
        candidates = [c for c in candidates if all_finite(c[1])]  # a diverged run's last states are not
        if not candidates:
            raise UserError("the run diverged before any finite student was kept; try a lower lr_student or lr_generator")
        if not len(self.holdout):
            self.student.load_state_dict(candidates[-1][1])
            return candidates[-1][0], None
        images, logits = self.holdout.contents()
        scored = []
        for step, state in candidates:
            self.student.load_state_dict(state)
            scored.append((agreement(self.student, images, logits), step, state))
        best = max(scored, key=lambda s: (s[0], s[1]))
        self.student.load_state_dict(best[2])
        return best[1], best[0]

    def on_train_end(self):
        """With several processes: check that every rank holds the same student (logged, and asserted)."""
        if self.trainer.world_size > 1:
            checksum = torch.stack([p.detach().double().sum() for p in self.student.parameters()]).sum().reshape(1)
            gathered = self.all_gather(checksum).flatten().tolist()
            self.log_fn({"step": self.rounds, "kind": "ddp_sync", "world_size": self.trainer.world_size,
                         "student_checksums": gathered})
            if max(gathered) - min(gathered) > 1e-6 * max(1.0, abs(gathered[0])):
                raise RuntimeError(f"the ranks' students drifted apart: {gathered}")

    # --- checkpoints carry everything a resume needs ---------------------------------------------
    def on_save_checkpoint(self, checkpoint):
        checkpoint["datafree"] = {
            "pool": self.pool.state_dict(), "holdout": self.holdout.state_dict(),
            "rng": self.rng.get_state(), "rng_ranks": self._rank_rng_states(),
            "snapshots": self.snapshots, "start_snapshot": self.start_snapshot, "schedule": json.dumps(self.schedule), "precision": json.dumps(self.precision),
            "bn_previous": self.synth.bn_prior.previous, "soft_targets": self.synth.soft_targets,
            "rounds": self.rounds, "elapsed": self.elapsed, "batches": self.batches,
            "final_start": json.dumps(self.final_start),
            "archive": self.archive.state_dict() if self.archive is not None else None,
        }

    def _rank_rng_states(self) -> list[torch.Tensor] | None:
        """Every process's random state (a collective: every rank saves a checkpoint together)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        gathered = self.all_gather(self.rng.get_state().to(self.device))
        return [s.cpu() for s in gathered]

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint["datafree"]
        self.schedule = json.loads(state["schedule"]) if state.get("schedule") else None
        self.precision = json.loads(state.get("precision") or "null")  # none in an older checkpoint: measured again
        if self.schedule is not None:
            self._apply_schedule()
        self.final_start = json.loads(state.get("final_start") or "null")
        if self.pool.capacity != int(state["pool"]["capacity"]):  # the last share's transfer set
            self.pool = SamplePool(int(state["pool"]["capacity"]))
        self.pool.load_state_dict(state["pool"])
        if state.get("archive") is not None:
            self.archive.load_state_dict(state["archive"])
        elif self.final_start is not None:
            self.archive = None
        self.holdout.load_state_dict(state["holdout"])
        self.rng.set_state(rank_rng_state(state, self.global_rank))
        self.snapshots = [(int(s), d) for s, d in state["snapshots"]]
        start = state.get("start_snapshot")  # none in an older checkpoint: round 0 is not a candidate there
        self.start_snapshot = (int(start[0]), start[1]) if start is not None else None
        self.synth.bn_prior.previous = state["bn_previous"]
        self.synth.soft_targets = state.get("soft_targets")
        self.rounds, self.elapsed, self.batches = int(state["rounds"]), float(state["elapsed"]), int(state["batches"])


def all_finite(state: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite.

    Example:
        >>> all_finite({"w": torch.ones(2), "n": torch.tensor(3)}), all_finite({"w": torch.tensor([1.0, float("nan")])})
        (True, False)
    """
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def rank_rng_state(saved: dict, rank: int) -> torch.Tensor:
    """The random state process ``rank`` resumes with: its own, saved beside rank 0's (``rng_ranks``);
    for a checkpoint without it (one process, or saved before), rank 0's, from which any other rank
    derives a stream of its own, so that no two processes synthesise the same batches.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> saved = {"rng": g.get_state()}
        >>> torch.equal(rank_rng_state(saved, 0), saved["rng"]), torch.equal(rank_rng_state(saved, 1), saved["rng"])
        (True, False)
    """
    ranks = saved.get("rng_ranks")
    if ranks is not None and rank < len(ranks):
        return ranks[rank]
    if rank == 0:
        return saved["rng"]
    g = torch.Generator()
    g.set_state(saved["rng"])
    return torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=g)) + 1000 * rank).get_state()


class Rounds(torch.utils.data.IterableDataset):
    """An endless stream of round numbers: the real input of each round is made by the generator."""

    def __iter__(self):
        i = 0
        while True:
            yield torch.tensor(i)
            i += 1
