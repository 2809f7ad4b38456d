"""SimCLR pre-training without labels (Chen et al. 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", arXiv:2002.05709), sized for small grayscale/colour images.

The encoder is a timm classifier's body: its pre-logits features are the embedding, so the
backdoored encoder plus a linear head is an ordinary classifier checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import ImageSet, to_float
from bdaudit.engine.loop import Runtime
from bdaudit.engine.recipe import warm_cosine
from bdaudit.models.checkpoint import NormalizedClassifier
from bdaudit.planting.common import EpochCallback


class Embedder(nn.Module):
    """Images in [0, 1] -> the classifier's pre-logits features (timm's ``forward_head(...,
    pre_logits=True)``); shares the classifier's weights."""

    def __init__(self, classifier: NormalizedClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.classifier.net
        x = (x - self.classifier.mean) / self.classifier.std
        return net.forward_head(net.forward_features(x), pre_logits=True)


@dataclass(frozen=True)
class ViewAugment:
    """One random SimCLR view per image, vectorised: a random resized crop, rotation, shear and
    shift as one affine warp, then contrast/brightness jitter and pixel noise. No flips (digits
    are not mirror-symmetric); SimCLR's colour distortion is reduced to what grayscale has."""

    scale: tuple[float, float] = (0.5, 1.2)  # side of the crop relative to the image
    rotate: float = 15.0  # degrees
    shear: float = 0.15
    shift: float = 0.15  # of the half-width, on top of the crop's own freedom
    contrast: float = 0.4
    brightness: float = 0.2
    noise: float = 0.05

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]

        def uniform(low: float | torch.Tensor, high: float | torch.Tensor) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=gen)

        zoom = uniform(*self.scale)
        angle = uniform(-math.radians(self.rotate), math.radians(self.rotate))
        shear = uniform(-self.shear, self.shear)
        room = (1.0 - zoom).clamp(min=0.0) + self.shift  # a smaller crop may sit anywhere
        tx, ty = uniform(-room, room), uniform(-room, room)
        cos, sin = zoom * angle.cos(), zoom * angle.sin()
        theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1),
                             torch.stack([sin, cos, ty], 1)], 1).to(x)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(-1, 1, 1, 1).to(x)
        brightness = uniform(-self.brightness, self.brightness).view(-1, 1, 1, 1).to(x)
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean + brightness
        x = x + self.noise * torch.randn(x.shape, generator=gen).to(x)
        return x.clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy: each view must pick its partner out of
    the other 2N - 2 views of the batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                              float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def projector(dim: int, out_dim: int) -> nn.Module:
    """SimCLR's MLP projection head; discarded after pre-training (the embedding is below it)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))


@dataclass(frozen=True)
class SimCLRSettings:
    """Contrastive pre-training: epochs, AdamW rate, batch (2 views per image), NT-Xent
    temperature and the projection head's width."""

    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 256
    temperature: float = 0.5
    proj_dim: int = 64


def pretrain_simclr(classifier: NormalizedClassifier, data: ImageSet, settings: SimCLRSettings,
                    runtime: Runtime, *, augment: ViewAugment | None = None,
                    on_epoch: EpochCallback | None = None) -> None:
    """Train the classifier's body contrastively on ``data``'s images; labels are never read."""
    epochs, lr, batch_size = settings.epochs, settings.lr, settings.batch_size
    temperature, proj_dim = settings.temperature, settings.proj_dim
    gen, device = runtime.gen, runtime.device
    augment = augment or ViewAugment()
    net = classifier.net
    embed = Embedder(classifier).to(device, memory_format=torch.channels_last).train()
    head = projector(net.num_features, proj_dim).to(device)
    head_ids = {id(p) for p in net.get_classifier().parameters()}
    params = [p for p in net.parameters() if id(p) not in head_ids] + list(head.parameters())
    # Adam instead of LARS: SimCLR's large-batch optimiser buys nothing at a few thousand images.
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    # Full batches only (a short last batch would be an easier NT-Xent task).
    starts = range(0, max(1, len(data) // batch_size) * batch_size, batch_size)
    lr_at = warm_cosine(lr, epochs * len(starts))
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total_loss = 0.0
        for start in starts:
            x = to_float(data.images[order[start:start + batch_size]])
            views = torch.cat([augment(x, gen), augment(x, gen)]).to(device)
            z = head(embed(views.contiguous(memory_format=torch.channels_last)))
            loss = nt_xent(*z.chunk(2), temperature)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, total_loss / len(starts))
    classifier.eval()
