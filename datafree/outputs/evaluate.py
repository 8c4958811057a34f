"""The fixed evaluation protocol for condensed sets: train fresh models on the set, score on real test data.

Protocol (as in the dataset-condensation papers): ConvNet width 128, depth 3, instance norm,
average pooling, first-layer padding as the reference code's (3 for 1-channel 28-pixel images);
SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half of the epochs; batch 256;
DSA augmentation while training (one family per batch, its parameters drawn for each image, as
the reference ``DiffAugment(seed=-1)``); 300 epochs. Other architectures (``lenet5``,
``resnet8``) give cross-architecture numbers under the same optimiser.

Example:
    >>> result = evaluate_set(condensed, test, arch="convnet", models=3)   # doctest: +SKIP
    >>> result["mean"], result["std"]                                       # doctest: +SKIP
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from datafree.base.errors import UserError
from datafree.data.augment import ALL_FAMILIES, SiameseAugment, families_for
from datafree.data.datasets import ImageSet
from datafree.models.inference import accuracy
from datafree.base.precision import Precision
from datafree.models.training import fit_supervised
from datafree.models.zoo import create_model, reference_padding

PROTOCOL = {"arch": "convnet", "arch_kwargs": {"width": 128, "depth": 3, "norm": "instance"}, "optimizer": "SGD",
            "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "x0.1 at half", "batch_size": 256,
            "augmentation": "DSA (one family per batch, parameters per image)", "epochs": 300}

# Named protocols: ``fixed`` is this project's (cheap enough for a CPU and the tests); ``published``
# is how the reference code of DC/DSA/DM (github.com/VICO-UoE/DatasetCondensation, ``main.py`` with
# DSA and ``main_DM.py``, ``utils.evaluate_synset``) scores a set: ``epoch_eval_train`` 1000 run as
# epochs 0..1000, lr x0.1 after epoch 501, ``num_eval`` 20 fresh networks, and its DSA strategy
# ``color_crop_cutout_flip_scale_rotate`` for every data set (flips digits too; ``fixed`` leaves
# flips out for digits, :func:`~datafree.data.augment.families_for`); everything else as above.
PROTOCOLS = {
    "fixed": {"epochs": 300, "models": 3, "decay_after": lambda epochs: epochs // 2, "families": None,
              "source": "datafree's fixed protocol"},
    "published": {"epochs": 1001, "models": 20, "decay_after": lambda epochs: (epochs - 1) // 2 + 2, "families": ALL_FAMILIES,
                  "source": "VICO-UoE/DatasetCondensation evaluate_synset with DSA: 1000 (+1) epochs, 20 models"},
}


class DSATransform(nn.Module):
    """DSA as a plain training augmentation: a fresh family for every batch and fresh parameters
    for every image in it (figures made before 2026-11-30, commit ccf44aa, drew one set per batch)."""

    def __init__(self, dataset: str, families: tuple[str, ...] | None = None):
        super().__init__()
        self.dsa = SiameseAugment(families or families_for(dataset))

    def forward(self, x):
        return self.dsa.apply(x, self.dsa.sample(torch.default_generator, per_image=len(x)))


def evaluate_set(train: ImageSet, test: ImageSet, arch: str = "convnet", models: int | None = None, epochs: int | None = None,
                 seed: int = 0, progress: bool = False, protocol: str = "fixed", report=None,
                 soft_labels: torch.Tensor | None = None, also: dict[str, ImageSet] | None = None,
                 accelerator: str = "cpu", devices: int = 1, precision: str = "fp32", keep: list | None = None) -> dict:
    """Train ``models`` fresh networks on ``train`` with a named protocol (:data:`PROTOCOLS`); accuracy on ``test``.

    ``models`` and ``epochs`` default to the protocol's. Returns ``{"mean", "std", "accuracies",
    "protocol"}`` (percent; std over the models, sample). With ``progress``, one bar (with ETA)
    counts the epochs of all models; the service's progress file follows it either way (``report``:
    a :class:`~datafree.base.progress.ProgressFile` to write to instead of the default one). With
    ``soft_labels`` (N x classes probabilities, e.g. a teacher's softmax stored with the set), the
    models learn them by cross-entropy to the soft targets (KD at T=1) instead of the hard labels;
    report that result beside the hard-label one, never instead of it. ``also`` names more sets
    that the same trained models are scored on (e.g. a validation split and, for the report, the
    test set): ``result["also"][name]`` has their mean, std and accuracies. ``accelerator``,
    ``devices`` and ``precision`` say where and how the models train (``precision="auto"`` is
    measured on the first model and kept for the others); the result records what ran. ``keep``, a
    list, receives the trained models (a membership audit attacks one).
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown evaluation protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    named = PROTOCOLS[protocol]
    models, epochs = models or named["models"], epochs or named["epochs"]
    decay_after = named["decay_after"](epochs)
    from tqdm.auto import tqdm

    from datafree.base.progress import ProgressFile

    spec = train.spec
    if soft_labels is not None:
        if tuple(soft_labels.shape) != (len(train), spec.num_classes):
            raise UserError(f"the soft labels are {tuple(soft_labels.shape)} but the set has {len(train)} images of {spec.num_classes} classes")
        train = ImageSet(train.images, soft_labels.float(), spec, name=train.name)
    kwargs = dict(PROTOCOL["arch_kwargs"], first_padding=reference_padding(spec.channels, spec.size)) if arch == "convnet" else {}
    augment = DSATransform(test.name or train.name, named["families"])
    accuracies, also_accuracies = [], {name: [] for name in also or {}}
    bar = tqdm(total=models * epochs, desc=f"evaluate {arch} x{models}", unit="epoch", disable=not progress)
    report = report or ProgressFile()

    def epoch_done(i, done):
        bar.update(i * epochs + done - bar.n)
        report.update((i * epochs + done) / (models * epochs), i * epochs + done, models * epochs,
                      {"model": i + 1, **({"accuracy": accuracies[-1]} if accuracies else {})})

    ran: dict = {}  # what the first model measured and chose; the others train the same way
    for i in range(models):
        torch.manual_seed(seed + i)
        model = create_model(arch, spec.num_classes, spec.channels, spec.size, **kwargs)
        fit_supervised(model, train, epochs=epochs, batch_size=PROTOCOL["batch_size"], lr=PROTOCOL["lr"], seed=seed + i,
                       augment=augment, progress=False, momentum=PROTOCOL["momentum"],
                       weight_decay=PROTOCOL["weight_decay"], milestones=[decay_after], nesterov=False,
                       on_epoch=lambda done, i=i: epoch_done(i, done), accelerator=accelerator, devices=devices,
                       precision=Precision(**ran["chosen"]) if ran else precision, record=None if ran else ran)
        accuracies.append(accuracy(model, test))
        if keep is not None:
            keep.append(model)
        for name, data in (also or {}).items():
            also_accuracies[name].append(accuracy(model, data))
        bar.set_postfix(last=f"{accuracies[-1]:.2f}%")
    bar.close()
    return {**_summary(accuracies), **({"also": {name: _summary(a) for name, a in also_accuracies.items()}} if also else {}),
            "protocol": dict(PROTOCOL, arch=arch, arch_kwargs=kwargs, epochs=epochs, models=models, seed=seed, name=protocol,
                             decay_after_epochs=decay_after, source=named["source"], augment_families=list(augment.dsa.families),
                             precision=ran,
                             labels="soft (the set's soft labels, cross-entropy to them)" if soft_labels is not None else "hard")}


def _summary(accuracies: list[float]) -> dict:
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return {"mean": round(statistics.fmean(accuracies), 2), "std": round(std, 2), "accuracies": [round(a, 2) for a in accuracies]}
