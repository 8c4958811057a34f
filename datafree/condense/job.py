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
from pathlib import Path

import torch

from datafree.base.errors import UserError
from datafree.base.io import check_writable_dir, launched_worker, sha256_file, write_text
from datafree.condense.config import MATCHING_METHODS, METHOD_DEFAULTS, PUBLISHED_METHODS, TEACHER_TERMS, CondenseJob

CHECKPOINT = "checkpoints/condense.pt"


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
    from datafree.base.config import load_yaml
    from datafree.teachers.ensemble import load_teachers, teacher_list

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
    from datafree.data.datasets import load_dataset, load_transfer_set

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


def _shards(job: CondenseJob, notify=None):
    """This process's share of the classes and its device: one CPU process unless the job asks for
    more processes or an accelerator (``auto`` takes a GPU when there is one, and says so)."""
    from datafree.condense.run import Shards

    on_cpu = job.accelerator == "cpu" or (job.accelerator == "auto" and not torch.cuda.is_available())
    if not job.scaled_out() and on_cpu:
        return Shards()
    from lightning.fabric import Fabric

    from datafree.models.training import quiet_lightning

    quiet_lightning()
    strategy = job.strategy or ("ddp" if job.scaled_out() else "auto")
    fabric = Fabric(accelerator=job.accelerator, devices=job.devices, num_nodes=job.num_nodes, strategy=strategy)
    fabric.launch()
    if notify is not None and fabric.global_rank == 0:
        from datafree.base.precision import notify_device

        notify_device(job.accelerator, fabric.device, notify)
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

        from datafree.base.progress import ProgressFile

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
    from datafree.condense.condenser import check_source, condense
    from datafree.condense.settings import CondenseSettings
    from datafree.data.datasets import no_real_data

    job.validate()
    source, source_info, data_free = load_source(job)
    if job.soft_label_model and not job.soft_labels:
        raise UserError("config field 'soft_label_model' labels the images only with soft_labels on; add --soft-labels")
    settings = job.settings() | job.teacher_weights(data_free)
    began_with = _checkpoint_key(Path(job.out) / CHECKPOINT) if job.resume else {}
    if job.method in MATCHING_METHODS:  # the selection methods pick source images: no start to choose
        settings["init"] = job.init_for(began_with.get("init"))
    if job.dp_epsilon is not None:
        from datafree.condense.private import check_private_job

        check_private_job(job, data_free, len(source))
        source_info.pop("sha256")  # a hash of the private data would be released outside the mechanism
        source_info["sha256_of"] = "not recorded under differential privacy (a hash of the private data is not private)"
        settings["init"] = "noise"
        settings["extra"] = {"dp": {"epsilon": job.dp_epsilon, "delta": job.dp_delta, "clip": job.dp_clip}}
    elif job.dp_clip is not None:
        raise UserError("config field 'dp_clip' applies only with dp_epsilon (differentially private condensation)")
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
    shards = _shards(job, notify)
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


def privacy_record(plan: dict, soft_labels: bool) -> dict:
    """The manifest's privacy section: the mechanism, the accounting, and what is and is not guaranteed."""
    from datafree.condense.private import PrivacyPlan, epsilon_spent

    done = plan["steps_done"]
    spent = epsilon_spent(plan["sigma"], plan["sample_rate"], done, plan["delta"])
    record = PrivacyPlan(**{k: v for k, v in plan.items() if k != "steps_done"}).record()
    not_guaranteed = ["the choice of settings made on the private data", "any evaluation on a real test set"]
    if soft_labels:
        not_guaranteed.insert(0, "the soft labels: a model trained without DP made them")
    if done < plan["steps"]:
        record["stopped_early"] = (f"the time budget ran out after {done} of {plan['steps']} planned steps (the steps ran slower "
                                   f"than timed, or the set-up took longer): epsilon spent is {spent:.3g}, below the target {plan['epsilon']:g}")
    return record | {"steps_done": done, "epsilon_spent": round(spent, 4),
                     "guarantee": f"the condensed images{' and hard labels' if soft_labels else ' and labels'} are "
                                  f"({spent:.3g}, {plan['delta']:g})-differentially private with respect to adding or "
                                  f"removing one of the {plan['private_images']:,} private images",
                     "not_guaranteed": not_guaranteed}


def _checkpoint_key(path: Path) -> dict:
    """The settings a checkpointed run started with (empty when there is no readable checkpoint): a
    run resumed without ``init`` or a method default keeps its own, even if the default has changed since."""
    try:
        return json.loads(torch.load(path, map_location="cpu", weights_only=True)["key"])
    except Exception:
        return {}  # the resume itself says what is wrong with the checkpoint


def soft_label_model(job: CondenseJob, source):
    """The model a real-data job's soft labels come from, checked against the source's image shape and classes."""
    from datafree.teachers.formats import load_teacher

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
    from datafree.condense.settings import CondenseSettings, matching_net_kwargs
    from datafree.outputs.export import save_image_set
    from datafree.outputs.report import write_report

    out = Path(job.out)
    soft = None
    if teacher is not None:  # the labeller sees the images in its own input space
        from datafree.models.inference import predict

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
                "processes": processes, "precision": result.precision or None, "iterations_done": len(result.history),
                "seconds": result.history[-1]["seconds"] if result.history else 0.0, "history_tail": result.history[-3:]}
    if result.privacy is not None:
        manifest["privacy"] = privacy_record(result.privacy, soft is not None)
    if job.evaluate:
        from datafree.data.datasets import ImageSet, load_dataset
        from datafree.outputs.evaluate import evaluate_set

        test_name = job.test or (None if data_free else source.name)
        if test_name:  # real data only after condensation, for the report
            test = load_dataset(test_name, train=False, data_dir=job.data_dir, download=job.download)
            condensed = ImageSet(result.images, result.labels, source.spec, name=test.name)
            from datafree.base.progress import ProgressFile

            manifest["evaluation"] = evaluate_set(condensed, test, models=job.evaluate, epochs=job.epochs, progress=job.progress,
                                                  report=ProgressFile(after="evaluate"), accelerator=job.accelerator,
                                                  precision=job.precision)
    save_image_set(out, result.images, result.labels, source.spec, manifest, soft, init_source=starts, stored=result.stored)
    write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in result.history))
    write_report(out)
    return {"out": str(out), "images": len(result.labels), "iterations": len(result.history),
            "evaluation": manifest.get("evaluation", {}).get("mean")}


