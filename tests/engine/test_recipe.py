"""The training recipe: one base type for planting and tuning settings, checked once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bdaudit.core.errors import BdauditError
from bdaudit.defenses.tuning import RateSettings, TuneSettings
from bdaudit.engine.recipe import OPTIMIZERS, Recipe, check_lr, make_optimizer, steps_per_epoch, warm_cosine
from bdaudit.planting.plant import TrainSettings


def test_planting_and_tuning_settings_share_the_recipe_with_their_own_defaults() -> None:
    shared = {f.name for f in dataclasses.fields(Recipe)}
    assert shared <= {f.name for f in dataclasses.fields(TrainSettings)}
    assert shared <= {f.name for f in dataclasses.fields(TuneSettings)}
    assert (TrainSettings().epochs, TrainSettings().batch_size, TrainSettings().min_steps) == (15, 128, 0)
    assert (TuneSettings().epochs, TuneSettings().batch_size, TuneSettings().min_steps) == (20, 64, 100)


def test_min_steps_raises_the_epochs_of_a_small_set() -> None:
    recipe = Recipe(epochs=2, min_steps=30, batch_size=10)
    assert steps_per_epoch(25, 10) == 3
    assert recipe.epochs_for(25) == 10 and recipe.total_steps(25) == 30
    assert Recipe(epochs=2, min_steps=0, batch_size=10).epochs_for(25) == 2
    assert recipe.epochs_for(1000) == 2  # a large set keeps its epochs


@pytest.mark.parametrize(("build", "field"), [
    (lambda: Recipe(epochs=0), "`epochs`"),
    (lambda: Recipe(batch_size=0), "`batch_size`"),
    (lambda: Recipe(min_steps=-1), "`min_steps`"),
    (lambda: Recipe(momentum=1.0), "`momentum`"),
    (lambda: Recipe(weight_decay=-1.0), "`weight_decay`"),
    (lambda: Recipe(optimizer="rmsprop"), "`optimizer`"),
    (lambda: TrainSettings(lr=0.0), "`lr`"),
    (lambda: RateSettings(lr=11.0), "`lr`"),
])
def test_bad_recipes_are_refused_naming_the_field(build, field: str) -> None:
    with pytest.raises(BdauditError, match=field):
        build()


def test_the_lr_bound_is_one_rule() -> None:
    check_lr(10.0)
    for bad in (0.0, -1.0, 10.5):
        with pytest.raises(BdauditError, match=r"`lr_peak1` must be in \(0, 10\]"):
            check_lr(bad, "lr_peak1")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_listed_optimizer_is_built(name: str) -> None:
    param = nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer([param], name, 0.1)
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert type(optimizer).__name__.lower() == name


def test_the_planting_schedule_warms_up_then_decays() -> None:
    schedule = TrainSettings(epochs=10, batch_size=10, lr=0.1).lr_function(100)
    assert schedule == warm_cosine(0.1, 100)
    assert schedule(0) < schedule(9) == pytest.approx(0.1)
    assert schedule(99) < 0.01
