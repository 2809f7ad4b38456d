"""Unknown-trigger detection, on by default in ``scan`` and ``clean``: triggers no library holds.

Three families, because each is blind where another sees:

- ``patch``: Neural Cleanse's mask + pattern (``inversion._invert_group``) — the smallest *region*
  that sends clean images to a class. Finds BadNets-like patches of any pattern, size or position;
  blind to triggers spread over the whole image (blends, warps, colour shifts, frequency patterns).
- ``perturbation``: a universal additive perturbation ``x' = clip(x + delta)`` per class, with the
  same adaptive-cost search on its L2 norm — the smallest *whole-image* change that sends clean
  images to a class. A blend ``(1 - a) x + a p`` is ``x + a (p - x)``: nearly universal for small
  ``a``; a frequency pattern is an additive change outright. (BTI-DBF, UNICORN and FeatureRE reach
  the same conclusion — invert in a space that is not a pixel mask — with generators and feature
  spaces; a universal perturbation is the cheapest member of that family and what a CPU affords.)
- ``transform``: no optimisation; a fixed grid of mild affine and colour transforms
  (``TRANSFORM_GRID``) is tried on 256 clean images, and a class that one of them sends >= 80 % of
  other classes' images to is flagged. A contrast/brightness filter is large in L2 (0.3 on every
  pixel) and invisible to ``perturbation``; brightening only makes *suspects* (see
  ``_search_transforms``).

``patch`` and ``perturbation`` score every candidate class by its trigger's size and flag outliers
with Neural Cleanse's MAD rule on log sizes (``inversion.score_classes``), below the median and
above ``patch_threshold`` (7) / ``perturbation_threshold`` (4) — above NC's 2 because the budget is
short and two rules run: on MNIST's clean models the naturally easy class 8 reaches 6.4 and 3.8
(benchmarks/README.md, "Blind generalisation"). A class is flagged when any family flags it.

Cost is bounded, not linear in the number of classes: with more than ``max_candidates`` classes a
class-count-independent pre-screen — one *untargeted* universal perturbation, optimised to push
clean images away from their labels — ranks classes by how many images it sends to each (a
backdoor is the shortcut such a perturbation finds, the observation behind K-Arm's bandit allocation
and universal-perturbation screens); the ``max_candidates // 2`` top classes and evenly spread
others (the reference the MAD rule needs) are inverted. With ``max_candidates`` classes or fewer
all are inverted. Each optimising family's budget is ``steps`` mini-batches of ``batch_size`` per
class (40 x 16: a fifth of ``--invert``'s 100 x 32, so both together cost 40 % of its image passes).

What it cannot see (documented in README "Residual risk"): sample-specific triggers (a different
trigger per image, e.g. Input-aware, ISSBA), warps whose universal additive equivalent is large,
triggers that need more than one class pair (source-specific backdoors), and backdoors whose
trigger is larger than the natural margin of some clean class.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import ImageSet, to_float
from bdaudit.core.errors import BdauditError
from bdaudit.detect.inversion import InversionSettings, InvertedTrigger, _CostSchedule, _invert_group, score_classes
from bdaudit.triggers.base import Trigger

FAMILIES = ("patch", "perturbation", "transform")
DETECT_MODES = ("auto", "on", "off")  # auto: on unless specific --trigger/--triggers were asked for


def detector_enabled(mode: str, explicit_triggers: bool) -> bool:
    if mode not in DETECT_MODES:
        raise BdauditError(f"--detect must be one of {', '.join(DETECT_MODES)}, not '{mode}'")
    return mode == "on" or (mode == "auto" and not explicit_triggers)


@dataclass(frozen=True)
class DetectSettings:
    """Budget and rule of the default detector (measured on CPU; benchmarks/README.md)."""

    steps: int = 40  # mini-batches per class and family (the screen)
    # An unconverged 40-step inversion is noisy: clean models' classes reach log anomaly indices of
    # 3-4 on it, and a backdoored tutorial-style MNIST net (4x4 checkerboard, 100 % ASR) only 3.5-5.7,
    # below the gates. At 120 steps the clean models measured fall to <= 2.5 and that backdoor rises
    # to 6-8. So a screen whose top class is ambiguous (index above Neural Cleanse's own 2, nothing
    # flagged) is refined at ``refine_steps`` and judged on the refined sizes.
    refine_steps: int = 120
    refine_above: float = 2.0
    batch_size: int = 16
    lr: float = 0.3  # Adam, as NC's fast setting in inversion.py
    perturbation_lr: float = 0.05
    max_candidates: int = 10  # classes inverted at most (cost bound)
    prescreen_steps: int = 30
    prescreen_eps: float = 0.3  # L-inf bound of the untargeted pre-screen perturbation
    patch_threshold: float = 7.0
    perturbation_threshold: float = 4.0
    transform_images: int = 256  # clean images each grid transform is tried on
    transform_asr: float = 0.8  # a grid transform sending this share of other classes' images to one class
    families: tuple[str, ...] = FAMILIES

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_candidates < 3 or self.prescreen_steps < 1:
            raise BdauditError("detector steps, batch size and pre-screen steps must be >= 1 and "
                               "max_candidates >= 3")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise BdauditError(f"detector families must be among {', '.join(FAMILIES)}, not {unknown}")


@dataclass(frozen=True, eq=False)
class PerturbationTrigger(Trigger):
    """A reversed whole-image trigger: ``clip(x + delta)``; ``null`` adds seeded noise of the same
    L2 norm (the same amount of change, no direction)."""

    name = "inverted_perturbation"
    paper = "bdaudit unknown-trigger detector (universal perturbation inversion)"
    summary = "whole-image perturbation reversed by bdaudit's detector"
    in_default_library = False

    delta: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, 1))  # (C, H, W)
    target_class: int = -1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta.to(x.device, x.dtype)).clamp(0, 1)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1234)
        noise = torch.randn(tuple(self.delta.shape), generator=gen)
        noise = noise * (self.delta.norm() / noise.norm().clamp_min(1e-12))
        return (x + noise.to(x.device, x.dtype)).clamp(0, 1)

    def spec(self) -> str:
        return f"{self.name}:target={self.target_class},l2={float(self.delta.norm()):.2f}"


def _intensity(x: torch.Tensor, gain: tuple[float, ...], bias: float) -> torch.Tensor:
    g = torch.tensor(gain, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * (g if x.shape[1] == len(gain) else g.mean()) + bias).clamp(0, 1)


def _geometric(x: torch.Tensor, degrees: float, scale: float, shift: tuple[float, float]) -> torch.Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a) / scale, -math.sin(a) / scale, shift[0]],
                          [math.sin(a) / scale, math.cos(a) / scale, shift[1]]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


# Whole-image transforms a colour-filter or geometric trigger may be (or be near): few parameters,
# so no class is "reachable" by one of them unless the model learnt it as a shortcut. Mild enough that
# a clean model keeps most of its accuracy (contrast at least 0.5, rotations at most 25 degrees).
TRANSFORM_GRID: tuple[tuple[str, tuple[Any, ...]], ...] = (
    # Strokes stay at >= 0.75 brightness: dimmer, a digit fades into its background and a clean model
    # answers "blank" with one class (measured: 94 % to '1' at gain 0.5, bias -0.2).
    *(("intensity", ((g, g, g), b)) for g in (0.5, 0.7, 0.85) for b in (-0.1, 0.1, 0.25, 0.4)
      if 0.75 <= g + b <= 1.25),
    *(("intensity", (gain, 0.0)) for gain in ((1.0, 0.8, 0.6), (0.6, 0.8, 1.0), (1.0, 0.6, 1.0), (0.7, 1.0, 0.7))),
    *(("geometric", (d, 1.0, (0.0, 0.0))) for d in (-25, -15, 15, 25)),
    *(("geometric", (d, 1.0, (0.1, -0.1))) for d in (-15, 15)),
    *(("geometric", (0, s, (0.0, 0.0))) for s in (0.8, 1.2)),
    *(("geometric", (0, 1.0, sh)) for sh in ((0.15, 0.0), (-0.15, 0.0), (0.0, 0.15), (0.0, -0.15))),
)


@dataclass(frozen=True, eq=False)
class TransformTrigger(Trigger):
    """A whole-image transform from ``TRANSFORM_GRID`` that sends clean images to one class; ``null``
    is seeded noise of the same mean L2 change (as much change, no structure)."""

    name = "inverted_transform"
    paper = "bdaudit unknown-trigger detector (transform-family search)"
    summary = "intensity/colour filter or affine transform that acts as a trigger"
    in_default_library = False

    kind: str = "intensity"
    params_: tuple[Any, ...] = ()
    target_class: int = -1

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return _intensity(x, *self.params_) if self.kind == "intensity" else _geometric(x, *self.params_)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        change = (self.apply(x) - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1234)).to(x.device, x.dtype)
        noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
        return (x + noise * change).clamp(0, 1)

    @property
    def gating(self) -> bool:
        return not (self.kind == "intensity" and self.params_[1] > 0)

    def spec(self) -> str:
        return f"{self.name}:target={self.target_class},{self.kind}={self.params_}"


@torch.no_grad()
def _search_transforms(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       s: DetectSettings, device: torch.device, gen: torch.Generator) -> FamilyResult:
    """Try each grid transform on a sample of clean images; per class, the transform that sends the
    largest share of other classes' images to it.

    Geometric and pure-gain transforms gate (flagged). Brightening transforms (a positive bias) only
    make *suspects*: a weak clean model can answer every brightened image with one class (measured:
    the tests' under-trained tiny CNN sends 99 % to '0' at +0.2), exactly as a filter backdoor does,
    so they cannot gate without false alarms. ``clean`` still probes and unlearns suspects (tuning on
    brightened images with their true labels costs a clean model nothing); README "Residual risk".
    """
    started = time.perf_counter()
    pick = torch.randperm(len(images), generator=gen)[:s.transform_images]
    x_all, y_all = to_float(images[pick], device), labels[pick]
    best = [0.0] * num_classes
    found: dict[int, TransformTrigger] = {}
    for kind, params in TRANSFORM_GRID:
        trig = TransformTrigger(kind=kind, params_=params)
        preds = torch.cat([classifier(trig.apply(x_all[i:i + 256])).argmax(1).cpu()
                           for i in range(0, len(x_all), 256)])
        for c in range(num_classes):
            keep = y_all != c
            rate = float((preds[keep] == c).float().mean()) if keep.any() else 0.0
            gating = not (kind == "intensity" and params[1] > 0)
            # A gating transform wins ties: it decides whether the class is flagged.
            if rate > best[c] or (rate == best[c] and gating and c in found and not found[c].gating):
                best[c] = rate
                found[c] = TransformTrigger(kind=kind, params_=params, target_class=c)
    classes = list(range(num_classes))
    over = [c for c in classes if best[c] >= s.transform_asr]
    flagged = [c for c in over if found[c].gating]
    return FamilyResult(family="transform", classes=classes, sizes=[1 - b for b in best], attack_success=best,
                        anomaly_index=[float("nan")] * num_classes, flagged=flagged,
                        triggers={c: found[c] for c in over}, seconds=time.perf_counter() - started,
                        suspects=[c for c in over if c not in flagged])


@dataclass
class FamilyResult:
    family: str
    classes: list[int]
    sizes: list[float]
    attack_success: list[float]
    anomaly_index: list[float]
    flagged: list[int]
    triggers: dict[int, Trigger]
    seconds: float
    suspects: list[int] = field(default_factory=list)  # over the line but not gating (transform family)

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        rows = [{"class": c, "name": class_names[c] if c < len(class_names) else str(c),
                 "size": round(s, 4), "attack_success": round(a, 4),
                 "anomaly_index": _finite(i), "flagged": c in self.flagged,
                 **({"transform": self.triggers[c].spec().split(",", 1)[1]} if c in self.triggers
                    and isinstance(self.triggers[c], TransformTrigger) else {})}
                for c, s, a, i in zip(self.classes, self.sizes, self.attack_success, self.anomaly_index,
                                      strict=True)]
        median = sorted(self.sizes)[len(self.sizes) // 2] if self.sizes else None
        unit = {"patch": "mask L1 (pixels)", "perturbation": "L2 norm",
                "transform": "1 - best share of other classes' images sent to the class by a grid transform"}
        return {"family": self.family, "size_unit": unit[self.family], "suspects": list(self.suspects),
                "median_size": None if median is None else round(median, 4), "flagged": list(self.flagged),
                "classes": rows, "seconds": round(self.seconds, 3)}


@dataclass
class DetectResult:
    settings: DetectSettings
    seed: int
    num_classes: int
    candidates: list[int]
    prescreen: dict[str, Any] | None
    families: list[FamilyResult]
    n_images: int
    seconds: float
    class_names: tuple[str, ...] = ()
    refined: dict[str, Any] | None = None  # the screen's top indices when it was ambiguous and refined

    @property
    def flagged(self) -> list[int]:
        return sorted({c for f in self.families for c in f.flagged})

    def flagged_triggers(self) -> list[Trigger]:
        return [f.triggers[c] for f in self.families for c in f.flagged]

    def unlearn_triggers(self) -> list[Trigger]:
        """What ``clean`` probes and (if the probe confirms) unlearns: flagged triggers and suspects."""
        return self.flagged_triggers() + [f.triggers[c] for f in self.families for c in f.suspects]

    def to_dict(self) -> dict[str, Any]:
        names = self.class_names
        return {"method": "bdaudit_detect", "settings": {**asdict(self.settings),
                                                         "families": list(self.settings.families)},
                "seed": self.seed, "n_images": self.n_images, "num_classes": self.num_classes,
                "candidates": list(self.candidates), "all_classes_inverted": len(self.candidates) == self.num_classes,
                "prescreen": self.prescreen, "refined": self.refined,
                "families": [f.to_dict(names) for f in self.families],
                "flagged": self.flagged,
                "flagged_names": [names[c] if c < len(names) else str(c) for c in self.flagged],
                "seconds": round(self.seconds, 3)}


def _finite(value: float) -> float | None:
    return round(value, 4) if value == value and abs(value) != float("inf") else None


def _prescreen(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               s: DetectSettings, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Share of clean images an untargeted universal perturbation sends to each class (cost
    independent of the number of classes)."""
    _, c, h, w = images.shape
    delta = torch.zeros(1, c, h, w, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=s.prescreen_eps / 5)
    for _ in range(s.prescreen_steps):
        index = torch.randint(0, len(images), (32,), generator=gen)
        x, y = to_float(images[index], device), labels[index].to(device)
        loss = -F.cross_entropy(classifier((x + delta).clamp(0, 1)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(-s.prescreen_eps, s.prescreen_eps)
    counts = torch.zeros(num_classes)
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = to_float(images[start:start + 256], device)
            pred = classifier((x + delta).clamp(0, 1)).argmax(1).cpu()
            moved = pred != labels[start:start + 256]
            counts += torch.bincount(pred[moved], minlength=num_classes).float()
    return counts / max(len(images), 1)


def choose_candidates(shares: torch.Tensor, k: int) -> list[int]:
    """The ``k // 2`` classes the pre-screen favours most, plus evenly spread others as the MAD
    rule's reference (a rule over suspects alone would have no normal to compare with)."""
    order = shares.argsort(descending=True).tolist()
    top = order[:k // 2]
    rest = order[k // 2:]
    need = k - len(top)
    picks = [rest[round(i * (len(rest) - 1) / max(need - 1, 1))] for i in range(need)] if need else []
    return sorted(set(top) | set(picks))


def _invert_perturbation(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: list[int],
                         s: DetectSettings, device: torch.device, gen: torch.Generator,
                         ) -> tuple[torch.Tensor, list[float]]:
    """Smallest-L2 universal additive perturbation per target (NC's adaptive cost on the norm)."""
    k = len(targets)
    _, c, h, w = images.shape
    delta = (0.01 * torch.randn(k, c, h, w, generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=s.perturbation_lr, betas=(0.5, 0.9))
    nc = InversionSettings(steps=s.steps, batch_size=s.batch_size, init_cost=1e-2, patience=2, check_every=5)
    schedule = _CostSchedule(k, nc)
    target_t = torch.tensor(targets, device=device)
    best = torch.full((k,), float("inf"))
    best_delta = delta.detach().cpu().clone()
    hits = torch.zeros(k, device=device)
    counted = torch.zeros(k, device=device)
    for step in range(s.steps):
        index = torch.randint(0, len(images), (s.batch_size,), generator=gen)
        x, y = to_float(images[index], device), labels[index].to(device)
        stamped = (x[None] + delta[:, None]).clamp(0, 1).flatten(0, 1)
        logits = classifier(stamped.contiguous(memory_format=torch.channels_last)).view(k, len(index), -1)
        keep = (y[None] != target_t[:, None]).float()
        ce = F.cross_entropy(logits.flatten(0, 1), target_t.repeat_interleave(len(index)),
                             reduction="none").view(k, -1)
        ce = (ce * keep).sum(1) / keep.sum(1).clamp_min(1)
        norms = delta.flatten(1).norm(dim=1)
        loss = (ce + torch.tensor(schedule.cost, device=device) * norms).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            hits += ((logits.argmax(-1) == target_t[:, None]).float() * keep).sum(1)
            counted += keep.sum(1)
        if (step + 1) % nc.check_every == 0 or step + 1 == s.steps:
            success = (hits / counted.clamp_min(1)).cpu()
            n = norms.detach().cpu()
            better = (success >= nc.success_threshold) & (n < best)
            if better.any():
                best = torch.where(better, n, best)
                best_delta[better] = delta.detach().cpu()[better]
            schedule.update(success.tolist())
            hits.zero_()
            counted.zero_()
    never = torch.isinf(best)
    if never.any():
        best_delta[never] = delta.detach().cpu()[never]
    return best_delta, list(schedule.cost)


@torch.no_grad()
def _success(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, target: int,
             device: torch.device) -> float:
    keep = labels != target
    x_all = images[keep]
    if len(x_all) == 0:
        return float("nan")
    hits = 0
    for start in range(0, len(x_all), 256):
        x = to_float(x_all[start:start + 256], device)
        hits += int((classifier(trigger.apply(x)).argmax(1) == target).sum())
    return hits / len(x_all)


def detect_unknown(classifier: nn.Module, images: ImageSet, *, device: torch.device | str = "cpu", seed: int = 0,
                   settings: DetectSettings | None = None) -> DetectResult:
    """Invert both families for the candidate classes and flag outliers (module docstring)."""
    s = settings or DetectSettings()
    device = torch.device(device)
    if len(images) == 0:
        raise BdauditError("unknown-trigger detection needs clean images; the data is empty")
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    num_classes = images.num_classes
    was_training = classifier.training
    classifier.to(device, memory_format=torch.channels_last).eval()
    grads = [p.requires_grad for p in classifier.parameters()]
    for p in classifier.parameters():
        p.requires_grad_(False)
    prescreen = None
    families: list[FamilyResult] = []
    try:
        if num_classes > s.max_candidates:
            t0 = time.perf_counter()
            shares = _prescreen(classifier, images.images, images.labels, num_classes, s, device, gen)
            candidates = choose_candidates(shares, s.max_candidates)
            top = shares.argsort(descending=True)[:5].tolist()
            prescreen = {"method": "untargeted universal perturbation", "steps": s.prescreen_steps,
                         "eps": s.prescreen_eps, "top_classes": top,
                         "top_shares": [round(float(shares[c]), 4) for c in top],
                         "seconds": round(time.perf_counter() - t0, 3)}
        else:
            candidates = list(range(num_classes))
        families = _invert_families(classifier, images, candidates, s, s.steps, device, gen)
        refined = None
        top = _top_index(families)
        if not any(f.flagged for f in families) and top > s.refine_above:
            refined = {"screen_steps": s.steps, "screen_top_index": round(top, 4), "steps": s.refine_steps,
                       "screen_seconds": round(time.perf_counter() - started, 3)}
            families = _invert_families(classifier, images, candidates, s, s.refine_steps, device, gen)
        if "transform" in s.families:
            families.append(_search_transforms(classifier, images.images, images.labels, num_classes, s, device, gen))
    finally:
        for p, g in zip(classifier.parameters(), grads, strict=True):
            p.requires_grad_(g)
        classifier.train(was_training)
    return DetectResult(settings=s, seed=seed, num_classes=num_classes, candidates=candidates, prescreen=prescreen,
                        families=families, n_images=len(images), seconds=time.perf_counter() - started,
                        class_names=tuple(images.class_names), refined=refined)


def _invert_families(classifier: nn.Module, images: ImageSet, candidates: list[int], s: DetectSettings, steps: int,
                     device: torch.device, gen: torch.Generator) -> list[FamilyResult]:
    """The patch and perturbation inversions at ``steps`` mini-batches per class."""
    families: list[FamilyResult] = []
    if "patch" in s.families:
        t0 = time.perf_counter()
        nc = InversionSettings(steps=steps, batch_size=s.batch_size, lr=s.lr, class_group=len(candidates))
        masks, patterns, _ = _invert_group(classifier, images.images, images.labels, candidates, nc, device, gen)
        triggers: dict[int, Trigger] = {c: InvertedTrigger(mask=masks[i].clone(), pattern=patterns[i].clone(),
                                                           target_class=c) for i, c in enumerate(candidates)}
        sizes = masks.flatten(1).sum(1).tolist()
        families.append(_score("patch", candidates, sizes, triggers, classifier, images, device, s, t0))
    if "perturbation" in s.families:
        t0 = time.perf_counter()
        deltas, _ = _invert_perturbation(classifier, images.images, images.labels, candidates,
                                         dataclasses.replace(s, steps=steps), device, gen)
        triggers = {c: PerturbationTrigger(delta=deltas[i].clone(), target_class=c) for i, c in enumerate(candidates)}
        sizes = deltas.flatten(1).norm(dim=1).tolist()
        families.append(_score("perturbation", candidates, sizes, triggers, classifier, images, device, s, t0))
    return families


def _top_index(families: Sequence[FamilyResult]) -> float:
    """The largest anomaly index of a below-median class (the rule only flags those)."""
    top = 0.0
    for fam in families:
        median = sorted(fam.sizes)[len(fam.sizes) // 2] if fam.sizes else 0.0
        top = max([top, *(i for size, i in zip(fam.sizes, fam.anomaly_index, strict=True)
                          if size < median and i == i and i != float("inf"))])
    return top


def _score(family: str, classes: list[int], sizes: list[float], triggers: dict[int, Trigger], classifier: nn.Module,
           images: ImageSet, device: torch.device, s: DetectSettings, t0: float) -> FamilyResult:
    # The success check only screens out triggers that never worked (>= 0.5 below): 256 images
    # measure that to +-6 points, at a third of the cost of the whole tuning set on the sample model.
    probe = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:256]
    success = [_success(classifier, images.images[probe], images.labels[probe], triggers[c], c, device)
               for c in classes]
    # A trigger that never reached the success threshold is no evidence of a shortcut: score it at
    # its size but never flag it (its "small size" only says the optimiser gave up).
    threshold = s.patch_threshold if family == "patch" else s.perturbation_threshold
    index, flagged = score_classes(classes, sizes, "log", threshold)
    flagged = [c for c in flagged if success[classes.index(c)] >= 0.5]
    return FamilyResult(family=family, classes=classes, sizes=sizes, attack_success=success,
                        anomaly_index=index.tolist(), flagged=flagged, triggers=triggers,
                        seconds=time.perf_counter() - t0)


def detect_reasons(summary: dict[str, Any], when: str = "") -> list[str]:
    """Gate lines: one per flagged class and family."""
    lines = []
    for fam in summary["families"]:
        for row in fam["classes"]:
            if not row["flagged"]:
                continue
            if fam["family"] == "transform":
                lines.append(f"unknown-trigger detector{when}: a whole-image {row.get('transform', 'transform')} "
                             f"sends {row['attack_success']:.0%} of other classes' clean images to class "
                             f"{row['name']!r} — a likely colour-filter or geometric trigger")
                continue
            lines.append(f"unknown-trigger detector{when}: class {row['name']!r} is reached with a "
                         f"{fam['family']} trigger of {fam['size_unit']} {row['size']:.2f} (median class "
                         f"{fam['median_size']:.2f}; anomaly index {row['anomaly_index']}) — a likely "
                         "backdoor target")
    return lines
