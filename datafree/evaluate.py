"""The fixed evaluation protocol for condensed sets: train fresh models on the set, score on real test data.

Protocol (as in the dataset-condensation papers): ConvNet width 128, depth 3, instance norm,
average pooling; SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at half of the epochs;
batch 256; DSA augmentation while training; 300 epochs. Other architectures (``lenet5``,
``resnet8``) give cross-architecture numbers under the same optimiser.

Example:
    >>> result = evaluate_set(condensed, test, arch="convnet", models=3)   # doctest: +SKIP
    >>> result["mean"], result["std"]                                       # doctest: +SKIP
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from datafree.augment import SiameseAugment, families_for
from datafree.data import ImageSet
from datafree.models import create_model
from datafree.training import accuracy, fit_supervised

PROTOCOL = {"arch": "convnet", "arch_kwargs": {"width": 128, "depth": 3, "norm": "instance"}, "optimizer": "SGD",
            "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "x0.1 at half", "batch_size": 256,
            "augmentation": "DSA (one family per batch)", "epochs": 300}


class DSATransform(nn.Module):
    """DSA as a plain training augmentation: a fresh family and parameters for every batch."""

    def __init__(self, dataset: str):
        super().__init__()
        self.dsa = SiameseAugment(families_for(dataset))

    def forward(self, x):
        return self.dsa(x, torch.default_generator)


def evaluate_set(train: ImageSet, test: ImageSet, arch: str = "convnet", models: int = 3, epochs: int = 300,
                 seed: int = 0, progress: bool = False) -> dict:
    """Train ``models`` fresh networks on ``train`` with the fixed protocol; accuracy on ``test``.

    Returns ``{"mean", "std", "accuracies", "protocol"}`` (percent). With ``progress``, one bar
    (with ETA) counts the epochs of all models; the service's progress file follows it either way.
    """
    from tqdm.auto import tqdm

    from datafree.progress import ProgressFile

    spec = train.spec
    kwargs = PROTOCOL["arch_kwargs"] if arch == "convnet" else {}
    accuracies = []
    bar = tqdm(total=models * epochs, desc=f"evaluate {arch} x{models}", unit="epoch", disable=not progress)
    report = ProgressFile()

    def epoch_done(i, done):
        bar.update(i * epochs + done - bar.n)
        report.update((i * epochs + done) / (models * epochs), i * epochs + done, models * epochs,
                      {"model": i + 1, **({"accuracy": accuracies[-1]} if accuracies else {})})

    for i in range(models):
        torch.manual_seed(seed + i)
        model = create_model(arch, spec.num_classes, spec.channels, spec.size, **kwargs)
        fit_supervised(model, train, epochs=epochs, batch_size=PROTOCOL["batch_size"], lr=PROTOCOL["lr"], seed=seed + i,
                       augment=DSATransform(test.name or train.name), progress=False, momentum=PROTOCOL["momentum"],
                       weight_decay=PROTOCOL["weight_decay"], milestones=[epochs // 2], nesterov=False,
                       on_epoch=lambda done, i=i: epoch_done(i, done))
        accuracies.append(accuracy(model, test))
        bar.set_postfix(last=f"{accuracies[-1]:.2f}%")
    bar.close()
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return {"mean": round(statistics.fmean(accuracies), 2), "std": round(std, 2), "accuracies": [round(a, 2) for a in accuracies],
            "protocol": dict(PROTOCOL, arch=arch, arch_kwargs=kwargs, epochs=epochs, models=models, seed=seed)}
