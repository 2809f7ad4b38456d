"""A third-party-style MNIST architecture for the blind benchmark: the classic PyTorch-examples
``Net`` (two convolutions, max-pool, dropout, two linear layers), loaded by bdaudit through its
``module:callable`` architecture path (``--arch blind_arch:tutorial_net``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TutorialNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(torch.flatten(F.max_pool2d(x, 2), 1))
        return self.fc2(self.dropout2(F.relu(self.fc1(x))))


def tutorial_net(num_classes: int = 10, in_chans: int = 1, **_: object) -> nn.Module:
    return TutorialNet(num_classes, in_chans)
