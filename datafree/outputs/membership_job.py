"""The membership audit as a job: ``datafree audit TARGET --membership --members mnist --non-members mnist:test``.

The target is what would be handed over, attacked through the model that carries it:

- a model file (``.safetensors`` with its card, or a ``.pt2`` program): that model (the teacher as
  the reference point, or a compressed student);
- a distill run folder: its student (the attack asks whether the *teacher's* training images show
  through a student that never saw them);
- a condensed set folder: a ConvNet trained on the set by the fixed evaluation protocol.

Members are images known to be in the training data (of the teacher, or of the set's source) and
non-members images of the same distribution known to be out. Reference models for offline LiRA
train on random halves of a pool that holds no audited image (the rest of both splits); for a
condensed set they are trained on real data, a proxy for the condensation pipeline it would take
too long to repeat on a CPU. Writes ``membership.json`` and ``membership_roc.png`` (log axes), and
adds the figures to the folder's manifest when auditing a run in place.

Example:
    >>> cfg = membership_config({"target": "assets/teachers/mnist_lenet5.safetensors", "members": "mnist",
    ...                          "non_members": "mnist:test", "samples": 500})
    >>> summary = run_membership_audit(cfg)                           # doctest: +SKIP
    >>> summary["attacks"]["lira"]["tpr_at_0.01_fpr"]                  # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

import torch
from pydantic.dataclasses import dataclass

from datafree.base.config import STRICT, build_config, describe
from datafree.base.errors import UserError


@dataclass(config=STRICT)
class MembershipConfig:
    """A membership-inference audit's settings.

    Example:
        >>> membership_config({"target": "m.safetensors", "members": "mnist", "non_members": "mnist:test"}).samples
        1000
    """

    target: str = describe("what is handed over: a model file (.safetensors with its card, or .pt2), a distill run "
                           "folder (its student) or a condensed set folder (a ConvNet trained on it is attacked)", "")
    members: str = describe("images known to be in the training data: a data set name with an optional split "
                            "(mnist is its training split), a folder or an .npz", "")
    non_members: str = describe("images of the same distribution known to be out of it, e.g. mnist:test", "")
    samples: int = describe("audited images on each side (drawn at random)", 1000, ge=10)
    references: int = describe("reference models for offline LiRA, each trained on a random half of the images not "
                               "audited (0: the loss-threshold attack only)", 4, ge=0)
    reference_epochs: int = describe("epochs of each reference model", 3, ge=1)
    reference_pool: int = describe("images not audited that the reference models draw their halves from", 10000, ge=20)
    reference_data: str | None = describe("where the reference models' images come from: a data set name with an optional "
                                          "split, a folder or an .npz, holding none of the audited images (default: the "
                                          "members and non-members not audited; needed when every member is audited, as "
                                          "with canaries)")
    set_epochs: int = describe("a condensed set: epochs of the ConvNet trained on it (the fixed protocol)", 300, ge=1)
    seed: int = describe("seed of the draws, the reference models and the bootstrap", 0)
    out: str | None = describe("the folder membership.json and membership_roc.png go into (default: the run's folder; "
                               "beside a model file, as MODEL.membership.json and MODEL.membership_roc.png)")
    data_dir: str | None = describe("root of the real data sets (default $DATAFREE_DATA)")


MEMBERSHIP_FIELDS = tuple(f.name for f in fields(MembershipConfig))


def membership_config(values: dict) -> MembershipConfig:
    """A :class:`MembershipConfig` from a mapping; unknown keys and bad values get one sentence."""
    cfg = build_config(MembershipConfig, {k: v for k, v in values.items() if v is not None})
    if not cfg.target:
        raise UserError("no target given: the model file, distill run or condensed set to audit")
    if not cfg.members:
        raise UserError("a membership audit needs members: images known to be in the training data (--members mnist)")
    if not cfg.non_members:
        raise UserError("a membership audit needs non-members: held-out images of the same distribution (--non-members mnist:test)")
    return cfg


def load_split(text: str, data_dir: str | None):
    """``name[:train|test]`` (default train), a folder or an .npz, as an :class:`ImageSet`."""
    from datafree.data.datasets import load_dataset

    name, _, split = text.partition(":") if not Path(text).exists() else (text, "", "")
    if split not in ("", "train", "test"):
        raise UserError(f"unknown split {split!r} in {text!r}; use NAME, NAME:train or NAME:test")
    return load_dataset(name, train=split != "test", data_dir=data_dir)


def resolve_target(cfg: MembershipConfig, notify=print) -> tuple:
    """``(model, input spec, arch, arch_kwargs, kind, folder or None)``: the model attacked and how to build references like it."""
    from datafree.teachers.formats import load_model, load_teacher

    path = Path(cfg.target)
    if path.is_dir() and (path / "student.safetensors").is_file():
        path, folder, kind = path / "student.safetensors", path, "distill run's student"
    elif path.is_dir() and (path / "dataset.safetensors").is_file():
        return (*_model_on_set(path, cfg, notify), "model trained on a condensed set", path)
    elif path.is_file():
        folder, kind = None, "model"
    else:
        raise UserError(f"no model, distill run or condensed set at {str(path)!r}")
    model = load_teacher(path)
    arch, kwargs = None, {}
    if path.suffix == ".safetensors":
        card = load_model(path)[1]
        arch, kwargs = card.get("arch"), card.get("arch_kwargs", {})
    return model, model.spec, arch, kwargs, kind, folder


def _model_on_set(folder: Path, cfg: MembershipConfig, notify) -> tuple:
    """A ConvNet trained on the condensed set by the fixed evaluation protocol (one model)."""
    from datafree.outputs.evaluate import evaluate_set
    from datafree.outputs.export import read_set

    images, _, _ = read_set(folder)
    kept: list = []
    notify(f"training a ConvNet on the condensed set ({len(images)} images, {cfg.set_epochs} epochs) to attack it")
    result = evaluate_set(images, images, models=1, epochs=cfg.set_epochs, seed=cfg.seed, keep=kept)
    protocol = result["protocol"]
    return kept[0].eval(), images.spec, protocol["arch"], protocol["arch_kwargs"]


def in_input_space(data, spec):
    """``data`` moved into a model's input space (its normalisation), checked against its shape and classes."""
    from datafree.data.datasets import ImageSet

    if (data.spec.channels, data.spec.size, data.spec.num_classes) != (spec.channels, spec.size, spec.num_classes):
        raise UserError(f"the images {data.name!r} are {data.spec.describe()} but the model takes {spec.describe()}")
    return ImageSet(spec.normalize(data.spec.denormalize(data.images)), data.labels, spec, name=data.name)


def check_disjoint(pool, audited: list[torch.Tensor], name: str) -> None:
    """Refuse reference data that holds an audited image (compared as 8-bit pixels): a reference
    model trained on it would be an IN model, and offline LiRA assumes none is."""
    def keys(images: torch.Tensor):
        return (x.numpy().tobytes() for x in pool.spec.to_uint8(images))

    seen = {key for part in audited for key in keys(part)}
    shared = sum(key in seen for key in keys(pool.images))
    if shared:
        raise UserError(f"{shared} of the images in reference_data {name!r} are audited images; the reference models "
                        "must train on images that are not audited")


def run_membership_audit(cfg: MembershipConfig, progress: bool = True, notify=print) -> dict:
    """Audit ``cfg.target``; write ``membership.json`` and ``membership_roc.png``; return the result."""
    from datafree.base.io import read_json, write_json
    from datafree.data.datasets import ImageSet
    from datafree.models.training import fit_supervised
    from datafree.models.zoo import create_model
    from datafree.outputs.membership import audit_membership, plot_roc

    started = time.monotonic()
    model, spec, arch, arch_kwargs, kind, folder = resolve_target(cfg, notify)
    members, non_members = (in_input_space(load_split(t, cfg.data_dir), spec) for t in (cfg.members, cfg.non_members))
    g = torch.Generator().manual_seed(cfg.seed)
    m_order, n_order = torch.randperm(len(members), generator=g), torch.randperm(len(non_members), generator=g)
    if min(len(members), len(non_members)) < cfg.samples:
        raise UserError(f"samples {cfg.samples} is more than the members ({len(members)}) or non-members ({len(non_members)}) hold")
    audited_m, audited_n = m_order[:cfg.samples], n_order[:cfg.samples]
    pick = lambda s, idx: ImageSet(s.images[idx], s.labels[idx], spec, name=s.name)  # noqa: E731
    references, why_none = [], None
    if cfg.references and arch is None:
        why_none = "the target is a program without a zoo architecture: reference models cannot be built like it"
        notify(f"note: {why_none}; the loss-threshold attack only")
    elif cfg.references:
        if cfg.reference_data:
            rest = in_input_space(load_split(cfg.reference_data, cfg.data_dir), spec)
            check_disjoint(rest, [members.images[audited_m], non_members.images[audited_n]], cfg.reference_data)
        else:
            rest = ImageSet(torch.cat([members.images[m_order[cfg.samples:]], non_members.images[n_order[cfg.samples:]]]),
                            torch.cat([members.labels[m_order[cfg.samples:]], non_members.labels[n_order[cfg.samples:]]]), spec)
        if len(rest) < 20:
            raise UserError(f"the reference models need at least 20 images that are not audited; there are {len(rest)} "
                            "(audit fewer samples, or give reference_data)")
        pool = pick(rest, torch.randperm(len(rest), generator=g)[:cfg.reference_pool])
        from tqdm.auto import tqdm

        for r in tqdm(range(cfg.references), desc="reference models", disable=not progress):
            half = pick(pool, torch.randperm(len(pool), generator=g)[:len(pool) // 2])
            torch.manual_seed(cfg.seed + 1 + r)
            reference = create_model(arch, spec.num_classes, spec.channels, spec.size, **arch_kwargs)
            references.append(fit_supervised(reference, half, epochs=cfg.reference_epochs, seed=cfg.seed + 1 + r, progress=False))
    result = audit_membership(model, pick(members, audited_m), pick(non_members, audited_n), references, seed=cfg.seed)
    result = {"target": str(cfg.target), "kind": kind, "members_from": cfg.members, "non_members_from": cfg.non_members,
              **result, "reference_models": {"count": len(references), "arch": arch, "epochs": cfg.reference_epochs,
                                             "pool": cfg.reference_pool, "trained_on": "random halves of images not audited",
                                             "drawn_from": cfg.reference_data or "the members and non-members not audited",
                                             **({"none_because": why_none} if why_none else {})},
              "seconds": round(time.monotonic() - started, 1),
              "reading": "TPR at a low FPR is the share of members an attacker finds while wrongly accusing that share of "
                         "non-members; near the FPR itself, the attack does no better than chance there"}
    out = Path(cfg.out) if cfg.out else (folder or Path(cfg.target).parent)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{Path(cfg.target).stem}." if folder is None and cfg.out is None else ""  # beside a model: named after it
    result["written_to"] = str(out / f"{prefix}membership.json")
    write_json(out / f"{prefix}membership.json", result)
    plot_roc({Path(cfg.target).name: result}, out / f"{prefix}membership_roc.png")
    if folder is not None and cfg.out is None and (folder / "manifest.json").is_file():  # audited in place
        manifest = read_json(folder / "manifest.json")
        manifest["membership"] = {"file": "membership.json", "members_from": cfg.members, "non_members_from": cfg.non_members,
                                  **{a: {k: v for k, v in r.items() if k != "roc"} for a, r in result["attacks"].items()}}
        write_json(folder / "manifest.json", manifest)
        from datafree.outputs.report import write_report

        write_report(folder)
    return result
