"""Trigger inversion and outlier detection — Neural Cleanse (Wang et al. 2019, "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P).

For every candidate target class ``t`` Neural Cleanse searches for the smallest patch that sends
clean images to ``t``: a mask ``m`` (H x W, in [0, 1]) and a pattern ``p`` (C x H x W, in [0, 1])
stamped as ``x' = (1 - m) * x + m * p``, minimising

    CE(f(x'), t) + lambda * |m|_1

with both tensors parameterised through ``tanh`` so they stay in [0, 1]. A backdoor target needs
a much smaller mask than the other classes; the median-absolute-deviation rule finds it.

What follows the paper's reference implementation (``visualizer.py``): random initialisation,
Adam (betas 0.5/0.9), ``init_cost`` 1e-3, ``lambda`` starting at 0 and set to ``init_cost`` once
the attack succeeds (>= ``success_threshold``, 0.99) for ``patience`` checks, then multiplied by 2
after ``patience`` successful checks in a row and divided by 2 ** 1.5 after ``patience`` failing
ones; the kept trigger is the smallest mask seen while the attack succeeded (the last one if it
never did).

Simplifications, chosen for speed on CPU and documented here:

- a "check" (NC: one epoch) is ``check_every`` = 5 mini-batches and ``patience`` is 2 checks
  (NC: 5 epochs), and a class's budget is ``steps`` = 100 mini-batches of 32 (NC: up to 1000
  epochs with early stopping). To converge in that budget Adam's rate is 0.3 (NC: 0.1). Measured
  on the MNIST test fixtures (tiny CNN, 400 clean images): 100 steps at lr 0.3 reach norms 0-35 %
  (median ~15 %) above those of a 600-step run at lr 0.1, in ~15 s for all 10 classes on one
  CPU thread; at lr 0.1 and 100 steps the masks are still 2-3x too large;
- all classes of a group (``class_group``) are optimised together on the same mini-batch: their
  losses are summed, which keeps their Adam updates independent (Adam is per element) and runs
  the network once per step;
- images whose true label is the candidate class are left out of its loss and of its attack
  success (they say nothing about the trigger).

``anomaly_index`` is the paper's rule: with ``MAD = 1.4826 * median(|l - median(l)|)`` each class
scores ``|l - median| / MAD``; a class is flagged when its norm is *below* the median and its
index exceeds 2. A norm cannot fall below 0, so no class can score above ``median / MAD``: the
report's ``max_possible_index``. When the clean classes' norms spread widely (as on MNIST's tiny
test model: ~35 to ~240 pixels) that ceiling is near 2 and even a near-zero trigger goes unflagged.

``anomaly_scale="log"`` (bdaudit's default; ``"l1"`` is the paper's rule): the same rule (median, MAD,
threshold, below-median only) on the logarithms of the norms, so a class is judged by how many
times smaller its trigger is, not by how many pixels. On the MNIST fixtures the BadNets target
scores 5.2-7.1 on the log scale (1.4-2.1 on the paper's) and the clean model's classes stay at or
below 1.3 on both, across seeds and budgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import ImageSet, to_float
from bdaudit.core.errors import BdauditError
from bdaudit.core.predict import predict, search_copy
from bdaudit.triggers.base import Trigger, seeded_pattern

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal distribution's sigma
ANOMALY_THRESHOLD = 2.0
SCALES = ("l1", "log")
_EPS = 1e-7  # keeps tanh's image strictly inside (0, 1), as NC's ``epsilon``


@dataclass(frozen=True)
class InversionSettings:
    """Neural Cleanse's optimisation knobs (defaults measured on CPU; see the module docstring)."""

    steps: int = 100  # mini-batches per class
    batch_size: int = 32
    lr: float = 0.3
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    patience: int = 2  # checks
    check_every: int = 5  # mini-batches per check
    cost_multiplier: float = 2.0
    class_group: int = 10  # classes optimised together
    anomaly_threshold: float = ANOMALY_THRESHOLD  # flag below-median classes whose index exceeds this
    anomaly_scale: str = "log"  # "log": the rule on log norms (default); "l1": the paper's rule on the norms

    def __post_init__(self) -> None:
        checks = {"steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "init_cost": self.init_cost > 0, "success_threshold": 0 < self.success_threshold <= 1,
                  "patience": self.patience >= 1, "check_every": self.check_every >= 1,
                  "cost_multiplier": self.cost_multiplier > 1, "class_group": self.class_group >= 1,
                  "anomaly_threshold": self.anomaly_threshold > 0, "anomaly_scale": self.anomaly_scale in SCALES}
        wanted = {"steps": "at least 1", "batch_size": "at least 1", "lr": "> 0", "init_cost": "> 0",
                  "success_threshold": "in (0, 1]", "patience": "at least 1", "check_every": "at least 1",
                  "cost_multiplier": "> 1", "class_group": "at least 1", "anomaly_threshold": "> 0",
                  "anomaly_scale": "l1 or log"}
        for name, ok in checks.items():
            if not ok:
                raise BdauditError(f"`{name}` must be {wanted[name]}, not {getattr(self, name)}")


@dataclass(frozen=True, eq=False)
class InvertedTrigger(Trigger):
    """A reversed trigger as a bdaudit Trigger: ``(1 - mask) * x + mask * pattern``.

    Not registered (it cannot be built from parameters); ``null`` stamps seeded noise through the
    same mask: the same area and strength without the pattern.
    """

    name = "nc_inverted"
    paper = "Wang et al. 2019, Neural Cleanse (IEEE S&P)"
    summary = "trigger reversed by Neural Cleanse: a mask and a pattern"
    in_default_library = False

    mask: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, 1))  # (1, H, W)
    pattern: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, 1))  # (C, H, W)
    target_class: int = -1  # the class it was reversed for (names it in reports)

    def _stamp(self, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(x.device, x.dtype)
        return (1 - mask) * x + mask * pattern.to(x.device, x.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._stamp(x, self.pattern)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        return self._stamp(x, seeded_pattern(1234, tuple(self.pattern.shape), x.device))


@dataclass
class InversionResult:
    """Per-class reversed triggers and the outlier analysis over their mask norms."""

    classes: list[int]
    masks: torch.Tensor  # (K, 1, H, W) in [0, 1]
    patterns: torch.Tensor  # (K, C, H, W) in [0, 1]
    l1_norms: list[float]
    attack_success: list[float]
    anomaly_index: list[float]
    flagged: list[int]
    final_cost: list[float]
    settings: InversionSettings
    seconds: float
    class_names: tuple[str, ...] = ()

    def trigger(self, cls: int) -> InvertedTrigger:
        i = self.classes.index(cls)
        return InvertedTrigger(mask=self.masks[i].clone(), pattern=self.patterns[i].clone(), target_class=cls)

    def flagged_triggers(self) -> list[InvertedTrigger]:
        return [self.trigger(cls) for cls in self.flagged]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no mask/pattern tensors)."""
        rows = []
        for i, cls in enumerate(self.classes):
            rows.append({"class": cls,
                         "name": self.class_names[cls] if cls < len(self.class_names) else str(cls),
                         "mask_l1": round(self.l1_norms[i], 4),
                         "attack_success": round(self.attack_success[i], 4),
                         "anomaly_index": _finite(self.anomaly_index[i]),
                         "final_cost": self.final_cost[i],
                         "flagged": cls in self.flagged})
        norms = torch.tensor(self.l1_norms, dtype=torch.float64)
        median = float(_median(norms))
        mad = MAD_CONSISTENCY * float(_median((norms - median).abs()))
        # The l1 index a zero-norm class would reach: that rule flags nothing when this is <= threshold.
        ceiling = median / mad if mad > 0 else float("inf")
        if self.settings.anomaly_scale != "l1":
            ceiling = float("inf")  # log norms have no floor
        return {"method": "neural_cleanse", "settings": asdict(self.settings), "flagged": list(self.flagged),
                "median_l1": round(median, 4), "mad_l1": round(mad, 4), "max_possible_index": _finite(ceiling),
                "classes": rows, "seconds": round(self.seconds, 3)}


def _finite(value: float) -> float | None:
    return round(value, 4) if value == value and abs(value) != float("inf") else None


def anomaly_index(l1_norms: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``|l - median| / (1.4826 * MAD)`` per class, signed-free (flag with ``flagged_classes``).

    When the MAD is zero (half or more of the norms equal) a class equal to the median scores 0
    and any other class ``inf``.
    """
    norms = torch.as_tensor(l1_norms, dtype=torch.float64).flatten()
    if norms.numel() == 0:
        return norms
    deviation = (norms - _median(norms)).abs()
    mad = MAD_CONSISTENCY * _median(deviation)
    if mad > 0:
        return deviation / mad
    return torch.where(deviation > 0, torch.full_like(deviation, float("inf")), torch.zeros_like(deviation))


def _median(values: torch.Tensor) -> torch.Tensor:
    """The usual median (mean of the two middle values for an even count), unlike torch's lower one."""
    ordered = values.sort().values
    n = ordered.numel()
    return ordered[n // 2] if n % 2 else ordered[n // 2 - 1:n // 2 + 1].mean()


def flagged_classes(classes: Sequence[int], l1_norms: Sequence[float], index: torch.Tensor,
                    threshold: float = ANOMALY_THRESHOLD) -> list[int]:
    """Classes whose norm is below the median and whose anomaly index exceeds ``threshold``."""
    median = float(_median(torch.as_tensor(l1_norms, dtype=torch.float64)))
    return [c for c, n, a in zip(classes, l1_norms, index.tolist(), strict=True)
            if n < median and a > threshold]


def score_classes(classes: Sequence[int], l1_norms: Sequence[float], scale: str = "l1",
                  threshold: float = ANOMALY_THRESHOLD) -> tuple[torch.Tensor, list[int]]:
    """Anomaly indices and flagged classes on the ``l1`` norms (the paper) or their logarithms."""
    if scale not in SCALES:
        raise BdauditError(f"`anomaly_scale` must be l1 or log, not '{scale}'")
    values = torch.as_tensor(l1_norms, dtype=torch.float64)
    if scale == "log":
        values = values.clamp_min(1e-6).log()
    index = anomaly_index(values)
    return index, flagged_classes(classes, values.tolist(), index, threshold)


def _to_unit(raw: torch.Tensor) -> torch.Tensor:
    return torch.tanh(raw) / (2 - _EPS) + 0.5


def _from_unit(x: torch.Tensor) -> torch.Tensor:
    return torch.atanh((x - 0.5) * (2 - _EPS))


class _CostSchedule:
    """NC's adaptive lambda, one value per class (``visualizer.py``'s counters, per check)."""

    def __init__(self, k: int, s: InversionSettings) -> None:
        self.s = s
        self.cost = [0.0] * k
        self.set_counter = [0] * k
        self.up = [0] * k
        self.down = [0] * k

    def update(self, success: list[float]) -> None:
        s = self.s
        for i, rate in enumerate(success):
            ok = rate >= s.success_threshold
            if self.cost[i] == 0 and ok:
                self.set_counter[i] += 1
                if self.set_counter[i] >= s.patience:
                    self.cost[i] = s.init_cost
                    self.up[i] = self.down[i] = 0
                    continue
            else:
                self.set_counter[i] = 0
            self.up[i], self.down[i] = (self.up[i] + 1, 0) if ok else (0, self.down[i] + 1)
            if self.up[i] >= s.patience:
                self.up[i] = 0
                self.cost[i] *= s.cost_multiplier
            elif self.down[i] >= s.patience:
                self.down[i] = 0
                self.cost[i] /= s.cost_multiplier ** 1.5


@dataclass
class _Search:
    """One adaptive-cost trigger search: ``stamp`` maps a clean batch (B, C, H, W) to the K stamped
    batches (K, B, C, H, W), each trigger's size (K,) and the tensors kept when a trigger is the best
    so far; ``current`` gives those tensors as they stand (the start, and the fallback of a class that
    never succeeded)."""

    optimizer: torch.optim.Optimizer
    stamp: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]]
    current: Callable[[], tuple[torch.Tensor, ...]]


def _adaptive_search(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: list[int],
                     s: InversionSettings, device: torch.device, gen: torch.Generator, search: _Search,
                     ) -> tuple[tuple[torch.Tensor, ...], list[float]]:
    """Neural Cleanse's loop, shared by its patch and the detector's universal perturbation:
    minimise CE + cost * size for every target at once, adapting each cost, and keep the smallest
    trigger seen while it succeeded."""
    k = len(targets)
    target_t = torch.tensor(targets, device=device)
    schedule = _CostSchedule(k, s)
    best_size = torch.full((k,), float("inf"))
    best = tuple(t.clone() for t in search.current())
    hits = torch.zeros(k, device=device)
    counted = torch.zeros(k, device=device)
    for step in range(s.steps):
        index = torch.randint(0, len(images), (s.batch_size,), generator=gen)
        x, y = to_float(images[index], device), labels[index].to(device)
        stamped, size, kept = search.stamp(x)
        logits = classifier(stamped.flatten(0, 1).contiguous(memory_format=torch.channels_last)).view(k, len(index), -1)
        keep = (y[None] != target_t[:, None]).float()  # (K, B): images not already of the target
        ce = F.cross_entropy(logits.flatten(0, 1), target_t.repeat_interleave(len(index)),
                             reduction="none").view(k, -1)
        ce = (ce * keep).sum(1) / keep.sum(1).clamp_min(1)
        loss = (ce + torch.tensor(schedule.cost, device=device) * size).sum()
        search.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        search.optimizer.step()
        with torch.no_grad():
            hits += ((logits.argmax(-1) == target_t[:, None]).float() * keep).sum(1)
            counted += keep.sum(1)
        if (step + 1) % s.check_every == 0 or step + 1 == s.steps:
            success = (hits / counted.clamp_min(1)).cpu()
            sizes = size.detach().cpu()
            better = (success >= s.success_threshold) & (sizes < best_size)
            if better.any():
                best_size = torch.where(better, sizes, best_size)
                # ``kept`` read after the step: a parameter kept as is has moved, a derived tensor not.
                for slot, tensor in zip(best, kept, strict=True):
                    slot[better] = tensor.detach().cpu()[better]
            schedule.update(success.tolist())
            hits.zero_()
            counted.zero_()
    # A class that never reached the threshold keeps its last trigger (as NC's visualizer does).
    never = torch.isinf(best_size)
    if never.any():
        for slot, tensor in zip(best, search.current(), strict=True):
            slot[never] = tensor[never]
    return best, list(schedule.cost)


def _invert_group(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: list[int],
                  s: InversionSettings, device: torch.device, gen: torch.Generator,
                  ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optimise masks and patterns for ``targets`` together; the best (smallest successful) kept."""
    k = len(targets)
    _, c, h, w = images.shape
    mask_raw = _from_unit(torch.rand(k, 1, h, w, generator=gen)).to(device).requires_grad_(True)
    pattern_raw = _from_unit(torch.rand(k, c, h, w, generator=gen)).to(device).requires_grad_(True)

    def stamp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        mask, pattern = _to_unit(mask_raw), _to_unit(pattern_raw)
        stamped = (1 - mask[:, None]) * x[None] + (mask * pattern)[:, None]  # (K, B, C, H, W)
        return stamped, mask.flatten(1).sum(1), (mask, pattern)

    def current() -> tuple[torch.Tensor, ...]:
        return _to_unit(mask_raw.detach()).cpu(), _to_unit(pattern_raw.detach()).cpu()

    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=s.lr, betas=(0.5, 0.9))
    (best_mask, best_pattern), costs = _adaptive_search(classifier, images, labels, targets, s, device, gen,
                                                        _Search(optimizer, stamp, current))
    return best_mask, best_pattern, costs


def trigger_success(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                    pattern: torch.Tensor, target: int, device: torch.device, batch_size: int = 256) -> float:
    """Fraction of the images not of ``target`` that the stamped trigger sends to ``target``."""
    keep = labels != target
    images = images[keep]
    if len(images) == 0:
        return float("nan")
    trigger = InvertedTrigger(mask=mask, pattern=pattern)
    preds = predict(classifier, images, device, batch_size, trigger.apply)
    return int((preds == target).sum()) / len(images)


def invert_seeded(classifier: nn.Module, images: ImageSet, device: torch.device, seed: int) -> InversionResult:
    """``invert_triggers`` at its default settings, seeded: what ``scan``/``clean --invert`` and the
    bench's ``unlearn_source=inverted`` run."""
    return invert_triggers(classifier, images, device=device, gen=torch.Generator().manual_seed(seed))


def invert_triggers(classifier: nn.Module, images: ImageSet, *, classes: Sequence[int] | None = None,
                    settings: InversionSettings | None = None, device: torch.device | str = "cpu",
                    gen: torch.Generator | None = None, **knobs: Any) -> InversionResult:
    """Reverse a trigger for every class in ``classes`` (default: all) and flag outliers.

    ``classifier`` takes float images in [0, 1]; ``images`` are the clean data (uint8). Knobs are
    ``InversionSettings`` fields, given either as ``settings`` or as keywords (``steps=100``).
    The anomaly index is computed over the classes inverted (all of them, for the paper's rule).
    """
    s = settings if settings is not None else InversionSettings(**knobs)
    if settings is not None and knobs:
        s = InversionSettings(**{**asdict(settings), **knobs})
    device = torch.device(device)
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    num_classes = images.num_classes
    chosen = list(range(num_classes)) if classes is None else [int(c) for c in classes]
    if not chosen:
        raise BdauditError("trigger inversion needs at least one class to invert")
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise BdauditError(f"classes {bad} are out of range for {num_classes} classes")
    if len(images) == 0:
        raise BdauditError("trigger inversion needs clean images; the data is empty")
    started = time.perf_counter()
    model = search_copy(classifier, device, images.images.shape)
    masks, patterns, costs = [], [], []
    for start in range(0, len(chosen), s.class_group):
        group = chosen[start:start + s.class_group]
        m, p, cost = _invert_group(model, images.images, images.labels, group, s, device, gen)
        masks.append(m)
        patterns.append(p)
        costs += cost
    masks_t, patterns_t = torch.cat(masks), torch.cat(patterns)
    success = [trigger_success(model, images.images, images.labels, masks_t[i], patterns_t[i], c, device)
               for i, c in enumerate(chosen)]
    norms = masks_t.flatten(1).sum(1).tolist()
    index, flagged = score_classes(chosen, norms, s.anomaly_scale, s.anomaly_threshold)
    return InversionResult(classes=chosen, masks=masks_t, patterns=patterns_t, l1_norms=norms,
                           attack_success=success, anomaly_index=index.tolist(),
                           flagged=flagged,
                           final_cost=costs, settings=s,
                           seconds=time.perf_counter() - started, class_names=tuple(images.class_names))


def inversion_reasons(summary: dict[str, Any]) -> list[str]:
    """Gate lines for ``scan --invert``: one per class whose reversed trigger is an outlier."""
    median = summary["median_l1"]
    return [f"trigger inversion: class {row['name']!r} is reached with a {row['mask_l1']:.1f}-pixel trigger "
            f"(median class {median:.1f}; anomaly index {row['anomaly_index']}) — a likely backdoor target"
            for row in summary["classes"] if row["flagged"]]
