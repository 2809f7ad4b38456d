"""Score-based membership inference without shadow models: one leg of Sha et al.'s "backdoor
sequela" (arXiv:2212.09067), which asks whether removing a backdoor changes how much the model
leaks about its training data.

Four metric attacks, each a per-sample score where higher means "more likely a member":

* ``loss`` — the loss-threshold attack of Yeom et al. 2018, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting" (score = -cross-entropy with the true label);
* ``confidence`` — the maximum softmax probability;
* ``entropy`` — the negated prediction entropy;
* ``modified_entropy`` — the negated modified entropy of Song & Mittal 2021, "Systematic
  Evaluation of Privacy Risks of Machine Learning Models" (USENIX Security), which also uses
  the label: a confident *wrong* prediction counts against membership.

Each is reported as ROC AUC and as TPR at 1 % and 0.1 % FPR, the low-FPR view Carlini et al.
2022 ("Membership Inference Attacks From First Principles") argue is the one that matters.
The attacks need no threshold fitting, so members and non-members are used whole: they are
balanced to the same size, and AUC/TPR are threshold-free summaries of the score separation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import ImageSet
from bdaudit.core.errors import BdauditError
from bdaudit.core.predict import Predictor

ATTACKS = ("loss", "confidence", "entropy", "modified_entropy")
FPR_POINTS = (0.01, 0.001)
# Song & Mittal's reference code clips probabilities at 1e-30 before taking logs.
LOG_FLOOR = math.log(1e-30)


class MembershipError(BdauditError):
    """The member / non-member sets cannot support a membership-inference measurement."""


# --------------------------------------------------------------------------- metrics


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their mean rank (what the Mann-Whitney U statistic needs)."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    upper = torch.cumsum(counts, 0).double()  # rank of the last copy of each distinct value
    return (upper - (counts.double() - 1.0) / 2.0)[inverse]


def roc_auc(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> float:
    """ROC AUC = P(member score > non-member score) + 0.5 P(tie), from ranks (Mann-Whitney U);
    equal to scikit-learn's ``roc_auc_score`` with members as the positive class."""
    pos, neg = member_scores.double().flatten(), nonmember_scores.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("ROC AUC needs at least one member and one non-member score")
    ranks = _average_ranks(torch.cat([pos, neg]))
    n_pos, n_neg = pos.numel(), neg.numel()
    u_stat = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u_stat / (n_pos * n_neg)


def tpr_at_fpr(member_scores: torch.Tensor, nonmember_scores: torch.Tensor, fpr: float) -> float:
    """The highest TPR over thresholds ("member if score >= t") whose FPR is <= ``fpr``.

    At most k = floor(fpr * n_neg) non-members may pass; the loosest such threshold sits just
    above the (k+1)-th highest non-member score, so exactly the members strictly above it pass.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], not {fpr}")
    pos, neg = member_scores.double().flatten(), nonmember_scores.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("TPR at FPR needs at least one member and one non-member score")
    allowed = math.floor(fpr * neg.numel() + 1e-9)  # 1e-9: 0.01 * 1000 must give 10, not 9
    if allowed >= neg.numel():
        return 1.0
    cutoff = torch.sort(neg, descending=True).values[allowed]
    return float((pos > cutoff).double().mean())


def roc_points(member_scores: torch.Tensor, nonmember_scores: torch.Tensor,
               max_points: int = 40) -> list[list[float]]:
    """(FPR, TPR) pairs for "member if score >= t", t over (at most ``max_points``) observed scores,
    from (0, 0) to (1, 1): enough to draw the curve, small enough for the JSON report."""
    pos, neg = member_scores.double().flatten(), nonmember_scores.double().flatten()
    thresholds = torch.unique(torch.cat([pos, neg]), sorted=True).flip(0)
    if thresholds.numel() > max_points:
        thresholds = thresholds[torch.linspace(0, thresholds.numel() - 1, max_points).round().long()]
    points = [[0.0, 0.0]]
    for t in thresholds.tolist():
        points.append([round(float((neg >= t).double().mean()), 4), round(float((pos >= t).double().mean()), 4)])
    points.append([1.0, 1.0])
    return points


def min_nonmembers_for(fpr: float) -> int:
    """Non-members needed for one false positive to be allowed at ``fpr``."""
    return math.ceil(1.0 / fpr - 1e-9)


# --------------------------------------------------------------------------- scores


def _margin(logits: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """log(sum_{j != c} exp(z_j - z_c)): cross-entropy at class c is softplus of it. Working in
    this form keeps near-certain predictions from rounding to loss 0 / confidence 1 and tying."""
    picked = logits.gather(1, column[:, None])
    others = logits.scatter(1, column[:, None], float("-inf"))
    return torch.logsumexp(others - picked, dim=1)


def _modified_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Song & Mittal's Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)."""
    margin = _margin(logits, labels)
    true_term = torch.sigmoid(margin) * -F.softplus(margin)  # (1 - p_y) * log p_y
    log_p = torch.log_softmax(logits, dim=1)
    log_not_p = torch.log(-torch.expm1(log_p)).clamp(min=LOG_FLOOR)  # log(1 - p_i)
    wrong = log_p.exp() * log_not_p
    wrong_term = wrong.sum(1) - wrong.gather(1, labels[:, None]).squeeze(1)
    return -(true_term + wrong_term)


def attack_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-attack membership scores (higher = more likely a member), in float64. Each is a
    strictly monotone transform of its named statistic, which leaves AUC and TPR unchanged."""
    logits = logits.double()
    log_p = torch.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(1)
    return {
        "loss": -F.softplus(_margin(logits, labels)),  # -CE(z, y)
        "confidence": -_margin(logits, logits.argmax(1)),  # max p = sigmoid(-margin at argmax)
        "entropy": -entropy,
        "modified_entropy": -_modified_entropy(logits, labels),
    }


@torch.no_grad()
def _logits(classifier: nn.Module, data: ImageSet, batch_size: int, device: torch.device,
            ) -> torch.Tensor:
    return Predictor(classifier, device, batch_size).logits(data.images)


# --------------------------------------------------------------------------- inputs


def image_hashes(data: ImageSet) -> list[str]:
    """sha256 of each image's uint8 pixels: the identity used to detect member overlap."""
    pixels = data.images.contiguous().numpy()
    return [hashlib.sha256(image.tobytes()).hexdigest() for image in pixels]


def check_disjoint(members: ImageSet, nonmembers: ImageSet) -> None:
    """Refuse member/non-member sets that share images: a shared image would count as both."""
    shared = set(image_hashes(members)) & set(image_hashes(nonmembers))
    if shared:
        raise MembershipError(
            f"{len(shared)} image(s) appear among both the members and the non-members "
            "(same pixels); non-members must be images the model was never trained on")


def _balance(members: ImageSet, nonmembers: ImageSet, seed: int) -> tuple[ImageSet, ImageSet]:
    """Subsample the larger side (seeded) so AUC and TPR are not skewed by the class prior."""
    size = min(len(members), len(nonmembers))
    gen = torch.Generator().manual_seed(seed)

    def take(data: ImageSet) -> ImageSet:
        if len(data) == size:
            return data
        return data.subset(torch.randperm(len(data), generator=gen)[:size].sort().values)

    return take(members), take(nonmembers)


def _check_sizes(members: ImageSet, nonmembers: ImageSet, min_per_side: int) -> None:
    short = [f"{len(d)} {name}" for name, d in (("members", members), ("non-members", nonmembers))
             if len(d) < min_per_side]
    if short:
        raise MembershipError(f"membership inference needs at least {min_per_side} members and "
                              f"{min_per_side} non-members; got {' and '.join(short)}")


# --------------------------------------------------------------------------- results


def _fpr_key(fpr: float) -> str:
    return f"tpr_at_{fpr * 100:g}pct_fpr".replace(".", "_")


@dataclass
class AttackResult:
    """One metric attack's separation of members from non-members."""

    attack: str
    auc: float
    tpr_at_fpr: dict[float, float]
    n_members: int
    n_nonmembers: int
    # FPR points with too few non-members for even one false positive (TPR there is TPR at 0 FPR).
    unreliable_fprs: list[float] = field(default_factory=list)
    roc: list[list[float]] = field(default_factory=list)  # (FPR, TPR) points for plots (schema 1.3)

    @property
    def note(self) -> str | None:
        if not self.unreliable_fprs:
            return None
        points = ", ".join(f"{f * 100:g} %" for f in self.unreliable_fprs)
        need = max(min_nonmembers_for(f) for f in self.unreliable_fprs)
        return (f"only {self.n_nonmembers} non-members: at {points} FPR no false positive is "
                f"allowed, so TPR there is TPR at 0 FPR; {need} non-members are needed")

    def to_dict(self, roc: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"attack": self.attack, "auc": float(self.auc)}
        out.update({_fpr_key(f): float(t) for f, t in self.tpr_at_fpr.items()})
        out.update(n_members=self.n_members, n_nonmembers=self.n_nonmembers,
                   low_fpr_reliable=not self.unreliable_fprs, note=self.note)
        if roc and self.roc:
            out["roc"] = self.roc
        return out


@dataclass
class MIAResult:
    """All attacks on one (model, members, non-members) triple."""

    attacks: dict[str, AttackResult]
    n_members: int
    n_nonmembers: int
    member_accuracy: float
    nonmember_accuracy: float
    seed: int
    # Raw per-attack scores of the balanced sets, for ROC plots; not serialised.
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def best(self) -> AttackResult:
        """The attack with the highest AUC (ties: the first in ``ATTACKS`` order)."""
        return max(self.attacks.values(), key=lambda a: a.auc)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "member_accuracy": float(self.member_accuracy),
            "nonmember_accuracy": float(self.nonmember_accuracy),
            "generalization_gap": float(self.member_accuracy - self.nonmember_accuracy),
            "seed": self.seed,
            "best_attack": self.best.attack,
            "best_auc": float(self.best.auc),
            # ROC points for the best attack only: what the HTML report plots, at a tenth of the size.
            "attacks": {name: result.to_dict(roc=result is self.best) for name, result in self.attacks.items()},
        }


def _attack_result(name: str, pos: torch.Tensor, neg: torch.Tensor) -> AttackResult:
    return AttackResult(
        attack=name, auc=roc_auc(pos, neg),
        tpr_at_fpr={f: tpr_at_fpr(pos, neg, f) for f in FPR_POINTS},
        n_members=pos.numel(), n_nonmembers=neg.numel(),
        unreliable_fprs=[f for f in FPR_POINTS if neg.numel() < min_nonmembers_for(f)],
        roc=roc_points(pos, neg))


# --------------------------------------------------------------------------- entry point


def _accuracy(logits: torch.Tensor, data: ImageSet) -> float:
    return float((logits.argmax(1) == data.labels).float().mean())


def membership_inference(classifier: nn.Module, members: ImageSet, nonmembers: ImageSet, *,
                         device: torch.device | str, batch_size: int = 256, seed: int = 0,
                         min_per_side: int = 50) -> MIAResult:
    """Run the four metric attacks on ``classifier`` (taking [0, 1] images, e.g.
    ``LoadedModel.classifier()``): ``members`` were in its training data, ``nonmembers`` come
    from the same distribution but were not."""
    _check_sizes(members, nonmembers, min_per_side)
    check_disjoint(members, nonmembers)
    members, nonmembers = _balance(members, nonmembers, seed)
    device = torch.device(device)
    outputs = []
    for data in (members, nonmembers):
        logits = _logits(classifier, data, batch_size, device)
        if int(data.labels.max()) >= logits.shape[1]:
            raise MembershipError(f"labels go up to {int(data.labels.max())} but the model has "
                                  f"{logits.shape[1]} outputs; the data's classes do not match")
        outputs.append((logits, attack_scores(logits, data.labels)))
    (member_logits, member_scores), (other_logits, other_scores) = outputs
    scores = {name: (member_scores[name], other_scores[name]) for name in ATTACKS}
    return MIAResult(
        attacks={name: _attack_result(name, *scores[name]) for name in ATTACKS},
        n_members=len(members), n_nonmembers=len(nonmembers),
        member_accuracy=_accuracy(member_logits, members),
        nonmember_accuracy=_accuracy(other_logits, nonmembers),
        seed=seed, scores=scores)


def compare(before: MIAResult, after: MIAResult) -> dict[str, Any]:
    """Per-attack change from ``before`` to ``after`` (e.g. before and after SFT): the sequela
    Sha et al. measure. Negative deltas mean the model leaks less membership."""
    per_attack = {}
    for name in ATTACKS:
        old, new = before.attacks[name], after.attacks[name]
        row = {"auc_before": float(old.auc), "auc_after": float(new.auc),
               "auc_delta": float(new.auc - old.auc)}
        for fpr in FPR_POINTS:
            key = _fpr_key(fpr)
            row[f"{key}_before"] = float(old.tpr_at_fpr[fpr])
            row[f"{key}_after"] = float(new.tpr_at_fpr[fpr])
            row[f"{key}_delta"] = float(new.tpr_at_fpr[fpr] - old.tpr_at_fpr[fpr])
        per_attack[name] = row
    return {
        "best_before": before.best.attack, "best_auc_before": float(before.best.auc),
        "best_after": after.best.attack, "best_auc_after": float(after.best.auc),
        "best_auc_delta": float(after.best.auc - before.best.auc),
        "gap_before": float(before.member_accuracy - before.nonmember_accuracy),
        "gap_after": float(after.member_accuracy - after.nonmember_accuracy),
        "attacks": per_attack,
    }
