"""Membership-inference audit: how well can an attacker tell a model's training images from others?

Two attacks on a model, given images known to be *members* (e.g. the teacher's training data) and
*non-members* (held-out images of the same distribution):

- ``loss``: the loss-threshold attack (Yeom et al. 2018): the lower the model's loss on an image,
  the likelier it is a member;
- ``lira``: offline LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"),
  calibrated per image: a few reference models of the same architecture are trained on random halves
  of a reference pool that holds no audited image, and the model's logit-scaled confidence on an
  image is compared with the references' (a Gaussian with one global variance, as the paper advises
  for few references). Sized for a CPU: a handful of references, a few epochs each.

Each attack gives the ROC AUC and the true-positive rate at 0.1% and 1% false-positive rate, with
95% bootstrap intervals (members and non-members resampled). A TPR at low FPR near the FPR itself
means the attack does no better than chance where it matters; AUC alone hides that.

Example:
    >>> members, non_members = torch.tensor([3.0, 2.5, 2.0, 0.1]), torch.tensor([0.0, 0.2, 1.0, 0.3])
    >>> roc_summary(members, non_members)["auc"]     # 13 of the 16 member / non-member pairs ordered right
    0.8125
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from datafree.base.errors import UserError

FPR_LEVELS = (0.001, 0.01)
BOOTSTRAP = 200


def per_example_logits(model, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's logits for ``images`` (fp32, evaluation mode, no graph)."""
    from datafree.models.inference import predict

    return predict(model, images, batch_size).float()


def loss_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss-threshold attack scores: minus the cross-entropy (higher: likelier a member).

    Example:
        >>> loss_scores(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 0])).round(decimals=2)
        tensor([-0.0200, -4.0200])
    """
    return -F.cross_entropy(logits, labels, reduction="none")


def scaled_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic: log(p / (1 - p)) of the true class, computed stably from the logits.

    Example:
        >>> scaled_confidence(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
        tensor([0.])
    """
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    return true - others


def lira_offline_scores(target: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Offline LiRA: how far above the reference (non-member) models' confidence the target's is,
    in units of one global standard deviation (``references``: R x N, every image out of every reference).

    Example:
        >>> lira_offline_scores(torch.tensor([2.0, 0.0]), torch.tensor([[0.0, 0.0], [2.0, 0.0]]))   # std sqrt(0.5)
        tensor([1.4142, 0.0000])
    """
    mean = references.mean(0)
    std = (references - mean).pow(2).mean().sqrt().clamp(min=1e-6) if len(references) > 1 else references.new_tensor(1.0)
    return (target - mean) / std


def roc_curve(members: torch.Tensor, non_members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """False- and true-positive rates over every threshold (from the highest score down), starting at (0, 0).

    Example:
        >>> fpr, tpr = roc_curve(torch.tensor([2.0, 1.0]), torch.tensor([0.0]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    scores = torch.cat([members, non_members]).double()
    is_member = torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))]).double()
    order = torch.argsort(scores, descending=True, stable=True)
    scores, is_member = scores[order], is_member[order]
    last_of_tie = torch.ones(len(scores), dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]  # a threshold takes every tied score at once
    tp, fp = is_member.cumsum(0)[last_of_tie], (1 - is_member).cumsum(0)[last_of_tie]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fp / len(non_members)]), torch.cat([zero, tp / len(members)])


def roc_summary(members: torch.Tensor, non_members: torch.Tensor) -> dict:
    """ROC AUC and the TPR at each of :data:`FPR_LEVELS` (the best TPR whose FPR is at most the level)."""
    fpr, tpr = roc_curve(members, non_members)
    auc = float(torch.trapezoid(tpr, fpr))
    summary = {"auc": round(auc, 4)}
    for level in FPR_LEVELS:
        summary[f"tpr_at_{level:g}_fpr"] = round(float(tpr[fpr <= level + 1e-12].max()), 5)
    return summary


def with_intervals(members: torch.Tensor, non_members: torch.Tensor, seed: int = 0, rounds: int = BOOTSTRAP) -> dict:
    """:func:`roc_summary` with 95% bootstrap intervals (``<name>_ci``), members and non-members resampled apart."""
    point = roc_summary(members, non_members)
    g = torch.Generator().manual_seed(seed)
    draws = {k: [] for k in point}
    for _ in range(rounds):
        m = members[torch.randint(len(members), (len(members),), generator=g)]
        n = non_members[torch.randint(len(non_members), (len(non_members),), generator=g)]
        for k, v in roc_summary(m, n).items():
            draws[k].append(v)
    for k, values in draws.items():
        values = sorted(values)
        point[f"{k}_ci"] = [values[int(0.025 * (rounds - 1))], values[math.ceil(0.975 * (rounds - 1))]]
    return point


def audit_membership(model, members, non_members, references: list | None = None, seed: int = 0) -> dict:
    """Both attacks on ``model`` (a classifier taking the sets' images), with their ROC curves.

    ``members`` and ``non_members`` are :class:`~datafree.data.datasets.ImageSet` s in the model's
    input space; ``references`` are models trained without any audited image (None: the loss attack only).
    """
    if not len(members) or not len(non_members):
        raise UserError("a membership audit needs members and non-members (images known to be in and out of the training data)")
    images = torch.cat([members.images, non_members.images])
    labels = torch.cat([members.labels, non_members.labels]).long()
    logits = per_example_logits(model, images)
    m = len(members)
    attacks = {"loss": loss_scores(logits, labels)}
    if references:
        stacked = torch.stack([scaled_confidence(per_example_logits(r, images), labels) for r in references])
        attacks["lira"] = lira_offline_scores(scaled_confidence(logits, labels), stacked)
    result = {"members": m, "non_members": len(non_members), "references": len(references or []), "attacks": {}}
    for name, scores in attacks.items():
        result["attacks"][name] = with_intervals(scores[:m], scores[m:], seed)
        fpr, tpr = roc_curve(scores[:m], scores[m:])
        result["attacks"][name]["roc"] = thin_curve(fpr, tpr)
    result["accuracy"] = {"members": round(float((logits[:m].argmax(1) == labels[:m]).float().mean() * 100), 2),
                          "non_members": round(float((logits[m:].argmax(1) == labels[m:]).float().mean() * 100), 2)}
    return result


def thin_curve(fpr: torch.Tensor, tpr: torch.Tensor, points: int = 200) -> dict:
    """At most ``points`` points of a ROC curve, spaced evenly in log FPR (for plots and JSON)."""
    grid = torch.logspace(-5, 0, points, dtype=torch.float64)
    idx = torch.searchsorted(fpr, grid, right=True).clamp(max=len(fpr)) - 1
    keep = sorted(set(idx.clamp(min=0).tolist()))
    return {"fpr": [round(float(fpr[i]), 6) for i in keep], "tpr": [round(float(tpr[i]), 6) for i in keep]}


def plot_roc(results: dict[str, dict], path) -> None:
    """ROC curves on log-log axes, one line per model and attack (``results``: name -> :func:`audit_membership`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, result in results.items():
        for attack, values in result["attacks"].items():
            fpr, tpr = values["roc"]["fpr"], values["roc"]["tpr"]
            pairs = [(f, t) for f, t in zip(fpr, tpr) if f > 0 and t > 0]
            if pairs:
                ax.plot(*zip(*pairs), label=f"{name}, {attack} (AUC {values['auc']:.3f})")
    ax.plot([1e-5, 1], [1e-5, 1], "k--", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false-positive rate", ylabel="true-positive rate",
           title="membership inference")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
