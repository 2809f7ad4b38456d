"""Library probes: sequential probing stops as soon as a verdict is certain, and agrees with
probing every image."""

from __future__ import annotations

import pytest
import torch

from bdaudit.core.data import load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.detect.probe import Gates, ProbeSettings, evaluate_triggers, look_schedule, paired_difference_interval
from bdaudit.models.checkpoint import load_model
from bdaudit.planting.plant import PlantResult
from bdaudit.triggers import default_triggers, parse_trigger

CPU = torch.device("cpu")


def _probe(model: PlantResult, eval_dir, triggers, **options):  # noqa: ANN001, ANN202
    loaded = load_model(model.path)
    data = load_image_folder(eval_dir, resolve_preprocessing(loaded.config), loaded.config.class_names)
    return evaluate_triggers(loaded.classifier(), data, triggers, ProbeSettings(**options), device=CPU)


@pytest.mark.parametrize("fixture", ["badnets_model", "clean_model"])
def test_sequential_probe_gives_the_full_probes_verdicts_with_fewer_passes(fixture: str, eval_dir,
                                                                          request) -> None:
    model = request.getfixturevalue(fixture)
    full = _probe(model, eval_dir, default_triggers(), probe="full")
    seq = _probe(model, eval_dir, default_triggers())
    assert [(t.flagged, t.flag_reason) for t in seq.triggers] == [(t.flagged, t.flag_reason) for t in full.triggers]
    assert seq.clean_accuracy == full.clean_accuracy  # clean accuracy always uses every image
    assert seq.forward_passes < 0.6 * full.forward_passes
    for t in seq.triggers:
        assert t.asr_ci95[0] <= t.asr <= t.asr_ci95[1] and t.probe_confidence == 0.99
    assert all(t.probe_decided is None for t in full.triggers)


def test_a_certain_trigger_stops_early_on_a_backdoored_and_on_a_clean_model(badnets_model: PlantResult,
                                                                           clean_model: PlantResult,
                                                                           eval_dir) -> None:
    badnets = parse_trigger("badnets")
    hit = _probe(badnets_model, eval_dir, [badnets]).triggers[0]
    assert hit.flagged and hit.target == 0 and hit.asr > 0.9
    assert hit.probe_decided and hit.n_probe < 150  # of 540 images not of class 0
    miss = _probe(clean_model, eval_dir, [badnets]).triggers[0]
    assert not miss.flagged and miss.probe_decided and miss.n_probe < 150
    fixed = _probe(badnets_model, eval_dir, [badnets], target=3).triggers[0]
    assert fixed.target == 3 and not fixed.flagged and fixed.probe_decided


def test_a_verdict_on_the_gate_takes_every_image(badnets_model: PlantResult, eval_dir) -> None:
    """With the fail gate at the trigger's own ASR the verdict is never certain early."""
    badnets = parse_trigger("badnets")
    full = _probe(badnets_model, eval_dir, [badnets], probe="full").triggers[0]
    edge = _probe(badnets_model, eval_dir, [badnets], gates=Gates(fail_asr=full.asr)).triggers[0]
    assert edge.probe_decided is False and edge.n_probe == full.n_probe and edge.asr == full.asr
    assert edge.flagged == full.flagged


def test_probing_draws_no_global_randomness(badnets_model: PlantResult, eval_dir) -> None:
    loaded = load_model(badnets_model.path)
    data = load_image_folder(eval_dir, resolve_preprocessing(loaded.config), loaded.config.class_names)
    classifier, triggers = loaded.classifier(), default_triggers()
    state = torch.get_rng_state()
    evaluate_triggers(classifier, data, triggers, device=CPU)
    assert torch.equal(state, torch.get_rng_state())


def test_probe_options_are_checked() -> None:
    with pytest.raises(BdauditError, match="`probe`"):
        ProbeSettings(probe="some")
    with pytest.raises(BdauditError, match="`confidence`"):
        ProbeSettings(confidence=1.0)
    assert look_schedule(600, 64) == [64, 128, 256, 512, 600]
    assert look_schedule(50, 64) == [50]


def _paired(n: int, lost: int, gained: int, wrong_both: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcomes of n items scored twice: ``lost`` right then wrong, ``gained`` wrong then right."""
    before = torch.ones(n, dtype=torch.bool)
    after = torch.ones(n, dtype=torch.bool)
    after[:lost] = False
    before[lost:lost + gained] = False
    before[lost + gained:lost + gained + wrong_both] = False
    after[lost + gained:lost + gained + wrong_both] = False
    return before, after


def test_paired_interval_is_tight_when_nothing_changes_and_honest_on_few_images() -> None:
    low, high = paired_difference_interval(*_paired(600, 0, 0, 30))
    assert low <= 0.0 <= high and high - low < 0.015  # the same predictions: no accuracy lost
    low, high = paired_difference_interval(*_paired(80, 2, 0, 3))  # 2 of 80 images: a 2.5-point drop
    assert low < 0.02 < 0.025 < high  # cannot tell it from a 2-point gate
    low, high = paired_difference_interval(*_paired(600, 60, 0, 20))
    assert 0.07 < low < 0.10 < high < 0.13  # 10 points lost on 600 images is clearly lost


def test_paired_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    gen = torch.Generator().manual_seed(0)
    n, covered, runs = 200, 0, 400
    for _ in range(runs):  # true accuracy 0.95 before, 0.92 after, correlated through shared items
        easy = torch.rand(n, generator=gen) < 0.92
        before = easy | (torch.rand(n, generator=gen) < 0.375)
        after = easy.clone()
        low, high = paired_difference_interval(before, after)
        covered += low <= 0.95 - 0.92 <= high
    assert 0.92 <= covered / runs <= 0.99
