"""Tuning-based defenses beyond FT/SFT: NAD (attention distillation), FT-SAM (sharpness-aware
fine-tuning) and FST (feature shift tuning) — behaviour on the tiny BadNets model, settings
validation and each one's mechanism.

Reference on the same fixture: plain ``ft`` for 3-5 epochs leaves ASR ~0.8-1.0 (10 epochs: ~0.36)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import clean_badnets
from torch import nn

from bdaudit.core.data import load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.defenses import DefenseContext, create_defense
from bdaudit.defenses.fst import project_norm, reinit_linear
from bdaudit.defenses.ftsam import SAMStep, sam_perturbation
from bdaudit.defenses.nad import attention_loss, attention_map, stage_outputs
from bdaudit.engine.loop import cross_entropy_loss, plain_step
from bdaudit.models.checkpoint import load_model
from bdaudit.planting.plant import PlantResult


def context(model: PlantResult, clean_dir: Path, scope: str = "full") -> DefenseContext:
    loaded = load_model(model.path)
    tune = load_image_folder(clean_dir, resolve_preprocessing(loaded.config), loaded.config.class_names)
    return DefenseContext(classifier=loaded.classifier(), config=loaded.config, tune=tune,
                          device=torch.device("cpu"), gen=torch.Generator().manual_seed(0), scope=scope)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


# --- behaviour on the BadNets fixture -------------------------------------------------------


def test_ftsam_removes_the_backdoor_where_plain_ft_does_not(badnets_model: PlantResult, clean_dir: Path,
                                                             eval_dir: Path) -> None:
    # What matters is the comparison at the same budget, not one CPU's exact numbers: over 4 fixture
    # seeds x 2 tuning seeds at 5 epochs, FT-SAM ends at ASR 0.04-0.42 and plain FT at 0.79-1.00 (gap
    # >= 0.58); FT-SAM's accuracy cost is <= 0.065 (plain FT's up to 0.10). At 3 epochs the gap fell to
    # 0.26 on one seed, which is why this budget is 5.
    ftsam = clean_badnets("ftsam", badnets_model, clean_dir, eval_dir, epochs=5)
    plain = clean_badnets("ft", badnets_model, clean_dir, eval_dir, epochs=5)
    assert ftsam["asr_before"] >= 0.9
    assert ftsam["asr_after"] <= plain["asr_after"] - 0.3
    assert ftsam["acc_after"] >= ftsam["acc_before"] - 0.1
    assert ftsam["hyperparameters"]["settings"]["adaptive"] is True


def test_fst_removes_the_backdoor(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> None:
    # Half the default budget: measured ASR 1.00 -> 0.01, accuracy 0.94 -> 0.90 (the re-initialised
    # head costs accuracy on short budgets; the default 20 epochs give 0.93).
    result = clean_badnets("fst", badnets_model, clean_dir, eval_dir, epochs=10)
    assert result["asr_after"] < 0.3
    assert result["acc_after"] >= result["acc_before"] - 0.06
    assert result["hyperparameters"]["head_norm"] > 0


def test_nad_removes_the_backdoor(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> None:
    # A quarter of the default budget, hence a gentler beta (the default 20 trades accuracy for speed
    # here): measured ASR 1.00 -> 0.03; the same budget with beta 0 (teacher + plain tuning) leaves 0.82.
    result = clean_badnets("nad", badnets_model, clean_dir, eval_dir, epochs=5, teacher_epochs=5, beta=10)
    assert result["asr_after"] < 0.3
    assert result["acc_after"] >= result["acc_before"] - 0.06
    assert result["hyperparameters"]["layers"] == ["features.2", "features.9", "features"]


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "params", "flag"), [
    ("ftsam", {"rho": -1}, "`rho` must be > 0, not -1"),
    ("ftsam", {"schedule": "step"}, "`schedule`"),
    ("fst", {"alpha": -0.5}, "`alpha` must be >= 0"),
    ("fst", {"lr": 0}, "`lr`"),
    ("nad", {"beta": -1}, "`beta` must be >= 0"),
    ("nad", {"teacher_epochs": 0}, "`teacher_epochs`"),
    ("nad", {"power": 0}, "`power`"),
])
def test_bad_settings_are_refused_naming_the_field(method: str, params: dict, flag: str) -> None:
    with pytest.raises(BdauditError, match=flag):
        create_defense(method, params)


def test_settings_are_coerced_from_strings() -> None:
    defense = create_defense("ftsam", {"rho": "0.5", "adaptive": "false"})
    assert defense.settings.rho == 0.5 and defense.settings.adaptive is False


@pytest.mark.parametrize("method", ["nad", "fst"])
def test_nad_and_fst_refuse_head_scope(method: str, badnets_model: PlantResult, clean_dir: Path) -> None:
    with pytest.raises(BdauditError, match="set `scope` to full"):
        create_defense(method, {"epochs": 1}).run(context(badnets_model, clean_dir, scope="head"))


# --- FT-SAM mechanism -----------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbation_has_radius_rho(adaptive: bool) -> None:
    net = tiny_net()
    F.cross_entropy(net(torch.rand(8, 1, 6, 6)), torch.arange(8) % 3).backward()
    params = [p for p in net.parameters() if p.grad is not None]
    steps = sam_perturbation(params, 0.3, adaptive)
    # Plain: ||e|| = rho. Adaptive (ASAM): ||e / |w| || = rho, and zero weights are not moved.
    scaled = [e / p.detach().abs() if adaptive else e for e, p in zip(steps, params, strict=True)]
    norm = torch.cat([s[torch.isfinite(s)].flatten() for s in scaled]).norm()
    assert norm == pytest.approx(0.3, rel=1e-4)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_descends_from_the_restored_weights_with_the_perturbed_gradient(adaptive: bool) -> None:
    x, y = torch.rand(8, 1, 6, 6), torch.arange(8) % 3
    net, lr, rho = tiny_net(), 0.1, 0.5
    # Reference, by hand: the gradient at w + e, applied from w.
    probe = copy.deepcopy(net).train()
    F.cross_entropy(probe(x), y).backward()
    params = list(probe.parameters())
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, sam_perturbation(params, rho, adaptive), strict=True):
            p.add_(e)
    probe.zero_grad()
    F.cross_entropy(probe(x), y).backward()
    expected = [w - lr * p.grad for w, p in zip(start, params, strict=True)]

    sam_net, sgd_net = copy.deepcopy(net).train(), copy.deepcopy(net).train()
    sam_opt = torch.optim.SGD(sam_net.parameters(), lr=lr)
    sgd_opt = torch.optim.SGD(sgd_net.parameters(), lr=lr)
    SAMStep(rho, adaptive)(sam_net, x, y, sam_opt, cross_entropy_loss)
    plain_step(sgd_net, x, y, sgd_opt, cross_entropy_loss)
    for got, want in zip(sam_net.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want)
    assert any(not torch.allclose(a, b) for a, b in zip(sam_net.parameters(), sgd_net.parameters(), strict=True))
    # BatchNorm statistics move once (first pass), as in a plain step.
    torch.testing.assert_close(sam_net[1].running_mean, sgd_net[1].running_mean)
    assert int(sam_net[1].num_batches_tracked) == 1


def test_ftsam_head_scope_moves_only_the_head(badnets_model: PlantResult, clean_dir: Path) -> None:
    ctx = context(badnets_model, clean_dir, scope="head")
    before = copy.deepcopy(ctx.net.state_dict())
    create_defense("ftsam", {"epochs": 1, "min_steps": 0}).run(ctx)
    after = ctx.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}


# --- FST mechanism --------------------------------------------------------------------------


def test_reinit_linear_is_seeded_and_in_the_default_range() -> None:
    heads = [nn.Linear(16, 4), nn.Linear(16, 4)]
    original = heads[0].weight.detach().clone()
    for head in heads:
        reinit_linear(head, torch.Generator().manual_seed(7))
    torch.testing.assert_close(heads[0].weight, heads[1].weight)
    assert not torch.allclose(heads[0].weight, original)
    assert heads[0].weight.abs().max() <= 0.25 and heads[0].bias.abs().max() <= 0.25  # 1/sqrt(16)


def test_project_norm_rescales_to_the_given_norm() -> None:
    weight = torch.randn(4, 8)
    project_norm(weight, torch.tensor(3.0))
    assert float(weight.norm()) == pytest.approx(3.0, rel=1e-5)


def test_fst_reinitialises_the_head_keeps_its_norm_and_turns_it_away(badnets_model: PlantResult,
                                                                      clean_dir: Path) -> None:
    cosines = {}
    for alpha in (0.0, 0.3):
        ctx = context(badnets_model, clean_dir)
        original = ctx.net.fc.weight.detach().clone()
        used = create_defense("fst", {"epochs": 1, "min_steps": 0, "alpha": alpha}).run(ctx).details
        weight = ctx.net.fc.weight.detach()
        assert float(weight.norm()) == pytest.approx(float(original.norm()), rel=1e-4)  # projected
        assert used["head_norm"] == pytest.approx(float(original.norm()), rel=1e-5)
        cosines[alpha] = float(F.cosine_similarity(weight.flatten(), original.flatten(), dim=0))
    # Re-initialised (alpha 0: no memory of the old head, cosine ~0); the penalty turns the new head
    # away from the compromised one (measured: -0.004 vs -0.11).
    assert abs(cosines[0.0]) < 0.1
    assert cosines[0.3] < min(0.0, cosines[0.0] - 0.05)


# --- NAD mechanism --------------------------------------------------------------------------


def test_attention_map_shape_normalisation_and_loss() -> None:
    features = torch.randn(5, 8, 7, 7)
    att = attention_map(features)
    assert att.shape == (5, 49)
    torch.testing.assert_close(att.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(att, attention_map(3 * features))  # scale-free
    torch.testing.assert_close(att, attention_map(-features))  # |a|^p
    expected = F.normalize(features.pow(2).mean(1).flatten(1), dim=1)
    torch.testing.assert_close(att, expected)
    assert float(attention_loss(features, features)) == 0.0
    other = torch.randn(5, 8, 7, 7)
    distance = (attention_map(features) - attention_map(other)).norm(dim=1).mean()
    torch.testing.assert_close(attention_loss(features, other), distance)


def test_stage_outputs_picks_the_last_module_of_each_resolution() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(2, 1, 16, 16)
    assert stage_outputs(net, net, x, 3) == ["1", "5", "8"]  # 16x16, 8x8, 4x4; the 1x1 pool is no stage
    assert stage_outputs(net, net, x, 2) == ["5", "8"]
    with pytest.raises(BdauditError, match="`layers`"):
        stage_outputs(nn.Flatten(), nn.Sequential(nn.Flatten()), x, 3)


def test_nad_teacher_is_frozen_and_the_student_moves(badnets_model: PlantResult, clean_dir: Path) -> None:
    ctx = context(badnets_model, clean_dir)
    before = copy.deepcopy(ctx.net.state_dict())
    settings = {"epochs": 1, "min_steps": 0, "teacher_epochs": 1, "layers": "features.9, features"}
    used = create_defense("nad", settings).run(ctx).details
    assert used["layers"] == ["features.9", "features"]
    assert any(not torch.equal(before[k], v) for k, v in ctx.net.state_dict().items())
    with pytest.raises(BdauditError, match="no module 'nope'"):
        create_defense("nad", {"epochs": 1, "layers": "nope"}).run(context(badnets_model, clean_dir))


def test_sft_with_sam_steps_removes_the_backdoor(badnets_model: PlantResult, clean_dir: Path,
                                                 eval_dir: Path) -> None:
    # The FT-SAM idea inside SFT (sft --set sam_rho=R): same schedule, SAM's two-pass step.
    result = clean_badnets("sft", badnets_model, clean_dir, eval_dir, epochs=6, sam_rho=2.0)
    assert result["hyperparameters"]["settings"]["sam_rho"] == 2.0
    assert result["asr_before"] > 0.9 and result["asr_after"] < 0.3
    # SAM's ascent on top of SFT's high phase-1 peak costs accuracy on this tiny model (and ~3-5
    # points on the bench's samples), which is why it is an option and not the default.
    assert result["acc_before"] - result["acc_after"] <= 0.25
    with pytest.raises(BdauditError, match="`sam_rho` must be > 0"):
        create_defense("sft", {"sam_rho": -1})


def test_a_mistyped_boolean_setting_is_refused_not_read_as_false() -> None:
    # Used to become False silently (issue 13): a typo must not switch a defense's behaviour.
    with pytest.raises(BdauditError, match="'flase' is not a boolean"):
        create_defense("ftsam", {"adaptive": "flase"})
    assert create_defense("ftsam", {"adaptive": "false"}).settings.adaptive is False
    assert create_defense("ftsam", {"adaptive": "Yes"}).settings.adaptive is True


def test_a_defense_result_keeps_the_report_keys() -> None:
    from bdaudit.defenses import DefenseResult

    result = DefenseResult({"lr": 0.1}, {"pruned": 3}, schedule={"total_steps": 5}, peak_selection={"source": "given"})
    assert list(result.to_dict()) == ["settings", "schedule", "peak_selection", "pruned"]
    result.note, result.unlearning = "left unchanged", {"fraction": 0.3}
    assert result.to_dict()["note"] == "left unchanged" and list(result.to_dict())[-1] == "unlearning"
    assert list(DefenseResult({}).to_dict()) == ["settings"]
