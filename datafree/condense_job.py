"""The ``condense`` job: a source (a real data set, or a distill run's transfer set) in, a condensed set out.

The command line, the job service and the benchmark all run condensation through
:func:`run_condense`, so they share its checks, its no-real-data guard in data-free mode, its
progress and its outputs:

    OUT/
      dataset.safetensors    images (normalised), labels, soft labels (optional), init_source
      manifest.json          method, settings, source (with its sha256), how each image started
      train/<class>/*.png    the images as 8-bit PNGs (ImageFolder / Hugging Face imagefolder)
      history.jsonl          one line per iteration: matching loss, seconds
      checkpoints/condense.pt  everything a ``resume`` needs
      report.html            the report

With ``devices``/``num_nodes``/``strategy``, the classes are split across processes started by
Lightning Fabric (gloo on CPUs); the condensed images equal a one-process run's.

Example:
    >>> summary = run_condense(CondenseJob(source="mnist", ipc=1, steps=10, out="runs/c1"))   # doctest: +SKIP
    >>> summary["images"]                                                                        # doctest: +SKIP
    10
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import fields
from typing import Literal
from pathlib import Path

import torch

from pydantic.dataclasses import dataclass

from datafree.config import CONDENSE_METHODS, DEFAULT_CONDENSE_METHOD, MATCHING_METHODS, STRICT, build_config, describe, parse_duration, step_cap
from datafree.errors import UserError
from datafree.io import check_writable_dir, launched_worker, sha256_file, write_text

CHECKPOINT = "checkpoints/condense.pt"
INITS = ("real", "herding", "noise", "kmeans")
SCHEDULES = ("cpu", "published")
# the published DC/DSA schedule (Zhao et al. 2021, their code's defaults): width-128 ConvNet, 256 real
# images per class per step, outer x inner loops of 1 x 1 (ipc 1), 10 x 50 (ipc 10), 50 x 10 (ipc 50)
PUBLISHED = {"net_width": 128, "real_per_class": 256}
# Data-free condensation's teacher terms (see condense.teacher_terms), chosen on a validation split
# of the training data (BENCHMARKS.md, "Data-free condensation with teacher terms").
TEACHER_TERMS = {"teacher_ce": 1.0, "teacher_bn": 10.0}
PUBLISHED_METHODS = ("dc", "dsa")
DEFAULT_ITERATIONS = 1000  # a job's iterations when neither steps nor a time budget is given


@dataclass(config=STRICT)
class CondenseJob:
    """Everything a condensation job needs; :meth:`validate` checks what spans fields before any work.

    Example:
        >>> job_from_dict({"ipc": 0})
        Traceback (most recent call last):
        datafree.errors.UserError: config field 'ipc' must be at least 1, got 0
    """

    source: str = describe("a data set name (mnist, fashion-mnist), a folder, an .npz, or a distill run folder (data-free)", "mnist")
    out: str = describe("the output folder", "runs/condense")
    ipc: int = describe("images per class", 10, ge=1)
    method: Literal[CONDENSE_METHODS] = describe(  # type: ignore[valid-type]
        "matching (dc, dsa, dm, gm_pool and dm_pool: dsa and dm over a cached network pool) or selection (random, herding, kcenter); dm was "
        "chosen on a validation split (BENCHMARKS.md)",
        DEFAULT_CONDENSE_METHOD)
    steps: int | None = describe(f"outer iterations (each with a fresh network; default {DEFAULT_ITERATIONS:,}, no cap "
                                 "when a time budget is given: the budget ends the run)", ge=1)
    time_budget: str | float | None = describe("stop after this long, e.g. 15m (or seconds); the progress counts the budget")
    init: Literal[INITS] | None = describe(  # type: ignore[valid-type]
        "start from random source images of each class (real), the class's herding picks (representative images), "
        "noise, or k-means centres of each class (the default, for a real data set and in data-free mode: chosen on "
        "validation splits, BENCHMARKS.md)")
    factor: int = describe("multi-formation: each stored image holds factor x factor smaller images, decoded to full "
                           "size for training (a different storage budget: report it apart)", 1, ge=1)
    schedule: Literal[SCHEDULES] = describe(  # type: ignore[valid-type]
        "cpu: this project's schedule for a CPU; published: the DC/DSA papers' (width 128, 256 real images per class, "
        "inner loop 50 at ipc 10); fields given explicitly override either", "cpu")
    pool_size: int | None = describe("gm_pool, dm_pool: networks in the pool (default 6)", ge=1)
    refresh_every: int | None = describe("gm_pool, dm_pool: matching steps between replacing the pool's oldest network (default 100)", ge=1)
    real_per_class: int | None = describe("real images per class per matching step (default 128; 256 for gm_pool)", ge=1)
    net_width: int | None = describe("width of the matching ConvNet (default 32, chosen on a validation split)", ge=1)
    outer_loop: int | None = describe("matching steps per fresh network (default by ipc)", ge=1)
    inner_loop: int | None = describe("network updates between matching steps (default by ipc)", ge=1)
    seed: int = describe("seed of every random draw", 0)
    evaluate: int = describe("after condensing, train N fresh models with the fixed protocol (report only)", 0, ge=0)
    epochs: int = describe("epochs of the evaluation protocol", 300, ge=1)
    test: str | None = describe("real test set for evaluate (default: the source's)")
    soft_labels: bool = describe("keep a labeller's softmax with each image: the run's teacher in data-free mode, "
                                 "soft_label_model for a real data set", False)
    soft_label_model: str | None = describe("real data set, with soft_labels: a model trained on the real data "
                                            "(.safetensors with its card, or a .pt2 taking [0, 1] pixels) whose softmax "
                                            "labels each image")
    teacher_ce: float | None = describe(
        "data-free mode, matching methods: weight of the teacher's cross-entropy to each synthetic image's class "
        f"(default {TEACHER_TERMS['teacher_ce']:g}, chosen on a validation split; a real source has no teacher)", ge=0)
    teacher_bn: float | None = describe(
        "data-free mode, matching methods: weight of the teacher's BatchNorm-statistics prior on the synthetic images "
        f"(default {TEACHER_TERMS['teacher_bn']:g}, chosen on a validation split; nothing for a teacher without BN)", ge=0)
    data_dir: str | None = describe("root of the real data sets (default $DATAFREE_DATA)")
    download: bool = describe("let torchvision download a missing data set (needs the network)", False)
    devices: int = describe("processes per machine; the classes are split across them (Lightning Fabric)", 1, ge=1)
    num_nodes: int = describe("machines (Lightning Fabric)", 1, ge=1)
    strategy: str | None = describe("Lightning strategy for devices/num_nodes (default ddp; gloo on CPUs)")
    resume: bool = describe("continue the run in out from its checkpoint (same settings)", False)
    overwrite: bool = describe("allow a non-empty out", False)
    progress: bool = describe("show a progress bar", True)

    def validate(self) -> "CondenseJob":
        """Raise :class:`UserError` (one sentence naming the field) for a bad value; return self."""
        self.budget_seconds()
        if self.schedule == "published" and self.method not in PUBLISHED_METHODS:
            raise UserError(f"config field 'schedule': the published schedule is the DC/DSA papers' (methods "
                            f"{', '.join(PUBLISHED_METHODS)}); method {self.method!r} has none here")
        return self

    def budget_seconds(self) -> float | None:
        """The time budget in seconds (None: none); a number reads as seconds, and one that is not a
        positive finite number is refused as a text would be."""
        return parse_duration(self.time_budget) or None

    def teacher_weights(self, data_free: bool) -> dict:
        """The teacher terms' weights this job runs with: the defaults in data-free mode (matching
        methods), none otherwise; a weight given for a real source is refused in one sentence."""
        given = {name: getattr(self, name) for name in TEACHER_TERMS if getattr(self, name) is not None}
        if not data_free:
            if any(given.values()):
                raise UserError(f"config field {next(n for n, v in given.items() if v)!r}: the teacher terms need a distill "
                                "run folder as the source (its teacher); a real data set has none")
            return {}
        if self.method not in MATCHING_METHODS:
            return given
        return TEACHER_TERMS | given

    def init_for(self, resumed: str | None = None) -> str:
        """The initialisation this job runs with: the one given; else the one a resumed run started with
        (``resumed``, from its checkpoint); else k-means centres of each class: chosen on a validation split
        of the training data for a real source, and on four teachers' transfer sets in data-free mode
        (``BENCHMARKS.md``; random transfer images were the data-free start until 2026-12-01)."""
        return self.init or resumed or "kmeans"

    def iteration_cap(self) -> int | None:
        """The most iterations this job makes: ``steps`` when given, none when only a time budget is
        (the budget ends the run), else ``DEFAULT_ITERATIONS``.

        Example:
            >>> CondenseJob(time_budget="15m").iteration_cap() is None, CondenseJob().iteration_cap()
            (True, 1000)
        """
        return step_cap(self.steps, self.time_budget, DEFAULT_ITERATIONS)

    def scaled_out(self) -> bool:
        return self.devices > 1 or self.num_nodes > 1 or bool(self.strategy)

    def settings(self) -> dict:
        """The :class:`~datafree.condense.CondenseSettings` fields this job sets (with the method's own defaults)."""
        from datafree.condense import with_method_defaults

        chosen = {"iterations": self.iteration_cap(), "time_budget": self.budget_seconds(), "factor": self.factor}
        if self.schedule == "published":
            outer, inner = (1, 1) if self.ipc == 1 else (10, 50) if self.ipc <= 10 else (50, 10)
            chosen |= PUBLISHED | {"outer_loop": outer, "inner_loop": inner}
        for name in ("real_per_class", "net_width", "outer_loop", "inner_loop", "pool_size", "refresh_every"):
            if getattr(self, name):
                chosen[name] = getattr(self, name)
        return with_method_defaults(self.method, chosen)


JOB_FIELDS = tuple(f.name for f in fields(CondenseJob))


def dataset_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the float32 images, then the int64 labels: identifies a source set and its order.

    Example:
        >>> len(dataset_digest(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])))
        64
    """
    digest = hashlib.sha256(images.float().contiguous().numpy().tobytes())
    digest.update(labels.long().contiguous().numpy().tobytes())
    return digest.hexdigest()


def teacher_of_run(run_dir: Path):
    """The teacher (or ensemble) a distill run used, each file checked against the hash the run recorded."""
    from datafree.config import load_yaml
    from datafree.ensemble import load_teachers, teacher_list

    run_dir = Path(run_dir)
    cfg = load_yaml(run_dir / "config.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    paths = teacher_list(cfg.get("teacher") or "")
    recorded = [t.get("sha256") for t in manifest.get("teachers", [])] or [manifest.get("teacher_sha256")]
    for path, expected in zip(paths, recorded):
        if not path or not Path(path).is_file():
            raise UserError(f"the run's teacher {path!r} (from {str(run_dir / 'config.yaml')!r}) is not there")
        if expected and sha256_file(path) != expected:
            raise UserError(f"the teacher at {path!r} is not the one that made this transfer set (sha256 differs)")
    rule = cfg.get("ensemble_rule", "probs")  # runs from before the rule existed averaged the softmax
    return load_teachers(cfg.get("teacher"), input_spec=cfg.get("teacher_input_spec"), rule=rule), manifest.get("teacher_sha256")


def load_source(job: CondenseJob):
    """``(source ImageSet, source description, data_free)`` for a job: a transfer set if the source is a distill run."""
    from datafree.data import load_dataset, load_transfer_set

    source_path = Path(job.source)
    if (source_path / "transfer.safetensors").is_file():  # labels from the teacher, no real image touched
        source, _ = load_transfer_set(source_path)
        info = {"name": str(source_path), "kind": "transfer set (no real data)",
                "sha256": sha256_file(source_path / "transfer.safetensors"),
                "teacher_sha256": json.loads((source_path / "manifest.json").read_text()).get("teacher_sha256")}
        if job.soft_label_model:
            raise UserError("config field 'soft_label_model' is for a real data set; a distill run's teacher labels its transfer set")
        return source, info, True
    if job.soft_labels and not job.soft_label_model:
        raise UserError("soft labels need a labeller: a distill run folder as the source (its teacher), or soft_label_model, "
                        "a model trained on the real data")
    source = load_dataset(job.source, train=True, data_dir=job.data_dir, download=job.download)
    info = {"name": source.name, "kind": "real data", "split": "train", "count": len(source),
            "sha256": dataset_digest(source.images, source.labels), "sha256_of": "the normalised float32 images, then the int64 labels"}
    return source, info, False


def _shards(job: CondenseJob):
    from datafree.condense import Shards

    if not job.scaled_out():
        return Shards()
    from lightning.fabric import Fabric

    from datafree.training import quiet_lightning

    quiet_lightning()
    fabric = Fabric(accelerator="cpu", devices=job.devices, num_nodes=job.num_nodes, strategy=job.strategy or "ddp")
    fabric.launch()
    return Shards(fabric)


class BudgetBar:
    """A progress bar (and the service's progress file) that follows whichever ends first: the
    iterations or the time budget, so a budgeted run reaches 100% when its budget is spent.

    Example:
        >>> bar = BudgetBar(steps=100, budget=None, show=False)
        >>> bar(50, 100, {"seconds": 1.0, "match_loss": 0.2}); bar.fraction
        0.5
    """

    def __init__(self, steps: int | None, budget: float | None, show: bool = True, desc: str = "condense", report: bool = True):
        from tqdm.auto import tqdm

        from datafree.progress import ProgressFile

        self.steps, self.budget, self.fraction = steps, budget, 0.0
        self.total = round(budget) if budget else steps
        unit = "s" if budget else "it"
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, disable=not show,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} " + unit + " [{elapsed}<{remaining}{postfix}]")
        self.report = ProgressFile(path="" if not report else None)  # only the main process reports

    def __call__(self, done: int, total: int, record: dict) -> None:
        self.fraction = min(1.0, max(done / self.steps if self.steps else 0.0, record.get("seconds", 0.0) / self.budget if self.budget else 0.0))
        self.bar.n = self.fraction * self.total
        self.bar.set_postfix(it=done, loss=f"{record.get('match_loss', 0):.3f}", refresh=False)
        self.bar.refresh()
        self.report.update(self.fraction, done, total, {"match_loss": round(record.get("match_loss", 0.0), 5)})

    def close(self) -> None:
        self.fraction, self.bar.n = 1.0, self.total
        self.bar.refresh()
        self.bar.close()
        self.report.update(1.0, force=True)


def run_condense(job: CondenseJob, notify=None) -> dict:
    """Run (or resume) a condensation job into ``job.out``; return the summary the command line prints.

    Raises :class:`UserError` for bad input before any file is written. In data-free mode (a
    distill run as the source) no real data set can be read until the set is written; the
    optional evaluation reads the real test set afterwards, for the report only.

    Example:
        >>> run_condense(CondenseJob(source="mnist", ipc=1, steps=5, out="runs/c", net_width=8))["images"]  # doctest: +SKIP
        10
    """
    from datafree.condense import METHOD_DEFAULTS, CondenseSettings, check_source, condense
    from datafree.data import no_real_data

    job.validate()
    source, source_info, data_free = load_source(job)
    if job.soft_label_model and not job.soft_labels:
        raise UserError("config field 'soft_label_model' labels the images only with soft_labels on; add --soft-labels")
    settings = job.settings() | job.teacher_weights(data_free)
    began_with = _checkpoint_key(Path(job.out) / CHECKPOINT) if job.resume else {}
    if job.method in MATCHING_METHODS:  # the selection methods pick source images: no start to choose
        settings["init"] = job.init_for(began_with.get("init"))
    for name in METHOD_DEFAULTS.get(job.method, {}):  # a default changed since the run began: it keeps its own
        if getattr(job, name) is None and name in began_with:
            settings[name] = began_with[name]
    check_source(source, job.method, CondenseSettings(ipc=job.ipc, **settings))  # before anything is written
    needs_teacher = job.soft_labels or any(settings.get(name) for name in TEACHER_TERMS)
    teacher = teacher_of_run(Path(job.source))[0] if needs_teacher and data_free else None  # checked before hours of work
    labeller = teacher if data_free else soft_label_model(job, source) if job.soft_labels else None
    out = Path(job.out)
    checkpoint = out / CHECKPOINT
    if job.resume and not checkpoint.is_file():
        raise UserError(f"nothing to resume: no checkpoint at {str(checkpoint)!r}")
    if not job.resume and not launched_worker():
        check_writable_dir(out, job.overwrite)
        remove_outputs(out)  # an overwritten run starts afresh: no image, checkpoint or report of the old one stays
    shards = _shards(job)
    bar = BudgetBar(job.iteration_cap(), job.budget_seconds(), show=job.progress and shards.is_main, desc=f"condense {job.method}",
                    report=shards.is_main)
    with no_real_data("data-free condensation") if data_free else contextlib.nullcontext():
        result = condense(source, job.method, job.ipc, seed=job.seed, progress=bar, checkpoint=checkpoint, resume=job.resume,
                          shards=shards, teacher=teacher, **settings)
    bar.close()
    if not shards.is_main:
        return {"rank": shards.rank}
    return write_condensed(job, result, source, source_info, data_free, labeller if job.soft_labels else None, settings,
                           shards.world)


def _checkpoint_key(path: Path) -> dict:
    """The settings a checkpointed run started with (empty when there is no readable checkpoint): a
    run resumed without ``init`` or a method default keeps its own, even if the default has changed since."""
    try:
        return json.loads(torch.load(path, map_location="cpu", weights_only=True)["key"])
    except Exception:
        return {}  # the resume itself says what is wrong with the checkpoint


def soft_label_model(job: CondenseJob, source):
    """The model a real-data job's soft labels come from, checked against the source's image shape and classes."""
    from datafree.teacher import load_teacher

    path = Path(job.soft_label_model)
    if not path.is_file():
        raise UserError(f"config field 'soft_label_model': no model file at {str(path)!r}")
    model = load_teacher(path)
    shape = (model.spec.channels, model.spec.size, model.spec.num_classes)
    if shape != (source.spec.channels, source.spec.size, source.spec.num_classes):
        raise UserError(f"config field 'soft_label_model': the model takes {model.spec.describe()} but the source is "
                        f"{source.spec.describe()}")
    model.sha256 = sha256_file(path)
    return model


OUTPUTS = ("dataset.safetensors", "manifest.json", "history.jsonl", "report.html", "audit.json", CHECKPOINT)
OUTPUT_FOLDERS = ("train", "report")


def remove_outputs(out: Path) -> None:
    """Delete what a previous condensation wrote into ``out`` (only those names; anything else stays)."""
    import shutil

    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def write_condensed(job: CondenseJob, result, source, source_info: dict, data_free: bool, teacher, settings: dict,
                    processes: int = 1) -> dict:
    """Write the set, its manifest, history and report into ``job.out`` (evaluating it first if asked)."""
    from datafree.condense import CondenseSettings, matching_net_kwargs
    from datafree.export import save_image_set
    from datafree.report import write_report

    out = Path(job.out)
    soft = None
    if teacher is not None:  # the labeller sees the images in its own input space
        from datafree.training import predict

        soft = predict(teacher, teacher.spec.normalize(source.spec.denormalize(result.images))).softmax(1)
    starts = result.init_source if result.init_source is not None else torch.full((len(result.labels),), -1)
    manifest = {"ipc": job.ipc, "method": job.method, "schedule": job.schedule if job.method in PUBLISHED_METHODS else None,
                "settings": {k: v for k, v in settings.items() if v is not None},
                "matching_net": {"arch": "convnet", **matching_net_kwargs(CondenseSettings(ipc=job.ipc, **settings))}
                if job.method in MATCHING_METHODS else None,
                "seed": job.seed, "source": source_info, "teacher_sha256": source_info.get("teacher_sha256"),
                "soft_labels": None if soft is None else "teacher softmax (T=1) of each condensed image" if data_free else
                {"softmax (T=1) of each condensed image by": str(job.soft_label_model), "sha256": getattr(teacher, "sha256", None)},
                "init": {"method": settings.get("init") if job.method in MATCHING_METHODS else f"selected by {job.method}",
                         "from_source_images": int((starts >= 0).sum()),
                         "source_index": "dataset.safetensors init_source: the index in the source of the image each "
                                         "condensed image started from (-1: noise or a k-means centre)"},
                "factor": job.factor, "storage": {"stored_images_per_class": job.ipc,
                                                  "training_images_per_class": job.ipc * job.factor ** 2,
                                                  "stored": "dataset.safetensors 'stored' holds the factorised images; 'images' "
                                                            "and the PNGs hold them decoded" if job.factor > 1 else None},
                "processes": processes, "iterations_done": len(result.history),
                "seconds": result.history[-1]["seconds"] if result.history else 0.0, "history_tail": result.history[-3:]}
    if job.evaluate:
        from datafree.data import ImageSet, load_dataset
        from datafree.evaluate import evaluate_set

        test_name = job.test or (None if data_free else source.name)
        if test_name:  # real data only after condensation, for the report
            test = load_dataset(test_name, train=False, data_dir=job.data_dir, download=job.download)
            condensed = ImageSet(result.images, result.labels, source.spec, name=test.name)
            from datafree.progress import ProgressFile

            manifest["evaluation"] = evaluate_set(condensed, test, models=job.evaluate, epochs=job.epochs, progress=job.progress,
                                                  report=ProgressFile(after="evaluate"))
    save_image_set(out, result.images, result.labels, source.spec, manifest, soft, init_source=starts, stored=result.stored)
    write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in result.history))
    write_report(out)
    return {"out": str(out), "images": len(result.labels), "iterations": len(result.history),
            "evaluation": manifest.get("evaluation", {}).get("mean")}


def job_from_dict(values: dict) -> CondenseJob:
    """A :class:`CondenseJob` from a mapping (a request, parsed flags); unknown keys are refused.

    Example:
        >>> job_from_dict({"ipc": 1, "colour": "red"})
        Traceback (most recent call last):
        datafree.errors.UserError: unknown config field 'colour'
    """
    return build_config(CondenseJob, {k: v for k, v in values.items() if v is not None}).validate()

