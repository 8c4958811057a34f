"""Supervised training of a zoo model on an in-memory :class:`ImageSet`, with Lightning.

Used to train teachers (``datafree teacher train``) and, later, to evaluate condensed sets.
Batches are sliced from one tensor (no per-sample Python), augmentation runs batched with kornia.

Example:
    >>> from datafree.data.datasets import load_dataset
    >>> from datafree.models.zoo import create_model
    >>> train = load_dataset("mnist", True)      # $DATAFREE_DATA, or data_dir=...
    >>> model = fit_supervised(create_model("lenet5"), train, epochs=1, seed=0)   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
import math
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from datafree.base.precision import FP32, Precision, check_precision, choose
from datafree.base.runtime import tune_allocator
from datafree.data.datasets import ImageSet


class TensorBatches(torch.utils.data.IterableDataset):
    """Shuffled mini-batches sliced from in-memory tensors; one epoch per iteration."""

    def __init__(self, images, labels, batch_size, seed=0, shuffle=True, drop_last=False):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.seed, self.shuffle, self.drop_last, self.epoch = seed, shuffle, drop_last, 0

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]


def batches(data: ImageSet, batch_size: int, seed: int = 0, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader of whole batches over an ImageSet (no workers: slicing is already fast)."""
    return torch.utils.data.DataLoader(TensorBatches(data.images, data.labels, batch_size, seed, shuffle), batch_size=None)


AUGMENTATIONS = ("affine", "flip-shift", "none")


def make_augment(kind: str) -> nn.Module | None:
    """Batched training augmentation by name (kornia).

    - ``affine``: shifts, small rotations and scaling; for digits (no flips);
    - ``flip-shift``: horizontal flips and small shifts; for clothes and natural images;
    - ``none``.
    """
    import kornia.augmentation as K

    if kind == "affine":
        return K.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), p=1.0)
    if kind == "flip-shift":
        return nn.Sequential(K.RandomHorizontalFlip(), K.RandomAffine(degrees=0, translate=(0.08, 0.08), p=1.0))
    if kind == "none":
        return None
    from datafree.base.errors import UserError
    raise UserError(f"unknown augmentation {kind!r}; use {', '.join(AUGMENTATIONS)}")


class SupervisedModule(L.LightningModule):
    """Cross-entropy training with SGD + cosine schedule, optional batched augmentation."""

    def __init__(self, model, lr=0.05, momentum=0.9, weight_decay=5e-4, augment=None, label_smoothing=0.0,
                 milestones=None, nesterov=True, layout: Precision = FP32):
        super().__init__()
        self.model, self.augment, self.nesterov, self.layout = model, augment, nesterov, layout
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.label_smoothing, self.milestones = label_smoothing, milestones

    def training_step(self, batch, _):
        x, y = batch
        if self.augment is not None:
            with torch.no_grad():
                x = self.augment(x)
        loss = F.cross_entropy(self.model(self.layout.images(x)).float(), y, label_smoothing=self.label_smoothing)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov)
        if self.milestones:  # step schedule, as in the condensed-set evaluation protocol
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, 0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def quiet_lightning() -> None:
    """Silence Lightning's start-up chatter (device tips, worker hints); keep real warnings."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen teacher, on purpose


LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def fit_supervised(model: nn.Module, data: ImageSet, epochs: int = 10, batch_size: int = 128, lr: float = 0.05,
                   seed: int = 0, augment: nn.Module | None = None, progress: bool = True, on_epoch=None,
                   accelerator: str = "cpu", devices: int = 1, precision: str | Precision = "fp32", record: dict | None = None,
                   **kwargs) -> nn.Module:
    """Train ``model`` on ``data`` in place and return it (on the CPU); ``on_epoch(epochs_done)`` after each epoch.

    ``accelerator`` and ``devices`` go to Lightning (``auto``: a GPU when there is one).
    ``precision`` is ``fp32``, ``bf16``, ``fp16`` (CUDA), a :class:`~datafree.base.precision.Precision`
    chosen before, or ``auto``, which times a training step in each candidate precision and layout
    first (:func:`~datafree.base.precision.choose`); ``record``, when given, receives what ran and
    what was measured.

    Example:
        >>> fit_supervised(create_model("lenet5"), train, epochs=1, progress=False)   # doctest: +SKIP
    """
    quiet_lightning()
    tune_allocator()
    L.seed_everything(seed, workers=True, verbose=False)
    trainer_kwargs = dict(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                          enable_model_summary=False, deterministic=False)
    device = L.Trainer(**trainer_kwargs, enable_progress_bar=False).strategy.root_device
    chosen = training_precision(model, data, batch_size, precision, device, record)
    module = SupervisedModule(model, lr=lr, augment=augment, layout=chosen, **kwargs)
    callbacks = [EpochHook(on_epoch)] if on_epoch else []
    trainer = L.Trainer(max_epochs=epochs, precision=LIGHTNING_PRECISION[chosen.dtype], enable_progress_bar=progress,
                        callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, batches(data, batch_size, seed))
    return model.cpu().eval()


def training_precision(model: nn.Module, data: ImageSet, batch_size: int, requested: str | Precision, device: torch.device,
                       record: dict | None = None) -> Precision:
    """The precision and layout a supervised training step runs fastest in on ``device`` (timed on a
    copy of ``model`` and one batch of ``data`` for ``auto``); ``record`` receives the measurement.

    Example:
        >>> training_precision(nn.Linear(4, 2), None, 8, "fp32", torch.device("cpu"))
        Precision(dtype='fp32', channels_last=False)
    """
    if isinstance(requested, Precision):
        chosen, measured, requested = requested, {"ms": {}, "failed": {}}, requested.describe()
    elif requested != "auto":
        check_precision(requested, device.type)
        chosen, measured = Precision(requested), {"requested": requested, "ms": {}, "failed": {}}
    else:
        probe = copy.deepcopy(model).to(device)
        x, y = data.images[:batch_size].to(device), data.labels[:batch_size].to(device)

        def step(p: Precision):
            with p.autocast(device.type):
                loss = F.cross_entropy(probe(p.images(x)).float(), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)

        chosen, measured = choose("auto", device, step)
    if record is not None:
        record.update({"requested": requested, "device": str(device), "chosen": chosen.as_dict(), "measured_ms": measured["ms"],
                       "failed": measured["failed"]})
    return chosen


class EpochHook(L.Callback):
    """Calls ``hook(epochs_done)`` at the end of every training epoch."""

    def __init__(self, hook):
        self.hook = hook

    def on_train_epoch_end(self, trainer, module):
        self.hook(trainer.current_epoch + 1)


