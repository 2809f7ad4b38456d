"""Pruning defenses: Fine-Pruning (``fp``) and Adversarial Neuron Pruning (``anp``) on the tiny
BadNets model — they remove the backdoor, reject bad settings, and prune for real (pruned units
contribute nothing, no hooks are left behind, the checkpoint's keys are unchanged)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from defense_helpers import clean_badnets
from torch import nn
from torch.nn.utils import parametrize

from bdaudit.core.data import ImageSet, load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.defenses import DefenseContext, create_defense
from bdaudit.defenses.anp import NeuronPerturbation, channels, neuron_layers, prune_neurons, select_neurons
from bdaudit.defenses.fine_pruning import FPSettings, head_features, plan_pruning
from bdaudit.defenses.layers import linear_head
from bdaudit.models.checkpoint import LoadedModel, load_model
from bdaudit.planting.plant import PlantResult


def context(loaded: LoadedModel, tune: ImageSet, seed: int = 0, scope: str = "full",
            on_epoch: object = None) -> DefenseContext:
    return DefenseContext(classifier=copy.deepcopy(loaded.classifier()), config=loaded.config, tune=tune,
                          device=torch.device("cpu"), gen=torch.Generator().manual_seed(seed), scope=scope,
                          on_epoch=on_epoch)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def loaded(badnets_model: PlantResult) -> LoadedModel:
    return load_model(badnets_model.path)


@pytest.fixture(scope="module")
def tune(loaded: LoadedModel, clean_dir: Path) -> ImageSet:
    return load_image_folder(clean_dir, resolve_preprocessing(loaded.config), loaded.config.class_names)


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# --- Fine-Pruning -------------------------------------------------------------------------------

def test_fine_pruning_removes_badnets(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> None:
    # Defaults except a 3-epoch fine-tune (default 10) to keep the test short. Measured: ASR 0.998 ->
    # 0.002, accuracy 0.937 -> 0.890 (10 of 32 channels pruned; the fine-tune recovers from 0.83).
    result = clean_badnets("fp", badnets_model, clean_dir, eval_dir, epochs=3)
    assert result["asr_before"] >= 0.9
    assert result["asr_after"] < 0.3
    assert result["acc_before"] - result["acc_after"] <= 0.08
    used = result["hyperparameters"]
    assert used["settings"]["accuracy_tolerance"] == 0.1 and used["settings"]["epochs"] == 3
    assert 0 < used["pruned"] <= 0.8 * used["channels"]
    assert used["tune_accuracy_unpruned"] - used["tune_accuracy_pruned"] <= 0.1


@pytest.mark.parametrize(("params", "flag"), [
    ({"prune_ratio_max": 2}, "`prune_ratio_max`"),
    ({"prune_ratio_max": -0.1}, "`prune_ratio_max`"),
    ({"accuracy_tolerance": 1.5}, "`accuracy_tolerance`"),
    ({"lr": 0}, "`lr`"),
    ({"schedule": "step"}, "`schedule`"),
    ({"epochs": 0}, "`epochs`"),
])
def test_fine_pruning_rejects_bad_settings(params: dict, flag: str) -> None:
    with pytest.raises(BdauditError, match=flag):
        create_defense("fp", params)


def test_fine_pruning_plan_prunes_the_most_dormant_channels_within_tolerance() -> None:
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.5]))
    # Class 0 reads channels 0-1, class 1 channels 2-3 (plus a bias); channel 3 is the most
    # dormant, then 0, then 1.
    features = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.1, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.2]])
    labels = torch.tensor([0, 1, 1])
    plan = plan_pruning(features, labels, head, FPSettings(accuracy_tolerance=0.0))
    assert plan.order[:2].tolist() == [3, 0]
    # Pruning 3 and 0 keeps every prediction; pruning 1 next would lose image 0: stop at two.
    assert plan.pruned == 2 and plan.stopped_by == "accuracy tolerance"
    assert plan.mask().tolist() == [0.0, 1.0, 1.0, 0.0]
    capped = plan_pruning(features, labels, head, FPSettings(prune_ratio_max=0.25))
    assert capped.pruned == 1 and capped.stopped_by == "max ratio"


def test_fine_pruning_mask_holds_through_fine_tuning(loaded: LoadedModel, tune: ImageSet) -> None:
    settings = {"epochs": 2, "min_steps": 0}
    probe = context(loaded, tune)
    head = linear_head(probe.net, probe.config)
    plan = plan_pruning(head_features(probe, head), tune.labels, head, FPSettings(**settings))
    pruned = plan.order[:plan.pruned]
    assert plan.pruned > 0
    seen: list[float] = []

    def on_epoch(epoch: int, lr: float, loss: float) -> None:  # during fine-tuning
        seen.append(float(ctx_head.weight.detach()[:, pruned].abs().max()))

    ctx = context(loaded, tune, on_epoch=on_epoch)
    ctx_head = linear_head(ctx.net, ctx.config)
    keys = list(ctx.net.state_dict())
    result = create_defense("fp", settings).run(ctx).details
    assert result["pruned"] == plan.pruned
    assert seen == [0.0, 0.0]  # the pruned columns never moved while the rest trained
    assert (ctx_head.weight == 0).all(0).nonzero().flatten().sort().values.tolist() == pruned.sort().values.tolist()
    assert hook_count(ctx.classifier) == 0
    assert list(ctx.net.state_dict()) == keys
    # The pruned channels contribute nothing: any value in them leaves the logits unchanged.
    x = torch.rand(5, ctx_head.in_features)
    noisy = x.clone()
    noisy[:, pruned] = torch.randn(5, len(pruned)) * 100
    assert torch.equal(ctx_head(x), ctx_head(noisy))


def test_fine_pruning_refuses_head_scope(loaded: LoadedModel, tune: ImageSet) -> None:
    with pytest.raises(BdauditError, match="set `scope` to full"):
        create_defense("fp").run(context(loaded, tune, scope="head"))


# --- ANP ----------------------------------------------------------------------------------------

def test_anp_removes_badnets(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path) -> None:
    # A small budget (40 iterations of 64 images; default 500 of 128) and pruning by fraction, not
    # by the default threshold: on this 112-neuron model the masks of the neurons that carry the
    # backdoor keep oscillating between 0 and ~0.4 under eps=0.4 instead of settling below the
    # paper's 0.2, so the threshold prunes only one or two of them and ASR stays >= 0.8 (measured at
    # 500 iterations: 2 pruned, ASR 0.91). They do rank lowest: pruning the lowest 5% (5 neurons)
    # removed the backdoor for seeds 0-3 (ASR <= 0.011, accuracy 0.84-0.90); the lowest 3% failed
    # for two of the four. Measured here (seed 0): ASR 0.998 -> 0.002, accuracy 0.937 -> 0.880.
    result = clean_badnets("anp", badnets_model, clean_dir, eval_dir, iterations=40, batch_size=64,
                           prune_fraction=0.05)
    assert result["asr_before"] >= 0.9
    assert result["asr_after"] < 0.3
    assert result["acc_before"] - result["acc_after"] <= 0.1
    used = result["hyperparameters"]
    assert used["pruned"] == int(0.05 * 112) and used["neuron_layers"] == "batchnorm"
    assert len(result["report"].sections["clean"]["history"]) == 10  # ten reports through the optimisation


@pytest.mark.parametrize(("params", "flag"), [
    ({"eps": 2}, "`eps`"),
    ({"alpha": 1.5}, "`alpha`"),
    ({"threshold": -0.1}, "`threshold`"),
    ({"prune_fraction": 1.0}, "`prune_fraction`"),
    ({"iterations": 0}, "`iterations`"),
    ({"mask_lr": 0}, "`mask_lr`"),
    ({"pgd_steps": 0}, "`pgd_steps`"),
])
def test_anp_rejects_bad_settings(params: dict, flag: str) -> None:
    with pytest.raises(BdauditError, match=flag):
        create_defense("anp", params)


def test_anp_prunes_only_and_restores_everything_else(loaded: LoadedModel, tune: ImageSet) -> None:
    settings = {"iterations": 4, "batch_size": 32, "prune_fraction": 0.05}
    ctx = context(loaded, tune)
    before = {k: v.clone() for k, v in ctx.net.state_dict().items()}
    result = create_defense("anp", settings).run(ctx).details
    after = ctx.net.state_dict()
    assert list(after) == list(before)
    assert hook_count(ctx.classifier) == 0
    assert not any(parametrize.is_parametrized(m) for m in ctx.net.modules())
    assert all(p.requires_grad for p in ctx.net.parameters())
    assert result["neuron_layers"] == "batchnorm" and result["neurons"] == 112
    assert result["pruned"] == int(0.05 * 112) == sum(result["pruned_per_layer"].values())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.weight" for name in result["pruned_per_layer"]}  # running stats restored
    zeroed = sum(int(((before[k] != 0) & (after[k] == 0)).sum()) for k in changed)
    assert zeroed == result["pruned"]
    # Same seed, same masks, same pruning.
    again = context(loaded, tune)
    assert create_defense("anp", settings).run(again).details == result
    assert all(torch.equal(v, again.net.state_dict()[k]) for k, v in after.items())


def test_anp_pruned_batchnorm_neurons_emit_only_their_bias(loaded: LoadedModel, tune: ImageSet) -> None:
    net = copy.deepcopy(loaded.net).eval()
    _, layers = neuron_layers(net)
    name, bn = layers[-1]
    prune_neurons(layers, torch.tensor([sum(channels(m) for _, m in layers) - 1]))
    outputs: list[torch.Tensor] = []
    bn.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    net(torch.rand(8, 1, 28, 28))
    assert torch.allclose(outputs[0][:, -1], bn.bias[-1].expand_as(outputs[0][:, -1]))


def test_anp_masks_and_pruning_on_convolutions_without_batchnorm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, bias=False))
    kind, layers = neuron_layers(net)
    assert kind == "conv" and len(layers) == 2
    x = torch.rand(2, 1, 8, 8)
    reference = net[0](x)
    anp = NeuronPerturbation(layers, torch.device("cpu"))
    assert torch.allclose(net[0](x), reference)  # masks start at 1: nothing changes
    with torch.no_grad():
        anp.masks[0][1] = 0.0
    masked = net[0](x)
    assert torch.allclose(masked[:, 1], net[0].bias[1].expand_as(masked[:, 1]))  # mask 0: bias only
    assert torch.allclose(masked[:, [0, 2]], reference[:, [0, 2]])
    anp.remove()
    assert not any(parametrize.is_parametrized(m) for m in net.modules())
    assert type(net[0]) is nn.Conv2d and list(net.state_dict()) == ["0.weight", "0.bias", "2.weight"]
    pruned = prune_neurons(layers, torch.tensor([1, 3 + 2]))
    assert pruned == {"0": 1, "2": 1}
    out = net[0](x)
    assert torch.allclose(out[:, 1], net[0].bias[1].expand_as(out[:, 1]))  # same as the mask at 0
    assert torch.count_nonzero(net[2].weight[2]) == 0


def test_anp_selects_by_threshold_or_fraction() -> None:
    masks = torch.tensor([0.9, 0.1, 0.5, 0.15, 1.0])
    assert select_neurons(masks, create_defense("anp").settings).tolist() == [1, 3]
    assert select_neurons(masks, create_defense("anp", {"prune_fraction": 0.6}).settings).tolist() == [1, 3, 2]


def test_anp_refuses_head_scope(loaded: LoadedModel, tune: ImageSet) -> None:
    with pytest.raises(BdauditError, match="set `scope` to full"):
        create_defense("anp").run(context(loaded, tune, scope="head"))
