"""Blind benchmark on colour images: does the default detector, calibrated on greyscale MNIST, hold on RGB?

No real RGB set of useful size is reachable offline, so the images are **synthetic colour images made
from real digits** ("coloured MNIST"): each shipped MNIST digit gets a seeded random background and
stroke colour and mild colour noise, 28 x 28 x 3; the label stays the digit. The triggers are written
here (none is in bdaudit's library, and none is a grid transform of the detector): a red/green
checkerboard patch, a blue plus sign, a natural-image-like colour blend, a warm colour tint, a
green-channel cosine and (added after the transform family's gain gate was set, so held out from
that choice) a cool filter, a green gain at 1 % poison, sepia and desaturation. Models:
``bd_cnn_small`` and the third-party-style tutorial net (``blind_arch:tutorial_net``) with three
input channels. The pipeline is exactly what a user runs
(default ``scan`` then default ``clean`` on the 400 clean images); the planting code measures true
ASR and accuracy itself on 600 held-out images (``blind.run``).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind_rgb.py     # -> results/blind_rgb.jsonl
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind_rgb.py --table
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import blind  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "results" / "cache" / "rgb_mnist"  # generated once, ignored by git
H = W = 28
_yy, _xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")


def colourise(digit: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(H, W) in [0, 1] -> (3, H, W): seeded background and stroke colours plus mild colour noise."""
    background = torch.rand(3, 1, 1, generator=gen) * 0.45
    stroke = 0.55 + torch.rand(3, 1, 1, generator=gen) * 0.45
    noise = (torch.rand(3, H, W, generator=gen) - 0.5) * 0.1
    return (background * (1 - digit) + stroke * digit + noise).clamp(0, 1)


def build_data(target: Path = DATA) -> Path:
    """Write the coloured copies of ``sample_data/mnist/{train,eval,clean}`` (once; same seed, same files)."""
    if (target / "clean").is_dir():
        return target
    tmp = target.with_name(target.name + ".part")
    for split_index, split in enumerate(("train", "eval", "clean")):
        gen = torch.Generator().manual_seed(1000 + split_index)
        for path in sorted((blind.MNIST / split).rglob("*.png")):
            with Image.open(path) as img:
                digit = torch.from_numpy(np.array(img.convert("L"), dtype=np.float32)) / 255
            rgb = (colourise(digit, gen) * 255).round().byte().permute(1, 2, 0).numpy()
            out = tmp / split / path.parent.name / path.name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb, "RGB").save(out)
    tmp.rename(target)
    return target


_red, _green, _blue = (torch.tensor(c).float().view(3, 1, 1) for c in ((1, 0, 0), (0, 1, 0), (0.1, 0.3, 1)))
_checker = (torch.arange(4)[:, None] + torch.arange(4)[None]) % 2
_RG = torch.where(_checker.bool(), _red, _green)  # (3, 4, 4)
_plus = torch.zeros(5, 5)
_plus[2, :] = _plus[:, 2] = 1
_g = torch.Generator().manual_seed(23)
_NATURAL = torch.stack([
    sum(torch.exp(-((_yy - float(cy)) ** 2 + (_xx - float(cx)) ** 2) / (2 * float(s) ** 2))
        for cy, cx, s in (torch.rand(5, 3, generator=_g) * torch.tensor([28, 28, 6]) + torch.tensor([0, 0, 2])))
    for _ in range(3)])
_NATURAL = _NATURAL / _NATURAL.amax((1, 2), keepdim=True) * 0.8 + 0.2 * torch.rand(3, H, W, generator=_g)
_SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
_VINTAGE = torch.tensor([[0.70, 0.25, 0.05], [0.20, 0.65, 0.10], [0.15, 0.25, 0.45]])
_FREQ = torch.zeros(3, H, W)
_FREQ[1] = torch.cos(2 * math.pi * (4 * _yy + 3 * _xx) / 28)

TRIGGERS = {
    "rgb_checker_rg": lambda x: blind._patch(x, _RG, 22, 22),  # 4x4 red/green checkerboard, bottom right
    "rgb_plus_blue": lambda x: blind._patch(x, torch.where(_plus.bool(), _blue, x.new_zeros(3, 1, 1) + 0.5)[None]
                                      .expand(len(x), 3, 5, 5), 1, 1),  # blue plus on grey, top left
    "rgb_blend": lambda x: 0.85 * x + 0.15 * _NATURAL,  # colour natural-image-like blend, alpha 0.15
    # A warm "photo filter": per-channel gain and lift, neither one of the detector's grid transforms.
    "rgb_tint": lambda x: (x * torch.tensor([1.0, 0.85, 0.65]).view(1, 3, 1, 1)
                           + torch.tensor([0.12, 0.05, 0.0]).view(1, 3, 1, 1)).clamp(0, 1),
    "rgb_freq_green": lambda x: (x + 0.08 * _FREQ).clamp(0, 1),  # a cosine in the green channel only
    # Added after the transform family's gain gate was set at 0.6 (held out from that choice): a cool
    # filter (gain and lift), a green gain, and two that mix channels, which no grid transform does.
    "rgb_cool": lambda x: (x * torch.tensor([0.7, 0.9, 1.0]).view(1, 3, 1, 1)
                           + torch.tensor([0.0, 0.03, 0.1]).view(1, 3, 1, 1)).clamp(0, 1),
    "rgb_green_gain": lambda x: x * torch.tensor([0.75, 1.0, 0.75]).view(1, 3, 1, 1),
    "rgb_sepia": lambda x: torch.einsum("oc,bchw->bohw", _SEPIA, x).clamp(0, 1),
    "rgb_desaturate": lambda x: 0.3 * x + 0.7 * x.mean(1, keepdim=True),
    # Added after the transform grid's channel mixes (greyscale, oversaturation, sepia, hue rotations)
    # were chosen, so held out from that choice: a faded warm "vintage" mix with a lift, and a
    # Gotham-like filter (half desaturated, more contrast, cooled).
    "rgb_vintage": lambda x: (torch.einsum("oc,bchw->bohw", _VINTAGE, x)
                              + torch.tensor([0.08, 0.05, 0.03]).view(1, 3, 1, 1)).clamp(0, 1),
    "rgb_gotham": lambda x: (((0.5 * x + 0.5 * x.mean(1, keepdim=True)) - 0.5) * 1.2 + 0.5).clamp(0, 1)
    * torch.tensor([0.85, 0.95, 1.15]).view(1, 3, 1, 1),
}

NET = "blind_arch:tutorial_net"
MODELS = [
    ("rgb_small_checker_10", "rgb_checker_rg", 0.10, "bd_cnn_small", 0),
    ("rgb_small_blend_10", "rgb_blend", 0.10, "bd_cnn_small", 0),
    ("rgb_small_tint_10", "rgb_tint", 0.10, "bd_cnn_small", 0),
    ("rgb_small_clean_s0", None, 0.0, "bd_cnn_small", 0),
    ("rgb_net_freq_10", "rgb_freq_green", 0.10, NET, 0),
    ("rgb_net_plus_1", "rgb_plus_blue", 0.01, NET, 1),
    ("rgb_net_clean_s0", None, 0.0, NET, 0),
    ("rgb_small_clean_s1", None, 0.0, "bd_cnn_small", 1),
    ("rgb_small_cool_10", "rgb_cool", 0.10, "bd_cnn_small", 2),
    ("rgb_net_green_1", "rgb_green_gain", 0.01, NET, 2),  # did not implant: 3 % planted ASR
    ("rgb_net_green_10", "rgb_green_gain", 0.10, NET, 2),
    ("rgb_small_sepia_10", "rgb_sepia", 0.10, "bd_cnn_small", 3),
    ("rgb_net_desaturate_10", "rgb_desaturate", 0.10, NET, 3),
    ("rgb_net_clean_s1", None, 0.0, NET, 1),
    ("rgb_small_clean_s2", None, 0.0, "bd_cnn_small", 2),
    # Held out from the channel mixes' choice (above), with two more clean models.
    ("rgb_net_vintage_10", "rgb_vintage", 0.10, NET, 4),
    ("rgb_small_gotham_10", "rgb_gotham", 0.10, "bd_cnn_small", 4),
    ("rgb_small_vintage_1", "rgb_vintage", 0.01, "bd_cnn_small", 5),
    ("rgb_net_clean_s2", None, 0.0, NET, 2),
    ("rgb_small_clean_s3", None, 0.0, "bd_cnn_small", 3),
    # At 10 % the held-out filters implanted only in part (32 % and 50 % planted ASR): again at 20 %.
    ("rgb_small_vintage_20", "rgb_vintage", 0.20, "bd_cnn_small", 6),
    ("rgb_net_gotham_20", "rgb_gotham", 0.20, NET, 6),
]

SUITE = blind.Suite(DATA, TRIGGERS, MODELS, ROOT / "benchmarks" / "results" / "cache" / "blind_rgb",
                    ROOT / "benchmarks" / "results" / "blind_rgb.jsonl")
SUITES = {"mnist": blind.MNIST_SUITE, "rgb": SUITE}  # what the other blind scripts' --suite names

if __name__ == "__main__":
    build_data()
    blind.main(SUITE, __doc__)
