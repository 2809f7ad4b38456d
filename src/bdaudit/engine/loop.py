"""The one training loop, shared by planting, cleaning and re-injection: seeded shuffling,
tensor-level augmentation, a per-step learning-rate function and hooks (stamping, per-epoch,
per-step, loss and step replacements)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import ImageSet, to_float
from bdaudit.core.predict import predict as core_predict
from bdaudit.engine.recipe import Augment, Recipe

# (images in [0, 1], labels, dataset indices, generator) -> (images, labels): e.g. poisoning.
BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator],
                          tuple[torch.Tensor, torch.Tensor]]
LrFunction = Callable[[int], float]
EpochCallback = Callable[[int, float], None]
# (classifier, images, labels) -> scalar loss with its graph: e.g. CE plus a regulariser.
LossFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# (classifier, images, labels, optimizer, loss function) -> the step's loss: one optimisation step
# (zero the gradients, backward, optimizer.step), e.g. SAM's two forward/backward passes.
StepFunction = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer, LossFunction],
                        torch.Tensor]


def cross_entropy_loss(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss: plain cross-entropy."""
    return F.cross_entropy(classifier(x), y)


def plain_step(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: LossFunction) -> torch.Tensor:
    """The default step: one forward/backward pass and one optimizer step."""
    loss = loss_fn(classifier, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@dataclass(frozen=True)
class Hooks:
    """What a run may change about the plain loop. ``batch_transform`` is the stamping hook
    (poisoning, trigger unlearning: ``engine.stamping``); ``on_epoch(epoch, mean loss)``;
    ``on_step`` runs after each step (e.g. a projection); ``set_modes`` after ``train()`` (e.g. a
    frozen body's BatchNorm stays in eval mode); ``loss_fn`` and ``step_fn`` replace plain
    cross-entropy and the single forward/backward/step."""

    batch_transform: BatchTransform | None = None
    on_epoch: EpochCallback | None = None
    on_step: Callable[[], None] | None = None
    set_modes: Callable[[], None] | None = None
    loss_fn: LossFunction | None = None
    step_fn: StepFunction | None = None


NO_HOOKS = Hooks()


@dataclass(frozen=True)
class Runtime:
    """Where a run computes and the generator every random choice of it draws from."""

    gen: torch.Generator
    device: torch.device


@dataclass(frozen=True)
class Plan:
    """How long a run is and what it feeds: epochs of shuffled batches, a per-step rate."""

    epochs: int
    batch_size: int
    lr_at: LrFunction
    augment: Augment | None = None


def train(classifier: nn.Module, data: ImageSet, plan: Plan, optimizer: torch.optim.Optimizer,
          runtime: Runtime, hooks: Hooks = NO_HOOKS) -> None:
    """The training loop: shuffled batches, ``plan.lr_at(step)`` sets every group's rate.
    Only parameters with ``requires_grad`` in ``optimizer`` move."""
    loss_fn = hooks.loss_fn or cross_entropy_loss
    step_fn = hooks.step_fn or plain_step
    gen, device = runtime.gen, runtime.device
    # channels_last speeds convolutions up ~1.4-4x on CPU and is neutral or better elsewhere.
    classifier.to(device, memory_format=torch.channels_last).train()
    if hooks.set_modes is not None:
        hooks.set_modes()
    step = 0
    for epoch in range(plan.epochs):
        order = torch.randperm(len(data), generator=gen)
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), plan.batch_size):
            index = order[start:start + plan.batch_size]
            x, y = to_float(data.images[index]), data.labels[index]
            if hooks.batch_transform is not None:
                x, y = hooks.batch_transform(x, y, index, gen)
            if plan.augment is not None:
                x = plan.augment(x, gen)
            x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
            for group in optimizer.param_groups:
                group["lr"] = plan.lr_at(step)
            loss = step_fn(classifier, x, y, optimizer, loss_fn)
            total_loss += float(loss.detach()) * len(y)
            seen += len(y)
            step += 1
            if hooks.on_step is not None:
                hooks.on_step()
        if hooks.on_epoch is not None:
            hooks.on_epoch(epoch, total_loss / max(seen, 1))
    classifier.eval()


def fit(classifier: nn.Module, data: ImageSet, recipe: Recipe, lr_at: LrFunction, runtime: Runtime, *,
        hflip: bool = False, params: Iterable[nn.Parameter] | None = None, hooks: Hooks = NO_HOOKS) -> None:
    """Train ``params`` (default: all of ``classifier``'s) with ``recipe`` — the one fine-tuning
    entry point of planting, transfer, the tuning defenses and Neural Cleanse. The run lasts
    ``recipe.epochs_for(len(data))`` epochs, so ``min_steps`` is honoured everywhere."""
    chosen = list(classifier.parameters() if params is None else params)
    optimizer = recipe.make_optimizer(chosen, lr_at(0))
    plan = Plan(recipe.epochs_for(len(data)), recipe.batch_size, lr_at, recipe.augment(hflip))
    train(classifier, data, plan, optimizer, runtime, hooks)


def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int | None, device: torch.device,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted labels for uint8 images, optionally transformed (e.g. triggered) first."""
    return core_predict(classifier, images, device, batch_size, transform)


def accuracy(classifier: nn.Module, data: ImageSet, batch_size: int | None, device: torch.device) -> float:
    preds = predict(classifier, data.images, batch_size, device)
    return float((preds == data.labels).float().mean()) if len(data) else float("nan")
