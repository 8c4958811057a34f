"""Numeric precision and memory layout, chosen by measuring them on the work itself.

``fp32`` runs as written. ``bf16`` (and ``fp16`` on CUDA) run forward and backward passes under
``torch.autocast``: matrix products and convolutions in 16 bits, weights, optimiser state and the
losses in fp32. ``channels_last`` hands 4-D images to the network in NHWC order, which many
convolution kernels prefer. Neither helps everywhere: a CPU without native bf16 (AVX-512 BF16 or
AMX) runs bf16 *slower* than fp32, and a LeNet gains nothing. So ``auto`` times every candidate on
the caller's own step (:func:`choose`) and keeps the fastest, preferring plain fp32 unless another
candidate is at least :data:`MARGIN` faster; the measured times go into the run's records.

Example:
    >>> Precision("bf16", channels_last=True).describe()
    'bf16 + channels_last'
    >>> [p.describe() for p in candidates("fp32", "cpu")]   # a named precision runs as it is
    ['fp32']
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from datafree.base.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what a user may ask for (fp16 on CUDA only)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MARGIN = 1.05  # a candidate replaces plain fp32 only when it is at least 5% faster


@dataclass(frozen=True)
class Precision:
    """How a network's passes run: ``dtype`` (``fp32``, ``bf16``, ``fp16``) and the image layout.

    Example:
        >>> p = Precision("fp32", channels_last=True)
        >>> p.images(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)
        True
    """

    dtype: str = "fp32"
    channels_last: bool = False

    def autocast(self, device_type: str):
        """The context the passes run in: ``torch.autocast`` for a 16-bit dtype, else nothing."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=DTYPES[self.dtype])

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this layout (4-D tensors only; values unchanged, gradients flow through)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def network(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with its weights in this layout (its convolutions then run channels_last)."""
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def describe(self) -> str:
        return self.dtype + (" + channels_last" if self.channels_last else "")

    def as_dict(self) -> dict:
        return asdict(self)


FP32 = Precision()


def check_precision(requested: str, device_type: str) -> None:
    """Refuse, in one sentence, a precision this device cannot run.

    Example:
        >>> check_precision("fp16", "cpu")
        Traceback (most recent call last):
        datafree.base.errors.UserError: precision 'fp16' needs a CUDA device; on a CPU use auto, fp32 or bf16
    """
    if requested not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; use {', '.join(PRECISIONS)}")
    if requested == "fp16" and device_type != "cuda":
        raise UserError("precision 'fp16' needs a CUDA device; on a CPU use auto, fp32 or bf16")


def candidates(requested: str, device_type: str) -> list[Precision]:
    """The settings :func:`choose` times for a request: for ``auto``, fp32 and bf16 (and fp16 on CUDA;
    bf16 on a CPU only where :func:`cpu_bf16_usable`), each with and without channels_last; a named
    dtype is that dtype in the default layout alone, so nothing is timed and a seeded run repeats
    exactly (a layout changes the order of float sums).

    Example:
        >>> [p.describe() for p in candidates("bf16", "cpu")]
        ['bf16']
    """
    check_precision(requested, device_type)
    if requested != "auto":
        return [Precision(requested)]
    if device_type == "cuda":
        dtypes = ["fp32", "bf16", "fp16"]
    else:
        dtypes = ["fp32", "bf16"] if device_type != "cpu" or cpu_bf16_usable() else ["fp32"]
    return [Precision(d, cl) for d in dtypes for cl in (False, True)]


BF16_PROBE: dict = {}  # this CPU's measured matmul speeds, filled once a process by cpu_bf16_usable


def cpu_bf16_usable() -> bool:
    """Whether this CPU runs bf16 at least half as fast as fp32, by timing a 256 x 256 matmul in each
    (milliseconds, once a process). Without native bf16 (AVX-512 BF16, AMX) a bf16 matmul runs at
    about 1 GFLOP/s against 75-175 in fp32: timing whole networks in bf16 there would cost seconds of
    a run for nothing. :data:`BF16_PROBE` keeps the figures for the records."""
    if "usable" not in BF16_PROBE:
        speed = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(256, 256).to(dtype)
            speed[name] = 2 * 256 ** 3 / 1e9 / time_step(lambda: a @ a, "cpu", repeats=3)
        BF16_PROBE.update({f"{k}_gflops": round(v, 1) for k, v in speed.items()})
        BF16_PROBE["usable"] = speed["bf16"] >= 0.5 * speed["fp32"]
    return BF16_PROBE["usable"]


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a CUDA step returns before it is done), so a clock reads it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device, repeats: int = 3, give_up_above: float | None = None) -> float:
    """Median seconds of ``step()`` over ``repeats`` calls, after one warm-up call; a call slower
    than ``give_up_above`` seconds ends the timing early (it cannot be the fastest anyway), and a
    warm-up four times slower than that is taken as the answer (bf16 on a CPU without native bf16
    can be 10-100x slower: one call says enough).

    Example:
        >>> time_step(lambda: torch.ones(8).sum(), "cpu", repeats=2) < 1.0
        True
    """
    started = time.perf_counter()
    step()
    synchronize(device)
    warm_up = time.perf_counter() - started
    if give_up_above is not None and warm_up > 4 * give_up_above:
        return warm_up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
        if give_up_above is not None and times[-1] > give_up_above:
            break
    return statistics.median(times)


def choose(requested: str, device, step, repeats: int = 3) -> tuple[Precision, dict]:
    """The precision to run ``step(precision)`` with, and what was measured (milliseconds per step).

    With one candidate nothing is timed. Otherwise each is timed (:func:`time_step`) and the fastest
    kept, plain fp32 unless another beats it by :data:`MARGIN`; a candidate that fails (an op
    without a 16-bit kernel) is skipped and recorded as such.

    Example:
        >>> net = torch.nn.Conv2d(1, 4, 3)
        >>> step = lambda p: net(p.images(torch.zeros(2, 1, 8, 8))).sum().backward()
        >>> choose("fp32", "cpu", step)[0], sorted(choose("auto", "cpu", step)[1]["ms"])[:2]
        (Precision(dtype='fp32', channels_last=False), ['fp32', 'fp32 + channels_last'])
    """
    device = torch.device(device)
    options = candidates(requested, device.type)
    measured: dict = {"requested": requested, "ms": {}, "failed": {}}
    if requested == "auto" and device.type == "cpu" and BF16_PROBE:
        measured["cpu_matmul_gflops"] = {k: v for k, v in BF16_PROBE.items() if k != "usable"}
    if len(options) == 1:
        return options[0], measured
    for option in options:
        fastest = min(measured["ms"].values(), default=None)
        give_up = 2 * fastest / 1000 if fastest else None  # twice the fastest so far: one call says enough
        try:
            measured["ms"][option.describe()] = round(1000 * time_step(lambda: step(option), device, repeats, give_up), 2)
        except (RuntimeError, NotImplementedError) as e:  # no kernel for this dtype or layout
            measured["failed"][option.describe()] = str(e).splitlines()[0][:200]
    if not measured["ms"]:
        return FP32, measured
    times = {o: measured["ms"][o.describe()] for o in options if o.describe() in measured["ms"]}
    best = min(times, key=times.get)
    if FP32 in times and times[best] * MARGIN > times[FP32]:
        best = FP32
    measured["chosen"] = best.describe()
    return best, measured


def notify_device(accelerator: str, device: torch.device, notify) -> None:
    """Say in one line when ``--accelerator auto`` found an accelerator (a CPU run says nothing).

    Example:
        >>> notify_device("auto", torch.device("cpu"), print)
        >>> notify_device("auto", torch.device("meta"), print)
        note: --accelerator auto runs on meta (--accelerator cpu keeps the CPU)
    """
    if accelerator == "auto" and device.type != "cpu":
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        notify(f"note: --accelerator auto runs on {name} (--accelerator cpu keeps the CPU)")
