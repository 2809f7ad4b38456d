"""Stamping part of a batch: poisoning, trigger unlearning and Neural Cleanse share one concept."""

from __future__ import annotations

import torch

from bdaudit.attacks import ATTACKS
from bdaudit.defenses.unlearning import TriggerUnlearning
from bdaudit.engine.stamping import Stamping, chain, relabel, stamp_rows


class Fill:
    def __init__(self, value: float) -> None:
        self.value = value

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


def batch(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 1, 4, 4), torch.arange(n) % 3


def test_stamp_rows_stamps_only_its_rows_and_never_the_input() -> None:
    x, _ = batch()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4]] = True
    out = stamp_rows(x, [(mask, Fill(1.0)), (torch.tensor([7]), Fill(0.5))])
    assert x.abs().sum() == 0
    assert out[1].min() == 1 and out[4].min() == 1 and out[7].max() == 0.5
    assert out[[0, 2, 3, 5, 6, 8, 9]].abs().sum() == 0
    assert stamp_rows(x, [(torch.zeros(10, dtype=torch.bool), Fill(1.0))]) is x


def test_relabel_moves_only_the_stamped_rows() -> None:
    y = torch.tensor([0, 1, 2, 1])
    assert relabel(y, torch.tensor([False, True, True, False]), 0).tolist() == [0, 0, 0, 1]


def test_exact_stamping_stamps_exactly_its_share_and_keeps_labels() -> None:
    x, y = batch(10)
    out, labels = Stamping((Fill(1.0), Fill(0.5)), 0.3, exact=True)(x, y, torch.arange(10),
                                                                 torch.Generator().manual_seed(0))
    stamped = out.flatten(1).amax(1) > 0
    assert int(stamped.sum()) == 3 and torch.equal(labels, y)


def test_share_stamping_follows_its_fraction() -> None:
    x, y = batch(2000)
    out, _ = Stamping((Fill(1.0),), 0.25)(x, y, torch.arange(2000), torch.Generator().manual_seed(0))
    share = float((out.flatten(1).amax(1) > 0).float().mean())
    assert 0.2 < share < 0.3
    same, _ = Stamping((Fill(1.0),), 0.0)(x, y, torch.arange(2000), torch.Generator().manual_seed(0))
    assert same is x


def test_attack_poisoning_is_stamping_plus_relabelling() -> None:
    attack = ATTACKS["badnets"].create(target=2, poison_rate=0.1)
    x = torch.rand(6, 1, 28, 28)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    mask = torch.tensor([True, False, True, False, False, False])
    px, py = attack.poison_batch(x, y, mask, torch.Generator())
    assert torch.equal(px, stamp_rows(x, [(mask, attack.trigger)]))
    assert py.tolist() == [2, 1, 2, 1, 0, 1]


def test_trigger_unlearning_is_a_stamping_and_chains_after_another() -> None:
    assert issubclass(TriggerUnlearning, Stamping)
    order: list[str] = []

    def first(x, y, index, gen):
        order.append("first")
        return x + 1, y

    def second(x, y, index, gen):
        order.append("second")
        return x * 2, y

    x, y = batch(2)
    out, _ = chain(first, None, second)(x, y, torch.arange(2), torch.Generator())
    assert order == ["first", "second"] and out.min() == 2
    assert chain(None, second) is second and chain(None) is None
