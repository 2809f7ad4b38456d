"""``square``: no optimisation; a solid black or white square about a seventh of the image side is
stamped at every position of a grid whose stride is one pixel less than its side (so any patch up to
half its side lies wholly inside one placement), on ``square_images`` (16) clean images. Per class,
the placement that moves the largest share of other classes' images to it is re-measured on up to
``square_confirm`` (256) *other* clean images, and the class is flagged when that share is at least
``square_asr`` (0.5).

Why a family of its own: a tiny solid patch (BadNets' canonical white square, or a 2x2 dot) is what
Neural Cleanse's mask search handles worst. The network learns "a white dot in the margin", so the
mask search spreads the trigger over several look-alike spots and its size looks ordinary (blind
benchmark: a 2x2 white dot with 88 % ASR scored anomaly index 2.7, below the gates). Stamped where it
was planted, a solid square fires at once: 0.83 of other classes' images on the screen, against at
most 0.25 on eight clean MNIST models of three architectures (benchmarks/README.md). Blind to
patterned, blended or non-solid patches (``patch``, ``perturbation``) and to whole-image triggers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from bdaudit.core.data import to_float
from bdaudit.detect.families.base import DetectorFamily, FamilyJob, FamilyResult
from bdaudit.triggers.base import Trigger, seeded_pattern

COLOURS = (("black", 0.0), ("white", 1.0))
_CHUNK = 1024  # stamped images held at once (the search copy runs them in cache-sized pieces)


def square_side(height: int, width: int) -> int:
    return max(2, round(min(height, width) / 7))


def placements(height: int, width: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners on a grid of stride ``side - 1`` that always ends flush with the far edges."""
    stride = max(1, side - 1)

    def axis(n: int) -> list[int]:
        last = n - side
        return sorted({*range(0, last + 1, stride), last})

    return [(i, j) for i in axis(height) for j in axis(width)]


@dataclass(frozen=True, eq=False)
class SquareTrigger(Trigger):
    """A solid square of one grey level at one place; ``null`` fills the same square with seeded noise."""

    name = "square_sweep"
    paper = "bdaudit unknown-trigger detector (solid-square sweep)"
    summary = "solid black or white square at a fixed place that acts as a trigger"
    in_default_library = False

    top: int = 0
    left: int = 0
    side: int = 2
    value: float = 1.0
    target_class: int = -1

    def _fill(self, x: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
        out = x.clone()
        out[..., self.top:self.top + self.side, self.left:self.left + self.side] = fill
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._fill(x, self.value)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        return self._fill(x, seeded_pattern(1234, (x.shape[1], self.side, self.side), x.device).to(x.dtype))

    def describe(self) -> str:
        colour = dict((v, k) for k, v in COLOURS).get(self.value, f"grey {self.value}")
        return f"{colour} {self.side}x{self.side} square at row {self.top}, column {self.left}"

    def spec(self) -> str:
        return f"{self.name}:target={self.target_class},top={self.top},left={self.left},side={self.side}," \
               f"value={self.value}"


def _moved_share(classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor,
                 squares: list[SquareTrigger], num_classes: int) -> torch.Tensor:
    """(placements, classes): share of the images neither labelled nor already predicted as the class
    that the placement sends to it."""
    n = len(x)
    per_chunk = max(1, _CHUNK // max(n, 1))
    preds = []
    for start in range(0, len(squares), per_chunk):
        chunk = squares[start:start + per_chunk]
        stamped = torch.cat([s.apply(x) for s in chunk])
        preds.append(classifier(stamped).argmax(1).cpu().view(len(chunk), n))
    pred = torch.cat(preds)  # (placements, images)
    classes = torch.arange(num_classes)
    eligible = (y[None] != classes[:, None]) & (clean_pred[None] != classes[:, None])  # (classes, images)
    hits = (pred[:, None, :] == classes[None, :, None]) & eligible[None]
    return hits.sum(2).float() / eligible.sum(1).clamp_min(1).float()[None]


class SquareFamily(DetectorFamily):
    name: ClassVar[str] = "square"
    size_unit: ClassVar[str] = "1 - share of other classes' images a solid square moves to the class"
    per_candidate: ClassVar[bool] = False

    @torch.inference_mode()
    def run(self, job: FamilyJob) -> FamilyResult:
        started = time.perf_counter()
        s, classifier, num_classes = job.settings, job.classifier, len(job.classes)
        images, labels = job.images.images, job.images.labels
        order = torch.randperm(len(images), generator=job.gen)
        screen, confirm = order[:s.square_images], order[s.square_images:s.square_images + s.square_confirm]
        if len(confirm) == 0:  # too few images for a separate confirmation: re-use the screen's
            confirm = screen
        _, _, height, width = images.shape
        side = square_side(height, width)
        squares = [SquareTrigger(top=i, left=j, side=side, value=value)
                   for _, value in COLOURS for i, j in placements(height, width, side)]

        def shares(pick: torch.Tensor, chosen: list[SquareTrigger]) -> torch.Tensor:
            x = to_float(images[pick], job.device)
            clean_pred = classifier(x).argmax(1).cpu()
            return _moved_share(classifier, x, labels[pick], clean_pred, chosen, num_classes)

        screened = shares(screen, squares)  # (placements, classes)
        best_screen, where = screened.max(0)
        found = {c: SquareTrigger(top=squares[int(where[c])].top, left=squares[int(where[c])].left, side=side,
                                  value=squares[int(where[c])].value, target_class=c) for c in range(num_classes)}
        # Only classes the screen finds reachable are re-measured: a share of 0.3 on 32 images is
        # where a confirmed 0.5 can still hide (one-sided 99 % bound).
        worth = [c for c in range(num_classes) if float(best_screen[c]) >= s.square_asr - 0.2]
        confirmed = [0.0] * num_classes
        if worth:
            rates = shares(confirm, [found[c] for c in worth])
            for row, c in enumerate(worth):
                confirmed[c] = float(rates[row, c])
        classes = list(range(num_classes))
        flagged = [c for c in classes if confirmed[c] >= s.square_asr]
        return FamilyResult(family=self.name, classes=classes, sizes=[1 - r for r in confirmed],
                            attack_success=confirmed, anomaly_index=[float("nan")] * num_classes, flagged=flagged,
                            triggers={c: found[c] for c in flagged}, seconds=time.perf_counter() - started,
                            size_unit=self.size_unit,
                            extras={c: {"screen_share": round(float(best_screen[c]), 4),
                                        **({"square": found[c].describe()} if c in worth else {})}
                                    for c in classes})
