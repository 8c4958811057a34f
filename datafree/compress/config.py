"""The compress job's typed config: every field with its default, range and one-sentence description.

Example:
    >>> compress_config({"teacher": "t.safetensors", "sparsity": 0.5}).target()
    ('sparsity', 0.5)
    >>> compress_config({"teacher": "t.safetensors", "sparsity": 0.5, "target_macs": "2x"})
    Traceback (most recent call last):
    datafree.base.errors.UserError: give either sparsity or target_macs, not both
"""
from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic.dataclasses import dataclass

from datafree.base.config import STRICT, build_config, describe, parse_duration
from datafree.base.errors import UserError
from datafree.base.precision import PRECISIONS
from datafree.compress.prune import IMPORTANCES
from datafree.distill.config import PRESET_NAMES

DEFAULT_TARGET = "2x"  # when neither a sparsity nor a MACs target is given
RECOVERY_LR_SCALE = 0.2  # recovery fine-tunes: a fifth of the preset's student rate (dfq: 0.05 -> 0.01, Torch-Pruning's CIFAR fine-tuning rate)


@dataclass(config=STRICT)
class CompressConfig:
    """Everything a ``datafree compress`` run needs; written to the output folder in ``compress.json``.

    Example:
        >>> CompressConfig(teacher="t.safetensors", sparsity=1.5)
        Traceback (most recent call last):
        pydantic_core._pydantic_core.ValidationError: 1 validation error for CompressConfig...
    """

    teacher: str = describe("the teacher file to compress: .safetensors with its .json card (a zoo architecture); "
                            "a .pt2 program or TorchScript cannot be pruned", "")
    out: str = describe("the output folder: pruned model, recovery run, handoff package and report", "runs/compress")
    sparsity: float | None = describe("share of every layer's channels removed (e.g. 0.5); give this or target_macs", gt=0, lt=1)
    target_macs: str | None = describe(f"prune until the MACs of one image are at most this: a count (200000, 1.5M) or a "
                                       f"reduction (2x: half the teacher's); default {DEFAULT_TARGET} when sparsity is not given")
    importance: Literal[IMPORTANCES] = describe(  # type: ignore[valid-type]
        "which channels go: magnitude (L2 norm of each coupled group's weights) or taylor (first-order Taylor on "
        "synthetic batches made from noise against the teacher; no real data)", "magnitude")
    recalibrate_bn: bool = describe("re-estimate the pruned network's BatchNorm statistics on synthetic images made from "
                                    "noise against the teacher before recovery (no real data; chosen on a validation "
                                    "split, BENCHMARKS.md)", True)
    check_recovery: bool = describe(
        "after recovery, score the pruned and the recovered network by teacher agreement on synthetic images made apart "
        "from the recovery, and hand over the better; off by default: on a validation split it caught a collapsed "
        "recovery once and discarded a better one once (BENCHMARKS.md)", False)
    time_budget: str | float | None = describe("time for pruning and recovery together, e.g. 10m (the handoff export "
                                               "runs after it); the recovery keeps the best student so far", "10m")
    steps: int | None = describe("recovery rounds instead of a time budget (the distill job's rounds)", ge=1)
    preset: Literal[PRESET_NAMES] | None = describe(  # type: ignore[valid-type]
        "the recovery's distill preset (default: the teacher's, as datafree distill chooses)")
    lr_student: float | None = describe(f"the pruned network's learning rate in recovery (default: {RECOVERY_LR_SCALE:g} x "
                                        "the preset's, a fine-tuning rate: 0.01 with dfq, whose fresh students train at 0.05)",
                                        gt=0)
    seed: int = describe("seed of every random draw (same seed, same run)", 0)
    int8: bool = describe("post-training static int8 of the recovered model, calibrated on the recovery's transfer set", True)
    onnx: bool = describe("student.onnx in the handoff, checked with ONNX Runtime", True)
    eval_data: str | None = describe("real test set for the report only, read after every stage is done (default: the card's)")
    data_dir: str | None = describe("root of the real data sets (default $DATAFREE_DATA)")
    precision: Literal[PRECISIONS] = describe(  # type: ignore[valid-type]
        "numeric precision of the recovery's passes (as datafree distill)", "auto")
    accelerator: str = describe("where the recovery runs: auto (a GPU when there is one), cpu, gpu", "auto")

    def check(self) -> None:
        """The checks that span fields."""
        if not self.teacher:
            raise UserError("no teacher given: pass --teacher FILE")
        if self.sparsity is not None and self.target_macs is not None:
            raise UserError("give either sparsity or target_macs, not both")
        parse_duration(self.time_budget)

    def target(self) -> tuple[str, float | str]:
        """``("sparsity", S)`` or ``("target_macs", T)``, the default when neither is given.

        Example:
            >>> CompressConfig(teacher="t").target()
            ('target_macs', '2x')
        """
        if self.sparsity is not None:
            return "sparsity", self.sparsity
        return "target_macs", self.target_macs or DEFAULT_TARGET


COMPRESS_FIELDS = tuple(f.name for f in fields(CompressConfig))


def compress_config(values: dict) -> CompressConfig:
    """A :class:`CompressConfig` from a mapping (parsed flags, a request); ``None`` values are not given.

    Example:
        >>> compress_config({"teacher": "t.safetensors", "colour": "red"})
        Traceback (most recent call last):
        datafree.base.errors.UserError: unknown config field 'colour'
    """
    return build_config(CompressConfig, {k: v for k, v in values.items() if v is not None})
