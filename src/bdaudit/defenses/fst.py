"""Feature Shift Tuning (Min et al. 2023, "Towards Stable Backdoor Purification through Feature
Shift Tuning", NeurIPS 2023, arXiv:2310.01875).

Vanilla fine-tuning barely moves the features a backdoored model learnt, so the backdoor survives
(worst at low poisoning rates, where backdoor and clean features are entangled). FST forces the
features to shift: it re-initialises the linear head, then tunes the whole model on clean data
with ``CE + alpha * <w, w_orig>`` — the inner product pushes the new head weight ``w`` away from
the original (compromised) one, and the body's features must follow. After every step ``w`` is
rescaled to the original head weight's norm (the paper's projection), so the penalty cannot be
lowered by merely shrinking or inflating ``w``. The reported loss includes the penalty, so it can be
negative.

Knobs (besides ``TuneSettings``: epochs, batch size, optimizer, momentum, weight decay, augment):

- ``alpha`` (0.2): the weight of the inner-product penalty (the paper's CIFAR-10 value; 0 gives
  "fine-tuning with a re-initialised head", FT-init).
- ``lr`` (0.01), ``schedule`` (cosine, or constant): as in the official code (SGD, cosine).
- ``epochs`` (10): the paper's budget.

Full scope only: FST needs the body to move.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import Defense, DefenseContext, DefenseResult, register_defense
from bdaudit.defenses.layers import linear_head
from bdaudit.defenses.tuning import RateSettings, fine_tune


@dataclass(frozen=True)
class FSTSettings(RateSettings):
    lr: float = 0.03
    schedule: str = "cosine"  # or constant
    alpha: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha >= 0:
            raise BdauditError(f"`alpha` must be >= 0, not {self.alpha}")


@torch.no_grad()
def reinit_linear(head: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight
    and bias, drawn from ``gen`` on the CPU (reproducible whatever the device)."""
    bound = 1.0 / math.sqrt(head.in_features)
    for param in (head.weight, head.bias):
        if param is not None:
            param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=gen))


@torch.no_grad()
def project_norm(weight: torch.Tensor, norm: torch.Tensor) -> None:
    """Rescale ``weight`` in place to the given Frobenius norm."""
    weight.mul_(norm / weight.norm().clamp_min(1e-12))


@register_defense
class FeatureShiftTuning(Defense):
    name = "fst"
    paper = ("Min et al. 2023, Towards Stable Backdoor Purification through Feature Shift Tuning "
             "(NeurIPS 2023, arXiv:2310.01875)")
    needs = "clean labelled data (no knowledge of the trigger or target); a linear classifier head"

    settings_cls = FSTSettings
    settings: FSTSettings

    def run(self, ctx: DefenseContext) -> DefenseResult:
        s = self.settings
        ctx.require_full_scope(self.name, "tunes the whole model (it shifts the body's features)")
        ctx.classifier.to(ctx.device)
        head = linear_head(ctx.net, ctx.config)
        original = head.weight.detach().clone()
        norm = original.norm()
        reinit_linear(head, ctx.gen)

        def loss_fn(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(classifier(x), y) + s.alpha * (head.weight * original).sum()

        lr_at = s.lr_function(len(ctx.tune))
        fine_tune(ctx, s, lr_at, loss_fn=loss_fn, on_step=lambda: project_norm(head.weight, norm))
        return DefenseResult(asdict(s), {"head_norm": float(norm)})
