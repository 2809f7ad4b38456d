"""Models written the way their authors write them (not bdaudit's), for the conformance suite.

A user points ``--arch thirdparty_models:Net`` at code like this; nothing here knows bdaudit.
"""

import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The classic PyTorch MNIST example: no constructor arguments, ``.view`` flatten, log-softmax."""

    def __init__(self):
        super(Net, self).__init__()  # noqa: UP008 - written as the tutorial writes it
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def sequential(num_classes=4, in_chans=3):
    """A plain nn.Sequential, as in countless notebooks."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, num_classes))


class LitClassifier(nn.Module):
    """Stands in for a LightningModule: the network lives under ``self.model`` (keys ``model.*``)."""

    def __init__(self):
        super().__init__()
        self.model = sequential(num_classes=4, in_chans=3)


def raises(num_classes=10):
    raise RuntimeError("this factory is broken")


def not_a_module():
    return {"weights": []}
