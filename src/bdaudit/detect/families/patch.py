"""``patch``: Neural Cleanse's mask + pattern (``inversion._invert_group``) — the smallest *region*
that sends clean images to a class — confirmed by a *compact patch* before it flags.

A short, unconverged mask search is noisy: on clean MNIST models the naturally easy class 8 reached
log anomaly indices up to 11.6, while a 4x4 checkerboard planted at 1 % poison (100 % ASR) scored
2.0-5.4 (blind benchmark, benchmarks/README.md). The size alone does not separate them; where the
mask is *densest* does. So the ``compact_tests`` (3) most anomalous below-median classes (index
above ``patch_threshold``, 1) each get a free pattern of ``compact_side`` pixels square (7 on
MNIST), optimised towards the class at one of the three windows holding most of its mask (10 pilot
steps at each, 40 steps of 32 images in all for the best, then ``recentre``), on half of the other
classes' clean images; the class is flagged when that patch sends at least ``compact_asr`` (90 %) of
the *other* half there (``confirms``). A trigger overrides the digit; a natural feature competes
with it. Measured over six scan seeds (benchmarks/patch_seeds.py, 2026-12-05): 0.92-1.0 for 5x5
crosses, a grey 6x6 patch, a 4x4 checkerboard at 1 % poison and a 2x2 dot; nominated classes of
five clean models at most 0.73, and the shipped ``encoder_clean`` sample's class 8 (a weak encoder
model: a 7x7 "top loop" makes most digits an 8) 0.58-0.88. A 6-pixel window let backdoors fall to
0.40, an 8-pixel one let clean classes reach 0.56: a larger free patch is an adversarial patch on
any model. Finds BadNets-like patches of any pattern, colour or position up to about the window's
size (a larger one when part of it still fires); blind to triggers spread over the whole image
(blends, warps, colour shifts, frequency patterns), which are ``perturbation``'s and ``transform``'s."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from bdaudit.core.data import to_float
from bdaudit.detect.families.base import FamilyJob, FamilyResult, InvertingFamily, score_inverted
from bdaudit.detect.inversion import InversionSettings, InvertedTrigger, _invert_group
from bdaudit.triggers.base import Trigger

if TYPE_CHECKING:
    from bdaudit.detect.unknown import DetectSettings

COMPACT_SEED_OFFSET = 104729  # the compact tests' generator: detector seed + this + class


def compact_side(height: int, width: int) -> int:
    """A quarter of the shorter side (7 on MNIST's 28 x 28, 8 on 32 x 32, 2 on 8 x 8): a fixed share
    of the image, because a larger free patch is an adversarial patch on any model."""
    return max(2, round(min(height, width) / 4))


def densest_window(mask: torch.Tensor, side: int) -> tuple[int, int]:
    """Top-left corner of the ``side`` x ``side`` window holding most of ``mask`` (1, H, W)."""
    return densest_windows(mask, side, 1)[0]


def densest_windows(mask: torch.Tensor, side: int, k: int) -> list[tuple[int, int]]:
    """Top-left corners of up to ``k`` non-overlapping ``side`` x ``side`` windows, most mask first."""
    h, w = mask.shape[-2:]
    mass = F.avg_pool2d(mask.reshape(1, 1, h, w).float(), side, stride=1)[0, 0].clone()
    corners: list[tuple[int, int]] = []
    while len(corners) < k and bool((mass > -1).any()):
        top, left = divmod(int(mass.flatten().argmax()), mass.shape[1])
        corners.append((top, left))
        mass[max(0, top - side + 1):top + side, max(0, left - side + 1):left + side] = -2  # overlapping ones
    return corners


def clean_predictions(job: FamilyJob) -> torch.Tensor:
    """The classifier's answer on every clean image of the job (computed once for all compact tests)."""
    images = job.images.images
    with torch.no_grad():
        return torch.cat([job.classifier(to_float(images[i:i + 256], job.device)).argmax(1).cpu()
                          for i in range(0, len(images), 256)]) if len(images) else torch.zeros(0, dtype=torch.long)


class _Compact:
    """One free ``side`` x ``side`` pattern at one window, optimised towards a class."""

    def __init__(self, job: FamilyJob, corner: tuple[int, int], side: int) -> None:
        self.job, (self.top, self.left), self.side = job, corner, side
        _, c, self.h, self.w = job.images.images.shape
        self.window = torch.zeros(1, self.h, self.w)
        self.window[:, self.top:self.top + side, self.left:self.left + side] = 1
        self.window_d = self.window.to(job.device)
        self.raw = torch.zeros(1, c, side, side, device=job.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.raw], lr=job.settings.lr)

    def shifted(self, down: int, right: int) -> _Compact | None:
        """The same patch moved by (``down``, ``right``), its pattern carried where the windows overlap
        (``None`` when the move leaves the image)."""
        top, left = self.top + down, self.left + right
        if not (0 <= top <= self.h - self.side and 0 <= left <= self.w - self.side):
            return None
        moved = _Compact(self.job, (top, left), self.side)
        n = self.side
        with torch.no_grad():
            moved.raw[..., max(0, -down):n - max(0, down), max(0, -right):n - max(0, right)] = \
                self.raw[..., max(0, down):n - max(0, -down), max(0, right):n - max(0, -right)]
        return moved

    def pattern(self) -> torch.Tensor:
        pad = (self.left, self.w - self.left - self.side, self.top, self.h - self.top - self.side)
        return F.pad(torch.sigmoid(4 * self.raw), pad)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.window_d) * x + self.window_d * self.pattern()

    def fit(self, indices: torch.Tensor, target: int, steps: int, gen: torch.Generator) -> None:
        images, s, device = self.job.images.images, self.job.settings, self.job.device
        for _ in range(steps):
            pick = indices[torch.randint(0, len(indices), (s.compact_batch,), generator=gen)]
            x = to_float(images[pick], device)
            loss = F.cross_entropy(self.job.classifier(self.stamp(x)), torch.full((len(x),), target, device=device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    @torch.no_grad()
    def hits(self, indices: torch.Tensor, target: int) -> int:
        return len(self.sent(indices, target))

    @torch.no_grad()
    def sent(self, indices: torch.Tensor, target: int) -> torch.Tensor:
        """The target's softmax probability on every stamped image the classifier sends to ``target``."""
        images, device = self.job.images.images, self.job.device
        probs = [F.softmax(self.job.classifier(self.stamp(to_float(images[indices[i:i + 256]], device))), 1).cpu()
                 for i in range(0, len(indices), 256)]
        p = torch.cat(probs) if probs else torch.zeros(0, 1)
        return p[p.argmax(1) == target, target] if len(p) else p[:, 0]


PILOT_SAMPLE = 64  # fit images that judge the pilots


def best_after_pilot(patches: list[_Compact], fit: torch.Tensor, target: int, steps: int,
                     gen: torch.Generator) -> tuple[_Compact, int, bool]:
    """Fit each candidate ``steps`` mini-batches; the one moving most of the first fit images (the
    earliest on ties), its hit count, and whether it moved all of them (then the later candidates are
    not tried: none could beat it)."""
    sample = fit[:PILOT_SAMPLE]
    scores = []
    for patch in patches:
        patch.fit(fit, target, steps, gen)
        scores.append(patch.hits(sample, target))
        if scores[-1] == len(sample):
            break
    best = max(scores)
    return patches[scores.index(best)], best, best == len(sample)


def recentre(patch: _Compact, fit: torch.Tensor, target: int, gen: torch.Generator) -> _Compact:
    """A window that holds only part of a trigger fires on part of the images (blind benchmark: a 4x4
    checkerboard at 1 % poison, 0.64 with two of its rows inside the window, 1.0 with all four). So a patch in the
    grey zone (``compact_shift_from`` <= share of the fit sample < ``compact_shift_until``) is also tried half a
    window up, down, left and right, pattern carried, for ``compact_pilot`` steps each; the best on the
    fit sample goes on for ``compact_shift_steps`` more. Fit images only: the held-apart ones judge."""
    s, sample = patch.job.settings, fit[:PILOT_SAMPLE]
    base = patch.hits(sample, target)
    if not s.compact_shift_steps or not s.compact_shift_from <= base / len(sample) < s.compact_shift_until:
        return patch
    d = max(1, patch.side // 2)
    moved = [m for m in (patch.shifted(-d, 0), patch.shifted(d, 0), patch.shifted(0, -d), patch.shifted(0, d)) if m]
    if not moved:
        return patch
    best, hits, saturated = best_after_pilot(moved, fit, target, s.compact_pilot, gen)
    if hits <= base:
        return patch
    if not saturated:
        best.fit(fit, target, s.compact_shift_steps, gen)
    return best


class CompactResult(NamedTuple):
    share: float  # of held-apart images of other classes sent to the target
    confidence: float  # mean target probability on those it sent
    trigger: InvertedTrigger
    where: str


@torch.enable_grad()
def compact_patch(job: FamilyJob, target: int, mask: torch.Tensor, side: int | None = None,
                  clean_pred: torch.Tensor | None = None) -> CompactResult:
    """Optimise a free square pattern (``side``, default ``compact_side``) towards ``target`` where
    ``mask`` is densest; its success on held-apart images of other classes (neither labelled nor
    already predicted ``target``; ``clean_pred``: ``clean_predictions(job)``, if already known).

    A short mask search often spreads over two or three similar spots, and the trigger is not always
    the densest (blind benchmark: a 5x5 cross at 1 % poison, 0.39-0.50 at the densest window and
    0.94-1.0 at the next). So the ``compact_windows`` densest windows each get ``compact_pilot`` steps,
    the one whose patch moves most of a fixed fit sample goes on for the rest of ``compact_steps`` (unless
    it already moves all of that sample: a planted trigger often does after the pilot, and more steps
    cannot raise it), and only that one is measured on the held-apart images (the choice never sees them)."""
    s = job.settings
    gen = torch.Generator().manual_seed(job.seed + COMPACT_SEED_OFFSET + target)
    images, labels = job.images.images, job.images.labels
    _, _, h, w = images.shape
    side = min(side or compact_side(h, w), h, w)
    pred = clean_predictions(job) if clean_pred is None else clean_pred
    others = ((labels != target) & (pred != target)).nonzero().flatten()
    order = others[torch.randperm(len(others), generator=gen)]
    fit, held = order[:len(order) // 2], order[len(order) // 2:]
    corners = densest_windows(mask, side, s.compact_windows)
    patches = [_Compact(job, corner, side) for corner in corners]
    if len(fit) and len(held):
        pilot = min(s.compact_pilot, s.compact_steps) if len(patches) > 1 else 0
        saturated = False
        if pilot:  # ties: the densest window
            best, _, saturated = best_after_pilot(patches, fit, target, pilot, gen)
            patches = [best]
        if not saturated:  # a pilot that already moves every fit image needs no more steps
            patches[0].fit(fit, target, s.compact_steps - pilot, gen)
            patches[0] = recentre(patches[0], fit, target, gen)
    chosen = patches[0]
    sent = chosen.sent(held, target)
    share = len(sent) / len(held) if len(held) else 0.0
    with torch.no_grad():
        pattern = chosen.pattern()[0].cpu()
    where = f"{side}x{side} patch at row {chosen.top}, column {chosen.left}"
    return CompactResult(share, float(sent.mean()) if len(sent) else 0.0,
                         InvertedTrigger(mask=chosen.window, pattern=pattern, target_class=target), where)


def confirms(found: CompactResult, settings: DetectSettings) -> bool:
    """A backdoor's trigger overrides the image; a clean model's naturally easy class (MNIST's 8) took
    up to 0.88 of images with a free, recentred patch, triggers 0.92 and more (module docstring).
    Mean confidence does not separate them (0.94 on that clean class), so it is reported, not used."""
    return found.share >= settings.compact_asr


class PatchFamily(InvertingFamily):
    name: ClassVar[str] = "patch"
    size_unit: ClassVar[str] = "mask L1 (pixels)"

    def threshold(self, settings: DetectSettings) -> float:
        return settings.patch_threshold

    def invert(self, job: FamilyJob) -> tuple[list[float], dict[int, Trigger]]:
        candidates = job.classes
        nc = InversionSettings(steps=job.steps, batch_size=job.settings.patch_batch_size, lr=job.settings.lr,
                               class_group=len(candidates))
        masks, patterns, _ = _invert_group(job.classifier, job.images.images, job.images.labels, candidates, nc,
                                           job.device, job.gen)
        triggers: dict[int, Trigger] = {c: InvertedTrigger(mask=masks[i].clone(), pattern=patterns[i].clone(),
                                                           target_class=c) for i, c in enumerate(candidates)}
        return masks.flatten(1).sum(1).tolist(), triggers

    def run(self, job: FamilyJob) -> FamilyResult:
        started = time.perf_counter()
        sizes, triggers = self.invert(job)
        # The MAD rule only nominates (index above ``patch_threshold``); the compact patch decides.
        result = score_inverted(self, job, sizes, triggers, self.threshold(job.settings), started)
        index = dict(zip(result.classes, result.anomaly_index, strict=True))
        nominated = sorted(result.flagged, key=lambda c: -index[c] if math.isfinite(index[c]) else -math.inf)
        result.flagged = []
        self.test_compact(job, result, nominated[:job.settings.compact_tests])
        result.seconds = time.perf_counter() - started
        return result

    def test_compact(self, job: FamilyJob, result: FamilyResult, classes: list[int],
                     nominated_by: str | None = None) -> None:
        """Give each of ``classes`` the compact-patch test at the windows where its reversed mask is
        densest; a class that passes joins ``result.flagged`` with the patch that fired as its trigger."""
        clean_pred = None
        for c in classes:
            if job.decided(result):
                result.extras[c] = {"compact_skipped": "another class was already flagged (a gate needs one finding)",
                                    **({"nominated_by": nominated_by} if nominated_by else {})}
                continue
            if clean_pred is None:
                clean_pred = clean_predictions(job)
            mask = result.triggers[c].mask  # type: ignore[attr-defined]
            found = compact_patch(job, c, mask, clean_pred=clean_pred)
            result.extras[c] = {"compact_asr": round(found.share, 4), "compact_confidence": round(found.confidence, 4),
                                "compact_patch": found.where}
            if nominated_by:
                result.extras[c]["nominated_by"] = nominated_by
            if confirms(found, job.settings):
                result.flagged = sorted([*result.flagged, c])
                result.triggers[c] = found.trigger  # what clean unlearns: the patch that fired, not the spread mask
