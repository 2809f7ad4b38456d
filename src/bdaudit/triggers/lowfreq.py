"""Low-frequency (LF) trigger — Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A
Frequency Perspective" (ICCV 2021, arXiv:2104.03413)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdaudit.triggers.base import Trigger, register_trigger, seeded_pattern

NULL_SEED_OFFSET = 7919
CPU = torch.device("cpu")


def smooth_noise(seed: int, shape: tuple[int, int, int], cutoff: float) -> torch.Tensor:
    """Seeded (C, H, W) noise low-passed in the Fourier domain (float64, CPU).

    Per axis, frequencies up to ``cutoff`` of Nyquist survive, and at least the first one, so a
    tiny image still gets a pattern. The DC term is dropped: the trigger is a pattern, not a
    global colour shift.
    """
    _, height, width = shape
    noise = seeded_pattern(seed, shape, CPU).double() * 2 - 1
    spectrum = torch.fft.rfft2(noise)
    ky = torch.fft.fftfreq(height, d=1.0 / height).abs()
    kx = torch.fft.rfftfreq(width, d=1.0 / width)
    keep_y = max(1, round(cutoff * height / 2))
    keep_x = max(1, round(cutoff * width / 2))
    keep = (ky[:, None] <= keep_y) & (kx[None, :] <= keep_x)
    keep[0, 0] = False
    return torch.fft.irfft2(spectrum * keep, s=(height, width))


@register_trigger
@dataclass(frozen=True)
class LowFrequency(Trigger):
    """A smooth seeded perturbation added to the whole image.

    epsilon: the perturbation's max |value| on the [0, 1] scale (0.1: visible as a faint tint,
    too weak to fool a clean model, easy for a poisoned one to learn). cutoff: fraction of the
    Nyquist frequency kept per axis (0.1 keeps 1-2 periods on 32 px). seed: seeds the noise.
    Zeng et al. craft the smooth trigger adversarially; this is the fixed seeded variant.
    Null: a different seeded smooth pattern with the same frequency band and L2 norm.
    """

    name = "lowfreq"
    paper = "Zeng et al. 2021, Rethinking the Backdoor Attacks' Triggers: A Frequency " \
            "Perspective (arXiv:2104.03413)"
    summary = "smooth low-frequency seeded noise added to the whole image"

    epsilon: float = 0.1
    cutoff: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in (0, 1], not {self.epsilon}")
        if not 0.0 < self.cutoff <= 1.0:
            raise ValueError(f"cutoff must be in (0, 1], not {self.cutoff}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, not {self.seed}")

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The (C, H, W) perturbation, max |value| = epsilon (float64, CPU)."""
        noise = smooth_noise(self.seed, shape, self.cutoff)
        return noise * (self.epsilon / noise.abs().max())

    def _add(self, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        return (x + pattern.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.pattern(tuple(x.shape[1:])))

    def null(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape[1:])
        trigger_norm = self.pattern(shape).norm()
        other = smooth_noise(self.seed + NULL_SEED_OFFSET, shape, self.cutoff)
        return self._add(x, other * (trigger_norm / other.norm()))
