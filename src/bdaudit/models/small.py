"""CIFAR/MNIST-scale classifiers with timm's classifier interface.

``bd_cnn_tiny`` / ``bd_cnn_small`` are fast CPU CNNs; ``preact_resnet18_cifar`` is the
PreAct-ResNet-18 used by BackdoorBench and most backdoor papers (He et al., 2016).
All expose ``forward_features`` / ``forward_head`` / ``get_classifier`` and name their head
``fc`` in ``pretrained_cfg`` so ``--scope head`` knows the boundary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {"classifier": "fc", "num_classes": 10, "first_conv": "stem.0", **kwargs}


class _ClassifierMixin:
    """timm-style head accessors shared by the small models."""

    fc: nn.Module
    num_features: int
    num_classes: int

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class BdCNN(_ClassifierMixin, nn.Module):
    """A VGG-style CNN: two conv blocks per stage, max-pool between stages, global average pool."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10,
                 in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for i, width in enumerate(widths):
            layers += _conv_bn(cin, width) + _conv_bn(width, width)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = width
        self.stem = nn.Sequential(*layers[:3])
        self.features = nn.Sequential(*layers[3:])
        self.num_features = cin
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return x if pre_logits else self.fc(x)


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(_ClassifierMixin, nn.Module):
    """CIFAR-style PreAct-ResNet-18: 3x3 stem, no stem pooling, four stages of two blocks."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False))
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_PreActBlock(cin, cout, stride), _PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(512)
        self.num_features = 512
        self.num_classes = num_classes
        self.fc = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.layers(self.stem(x))))


def _build(cls: type[nn.Module], pretrained: bool, cfg: dict[str, Any], **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError("bdaudit's small models have no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = cls(**kwargs)
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    model.default_cfg = cfg  # type: ignore[assignment]
    return model


@register_model
def bd_cnn_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """~13 k parameters; trains in seconds on CPU (tests)."""
    return _build(BdCNN, pretrained, _cfg(), widths=(8, 16, 32), **kwargs)


@register_model
def bd_cnn_small(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """~73 k parameters; the sample models' architecture (~1000 img/s training on 2 CPU cores)."""
    return _build(BdCNN, pretrained, _cfg(), widths=(16, 32, 64), **kwargs)


@register_model
def bd_cnn_medium(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """~0.29 M parameters; a wider variant for 32x32 colour data."""
    return _build(BdCNN, pretrained, _cfg(), widths=(32, 64, 128), **kwargs)


@register_model
def preact_resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR-style PreAct-ResNet-18 (~11 M parameters), the backdoor benchmarks' standard."""
    return _build(PreActResNet18, pretrained, _cfg(), **kwargs)
