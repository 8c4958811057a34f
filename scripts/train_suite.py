"""Train the teacher suite of the data-free benchmark: teachers of other shapes, costs and forms.

    DATAFREE_DATA=../shared/data python scripts/train_suite.py            # writes assets/suite/

The shipped teachers (``assets/teachers/``: LeNet-5 with and without BN, the Fashion-MNIST
ConvNet) are the first three members; this script adds four more, each with a fixed seed and a
fixed number of epochs chosen before training (nothing here looks at the test set except the
accuracy written into the suite manifest afterwards):

| name | architecture | BN | handed over as |
|---|---|---|---|
| ``mnist_convnet_in`` | DC ConvNet width 32, depth 3, *instance* norm | no | safetensors + card |
| ``mnist_resnet20`` | CIFAR-style ResNet-20, global average pool head | yes | safetensors + card |
| ``mnist_owner_resgap`` | an owner's own residual CNN (plain torch, not in the zoo), normalisation inside, [0, 1] input | yes | ``.pt2`` only, no card |
| ``fmnist_resnet8`` | CIFAR-style ResNet-8 | yes, hidden | TorchScript only, no card (logits only) |

The last two are trained with a plain torch loop, as an owner outside this project would, and
saved without any datafree metadata: the benchmark loads them the way a user's file is loaded.
``assets/suite/suite.json`` lists every member with its form, parameters and test accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datafree.data.datasets import load_dataset  # noqa: E402
from datafree.models.inference import accuracy  # noqa: E402
from datafree.models.training import fit_supervised, make_augment
from datafree.models.zoo import create_model  # noqa: E402
from datafree.teachers.formats import load_teacher, save_model  # noqa: E402

SHIPPED = [  # (name, file, dataset, form)
    ("mnist_lenet5", "assets/teachers/mnist_lenet5.safetensors", "mnist", "safetensors + card"),
    ("mnist_lenet5_nobn", "assets/teachers/mnist_lenet5_nobn.safetensors", "mnist", "safetensors + card"),
    ("fmnist_convnet", "assets/teachers/fmnist_convnet.safetensors", "fashion-mnist", "safetensors + card"),
]


class OwnerResGap(nn.Module):
    """An owner's model the zoo has never seen: a stem, three residual stages with BN, a global
    average pool head, and the normalisation inside (it takes pixels in [0, 1])."""

    def __init__(self, widths=(16, 24, 32), num_classes=10):
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.1307).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(0.3081).view(1, 1, 1, 1))
        layers, c = [nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()], widths[0]
        self.stem = nn.Sequential(*layers)
        self.blocks = nn.ModuleList()
        for i, w in enumerate(widths):
            self.blocks.append(nn.ModuleDict({
                "conv1": nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False), "bn1": nn.BatchNorm2d(w),
                "conv2": nn.Conv2d(w, w, 3, padding=1, bias=False), "bn2": nn.BatchNorm2d(w),
                "skip": nn.Identity() if (i == 0 and c == w) else nn.Sequential(nn.Conv2d(c, w, 1, stride=1 if i == 0 else 2, bias=False), nn.BatchNorm2d(w)),
            }))
            c = w
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem((x - self.mean) / self.std)
        for b in self.blocks:
            x = F.relu(b["bn2"](b["conv2"](F.relu(b["bn1"](b["conv1"](x))))) + b["skip"](x))
        return self.fc(x.mean((2, 3)))


class PixelInput(nn.Module):
    """Wraps a zoo model so that it takes [0, 1] pixels (the owner's TorchScript file has its normalisation inside)."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def plain_torch_fit(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, lr: float = 0.05) -> None:
    """An owner's training loop: SGD with momentum, one-cycle cosine, random shifts, batch 128."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(pixels) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(pixels), generator=g).split(128):
            x = pixels[idx]
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def train_zoo(name, dataset, arch, kwargs, epochs, augment, out_dir: Path, seed=0) -> Path:
    train = load_dataset(dataset, train=True)
    spec = train.spec
    model = create_model(arch, spec.num_classes, spec.channels, spec.size, **kwargs)
    fit_supervised(model, train, epochs=epochs, batch_size=128, lr=0.05, seed=seed, augment=make_augment(augment))
    path = out_dir / f"{name}.safetensors"
    save_model(model, path, arch, spec, kwargs, dataset=train.name,
               test_accuracy=round(accuracy(model, load_dataset(dataset, train=False)), 2),
               training={"epochs": epochs, "batch_size": 128, "lr": 0.05, "seed": seed, "augment": augment})
    return path


def train_owner_pt2(out_dir: Path, epochs: int, seed=0) -> Path:
    train = load_dataset("mnist", train=True)
    pixels = train.spec.denormalize(train.images)
    model = OwnerResGap()
    plain_torch_fit(model, pixels, train.labels, epochs, seed)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (torch.rand(4, 1, 28, 28),), dynamic_shapes=({0: batch},))
    path = out_dir / "mnist_owner_resgap.pt2"
    torch.export.save(program, str(path))
    return path


def train_torchscript(out_dir: Path, epochs: int, seed=0) -> Path:
    train = load_dataset("fashion-mnist", train=True)
    pixels = train.spec.denormalize(train.images)
    model = PixelInput(create_model("resnet8", 10, 1, 28), train.spec.mean, train.spec.std)
    plain_torch_fit(model, pixels, train.labels, epochs, seed)
    path = out_dir / "fmnist_resnet8.ts"
    torch.jit.save(torch.jit.trace(model, torch.rand(4, 1, 28, 28)), str(path))
    return path


NEW = [  # (name, dataset, form, input spec a user passes, trainer)
    ("mnist_convnet_in", "mnist", "safetensors + card", None,
     lambda d: train_zoo("mnist_convnet_in", "mnist", "convnet", {"width": 32, "depth": 3, "norm": "instance"}, 3, "affine", d)),
    ("mnist_resnet20", "mnist", "safetensors + card", None,
     lambda d: train_zoo("mnist_resnet20", "mnist", "resnet20", {}, 2, "affine", d)),
    ("mnist_owner_resgap", "mnist", ".pt2 (no card)", None, lambda d: train_owner_pt2(d, 3)),
    ("fmnist_resnet8", "fashion-mnist", "TorchScript (no card)", "1x28x28", lambda d: train_torchscript(d, 4)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "assets" / "suite"))
    parser.add_argument("--only", help="comma-separated names to (re)train")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for name, file, dataset, form in SHIPPED:
        members.append({"name": name, "file": file, "dataset": dataset, "form": form, "input_spec": None})
    for name, dataset, form, input_spec, trainer in NEW:
        existing = sorted(out.glob(f"{name}.*"))
        existing = [p for p in existing if p.suffix != ".json"]
        if args.only is None and existing:
            path = existing[0]
        elif args.only is None or name in args.only.split(","):
            started = time.time()
            path = trainer(out)
            print(f"trained {name} in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
        else:
            continue
        members.append({"name": name, "file": str(path.relative_to(ROOT)), "dataset": dataset, "form": form, "input_spec": input_spec})
    for m in members:  # the teacher as the benchmark will load it: its parameters and test accuracy
        teacher = load_teacher(ROOT / m["file"], input_spec=m["input_spec"])
        test = load_dataset(m["dataset"], train=False)
        test.images = teacher.spec.normalize(test.spec.denormalize(test.images))
        m.update(parameters=sum(p.numel() for p in teacher.parameters()) or None, bn_layers=len(teacher.bn_names),
                 test_accuracy=round(accuracy(teacher, test), 2))
        print(json.dumps(m), flush=True)
    (out / "suite.json").write_text(json.dumps({"command": " ".join(sys.argv), "members": members}, indent=2) + "\n")


if __name__ == "__main__":
    main()
