"""FT-SAM (Zhu et al. 2023, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023, arXiv:2304.11823): fine-tune on clean data with sharpness-aware
minimisation (SAM; Foret et al. 2021, ICLR) and a large perturbation radius.

Each step takes two forward/backward passes on the same batch: the gradient ``g`` at the weights
``w`` gives the ascent ``e = rho * g / ||g||`` (plain SAM) or, with ``adaptive`` (ASAM-style, as in
the paper), ``e = rho * w^2 * g / ||w * g||``; the gradient at ``w + e`` then drives the optimizer
step taken from the restored ``w``. The paper's observation is that backdoor neurons have large
weight norms, so a large adaptive radius perturbs exactly them and fine-tuning leaves their basin.
BatchNorm running statistics are kept from the first pass only (the perturbed pass does not move
them).

Knobs (besides ``TuneSettings``: epochs, batch size, optimizer, momentum, weight decay, augment):

- ``rho`` (2.0): the perturbation radius; the paper's (and BackdoorBench's) value with ``adaptive``.
  With plain SAM it is an absolute L2 radius over all tuned weights: use ~0.05-0.5 there.
- ``adaptive`` (True): scale the ascent per parameter by ``|w|`` (ASAM).
- ``lr`` (0.01), ``schedule`` (cosine, or constant): the descent's rate, as in the paper.

``--scope head`` perturbs and tunes the head only (the body stays frozen).
Differences from the paper: plain cross-entropy instead of label smoothing; the epoch budget
defaults to ``TuneSettings.epochs`` (the paper tunes for 100 epochs on 5% of CIFAR-10).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import Defense, DefenseContext, DefenseResult, register_defense
from bdaudit.defenses.tuning import RateSettings, fine_tune
from bdaudit.engine.loop import LossFunction


@dataclass(frozen=True)
class FTSAMSettings(RateSettings):
    lr: float = 0.01
    schedule: str = "cosine"  # or constant
    rho: float = 2.0
    adaptive: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho > 0:
            raise BdauditError(f"`rho` must be > 0, not {self.rho}")


def sam_perturbation(params: list[nn.Parameter], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """The ascent ``e`` for each parameter (with a gradient): ``rho * T^2 g / ||T g||`` with
    ``T = |w|`` (adaptive) or the identity (plain SAM)."""
    scaled = [(p.detach().abs() * p.grad if adaptive else p.grad) for p in params]
    norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2) if scaled else torch.tensor(0.0)
    scale = rho / (norm + 1e-12)
    return [(p.detach().abs() * s if adaptive else s) * scale for p, s in zip(params, scaled, strict=True)]


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm running statistics are restored on exit (normalisation still
    uses the batch's statistics in train mode)."""
    saved = [(m, [b.clone() for b in m.buffers()]) for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for buffer, value in zip(m.buffers(), buffers, strict=True):
                    buffer.copy_(value)


@dataclass(frozen=True)
class SAMStep:
    """A ``train`` step function: SAM's ascent, the gradient at the perturbed point, the descent
    from the original weights with the wrapped optimizer."""

    rho: float
    adaptive: bool

    def __call__(self, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 optimizer: torch.optim.Optimizer, loss_fn: LossFunction) -> torch.Tensor:
        loss = loss_fn(classifier, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, step in zip(params, sam_perturbation(params, self.rho, self.adaptive), strict=True):
                param.add_(step)
        optimizer.zero_grad(set_to_none=True)
        with frozen_batchnorm_stats(classifier):
            loss_fn(classifier, x, y).backward()
        with torch.no_grad():
            for param, value in zip(params, saved, strict=True):
                param.copy_(value)
        optimizer.step()
        return loss


@register_defense
class FineTuningSAM(Defense):
    name = "ftsam"
    paper = ("Zhu et al. 2023, Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware "
             "Minimization (ICCV 2023, arXiv:2304.11823)")
    needs = "clean labelled data (no knowledge of the trigger or target)"

    settings_cls = FTSAMSettings
    settings: FTSAMSettings

    def run(self, ctx: DefenseContext) -> DefenseResult:
        s = self.settings
        lr_at = s.lr_function(len(ctx.tune))
        fine_tune(ctx, s, lr_at, step_fn=SAMStep(s.rho, s.adaptive))
        return DefenseResult(asdict(s))
