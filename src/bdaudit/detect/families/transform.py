"""``transform``: no optimisation; a fixed grid of mild affine and colour transforms
(``TRANSFORM_GRID``; on colour images also the standard channel-mixing photo filters: greyscale,
oversaturation, sepia, hue rotations) is tried on ``transform_images`` (128) clean images, and a class
that a geometric, gain or channel-mixing transform sends >= ``transform_gate_asr`` (60 %) of other
classes' images to is flagged; a
brightening one that sends >= ``transform_asr`` (80 %) makes a *suspect* (see ``TransformFamily.run``).
Each transform is screened on half of the images; the other half is tried only where a class could
still reach its threshold. A contrast/brightness or colour filter is large in L2 (0.3 on every
pixel) and invisible to ``perturbation``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from bdaudit.core.data import to_float
from bdaudit.detect.families.base import DetectorFamily, FamilyJob, FamilyResult
from bdaudit.triggers.base import Trigger


def _intensity(x: torch.Tensor, gain: tuple[float, ...], bias: float) -> torch.Tensor:
    g = torch.tensor(gain, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * (g if x.shape[1] == len(gain) else g.mean()) + bias).clamp(0, 1)


# W3C Filter Effects' colour matrices (the CSS ``saturate``, ``sepia`` and ``hue-rotate`` filters): the
# standard photo filters, each a 3x3 mix of the RGB channels that no per-channel gain can express.
_LUMA = torch.tensor([0.213, 0.715, 0.072])
_SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])


def mix_matrix(name: str, amount: float) -> torch.Tensor:
    """The (3, 3) matrix of a named channel-mixing filter: ``saturate`` (0 is greyscale), ``sepia``
    (0 to 1) or ``hue`` (degrees)."""
    grey = _LUMA.expand(3, 3)
    if name == "saturate":
        return grey + amount * (torch.eye(3) - grey)
    if name == "sepia":
        return (1 - amount) * torch.eye(3) + amount * _SEPIA
    if name == "hue":
        a = math.radians(amount)
        rot = torch.tensor([[0.787, -0.715, -0.072], [-0.213, 0.285, -0.072], [-0.213, -0.715, 0.928]])
        sin = torch.tensor([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])
        return grey + math.cos(a) * rot + math.sin(a) * sin
    raise ValueError(f"unknown colour mix {name!r}")


def _mix(x: torch.Tensor, name: str, amount: float) -> torch.Tensor:
    m = mix_matrix(name, amount).to(x.device, x.dtype)
    return torch.einsum("oc,bchw->bohw", m, x).clamp(0, 1)


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
    # Channel mixes (RGB only): greyscale, oversaturation, sepia, hue rotations of a sixth of the
    # colour wheel (not half: red skin turned blue is no longer a mild change of a natural image).
    *(("mix", p) for p in (("saturate", 0.0), ("saturate", 2.0), ("sepia", 1.0), ("sepia", 0.5),
                           ("hue", 60.0), ("hue", -60.0))),
)


def is_colour(x: torch.Tensor) -> bool:
    """Whether float images (N, C, H, W) have colour: three channels that differ somewhere (greyscale
    photos stored as RGB have none for a channel mix to mix)."""
    return x.shape[1] == 3 and bool((x.amax(1) - x.amin(1)).amax() > 2 / 255)


def distinct_transforms(channels: int, colour: bool | None = None) -> list[tuple[str, tuple[Any, ...]]]:
    """``TRANSFORM_GRID`` less the entries that act alike on images of ``channels`` (on greyscale a
    colour gain is its mean gain, so four colour filters are two) and the channel mixes unless the
    images are ``colour`` (default: three channels). On grey pixels a mix is the identity or, for
    sepia, a brightening, which clean models answer with one class (README "Residual risk")."""
    colour = channels == 3 if colour is None else colour
    seen, kept = set(), []
    for kind, params in TRANSFORM_GRID:
        if kind == "mix" and not (colour and channels == 3):
            continue
        key: tuple[Any, ...] = (kind, params)
        if kind == "intensity" and len(params[0]) != channels:
            key = (kind, round(sum(params[0]) / len(params[0]), 6), params[1])
        if key not in seen:
            seen.add(key)
            kept.append((kind, params))
    return kept


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
        if self.kind == "mix":
            return _mix(x, *self.params_)
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


class TransformFamily(DetectorFamily):
    name: ClassVar[str] = "transform"
    size_unit: ClassVar[str] = "1 - best share of other classes' images sent to the class by a grid transform"
    per_candidate: ClassVar[bool] = False

    @staticmethod
    def _sent(classifier: torch.nn.Module, trig: TransformTrigger, x: torch.Tensor, y: torch.Tensor,
              num_classes: int) -> torch.Tensor:
        """Per class, how many of ``x`` not labelled it the transform sends to it."""
        preds = torch.cat([classifier(trig.apply(x[i:i + 256])).argmax(1).cpu() for i in range(0, len(x), 256)])
        moved = preds[preds != y]
        return torch.bincount(moved, minlength=num_classes)[:num_classes].float()

    @torch.no_grad()
    def run(self, job: FamilyJob) -> FamilyResult:
        """Try each grid transform on a sample of clean images; per class, the transform that sends the
        largest share of other classes' images to it.

        Geometric, pure-gain and channel-mixing transforms gate (flagged at ``transform_gate_asr``): no
        clean model answers them with one class (measured: at most 0.13 on 25 clean MNIST and colour
        models of two architectures, 0.41 on a CNN trained on only 1,000 digits; the colour benchmark's
        warm tint, a gain and lift off the grid, 0.75; channel mixes on 7 clean colour models: at most
        0.04). Brightening transforms (a positive bias) only make *suspects* (at ``transform_asr``):
        clean models answer every brightened image with one class too, exactly as a filter backdoor does
        (a washed-out digit reads as '0' or '8'; benchmarks/brightening_study.py: no statistic of the
        response separated them), so they cannot gate without false alarms. ``clean`` still probes and
        unlearns suspects (tuning on brightened images with their true labels costs a clean model
        nothing); README "Residual risk".
        """
        started = time.perf_counter()
        s, classifier, num_classes = job.settings, job.classifier, len(job.classes)
        images, labels = job.images.images, job.images.labels
        pick = torch.randperm(len(images), generator=job.gen)[:s.transform_images]
        x_all, y_all = to_float(images[pick], job.device), labels[pick]
        # Every transform is screened on the first half; only a (transform, class) pair that could still
        # reach ``transform_asr`` on all images (the other half all sent there) is tried on the second:
        # the same flags and suspects as trying everything on every image, at about half the cost.
        half = (len(x_all) + 1) // 2
        classes_t = torch.arange(num_classes)
        eligible = [(y_all[:half, None] != classes_t).sum(0), (y_all[half:, None] != classes_t).sum(0)]
        # Per class, the best gating and the best brightening transform apart: each has its own threshold.
        best = {True: [0.0] * num_classes, False: [0.0] * num_classes}
        found: dict[bool, dict[int, TransformTrigger]] = {True: {}, False: {}}
        for kind, params in distinct_transforms(x_all.shape[1], is_colour(x_all)):
            trig = TransformTrigger(kind=kind, params_=params)
            gating = trig.gating
            threshold = s.transform_gate_asr if gating else s.transform_asr
            sent = self._sent(classifier, trig, x_all[:half], y_all[:half], num_classes)
            rates = sent / eligible[0].clamp_min(1)
            reach = (sent + eligible[1]) >= threshold * (eligible[0] + eligible[1])
            if bool(reach.any()) and half < len(x_all):
                sent = sent + self._sent(classifier, trig, x_all[half:], y_all[half:], num_classes)
                rates = torch.where(reach, sent / (eligible[0] + eligible[1]).clamp_min(1), rates)
            for c in range(num_classes):
                if float(rates[c]) > best[gating][c]:
                    best[gating][c] = float(rates[c])
                    found[gating][c] = TransformTrigger(kind=kind, params_=params, target_class=c)
        classes = list(range(num_classes))
        flagged = [c for c in classes if best[True][c] >= s.transform_gate_asr]
        suspects = [c for c in classes if c not in flagged and best[False][c] >= s.transform_asr]
        triggers = {**{c: found[False][c] for c in suspects}, **{c: found[True][c] for c in flagged}}
        shares = [max(best[True][c], best[False][c]) for c in classes]
        return FamilyResult(family=self.name, classes=classes, sizes=[1 - b for b in shares], attack_success=shares,
                            anomaly_index=[float("nan")] * num_classes, flagged=flagged,
                            triggers=triggers, seconds=time.perf_counter() - started,
                            suspects=suspects, size_unit=self.size_unit,
                            extras={c: {"transform": t.spec().split(",", 1)[1],
                                        "transform_share": round(best[t.gating][c], 4)} for c, t in triggers.items()})
