"""Machine-readable progress for the job service: when ``DATAFREE_PROGRESS_FILE`` is set, long
commands mirror their progress bar into that JSON file (fraction, ETA, latest metrics).

Example:
    >>> report = ProgressFile()                     # reads DATAFREE_PROGRESS_FILE; a no-op when unset
    >>> report.update(0.25, done=50, total=200, metrics={"loss": 0.3})
"""
from __future__ import annotations

import json
import os
import time

ENV = "DATAFREE_PROGRESS_FILE"


class ProgressFile:
    """Writes ``{"fraction", "done", "total", "eta_s", "elapsed_s", "metrics", "updated"}`` atomically, at most every ``every`` s."""

    def __init__(self, path: str | None = None, every: float = 1.0, after: str | None = None):
        """``after``: the name of a stage that runs once the job's budgeted work is done (e.g. an
        evaluation after a condensation): the job's fraction stays at 1 and this stage's own
        fraction goes to the metrics as ``<after>_fraction``, so the service's progress never goes back."""
        self.path, self.after = (os.environ.get(ENV) if path is None else path), after  # "": no file
        self.every, self.started, self.last = every, time.monotonic(), 0.0
        self.first_fraction = None

    def update(self, fraction: float, done: int | None = None, total: int | None = None, metrics: dict | None = None,
               force: bool = False) -> None:
        if not self.path:
            return
        if self.after:
            metrics = {**(metrics or {}), f"{self.after}_fraction": round(fraction, 4), "stage": self.after}
            fraction = 1.0
        now = time.monotonic()
        if self.first_fraction is None:
            self.first_fraction = fraction
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed, gained = now - self.started, fraction - self.first_fraction
        eta = elapsed * (1 - fraction) / gained if gained > 0 else None
        record = {"fraction": round(min(max(fraction, 0.0), 1.0), 4), "done": done, "total": total,
                  "eta_s": round(eta, 1) if eta is not None else None, "elapsed_s": round(elapsed, 1),
                  "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))}, "updated": time.time()}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self.path)


class Stages:
    """A bar over the named stages of a job (and the service's progress file), for work counted in steps, not epochs.

    Example:
        >>> stages = Stages(["load", "search"], "audit", show=False)
        >>> stages.next(); stages.fraction
        0.5
    """

    def __init__(self, names: list[str], desc: str, show: bool = True):
        from tqdm.auto import tqdm

        self.names, self.done, self.desc, self.report = names, 0, desc, ProgressFile()
        self.bar = tqdm(total=len(names), desc=f"{desc}: {names[0]}" if names else desc, unit="stage", disable=not show)

    @property
    def fraction(self) -> float:
        return self.done / max(len(self.names), 1)

    def next(self) -> None:
        """The current stage is done."""
        self.done += 1
        if self.done < len(self.names):
            self.bar.set_description(f"{self.desc}: {self.names[self.done]}", refresh=False)
        self.bar.update(1)
        self.report.update(self.fraction, self.done, len(self.names), {"stage": self.names[min(self.done, len(self.names) - 1)]},
                           force=True)

    def close(self) -> None:
        self.bar.close()
