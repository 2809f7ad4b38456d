"""Backdoor sequela: membership inference (metric attacks) and the retuning attack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from bdaudit.core.config import ModelConfig
from bdaudit.core.data import ImageSet, Preprocessing, load_image_folder
from bdaudit.core.errors import BdauditError
from bdaudit.engine.loop import Plan, Runtime, train
from bdaudit.engine.recipe import Augment, make_optimizer
from bdaudit.engine.schedules import Constant
from bdaudit.models.checkpoint import NormalizedClassifier, build_model, load_model
from bdaudit.planting.plant import PlantResult
from bdaudit.sequela import (
    MembershipError,
    ReinjectionError,
    compare,
    membership_inference,
    reinjection_attack,
    roc_auc,
    tpr_at_fpr,
)
from bdaudit.sequela.mia import attack_scores
from bdaudit.sequela.reinjection import ReinjectionSettings
from bdaudit.triggers import parse_trigger

MNIST = Path(__file__).resolve().parents[2] / "sample_data" / "mnist"
PREP = Preprocessing(1, (28, 28))
CPU = torch.device("cpu")



def per_class(data: ImageSet, count: int, offset: int = 0) -> ImageSet:
    index = torch.cat([torch.nonzero(data.labels == c).flatten()[offset:offset + count]
                       for c in range(data.num_classes)])
    return data.subset(index.sort().values)


@pytest.fixture(scope="module")
def clean_set(clean_dir: Path) -> ImageSet:
    return load_image_folder(clean_dir, PREP)


@pytest.fixture(scope="module")
def eval_set(eval_dir: Path) -> ImageSet:
    return load_image_folder(eval_dir, PREP)


# --------------------------------------------------------------------------- metrics


def test_auc_matches_sklearn_with_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n_pos, n_neg = torch.randint(1, 80, (2,), generator=gen).tolist()
        # Few distinct values: many ties, within and across the two sides.
        pos = torch.randint(0, 6, (n_pos,), generator=gen).float()
        neg = torch.randint(0, 6, (n_neg,), generator=gen).float() - 1.0
        labels = [1] * n_pos + [0] * n_neg
        expected = roc_auc_score(labels, torch.cat([pos, neg]).numpy())
        assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_auc_on_separable_and_constant_scores() -> None:
    pos, neg = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0])
    assert roc_auc(pos, neg) == 1.0
    assert roc_auc(neg, pos) == 0.0
    assert roc_auc(torch.ones(4), torch.ones(7)) == 0.5


def test_tpr_at_fpr_hand_made_and_against_roc_curve() -> None:
    members = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.05, 0.0])
    nonmembers = torch.tensor([0.85, 0.5, 0.4, 0.4, 0.3, 0.2, 0.1, 0.1, 0.0, 0.0])
    assert tpr_at_fpr(members, nonmembers, 0.0) == pytest.approx(0.2)  # only 0.95 and 0.9 beat 0.85
    assert tpr_at_fpr(members, nonmembers, 0.1) == pytest.approx(0.5)  # one FP: beat 0.5
    assert tpr_at_fpr(members, nonmembers, 0.2) == pytest.approx(0.5)  # 0.4 is tied: still 1 FP
    assert tpr_at_fpr(members, nonmembers, 0.3) == pytest.approx(0.5)  # three FPs: beat 0.3
    assert tpr_at_fpr(members, nonmembers, 1.0) == 1.0
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        pos = torch.randint(0, 20, (60,), generator=gen).float() + 3
        neg = torch.randint(0, 20, (90,), generator=gen).float()
        fpr, tpr, _ = roc_curve([1] * 60 + [0] * 90, torch.cat([pos, neg]).numpy(),
                                drop_intermediate=False)
        for target in (0.0, 0.01, 0.05, 0.2, 0.5):
            assert tpr_at_fpr(pos, neg, target) == pytest.approx(tpr[fpr <= target + 1e-12].max())


def test_attack_scores_equal_the_textbook_formulas() -> None:
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    labels = torch.arange(64) % 10
    p = logits.softmax(1)
    p_y = p[torch.arange(64), labels]
    others = p.scatter(1, labels[:, None], 0.0)
    mentr = -(1 - p_y) * p_y.log() - (others * (1 - others).log()).sum(1)  # Song & Mittal 2021
    expected = {"loss": -torch.nn.functional.cross_entropy(logits, labels, reduction="none"),
                "confidence": p.max(1).values, "entropy": (p * p.log()).sum(1), "modified_entropy": -mentr}
    scores = attack_scores(logits, labels)
    for name in ("loss", "entropy", "modified_entropy"):
        assert torch.allclose(scores[name], expected[name], atol=1e-10), name
    # Confidence is scored as -log((1 - p_max) / p_max), a monotone map of p_max: same ranking.
    assert torch.allclose(torch.sigmoid(scores["confidence"]), expected["confidence"], atol=1e-10)


# --------------------------------------------------------------------------- membership inference


@pytest.fixture(scope="module")
def overfit() -> tuple[torch.nn.Module, ImageSet]:
    """A tiny CNN memorising 100 digits (10 per class): no augmentation, 40 epochs."""
    members = per_class(load_image_folder(MNIST / "train", PREP), 10, offset=300)
    config = ModelConfig(arch="bd_cnn_tiny", num_classes=10, in_chans=1, input_size=(28, 28),
                         mean=(0.13,), std=(0.31,))
    torch.manual_seed(0)
    classifier = NormalizedClassifier(build_model(config), config)
    optimizer = make_optimizer(classifier.parameters(), "sgd", 0.05, weight_decay=0.0)
    train(classifier, members, Plan(40, 20, Constant(0.05)), optimizer, Runtime(torch.Generator().manual_seed(0), CPU))
    return classifier, members


def test_overfit_model_leaks_membership(overfit: tuple[torch.nn.Module, ImageSet],
                                        eval_set: ImageSet) -> None:
    classifier, members = overfit
    result = membership_inference(classifier, members, eval_set, device=CPU)
    # Measured: AUC ~0.95 for every attack, member accuracy 1.0 vs ~0.75 on unseen digits.
    assert result.best.auc >= 0.8
    assert all(a.auc >= 0.7 for a in result.attacks.values())
    assert result.n_members == result.n_nonmembers == 100  # 600 non-members subsampled
    assert result.member_accuracy - result.nonmember_accuracy >= 0.1
    report = json.loads(json.dumps(result.to_dict()))
    assert report["best_attack"] == result.best.attack
    loss = report["attacks"]["loss"]
    assert set(loss) >= {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "n_nonmembers", "note"}
    assert loss["low_fpr_reliable"] is False and "1000 non-members" in loss["note"]


def test_unseen_members_give_chance_auc(overfit: tuple[torch.nn.Module, ImageSet],
                                        clean_set: ImageSet, eval_set: ImageSet) -> None:
    classifier, _ = overfit
    result = membership_inference(classifier, clean_set, eval_set, device=CPU)
    # Neither side was trained on: measured AUCs 0.486-0.503 on 400 vs 400.
    assert all(abs(a.auc - 0.5) <= 0.1 for a in result.attacks.values())
    again = membership_inference(classifier, clean_set, eval_set, device=CPU)
    assert again.to_dict() == result.to_dict()  # seeded balancing: reproducible
    delta = compare(result, again)
    assert delta["best_auc_delta"] == 0.0 and delta["attacks"]["entropy"]["auc_delta"] == 0.0


def test_overlapping_sets_refused(overfit: tuple[torch.nn.Module, ImageSet],
                                  clean_set: ImageSet, eval_set: ImageSet) -> None:
    classifier, _ = overfit
    leaked = ImageSet(torch.cat([eval_set.images, clean_set.images[:7]]),
                      torch.cat([eval_set.labels, clean_set.labels[:7]]), eval_set.class_names)
    with pytest.raises(MembershipError, match=r"^7 image\(s\) appear among both") as info:
        membership_inference(classifier, clean_set, leaked, device=CPU)
    assert isinstance(info.value, BdauditError) and "\n" not in str(info.value)


def test_too_few_samples_refused(overfit: tuple[torch.nn.Module, ImageSet],
                                 clean_set: ImageSet, eval_set: ImageSet) -> None:
    classifier, _ = overfit
    with pytest.raises(MembershipError, match="at least 50 members.*got 30 members"):
        membership_inference(classifier, per_class(clean_set, 3), eval_set, device=CPU)
    with pytest.raises(MembershipError, match="at least 500 .*got 400 members and 100 non-members"):
        membership_inference(classifier, clean_set, per_class(eval_set, 10), device=CPU,
                             min_per_side=500)


# --------------------------------------------------------------------------- retuning attack


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def superficially_cleaned(badnets: PlantResult, clean_set: ImageSet, eval_set: ImageSet) -> torch.nn.Module:
    """BadNets model fine-tuned on clean data just long enough to push ASR below 50 %: epoch by epoch
    until it is (a fixed budget left 0.27 on one CPU and 0.63 on another)."""
    classifier = load_model(badnets.path).classifier()
    optimizer = make_optimizer(classifier.parameters(), "sgd", 0.02)
    stamped = parse_trigger("badnets").apply(eval_set.images[eval_set.labels != 0].float() / 255)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        train(classifier, clean_set, Plan(1, 64, Constant(0.02), Augment(2)), optimizer, Runtime(gen, CPU))
        with torch.no_grad():
            if float((classifier(stamped).argmax(1) == 0).float().mean()) < 0.5:
                break
    return classifier


def test_retuning_revives_a_hidden_backdoor_but_not_a_clean_model(
        badnets_model: PlantResult, clean_model: PlantResult, clean_set: ImageSet,
        eval_set: ImageSet) -> None:
    trigger = parse_trigger("badnets")
    kwargs = {"eval_data": per_class(eval_set, 30), "device": CPU, "settings": ReinjectionSettings(eval_every=10)}
    hidden = superficially_cleaned(badnets_model, clean_set, eval_set)
    before = state_copy(hidden)
    revived = reinjection_attack(hidden, clean_set, trigger, 0, **kwargs)
    # Measured: ASR 0.27 -> 0.99 by step 10 of 60 at CA 0.93; the clean model stays <= 0.03.
    assert revived.initial_asr < 0.5  # the backdoor looked gone ...
    assert revived.regained and revived.final_asr >= 0.8  # ... and came back within the budget
    assert revived.final_clean_accuracy >= 0.85
    after = hidden.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched

    fresh = reinjection_attack(load_model(clean_model.path).classifier(), clean_set, trigger, 0,
                               **kwargs)
    assert not fresh.regained and fresh.final_asr < 0.5
    assert [p.step for p in fresh.curve] == list(range(0, revived.settings["budget_steps"] + 1, 10))

    planted = reinjection_attack(load_model(badnets_model.path).classifier(), clean_set, trigger, 0,
                                 **{**kwargs, "settings": ReinjectionSettings(eval_every=10, budget_steps=10)})
    assert planted.steps_to_regain == 0 and planted.final_asr >= 0.9
    report = json.loads(json.dumps(revived.to_dict()))
    assert report["steps_to_regain"] == revived.steps_to_regain and len(report["curve"]) > 2


def test_retuning_is_deterministic(clean_model: PlantResult, clean_set: ImageSet,
                                   eval_set: ImageSet) -> None:
    classifier = load_model(clean_model.path).classifier()
    settings = ReinjectionSettings(budget_steps=12, eval_every=4, lr=0.05, seed=5)
    runs = [reinjection_attack(classifier, clean_set, parse_trigger("badnets"), 3,
                               eval_data=per_class(eval_set, 10), device=CPU, settings=settings).to_dict()
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert [p["step"] for p in runs[0]["curve"]] == [0, 4, 8, 12]


def test_retuning_refuses_impossible_settings(clean_model: PlantResult, clean_set: ImageSet,
                                              eval_set: ImageSet) -> None:
    classifier = load_model(clean_model.path).classifier()
    trigger = parse_trigger("badnets")
    with pytest.raises(ReinjectionError, match="needs 400 clean \\+ 10 poisoned images but .* 400"):
        reinjection_attack(classifier, clean_set, trigger, 0, eval_data=eval_set, device=CPU,
                           settings=ReinjectionSettings(n_clean=400, n_poison=10))
    with pytest.raises(ReinjectionError, match="`target` 10 is not a class index"):
        reinjection_attack(classifier, clean_set, trigger, 10, eval_data=eval_set, device=CPU)
    with pytest.raises(ReinjectionError, match="does not fit"):
        reinjection_attack(classifier, clean_set, parse_trigger("badnets:size=40"), 0,
                           eval_data=eval_set, device=CPU)
