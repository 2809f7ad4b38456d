"""Library probes: sequential probing stops as soon as a verdict is certain, and agrees with
probing every image."""

from __future__ import annotations

import pytest
import torch

from bdaudit.core.data import load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.detect.probe import Gates, ProbeSettings, evaluate_triggers, look_schedule
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
