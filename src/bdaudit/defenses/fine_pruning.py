"""Fine-Pruning (Liu, Dolan-Gavitt & Garg 2018, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID): prune the channels of the last convolutional layer that
stay dormant on clean data — where backdoor behaviour tends to hide — then fine-tune on clean data.

How bdaudit finds the last layer's channels, for any CNN with a linear head: after global average
pooling they are exactly the inputs of the head (``layers.linear_head``), so their mean activation
on the clean tuning data is read there (``layers.capture_head_inputs``), and a pruned channel is
removed by zeroing the head's weight column for it. During fine-tuning a forward pre-hook on the
head multiplies its input by the pruning mask, so the pruned columns get no gradient and stay
exactly zero under any of the optimizers and weight decay (the body may still move those
channels, but nothing downstream reads them). The hook is removed at the end and the zeroed
columns are baked into the weights: the checkpoint holds only the ordinary state dict, with the
same keys as before.

Pruning proceeds in increasing order of mean activation (the most dormant channel first) while the
accuracy on the clean **tuning data itself** stays within ``accuracy_tolerance`` of the unpruned
accuracy, and stops at ``prune_ratio_max`` of the channels. The tuning data is used (rather than a
held-back part of it) because pruning fits nothing but one number — how many channels go — so the
measurement is not biased by training on it, and every image stays available for fine-tuning.
The accuracy curve costs one forward pass: logits are updated channel by channel from the cached
head inputs.

Knobs (``FPSettings``):

- ``prune_ratio_max`` (0.8): never prune more than this fraction of the channels.
- ``accuracy_tolerance`` (0.1): stop before the pruning alone costs more than this absolute drop
  in clean accuracy. Fine-tuning wins most of it back, so the stop rule can afford to be generous:
  on the tests' tiny BadNets CNN 0.05 prunes 5 of 32 channels and leaves the backdoor partly alive
  (ASR 0.17-0.74 across the fine-tuning epochs), while 0.1 prunes 10 and takes ASR to ~0.1 with
  clean accuracy 0.937 -> 0.920.
- fine-tuning: ``epochs`` (10), ``lr`` (0.01), ``schedule`` (cosine, or constant) and the shared
  ``TuneSettings`` (batch size, optimizer, momentum, weight decay, augmentation). The paper
  fine-tunes the whole pruned network at a small rate; the cosine decay ends the run at a low rate,
  which keeps the final model steadier than a constant rate (fine-tuning on clean data can
  partly revive a backdoor through the channels that were kept).

Needs clean labelled data and a linear classifier head; works on the whole model (``--scope full``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from bdaudit.core.data import to_float
from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import Defense, DefenseContext, DefenseResult, register_defense
from bdaudit.defenses.layers import capture_head_inputs, linear_head
from bdaudit.defenses.tuning import RateSettings, fine_tune

EVAL_BATCH = 256


@dataclass(frozen=True)
class FPSettings(RateSettings):
    """Fine-Pruning knobs: the pruning stop rule, then the fine-tuning stage's optimisation."""

    prune_ratio_max: float = 0.8
    accuracy_tolerance: float = 0.1
    epochs: int = 10
    lr: float = 0.01
    schedule: str = "cosine"  # or constant

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.prune_ratio_max < 1.0:
            raise BdauditError(f"`prune_ratio_max` must be in [0, 1), not {self.prune_ratio_max}")
        if not 0.0 <= self.accuracy_tolerance <= 1.0:
            raise BdauditError(f"`accuracy_tolerance` must be in [0, 1], not {self.accuracy_tolerance}")


@dataclass(frozen=True)
class PrunePlan:
    """Which head inputs to prune, and the clean accuracy before and after."""

    order: torch.Tensor  # channel indices, most dormant first
    pruned: int
    accuracy_before: float
    accuracy_after: float
    stopped_by: str  # "accuracy tolerance" or "max ratio"
    mean_activation: torch.Tensor

    def mask(self) -> torch.Tensor:
        keep = torch.ones(len(self.order))
        keep[self.order[:self.pruned]] = 0.0
        return keep


@torch.no_grad()
def head_features(ctx: DefenseContext, head: nn.Linear) -> torch.Tensor:
    """The head's inputs (pooled last-stage channels) for every tuning image, in eval mode."""
    ctx.classifier.to(ctx.device).eval()
    chunks = []
    with capture_head_inputs(head) as seen:
        for start in range(0, len(ctx.tune), EVAL_BATCH):
            ctx.classifier(to_float(ctx.tune.images[start:start + EVAL_BATCH], ctx.device))
            chunks.append(seen.pop().detach().reshape(-1, head.in_features))
    return torch.cat(chunks)


@torch.no_grad()
def plan_pruning(features: torch.Tensor, labels: torch.Tensor, head: nn.Linear,
                 settings: FPSettings) -> PrunePlan:
    """Prune in increasing order of mean activation while accuracy stays within the tolerance."""
    mean_activation = features.mean(0).cpu()
    order = torch.argsort(mean_activation, stable=True)
    labels = labels.to(features.device)
    logits = head(features)
    acc_before = float((logits.argmax(1) == labels).float().mean())
    limit = int(settings.prune_ratio_max * features.shape[1])
    pruned, acc_after, stopped_by = 0, acc_before, "max ratio"
    for j in order[:limit].tolist():
        logits -= features[:, j:j + 1] * head.weight[:, j][None, :]
        acc = float((logits.argmax(1) == labels).float().mean())
        if acc_before - acc > settings.accuracy_tolerance:
            stopped_by = "accuracy tolerance"
            break
        pruned, acc_after = pruned + 1, acc
    return PrunePlan(order, pruned, acc_before, acc_after, stopped_by, mean_activation)


def prune_head_inputs(head: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the head's weight columns for pruned inputs (the permanent form of the mask)."""
    with torch.no_grad():
        head.weight.mul_(mask.to(head.weight.device, head.weight.dtype)[None, :])


def mask_head_inputs(head: nn.Linear, mask: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Keep pruned inputs out of the head while training (their columns then get no gradient)."""
    mask = mask.to(head.weight.device, head.weight.dtype)

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (inputs[0] * mask, *inputs[1:])

    return head.register_forward_pre_hook(hook)


@register_defense
class FinePruning(Defense):
    name = "fp"
    paper = ("Liu, Dolan-Gavitt & Garg 2018, Fine-Pruning: Defending Against Backdooring Attacks on "
             "Deep Neural Networks (RAID)")
    needs = "clean labelled data and a linear classifier head (no knowledge of the trigger or target)"

    settings_cls = FPSettings
    settings: FPSettings

    def run(self, ctx: DefenseContext) -> DefenseResult:
        s = self.settings
        ctx.require_full_scope(self.name, "prunes and fine-tunes the whole model")
        head = linear_head(ctx.net, ctx.config)
        plan = plan_pruning(head_features(ctx, head), ctx.tune.labels, head, s)
        mask = plan.mask()
        prune_head_inputs(head, mask)
        lr_at = s.lr_function(len(ctx.tune))
        handle = mask_head_inputs(head, mask)
        try:
            fine_tune(ctx, s, lr_at)
        finally:
            handle.remove()
        prune_head_inputs(head, mask)  # bake the mask in (the columns are already zero)
        channels = len(plan.order)
        return DefenseResult(asdict(s), {
            "channels": channels, "pruned": plan.pruned, "pruned_fraction": plan.pruned / channels,
            "stopped_by": plan.stopped_by, "tune_accuracy_unpruned": plan.accuracy_before,
            "tune_accuracy_pruned": plan.accuracy_after})
