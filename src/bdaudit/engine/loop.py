"""The training loop shared by planting and cleaning: seeded shuffling, tensor-level
augmentation, a per-step learning-rate function and per-epoch callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import ImageSet, to_float
from bdaudit.core.predict import predict as core_predict

# Far beyond any useful run, yet small enough that a typo (--epochs 10^20) is refused, not started.
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_STEPS = 1_000_000

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
class Augment:
    """Random crop with zero padding and an optional horizontal flip (never for digits)."""

    pad: int = 2
    hflip: bool = False

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.pad > 0:
            n, _, h, w = x.shape
            padded = F.pad(x, (self.pad,) * 4)
            # One integer shift per image: translate by unfolding offsets with gather-free slicing.
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen).tolist()
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen).tolist()
            x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        if self.hflip:
            flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}': use sgd, adam or adamw")


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return max(1, -(-n_images // batch_size))


def train(classifier: nn.Module, data: ImageSet, *, epochs: int, batch_size: int,
          optimizer: torch.optim.Optimizer, lr_at: LrFunction, gen: torch.Generator,
          device: torch.device, augment: Augment | None = None,
          batch_transform: BatchTransform | None = None,
          on_epoch: EpochCallback | None = None, on_step: Callable[[], None] | None = None,
          set_modes: Callable[[], None] | None = None, loss_fn: LossFunction | None = None,
          step_fn: StepFunction | None = None) -> None:
    """Training over shuffled batches; ``lr_at(step)`` sets every group's rate.
    Only parameters with ``requires_grad`` in ``optimizer`` move. ``loss_fn`` replaces the
    cross-entropy loss and ``step_fn`` the single forward/backward/step (defaults: plain CE, one
    pass); ``on_step`` runs after each step (e.g. a projection)."""
    loss_fn = loss_fn or cross_entropy_loss
    step_fn = step_fn or plain_step
    # channels_last speeds convolutions up ~1.4-4x on CPU and is neutral or better elsewhere.
    classifier.to(device, memory_format=torch.channels_last).train()
    if set_modes is not None:  # e.g. keep a frozen body's BatchNorm in eval mode
        set_modes()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total_loss, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            x, y = to_float(data.images[index]), data.labels[index]
            if batch_transform is not None:
                x, y = batch_transform(x, y, index, gen)
            if augment is not None:
                x = augment(x, gen)
            x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = step_fn(classifier, x, y, optimizer, loss_fn)
            total_loss += float(loss.detach()) * len(y)
            seen += len(y)
            step += 1
            if on_step is not None:
                on_step()
        if on_epoch is not None:
            on_epoch(epoch, total_loss / max(seen, 1))
    classifier.eval()


def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int | None, device: torch.device,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted labels for uint8 images, optionally transformed (e.g. triggered) first."""
    return core_predict(classifier, images, device, batch_size, transform)


def accuracy(classifier: nn.Module, data: ImageSet, batch_size: int | None, device: torch.device) -> float:
    preds = predict(classifier, data.images, batch_size, device)
    return float((preds == data.labels).float().mean()) if len(data) else float("nan")
