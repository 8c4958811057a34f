"""Atomic, safe file writing and reading helpers shared by every module.

Every file a job writes goes to a temporary name in the same folder and is renamed into place,
so a reader (or a killed job) never sees half a file.

Example:
    >>> write_json("runs/x/config.json", {"seed": 0})
    >>> read_json("runs/x/config.json")["seed"]
    0
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from datafree.base.errors import UserError


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no file at {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{str(path)!r} is not valid JSON ({e})") from None


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous), byte for byte the same for the
    same tensors and metadata: safetensors writes its header's keys in hash order, so the header is
    rewritten with sorted keys (same length, same offsets)."""
    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > n:  # never expected: the library writes the same compact JSON
        raise RuntimeError("cannot canonicalise a safetensors header")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(raw[:8] + header + b" " * (n - len(header)) + raw[8 + n:])


def load_tensors(path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupt file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no file at {str(path)!r}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt: {e})") from None


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path, overwrite: bool = False) -> Path:
    """Make an output folder, refusing one that already holds files unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the output {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"the output folder {str(path)!r} is not empty; choose another, pass --resume to continue it, or --overwrite")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the output folder {str(path)!r} ({e.strerror})") from None
    return path


def launched_worker() -> bool:
    """True in the extra processes Lightning starts for several devices or nodes (local or node rank
    above 0): they re-run the command, and rank 0 owns the output folder and the stop signals.

    Example:
        >>> launched_worker()   # a plain process
        False
    """
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0
