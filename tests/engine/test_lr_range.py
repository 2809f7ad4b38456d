"""The learning-rate range test, now an engine tool that needs no defense context."""

from __future__ import annotations

import torch
from torch import nn

from bdaudit.core.data import ImageSet
from bdaudit.engine.loop import Runtime
from bdaudit.engine.lr_range import RangeTestSettings, lr_range_test


def test_the_sweep_climbs_exponentially_and_moves_only_the_given_parameters() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=gen)
    data = ImageSet(images, torch.arange(64) % 2, ("a", "b"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))
    body = model[1].weight.detach().clone()
    settings = RangeTestSettings(lr_min=1e-3, lr_max=100.0, steps=30, batch_size=16)
    test = lr_range_test(model, model[3].parameters(), data, Runtime(torch.Generator().manual_seed(1),
                                                                      torch.device("cpu")),
                         num_classes=2, settings=settings)
    assert test.lrs[0] == 1e-3 and all(b > a for a, b in zip(test.lrs, test.lrs[1:], strict=False))
    assert len(test.losses) == len(test.lrs) <= 30
    # A rate of 100 throws any model out of its basin: the test must see it leave.
    assert test.escape_lr is not None or test.diverge_lr is not None
    assert torch.equal(body, model[1].weight)
    assert test.to_dict()["curve"][0][0] == 1e-3
