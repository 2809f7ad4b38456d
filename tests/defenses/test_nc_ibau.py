"""Trigger inversion (Neural Cleanse) and the unlearning defenses ``nc`` and ``ibau`` on the
session's tiny MNIST models.

What the fixtures show (measured): Neural Cleanse reverses the BadNets trigger to a tiny
bottom-right mask for class 0 (~3-4 pixels against a median of ~65-120), but the clean classes'
norms spread so widely (~35 to ~370) that the paper's MAD rule caps any class's anomaly index near
2: class 0 scores 1.4-2.1 depending on seed and budget (1.36 at the defaults), so whether the
paper's threshold of 2 flags it is chance. The tests pin the robust facts (smallest norm by far,
largest below-median index, the ceiling) and run ``nc`` with ``anomaly_scale="log"`` (the same rule
on log norms, a documented bdaudit extension): class 0 scores 5-7 there, clean classes <= 1.3.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from defense_helpers import clean_badnets

from bdaudit.core.data import resolve_data
from bdaudit.core.errors import BdauditError
from bdaudit.defenses import DefenseContext, create_defense
from bdaudit.detect.families.patch import densest_window
from bdaudit.detect.inversion import (
    InversionResult,
    InvertedTrigger,
    anomaly_index,
    flagged_classes,
    invert_triggers,
    score_classes,
)
from bdaudit.models.checkpoint import load_model
from bdaudit.planting.plant import PlantResult

# A cheap budget for tests (the defaults are 100 steps at batch 32); the inversion fixtures keep the
# paper's l1 rule so its documented ceiling is pinned; nc runs with bdaudit's default (log).
TEST_INVERSION = {"steps": 60, "batch_size": 16, "anomaly_scale": "l1"}
NC_TEST = {"inversion_steps": 60, "inversion_batch_size": 16, "epochs": 5}


def invert(model: PlantResult, clean_dir: Path, eval_dir: Path, **knobs: object) -> InversionResult:
    loaded = load_model(model.path)
    split = resolve_data(clean_dir, loaded.config, eval_dir=eval_dir)
    return invert_triggers(loaded.classifier(), split.tune, gen=torch.Generator().manual_seed(0),
                           **{**TEST_INVERSION, **knobs})


@pytest.fixture(scope="module")
def badnets_inversion(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> InversionResult:
    return invert(badnets_model, clean_dir, eval_dir)


@pytest.fixture(scope="module")
def clean_inversion(clean_model: PlantResult, clean_dir: Path, eval_dir: Path) -> InversionResult:
    return invert(clean_model, clean_dir, eval_dir)


def test_anomaly_index_matches_the_mad_rule_by_hand() -> None:
    norms = [2.0, 10.0, 11.0, 9.0, 10.0, 12.0, 8.0, 10.0, 30.0]
    # median 10; |deviations| 8,0,1,1,0,2,2,0,20 -> median 1 -> MAD 1.4826
    index = anomaly_index(norms)
    assert index[0] == pytest.approx(8 / 1.4826)
    assert index[8] == pytest.approx(20 / 1.4826)
    assert index[6] == pytest.approx(2 / 1.4826)
    # Only below-median outliers count: class 8's large norm is no backdoor.
    assert flagged_classes(range(9), norms, index) == [0]
    # An even count uses the mean of the two middle values.
    # median 2.5; |deviations| 1.5, 0.5, 0.5, 1.5 -> median 1.0
    assert anomaly_index([1.0, 2.0, 3.0, 4.0]).tolist() == pytest.approx([1.5 / 1.4826, 0.5 / 1.4826,
                                                                          0.5 / 1.4826, 1.5 / 1.4826])
    # Zero MAD: the odd one out is infinitely anomalous, the rest 0.
    assert anomaly_index([5.0, 5.0, 5.0, 1.0]).tolist() == [0.0, 0.0, 0.0, float("inf")]
    assert flagged_classes(range(4), [5.0, 5.0, 5.0, 1.0], anomaly_index([5.0, 5.0, 5.0, 1.0])) == [3]


def test_inversion_finds_the_badnets_trigger(badnets_inversion: InversionResult) -> None:
    result = badnets_inversion
    norms = torch.tensor(result.l1_norms)
    median = float(norms.median())
    assert int(norms.argmin()) == 0 and result.l1_norms[0] < 0.1 * median
    assert result.attack_success[0] >= 0.95
    # The mask sits where the trigger is: the bottom-right corner (box rows/cols 24-26 of 28).
    mask = result.masks[0, 0]
    assert float(mask[14:, 14:].sum() / mask.sum()) >= 0.6
    # Its densest 4x4 window covers the box, give or take the 2-pixel augmentation (not the single
    # brightest pixel: on another CPU a stray pixel at row 11 peaked while 60 %+ of the mass sat here).
    top, left = densest_window(mask[None], 4)
    assert 20 <= top <= 24 and 20 <= left <= 24, (top, left)
    # Class 0 has the largest index below the median, but the paper's rule is capped here: no class
    # can score above median / MAD (~1.4-2.2 on this model), so we do not pin the verdict at 2.
    below = [i for i, n in enumerate(result.l1_norms) if n < median]
    assert max(below, key=lambda i: result.anomaly_index[i]) == 0
    assert result.anomaly_index[0] > 1.3
    # On log norms the same rule flags class 0 and only class 0, with a wide margin.
    log_index, flagged = score_classes(result.classes, result.l1_norms, "log")
    assert flagged == [0] and float(log_index[0]) > 4
    report = result.to_dict()
    json.dumps(report)  # JSON-safe
    assert report["classes"][0]["mask_l1"] == pytest.approx(result.l1_norms[0], abs=1e-3)
    assert report["max_possible_index"] is not None and report["max_possible_index"] < 3


def test_inversion_flags_nothing_on_the_clean_model(clean_inversion: InversionResult,
                                                    badnets_inversion: InversionResult) -> None:
    result = clean_inversion
    assert result.flagged == []
    log_index, flagged = score_classes(result.classes, result.l1_norms, "log")
    assert flagged == []
    # The same class's reversed trigger is an order of magnitude larger without the backdoor.
    assert result.l1_norms[0] > 5 * badnets_inversion.l1_norms[0]


def test_inversion_is_seeded_and_the_trigger_is_usable(badnets_model: PlantResult, clean_dir: Path,
                                                       eval_dir: Path) -> None:
    a = invert(badnets_model, clean_dir, eval_dir, classes=[0, 3], steps=5)
    b = invert(badnets_model, clean_dir, eval_dir, classes=[0, 3], steps=5)
    assert torch.equal(a.masks, b.masks) and torch.equal(a.patterns, b.patterns)
    assert a.classes == [0, 3] and a.masks.shape == (2, 1, 28, 28) and a.patterns.shape == (2, 1, 28, 28)
    trigger = a.trigger(0)
    assert isinstance(trigger, InvertedTrigger)
    x = torch.rand(2, 1, 28, 28)
    expected = (1 - a.masks[0]) * x + a.masks[0] * a.patterns[0]
    assert torch.allclose(trigger.apply(x), expected)
    assert trigger.null(x).shape == x.shape


def test_nc_unlearns_the_reversed_trigger(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> None:
    result = clean_badnets("nc", badnets_model, clean_dir, eval_dir, **NC_TEST)
    used = result["hyperparameters"]
    assert used["flagged"] == [0] and used["unlearned"] is True
    assert used["inversion"]["classes"][0]["anomaly_index"] > 4
    json.dumps(result["report"].to_dict())
    assert result["asr_before"] >= 0.9
    assert result["asr_after"] < 0.3
    # Plain fine-tuning on the same budget (ft, lr 0.01, 5 epochs) keeps the ASR at 0.965: the reversed
    # trigger does the work. Accuracy: measured -3 points (ft alone: -9; lr 0.01 on 400 images is noisy).
    assert result["acc_after"] >= result["acc_before"] - 0.08


def test_nc_leaves_the_model_alone_when_nothing_is_flagged(clean_model: PlantResult, clean_dir: Path,
                                                           eval_dir: Path) -> None:
    result = clean_badnets("nc", clean_model, clean_dir, eval_dir, **NC_TEST)
    used = result["hyperparameters"]
    assert used["flagged"] == [] and used["unlearned"] is False and "left the model unchanged" in used["note"]
    assert result["acc_after"] == result["acc_before"]
    assert result["report"].sections["clean"]["history"] == []


def test_ibau_unlearns_badnets(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> None:
    result = clean_badnets("ibau", badnets_model, clean_dir, eval_dir, fixed_point_iters=2)
    assert result["asr_before"] >= 0.9
    assert result["asr_after"] < 0.3
    assert result["acc_after"] >= result["acc_before"] - 0.08  # measured about -3 points
    rounds = result["hyperparameters"]["rounds"]
    assert len(rounds) == 5 and all(r["delta_l2"] <= 1.0 + 1e-4 for r in rounds)
    assert len(result["report"].sections["clean"]["history"]) == 5


@pytest.mark.parametrize(("method", "settings", "message"), [
    ("ibau", {"inner_steps": 0}, "`inner_steps` must be at least 1, not 0"),
    ("ibau", {"eps": -1.0}, "`eps` must be > 0"),
    ("ibau", {"fixed_point_iters": -1}, "`fixed_point_iters` must be >= 0"),
    ("ibau", {"perturb_fraction": 0.0}, "`perturb_fraction` must be in (0, 1]"),
    ("nc", {"poison_fraction": 1.5}, "`poison_fraction` must be in (0, 1]"),
    ("nc", {"inversion_steps": 0}, "`inversion_steps` must be at least 1, not 0"),
    ("nc", {"anomaly_threshold": 0}, "`anomaly_threshold` must be > 0"),
    ("nc", {"anomaly_scale": "sqrt"}, "`anomaly_scale` must be l1 or log"),
    ("nc", {"epochs": 0}, "`epochs` must be between 1 and"),
])
def test_bad_settings_are_refused(method: str, settings: dict, message: str) -> None:
    with pytest.raises(BdauditError, match=re.escape(message)):
        create_defense(method, settings)


@pytest.mark.parametrize("method", ["nc", "ibau"])
def test_head_scope_is_refused(method: str, badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> None:
    loaded = load_model(badnets_model.path)
    split = resolve_data(clean_dir, loaded.config, eval_dir=eval_dir)
    ctx = DefenseContext(classifier=loaded.classifier(), config=loaded.config, tune=split.tune,
                         device=torch.device("cpu"), gen=torch.Generator().manual_seed(0), scope="head")
    with pytest.raises(BdauditError, match="set `scope` to full"):
        create_defense(method).run(ctx)


class _Flagged:
    """An inversion result that flagged class 0 with a fixed square (no inversion run)."""

    flagged = (0,)

    def trigger(self, _cls: int) -> object:
        class Square:
            def apply(self, x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                x[..., -4:, -4:] = 1.0
                return x
        return Square()


def _nc_epochs(badnets_model: PlantResult, clean_dir: Path, **settings: object) -> tuple[int, int]:
    """Epochs Neural Cleanse's unlearning ran and batches the scan's unlearning hook saw."""
    from bdaudit.defenses.neural_cleanse import unlearn

    loaded = load_model(badnets_model.path)
    split = resolve_data(clean_dir, loaded.config)
    epochs: list[int] = []
    hooked: list[int] = []

    def hook(x, y, index, gen):
        hooked.append(len(y))
        return x, y

    ctx = DefenseContext(classifier=loaded.classifier(), config=loaded.config, tune=split.tune,
                         device=torch.device("cpu"), gen=torch.Generator().manual_seed(0),
                         on_epoch=lambda epoch, lr, loss: epochs.append(epoch), unlearn=hook)
    unlearn(ctx, create_defense("nc", settings).settings, _Flagged())
    return len(epochs), len(hooked)


def test_nc_unlearning_honours_min_steps_and_the_unlearning_hook(badnets_model: PlantResult,
                                                                 clean_dir: Path) -> None:
    # Before the shared loop, nc ran `epochs` epochs whatever min_steps said and skipped the hook.
    n = len(resolve_data(clean_dir, load_model(badnets_model.path).config).tune)
    per_epoch = -(-n // 64)
    epochs, hooked = _nc_epochs(badnets_model, clean_dir, epochs="1", min_steps=str(3 * per_epoch))
    assert epochs == 3 and hooked == 3 * per_epoch
    assert _nc_epochs(badnets_model, clean_dir, epochs="1", min_steps="0")[0] == 1
