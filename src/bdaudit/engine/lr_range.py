"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks"; Smith & Topin 2019, "Super-Convergence") run on the clean tuning data.

SFT needs a phase-1 peak high enough to throw the weights out of the backdoor's basin but not so
high that the model collapses; that rate depends on the architecture (a BN-free CNN diverges
where a BN ResNet is fine), so bdaudit measures it per model instead of fixing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import ImageSet
from bdaudit.engine.loop import Runtime
from bdaudit.engine.recipe import Augment, make_optimizer

ESCAPE_RISE = 0.5  # nats above the curve's minimum: predictions are substantially off


@dataclass
class RangeTest:
    """Loss as the rate grows exponentially. ``escape_lr``: the smoothed loss has risen
    ``ESCAPE_RISE`` nats above its minimum — the weights are leaving the basin they were trained
    into; ``diverge_lr``: the loss reached chance level (or overflowed) — the model collapsed."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    start_loss: float = float("nan")
    min_loss: float = float("inf")
    escape_lr: float | None = None
    diverge_lr: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"escape_lr": self.escape_lr, "diverge_lr": self.diverge_lr,
                "start_loss": self.start_loss, "min_loss": self.min_loss,
                "curve": [[round(lr, 8), round(loss, 5)] for lr, loss in zip(self.lrs, self.losses,
                                                                              strict=True)]}


@dataclass(frozen=True)
class RangeTestSettings:
    """The rates swept (exponentially from ``lr_min`` to ``lr_max`` over ``steps``) and the SGD
    recipe they are swept with; ``smoothing`` is the loss curve's exponential smoothing."""

    lr_min: float = 1e-4
    lr_max: float = 10.0
    steps: int = 80
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    smoothing: float = 0.7


def lr_range_test(model: nn.Module, params: Iterable[nn.Parameter], data: ImageSet, runtime: Runtime, *,
                  num_classes: int, hflip: bool = False, settings: RangeTestSettings | None = None) -> RangeTest:
    """Run the test by training ``params`` of ``model`` — pass a copy (in train mode, a frozen
    body already in eval mode): the test throws its weights away."""
    s = settings or RangeTestSettings()
    lr_min, lr_max, steps, batch_size, smoothing = s.lr_min, s.lr_max, s.steps, s.batch_size, s.smoothing
    optimizer = make_optimizer(params, "sgd", lr_min, s.momentum, s.weight_decay)
    augment = Augment(2, hflip)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=runtime.gen)))
    chance = math.log(max(2, num_classes))
    result = RangeTest()
    smoothed, order = None, torch.empty(0, dtype=torch.long)
    for step in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (step / max(1, steps - 1))
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(data), generator=gen)])
        index, order = order[:batch_size], order[batch_size:]
        x = augment(data.images[index].float().div(255), gen).to(runtime.device)
        y = data.labels[index].to(runtime.device)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            result.diverge_lr = result.diverge_lr or lr
            break
        smoothed = value if smoothed is None else smoothing * smoothed + (1 - smoothing) * value
        if step == 0:
            result.start_loss = value
        result.lrs.append(lr)
        result.losses.append(smoothed)
        result.min_loss = min(result.min_loss, smoothed)
        if result.escape_lr is None and smoothed > result.min_loss + ESCAPE_RISE:
            result.escape_lr = lr
        if smoothed > chance:
            result.diverge_lr = lr
            break
    return result
