"""Real data sets, loaded whole into memory as normalised tensors, each with its input spec.

Sources, by name or path:

- ``mnist``, ``fashion-mnist`` (``fmnist``), ``cifar10``: torchvision's on-disk layout under the data
  root (``--data-dir``, else ``$DATAFREE_DATA``). Missing files are fetched by torchvision only when
  asked (``--download`` or ``DATAFREE_DOWNLOAD=1``); otherwise one sentence names the files looked
  for and the flag or variable to set.
- a folder in torchvision ``ImageFolder`` layout (``root/<class>/<image>``);
- an ``.npz`` file with ``x`` (N x H x W, N x H x W x C or N x C x H x W) and ``y`` arrays.

Small data sets (60,000 MNIST digits are 188 MB as float) are cheapest on a CPU as one tensor:
no loader workers, no per-sample Python.

Example:
    >>> train = load_dataset("mnist", train=True, data_dir="../shared/data")
    >>> train.images.shape, train.spec.size
    (torch.Size([60000, 1, 28, 28]), 28)
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from datafree.base.errors import UserError

DATA_ENV = "DATAFREE_DATA"
DOWNLOAD_ENV = "DATAFREE_DOWNLOAD"
_REAL_DATA_FORBIDDEN: list[str] = []


@contextmanager
def no_real_data(reason: str):
    """Inside this block any attempt to load a real data set raises: data-free training never reads one.

    Example:
        >>> with no_real_data("data-free distillation"):
        ...     load_dataset("mnist")
        Traceback (most recent call last):
        RuntimeError: real data was requested during data-free distillation
    """
    _REAL_DATA_FORBIDDEN.append(reason)
    try:
        yield
    finally:
        _REAL_DATA_FORBIDDEN.pop()


@dataclass
class InputSpec:
    """What a model expects: ``channels`` x ``size`` x ``size`` images, normalised by mean/std.

    The *input space* of a model is ``(pixels_in_0_1 - mean) / std``; synthetic images live there.

    Example:
        >>> spec = InputSpec(1, 28, (0.1307,), (0.3081,), [str(i) for i in range(10)])
        >>> spec.num_classes
        10
    """

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UserError(f"the input spec has {self.channels} channels but {len(self.mean)} means and {len(self.std)} stds")
        if self.channels < 1 or self.size < 1 or min(self.std) <= 0:
            raise UserError(f"the input spec {self.describe()} is not valid (channels, size and std must be positive)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_statistics(self) -> bool:
        """Whether mean/std are a data set's statistics rather than the identity (pixels in [0, 1] as is).

        Example:
            >>> InputSpec(1, 28, (0.1307,), (0.3081,)).has_statistics, InputSpec(1, 28, (0.0,), (1.0,)).has_statistics
            (True, False)
        """
        return any(m != 0.0 for m in self.mean) or any(s != 1.0 for s in self.std)

    def describe(self) -> str:
        return f"{self.channels}x{self.size}x{self.size}"

    def to_dict(self) -> dict:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        try:
            return cls(int(d["channels"]), int(d["size"]), tuple(d["mean"]), tuple(d["std"]), list(d.get("class_names", [])))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"the input spec {d!r} is missing or has a malformed field ({e})") from None

    @classmethod
    def parse(cls, text: str, num_classes: int | None = None) -> "InputSpec":
        """Parse ``CxHxW[:mean,..:std,..]``, e.g. ``1x28x28`` (pixels in [0, 1]) or ``1x28x28:0.1307:0.3081``."""
        parts = text.split(":")
        try:
            c, h, w = (int(v) for v in parts[0].lower().split("x"))
            mean = [float(v) for v in parts[1].split(",")] if len(parts) > 1 else [0.0] * c
            std = [float(v) for v in parts[2].split(",")] if len(parts) > 2 else [1.0] * c
        except ValueError:
            raise UserError(f"cannot read the input spec {text!r}: expected CxHxW[:mean:std], e.g. 1x28x28:0.1307:0.3081") from None
        if h != w:
            raise UserError(f"the input spec {text!r} is not square; datafree handles square images only")
        if len(mean) == 1:
            mean, std = mean * c, std * c if len(std) == 1 else std
        names = [str(i) for i in range(num_classes)] if num_classes else []
        return cls(c, h, tuple(mean), tuple(std), names)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] to this input space."""
        return (pixels - self._stat(self.mean, pixels)) / self._stat(self.std, pixels)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in this input space back to [0, 1] pixels (not clamped)."""
        return images * self._stat(self.std, images) + self._stat(self.mean, images)

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Images in this input space as 8-bit pixels (clamped to [0, 255]).

        Example:
            >>> InputSpec(1, 2, (0.5,), (0.5,), ["a"]).to_uint8(torch.tensor([[[[-1.0, 1.0], [0.0, 3.0]]]])).flatten().tolist()
            [0, 255, 128, 255]
        """
        return (self.denormalize(images).clamp(0, 1) * 255).round().to(torch.uint8)

    def _stat(self, values, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


@dataclass
class ImageSet:
    """Images in a model's input space (float, N x C x H x W), integer labels, and the spec."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: InputSpec
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)


MNIST_NAMES = [str(i) for i in range(10)]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# name -> (torchvision class name, channels, size, mean, std, class names)
TORCHVISION_SETS = {
    "mnist": ("MNIST", 1, 28, (0.1307,), (0.3081,), MNIST_NAMES),
    "fashion-mnist": ("FashionMNIST", 1, 28, (0.2860,), (0.3530,), FASHION_NAMES),
    "cifar10": ("CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_NAMES),
}
ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}


def canonical_name(name: str) -> str:
    """``'FMNIST'`` -> ``'fashion-mnist'``; unknown names come back lower-cased."""
    key = name.lower()
    return ALIASES.get(key, key)


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$DATAFREE_DATA``, else ``~/.cache/datafree/data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "datafree" / "data"


def download_allowed() -> bool:
    """Whether torchvision may download missing data sets: ``$DATAFREE_DOWNLOAD`` is 1 (or true, yes, on).

    The command line's ``--download`` sets it for the command it runs.

    Example:
        >>> os.environ["DATAFREE_DOWNLOAD"] = "1"; download_allowed()   # doctest: +SKIP
        True
    """
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def dataset_spec(name: str) -> InputSpec:
    """The input spec of a named torchvision data set, without loading it."""
    key = canonical_name(name)
    if key not in TORCHVISION_SETS:
        raise UserError(f"unknown data set {name!r}; known names: {', '.join(TORCHVISION_SETS)}, or a folder or .npz path")
    _, c, size, mean, std, names = TORCHVISION_SETS[key]
    return InputSpec(c, size, mean, std, list(names))


def load_dataset(name: str, train: bool = True, data_dir: str | os.PathLike | None = None, download: bool = False, spec: InputSpec | None = None) -> ImageSet:
    """Load a data set by name (torchvision), folder (ImageFolder) or ``.npz`` path.

    Args:
        name: ``mnist``, ``fashion-mnist``, ``cifar10``, a folder, or an ``.npz`` file.
        train: the training split (True) or the test split (False); ignored for folders and npz.
        data_dir: root of torchvision's layout; defaults to ``$DATAFREE_DATA``.
        download: allow torchvision to download when the files are missing (needs the network);
            ``DATAFREE_DOWNLOAD=1`` allows it too (:func:`download_allowed`).
        spec: for folders and npz: the mean/std (and size) to normalise with; default [0, 1] pixels.

    Returns:
        An :class:`ImageSet` with normalised float images.

    Example:
        >>> test = load_dataset("fashion-mnist", train=False, data_dir="../shared/data")
        >>> len(test), test.spec.class_names[0]
        (10000, 'T-shirt/top')
    """
    if _REAL_DATA_FORBIDDEN:
        raise RuntimeError(f"real data was requested during {_REAL_DATA_FORBIDDEN[-1]}")
    path = Path(name).expanduser()
    if name.endswith(".npz"):
        return _load_npz(path, spec)
    if path.is_dir():
        return _load_imagefolder(path, spec)
    key = canonical_name(name)
    if key not in TORCHVISION_SETS:
        raise UserError(f"unknown data set {name!r}: not a known name ({', '.join(TORCHVISION_SETS)}), an existing folder, or an .npz file")
    return _load_torchvision(key, train, data_root(data_dir), download or download_allowed())


def _load_torchvision(key: str, train: bool, root: Path, download: bool) -> ImageSet:
    import torchvision

    cls_name, *_ = TORCHVISION_SETS[key]
    spec = dataset_spec(key)
    try:
        ds = getattr(torchvision.datasets, cls_name)(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as e:  # not there; or the download failed (URLError is an OSError)
        expected = _expected_files(cls_name, root)
        if download:
            reason = " ".join(str(e).split())[:300]
            raise UserError(f"{cls_name} is not under the data root {str(root)!r} and downloading it failed ({reason}); "
                            f"without the network, put the files there ({expected}) or point --data-dir or "
                            f"{DATA_ENV} at a folder that holds them") from None
        raise UserError(f"{cls_name} is not under the data root {str(root)!r} (looked for {expected}); point --data-dir "
                        f"or {DATA_ENV} at the folder that holds it, or pass --download (or set {DOWNLOAD_ENV}=1) "
                        "to let torchvision fetch it") from None
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    if data.ndim == 3:  # N x H x W grey
        data = data.unsqueeze(1)
    else:  # N x H x W x C colour
        data = data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    images = spec.normalize(data.float().div_(255.0))
    return ImageSet(images.contiguous(), labels, spec, name=key)


def _expected_files(cls_name: str, root: Path) -> str:
    if cls_name == "CIFAR10":
        return str(root / "cifar-10-batches-py" / "data_batch_1..5, test_batch")
    return str(root / cls_name / "raw" / "train-images-idx3-ubyte, ...")


def _load_npz(path: Path, spec: InputSpec | None) -> ImageSet:
    if not path.is_file():
        raise UserError(f"no .npz file at {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except KeyError:
        raise UserError(f"{str(path)!r} must hold arrays named 'x' and 'y'") from None
    except ValueError as e:
        raise UserError(f"{str(path)!r} is not a readable .npz file ({e})") from None
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or len(x) != len(y) or x.shape[2] != x.shape[3]:
        raise UserError(f"{str(path)!r}: x must be N square images matching y's N, got x {x.shape} and y {y.shape}")
    images = torch.from_numpy(x.astype(np.float32))
    if x.dtype == np.uint8:
        images /= 255.0
    labels = torch.from_numpy(y.astype(np.int64))
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    spec = spec or InputSpec(x.shape[1], x.shape[2], (0.0,) * x.shape[1], (1.0,) * x.shape[1], [str(i) for i in range(n_classes)])
    _check_shape(spec, images, path)
    return ImageSet(spec.normalize(images), labels, spec, name=path.name)


def _load_imagefolder(path: Path, spec: InputSpec | None) -> ImageSet:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    try:
        folder = ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{str(path)!r} is not an ImageFolder (root/<class>/<image>): {e}") from None
    mode = "L" if spec is None or spec.channels == 1 else "RGB"
    if spec is None:
        first = folder.loader(folder.samples[0][0])
        mode = "L" if first.mode in ("L", "1", "I;16") else "RGB"
    tensors = [pil_to_tensor(folder.loader(p).convert(mode)) for p, _ in folder.samples]
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) != 1:
        raise UserError(f"the images under {str(path)!r} differ in size or channels ({sorted(sizes)[:3]}...); resize them to one size first")
    images = torch.stack(tensors).float() / 255.0
    c, h, w = images.shape[1:]
    if h != w:
        raise UserError(f"the images under {str(path)!r} are {h}x{w}; datafree handles square images only")
    spec = spec or InputSpec(c, h, (0.0,) * c, (1.0,) * c, list(folder.classes))
    _check_shape(spec, images, path)
    labels = torch.tensor([t for _, t in folder.samples], dtype=torch.long)
    return ImageSet(spec.normalize(images), labels, spec, name=path.name)


def _check_shape(spec: InputSpec, images: torch.Tensor, path: Path) -> None:
    if tuple(images.shape[1:]) != (spec.channels, spec.size, spec.size):
        raise UserError(f"the images in {str(path)!r} are {'x'.join(map(str, images.shape[1:]))} but {spec.describe()} is expected")


def load_transfer_set(run_dir) -> tuple[ImageSet, torch.Tensor]:
    """The transfer set of a ``datafree distill`` run: images labelled by the teacher's argmax, and its logits.

    Example:
        >>> transfer, teacher_logits = load_transfer_set("runs/distill")   # doctest: +SKIP
    """
    import json

    from datafree.base.io import load_tensors

    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not (run_dir / "transfer.safetensors").is_file() or not manifest_path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a finished distill run (no transfer.safetensors and manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    tensors = load_tensors(run_dir / "transfer.safetensors")
    spec = InputSpec.from_dict(manifest["input_spec"])
    images, logits = tensors["images"], tensors["teacher_logits"]
    if images.dim() != 4 or tuple(images.shape[1:]) != (spec.channels, spec.size, spec.size):
        raise UserError(f"the transfer set in {str(run_dir)!r} holds {tuple(images.shape[1:])} images, not {spec.describe()}")
    return ImageSet(images, logits.argmax(1), spec, name=f"transfer:{run_dir.name}"), logits
