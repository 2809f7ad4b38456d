"""The SFT schedule is a pure function: phases, peaks and linear ramps."""

from __future__ import annotations

import pytest

from bdaudit.core.errors import BdauditError
from bdaudit.defenses.sft import SFTSettings, build_schedule, range_test_batch
from bdaudit.engine.schedules import Constant, Cosine, TwoPhaseCyclic


def test_two_phases_with_their_own_peaks() -> None:
    sched = TwoPhaseCyclic(total_steps=100, lr_base=0.001, lr_peak1=0.1, lr_peak2=0.01,
                           cycle_steps=10, phase1_fraction=0.4)
    rates = [sched(s) for s in range(100)]
    assert sched.phase1_steps == 40
    assert max(rates[:40]) == pytest.approx(0.1) and max(rates[40:]) == pytest.approx(0.01)
    assert {sched.phase(s) for s in range(40)} == {1} and {sched.phase(s) for s in range(40, 100)} == {2}
    assert rates[0] == pytest.approx(0.001) and rates[40] == pytest.approx(0.001)  # each cycle starts at base


def test_cycles_ramp_linearly_up_then_down() -> None:
    sched = TwoPhaseCyclic(total_steps=40, lr_base=0.01, lr_peak1=1.01, lr_peak2=0.51, cycle_steps=8,
                           phase1_fraction=0.5)
    first_cycle = [sched(s) - 0.01 for s in range(8)]
    assert first_cycle == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25])
    assert [sched(s) for s in range(8)] == [sched(s) for s in range(8, 16)]  # periodic


def test_phase1_rounds_to_whole_cycles() -> None:
    sched = TwoPhaseCyclic(total_steps=100, lr_base=0.001, lr_peak1=0.1, lr_peak2=0.01, cycle_steps=15,
                           phase1_fraction=0.4)
    assert sched.phase1_steps == 45


def test_schedule_scales_with_the_clean_subset() -> None:
    settings = SFTSettings(epochs=10, batch_size=50, min_steps=0)
    small, large = build_schedule(settings, 100, 0.1), build_schedule(settings, 1000, 0.1)
    assert (small.total_steps, small.cycle_steps) == (20, 4)
    assert (large.total_steps, large.cycle_steps) == (200, 40)
    assert small.lr_peak2 == pytest.approx(0.001) and small.lr_base == pytest.approx(0.0001)


def test_small_clean_sets_get_more_epochs_up_to_the_step_floor() -> None:
    settings = SFTSettings(epochs=10, batch_size=50, min_steps=100)
    assert settings.epochs_for(100) == 50 and build_schedule(settings, 100, 0.1).total_steps == 100
    assert settings.epochs_for(1000) == 10 and build_schedule(settings, 1000, 0.1).total_steps == 200


def test_range_test_uses_several_batches_on_tiny_clean_sets() -> None:
    # One repeated full batch would measure full-batch stability, far above SGD's escape rate.
    assert range_test_batch(400, 64) == 64 and range_test_batch(128, 64) == 64
    assert range_test_batch(50, 64) == 12 and range_test_batch(100, 64) == 25
    assert range_test_batch(20, 64) == 8  # never below the floor


@pytest.mark.parametrize("kwargs", [
    {"lr_base": 0.5},  # base above the peaks
    {"phase1_fraction": 1.0},
    {"cycle_steps": 1},
])
def test_invalid_schedules_are_refused(kwargs: dict) -> None:
    args = {"total_steps": 10, "lr_base": 0.001, "lr_peak1": 0.1, "lr_peak2": 0.01, "cycle_steps": 4,
            **kwargs}
    with pytest.raises(BdauditError):
        TwoPhaseCyclic(**args)


def test_baseline_schedules() -> None:
    assert Constant(0.01)(123) == 0.01
    cosine = Cosine(0.1, total_steps=100)
    assert cosine(0) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.05)
    assert cosine(100) == pytest.approx(0.0)
