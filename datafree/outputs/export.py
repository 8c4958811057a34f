"""Models leave the project as self-contained programs: [0, 1] images at native size in, logits out.

``export_program`` wraps a zoo model with its normalisation and writes a ``torch.export`` program
(``.pt2``) or TorchScript, each carrying the model card inside the archive. The result loads with
plain torch and no ``datafree`` import::

    import torch
    model = torch.export.load("model.pt2").module()
    logits = model(images_in_0_1)          # N x C x H x W float

Example:
    >>> export_program(model, spec, "student.pt2", card)   # doctest: +SKIP
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from datafree.base.errors import UserError
from datafree.base.io import atomic_path
from datafree.data.datasets import InputSpec


class PixelModel(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in [0, 1]: the normalisation lives inside the program."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def pixel_spec(spec: InputSpec) -> InputSpec:
    """The spec of an exported program: the same shape and classes, inputs in [0, 1]."""
    return InputSpec(spec.channels, spec.size, (0.0,) * spec.channels, (1.0,) * spec.channels, list(spec.class_names))


def export_program(model: nn.Module, spec: InputSpec, path, card: dict | None = None) -> Path:
    """Write ``model`` as a [0, 1]-input program; ``.pt2`` -> torch.export, ``.ts``/``.pt`` -> TorchScript.

    The written program is loaded back and checked to give the same predictions as ``model``.
    """
    path = Path(path)
    wrapped = PixelModel(model, spec).eval()
    card = dict(card or {}, program_input_spec=pixel_spec(spec).to_dict(), normalisation_inside={"mean": list(spec.mean), "std": list(spec.std)})
    example = torch.rand(4, spec.channels, spec.size, spec.size)
    extra = {"datafree_card.json": json.dumps(card)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".pt2":
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
            with atomic_path(path) as tmp:
                torch.export.save(program, str(tmp), extra_files=extra)
            loaded = torch.export.load(str(path)).module()
        elif path.suffix in (".ts", ".pt", ".torchscript"):
            scripted = torch.jit.trace(wrapped, example)
            with atomic_path(path) as tmp:
                torch.jit.save(scripted, str(tmp), _extra_files=extra)
            loaded = torch.jit.load(str(path))
        else:
            raise UserError(f"cannot tell the export format from {path.name!r}: use .pt2 (torch.export) or .ts (TorchScript)")
    with torch.no_grad():
        check = torch.rand(7, spec.channels, spec.size, spec.size)
        if not torch.equal(loaded(check).argmax(1), wrapped(check).argmax(1)):
            raise RuntimeError(f"the exported program {path} does not reproduce the model's predictions")
    return path


# --- condensed and synthetic data sets ---------------------------------------------------------------

DATASET_SCHEMA = "datafree-condensed/1"


def class_folder(index: int, name: str, count: int) -> str:
    """``03_Dress``: zero-padded so that sorted folder names keep the class order (ImageFolder, HF)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or str(index)
    return f"{index:0{len(str(max(count - 1, 1)))}d}_{safe}"


def save_image_set(folder, images: torch.Tensor, labels: torch.Tensor, spec: InputSpec, manifest: dict,
                   soft_labels: torch.Tensor | None = None, init_source: torch.Tensor | None = None,
                   stored: torch.Tensor | None = None) -> Path:
    """Write a synthetic data set as ``dataset.safetensors`` + ``manifest.json`` + ``train/<class>/<i>.png``.

    ``images`` are in the normalised input space; the PNGs hold them denormalised to [0, 1] and
    rounded to 8 bits, so they load in torchvision's ``ImageFolder`` and Hugging Face ``datasets``'
    imagefolder loader as they are. ``init_source`` (optional) holds, per image, the index of the
    source image it started from (-1 for none), for the audit's traceability check.

    Example:
        >>> save_image_set("runs/c/export", images, labels, spec, {"method": "dsa", "ipc": 10})   # doctest: +SKIP
    """
    from PIL import Image

    from datafree.base.io import save_tensors, write_json, write_text

    folder = Path(folder)
    tensors = {"images": images, "labels": labels.long()}
    if soft_labels is not None:
        tensors["soft_labels"] = soft_labels
    if init_source is not None:
        tensors["init_source"] = init_source.long()
    if stored is not None:  # multi-formation: the factorised storage; "images" are decoded from it
        tensors["stored"] = stored
    save_tensors(folder / "dataset.safetensors", tensors)
    pixels = spec.to_uint8(images)
    lines, k = [], spec.num_classes
    for i, (img, y) in enumerate(zip(pixels, labels.tolist())):
        sub = class_folder(y, spec.class_names[y], k)
        rel = f"{sub}/{i:05d}.png"
        path = folder / "train" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        array = img.permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if spec.channels == 1 else array).save(path)
        lines.append(json.dumps({"file_name": rel, "label": y, "class_name": spec.class_names[y]}))
    write_text(folder / "train" / "metadata.jsonl", "\n".join(lines) + "\n")
    counts = torch.bincount(labels.long(), minlength=k).tolist()
    write_json(folder / "manifest.json", {"schema": DATASET_SCHEMA, "class_names": spec.class_names,
                                          "class_folders": [class_folder(i, n, k) for i, n in enumerate(spec.class_names)],
                                          "input_spec": spec.to_dict(), "count": len(labels), "class_counts": counts,
                                          "space": "dataset.safetensors holds normalised images: pixels = images * std + mean",
                                          **manifest})
    return folder


def load_image_set(folder):
    """Read a folder written by :func:`save_image_set` back as an ImageSet (plus soft labels, manifest)."""
    from datafree.base.io import load_tensors, read_json
    from datafree.data.datasets import ImageSet

    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    if manifest.get("schema") != DATASET_SCHEMA:
        raise UserError(f"{str(folder)!r} is not a datafree data set folder (schema {manifest.get('schema')!r})")
    tensors = load_tensors(folder / "dataset.safetensors")
    spec = InputSpec.from_dict(manifest["input_spec"])
    return ImageSet(tensors["images"], tensors["labels"], spec, name=folder.name), tensors.get("soft_labels"), manifest


def init_sources(folder) -> torch.Tensor | None:
    """Per image of a saved set, the index of the source image it started from (-1: none); None if not recorded."""
    from datafree.base.io import load_tensors

    path = Path(folder) / "dataset.safetensors"
    return load_tensors(path).get("init_source") if path.is_file() else None


def plain_image_folder(folder) -> Path | None:
    """The ImageFolder root (``<class>/<image>``) of a folder made by any tool, or None.

    ``folder/train/<class>/...`` (this project's export and many tools' layout) is found too.

    Example:
        >>> plain_image_folder("/nonexistent") is None
        True
    """
    folder = Path(folder)
    for root in (folder / "train", folder):
        if root.is_dir() and any(d.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())
                                 for d in root.iterdir()):
            return root
    return None


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


def read_set(folder, spec: InputSpec | None = None):
    """A condensed set written by this project, or a plain ImageFolder made by another tool:
    ``(images, soft labels or None, manifest)``. A plain folder's images are normalised with
    ``spec`` (a real data set's), whose class ``i`` is the ``i``-th class folder in sorted order.

    Example:
        >>> images, soft, manifest = read_set("../shared/reference/vico-mnist-ipc10/snap_DM_ipc10_exp0_t01201",
        ...                                   spec=dataset_spec("mnist"))        # doctest: +SKIP
    """
    from datafree.data.datasets import load_dataset

    folder = Path(folder)
    if (folder / "dataset.safetensors").is_file():
        return load_image_set(folder)
    root = plain_image_folder(folder)
    if root is None:
        raise UserError(f"{str(folder)!r} is neither a datafree set (dataset.safetensors) nor an image folder (<class>/<image>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if spec is not None and len(classes) != spec.num_classes:
        raise UserError(f"{str(root)!r} has {len(classes)} class folders but the data set to compare with has {spec.num_classes} classes")
    images = load_dataset(str(root), spec=spec)
    images.name = folder.name
    manifest = {"source": {"kind": "image folder made by another tool", "name": str(folder)}, "class_folders": classes,
                "count": len(images)}
    return images, None, manifest
