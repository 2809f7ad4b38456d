"""The one training loop: plans, hooks and the recipe-driven ``fit``."""

from __future__ import annotations

import torch
from torch import nn

from bdaudit.core.data import ImageSet
from bdaudit.engine.loop import Hooks, Plan, Runtime, fit, train
from bdaudit.engine.recipe import Recipe
from bdaudit.engine.schedules import Constant

CPU = torch.device("cpu")


def data(n: int = 20) -> ImageSet:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen)
    return ImageSet(images, torch.arange(n) % 2, ("a", "b"))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))


def runtime(seed: int = 0) -> Runtime:
    return Runtime(torch.Generator().manual_seed(seed), CPU)


def test_fit_honours_min_steps_and_reports_every_epoch() -> None:
    steps, epochs, lrs = [], [], []
    model = net()
    recipe = Recipe(epochs=1, min_steps=7, batch_size=10)
    hooks = Hooks(on_step=lambda: steps.append(1), on_epoch=lambda e, loss: epochs.append((e, loss)))
    fit(model, data(), recipe, lambda step: lrs.append(step) or 0.01, runtime(), hooks=hooks)
    assert len(steps) == 8 and [e for e, _ in epochs] == [0, 1, 2, 3]  # 4 epochs of 2 batches >= 7 steps
    assert all(loss > 0 for _, loss in epochs)
    assert lrs[1:] == list(range(8))  # the rate is set before every step (lrs[0]: the optimizer's start)


def test_only_the_given_parameters_move_and_the_stamping_hook_sees_every_batch() -> None:
    model = net()
    body = [p.detach().clone() for p in model[0].parameters()]
    head = [p.detach().clone() for p in model[3].parameters()]
    seen: list[int] = []

    def stamp(x, y, index, gen):
        seen.extend(index.tolist())
        return x.clamp(max=0.5), y

    fit(model, data(), Recipe(epochs=2, batch_size=8), Constant(0.1), runtime(),
        params=model[3].parameters(), hooks=Hooks(batch_transform=stamp))
    assert all(torch.equal(a, b) for a, b in zip(body, model[0].parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(head, model[3].parameters(), strict=True))
    assert sorted(seen) == sorted(list(range(20)) * 2)


def test_the_same_seed_trains_the_same_weights_and_another_does_not() -> None:
    def weights(seed: int) -> torch.Tensor:
        model = net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train(model, data(), Plan(2, 6, Constant(0.1)), optimizer, runtime(seed))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_a_custom_loss_replaces_cross_entropy() -> None:
    calls: list[int] = []

    def loss_fn(classifier, x, y):
        calls.append(len(y))
        return classifier(x).pow(2).mean()

    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, data(), Plan(1, 10, Constant(0.1)), optimizer, runtime(), Hooks(loss_fn=loss_fn))
    assert calls == [10, 10]
    assert not model.training  # the loop leaves eval mode
