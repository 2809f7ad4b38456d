"""Blended trigger — Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning" (2017, arXiv:1712.05526)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bdaudit.triggers.base import Trigger, register_trigger, seeded_pattern

# A prime offset: the null's seed never coincides with a small trigger seed.
NULL_SEED_OFFSET = 7919
CPU = torch.device("cpu")


def pil_mode(channels: int) -> str:
    """PIL mode matching a batch's channel count."""
    if channels not in (1, 3):
        raise ValueError(f"image triggers need 1 or 3 channels, not {channels}")
    return "L" if channels == 1 else "RGB"


def probe_image(path: str, what: str) -> None:
    """Fail early (ValueError) when ``path`` is not a readable image."""
    if not Path(path).is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{what} {path} is not a readable image ({exc})") from None


def has_alpha(path: str) -> bool:
    """Whether the image carries transparency (an alpha channel or a transparent colour)."""
    with Image.open(path) as img:
        return img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info


@lru_cache(maxsize=64)
def load_image(path: str, mode: str, height: int, width: int) -> torch.Tensor:
    """(C, height, width) float32 in [0, 1] on the CPU, resized bilinearly.

    ``mode`` is ``L``, ``RGB`` or ``A`` (the alpha channel). The result is cached and shared:
    callers must not modify it in place.
    """
    with Image.open(path) as img:
        img = img.convert("RGBA").getchannel("A") if mode == "A" else img.convert(mode)
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


@register_trigger
@dataclass(frozen=True)
class Blended(Trigger):
    """The whole image blended with a pattern: ``x * (1 - alpha) + pattern * alpha``.

    alpha: blend weight in (0, 1]. seed: seeds the uniform-noise pattern (one value per pixel
    and channel). image: optional path to a picture used as the pattern instead (converted to
    the batch's channels and resized bilinearly to its size).
    Null: the same blend with a different seeded noise pattern (seed + 7919).
    """

    name = "blended"
    paper = "Chen et al. 2017, Targeted Backdoor Attacks ... Data Poisoning (arXiv:1712.05526)"
    summary = "whole-image alpha blend with a seeded noise pattern or a user image"

    alpha: float = 0.2
    seed: int = 0
    image: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {self.alpha}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, not {self.seed}")
        if self.image:
            probe_image(self.image, "image")

    def _blend(self, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        pattern = pattern.to(device=x.device, dtype=x.dtype)
        return (x * (1.0 - self.alpha) + pattern * self.alpha).clamp(0.0, 1.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = x.shape
        if self.image:
            return self._blend(x, load_image(self.image, pil_mode(channels), height, width))
        return self._blend(x, seeded_pattern(self.seed, (channels, height, width), CPU))

    def null(self, x: torch.Tensor) -> torch.Tensor:
        # Noise rather than a shuffle of the user image: a shuffled solid-colour image would be
        # the trigger itself.
        shape = tuple(x.shape[1:])
        return self._blend(x, seeded_pattern(self.seed + NULL_SEED_OFFSET, shape, CPU))
