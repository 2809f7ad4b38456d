"""The classifier head and training only it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdaudit.core.config import ModelConfig
from bdaudit.core.errors import BdauditError
from bdaudit.core.heads import HeadOnly, body_eval, freeze_body, frozen_except, head_of, unfreeze


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
        self.fc = nn.Linear(8, 2)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def config(head: str | None) -> ModelConfig:
    return ModelConfig(arch="test", num_classes=2, in_chans=1, input_size=(4, 4), head=head)


def test_the_recorded_head_is_found_and_a_missing_one_named() -> None:
    net = Net()
    assert head_of(net, config("fc")) is net.fc
    with pytest.raises(BdauditError, match="no module 'nope'"):
        head_of(net, config("nope"))
    with pytest.raises(BdauditError, match="`scope` head needs a recorded head"):
        head_of(net, config(None))
    assert head_of(net, config(None), infer=True) is net.fc  # a model bdaudit built: timm's head
    with pytest.raises(BdauditError, match="cannot tell the classifier head"):
        head_of(nn.Linear(2, 2), config(None), infer=True)


def test_freezing_the_body_and_back() -> None:
    net = Net()
    params = freeze_body(net, net.fc)
    assert [id(p) for p in params] == [id(p) for p in net.fc.parameters()]
    assert not any(p.requires_grad for p in net.body.parameters())
    unfreeze(net)
    assert all(p.requires_grad for p in net.parameters())


def test_frozen_except_restores_only_what_it_froze() -> None:
    net = Net()
    net.body[0].bias.requires_grad_(False)  # frozen before: stays frozen
    with frozen_except(net, net.fc) as params:
        assert len(params) == 2 and not net.body[0].weight.requires_grad
    assert net.body[0].weight.requires_grad and not net.body[0].bias.requires_grad


def test_only_the_head_enters_train_mode() -> None:
    net = Net()
    body_eval(net, net.fc)
    assert not net.body[1].training and net.fc.training
    wrapped = HeadOnly(net, net.fc).train()
    assert not net.body[1].training and net.fc.training and not wrapped.training
    x = torch.rand(3, 1, 4, 4)
    assert torch.equal(wrapped(x), net(x))
