"""WaNet warping trigger — Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack"
(ICLR 2021, arXiv:2102.10369)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bdaudit.triggers.base import Trigger, register_trigger, seeded_pattern

NULL_SEED_OFFSET = 7919
CPU = torch.device("cpu")


def random_flow(seed: int, k: int, height: int, width: int) -> torch.Tensor:
    """The paper's flow field: seeded k x k uniform(-1, 1) control points, normalised to mean
    |.| = 1, upsampled bicubically to (1, height, width, 2) (x, y) on the CPU."""
    points = seeded_pattern(seed, (1, 2, k, k), CPU) * 2 - 1
    points = points / points.abs().mean()
    flow = F.interpolate(points, size=(height, width), mode="bicubic", align_corners=True)
    return flow.permute(0, 2, 3, 1)


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(1, height, width, 2) sampling grid in grid_sample's (x, y) order that changes nothing."""
    ys = torch.linspace(-1.0, 1.0, height)
    xs = torch.linspace(-1.0, 1.0, width)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)[None]


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` at ``grid`` (clamped to the image, as in the reference code)."""
    grid = grid.clamp(-1.0, 1.0).to(device=x.device, dtype=x.dtype)
    grid = grid.expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, align_corners=True).clamp(0.0, 1.0)


@register_trigger
@dataclass(frozen=True)
class WaNet(Trigger):
    """A fixed, smooth, barely visible warp of the whole image.

    k: control-point grid side (the paper's k = 4). strength: the paper's s; the displacement is
    ``s * flow / size`` in grid_sample's [-1, 1] units (0.5 means sub-pixel shifts). seed: seeds
    the flow field. ``noise_warp`` adds the paper's per-sample random jitter ("noise mode").
    Null: a different seeded flow field rescaled to the same mean displacement.
    """

    name = "wanet"
    paper = "Nguyen & Tran 2021, WaNet - Imperceptible Warping-based Backdoor Attack " \
            "(arXiv:2102.10369)"
    summary = "smooth seeded elastic warp of the whole image (grid_sample)"

    k: int = 4
    strength: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"k must be >= 2, not {self.k}")
        if self.strength <= 0:
            raise ValueError(f"strength must be > 0, not {self.strength}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, not {self.seed}")

    def _flow(self, seed: int, height: int, width: int) -> torch.Tensor:
        if self.k > min(height, width):
            raise ValueError(f"a {self.k}x{self.k} control grid does not fit "
                             f"{height}x{width} images")
        return random_flow(seed, self.k, height, width)

    def _grid(self, flow: torch.Tensor) -> torch.Tensor:
        height, width = flow.shape[1], flow.shape[2]
        scale = torch.tensor([self.strength / width, self.strength / height])
        return identity_grid(height, width) + flow * scale

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The trigger's (1, height, width, 2) sampling grid (unclamped, on the CPU)."""
        return self._grid(self._flow(self.seed, height, width))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self.grid(x.shape[-2], x.shape[-1]))

    def noise_warp(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The trigger warp plus per-sample uniform jitter of up to one pixel-step (WaNet's
        "noise mode" for cross samples, which keep their label so the model learns the exact
        warp). ``gen`` drives the jitter; it is drawn on ``gen``'s device."""
        n, _, height, width = x.shape
        jitter = torch.rand((n, height, width, 2), generator=gen, device=gen.device) * 2 - 1
        jitter = jitter.cpu() / torch.tensor([width, height])
        return warp(x, self.grid(height, width) + jitter)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        flow = self._flow(self.seed, height, width)
        other = self._flow(self.seed + NULL_SEED_OFFSET, height, width)
        # Match the upsampled field's mean displacement, not only the control points'.
        other = other * (flow.abs().mean() / other.abs().mean())
        return warp(x, self._grid(other))
