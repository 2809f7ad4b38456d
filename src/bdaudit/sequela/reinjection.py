"""The retuning (re-injection) attack: how fast does a backdoor come back?

A defense can make a backdoor dormant without removing it: ASR drops, but the trigger features
survive and a little fine-tuning on a few poisoned samples reactivates them (Min et al. 2024,
"Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense",
NeurIPS, arXiv:2410.09838 — the "retuning attack"; cf. Min et al. 2023, "Towards Stable
Backdoor Purification through Feature Shift Tuning", and Qi et al. 2023, "Revisiting the
Assumption of Latent Separability for Backdoor Defenses"). This module fine-tunes a copy of
the model on a few hundred clean samples mixed with a handful relabelled to the target under
the trigger, and tracks attack success (ASR) and clean accuracy (CA) as it goes. A backdoor
that was truly removed should come back no faster than it plants into a never-backdoored model.

Defaults (SGD, lr 0.002, batch 32, 300 clean + 10 poisoned samples, 60 steps, ASR every
5 steps) were measured on the test fixtures: ``bd_cnn_tiny`` planted on 1,000 MNIST digits
(BadNets to class 0, ASR 1.00), retuned on the 400-image clean subset, ASR on the 600-image eval
subset, three retuning seeds each. Steps to ASR >= 0.5:

* never-backdoored model: not reached in 60 steps (max ASR 0.02-0.04); in 120 steps not reached
  either (max 0.41), so the budget keeps a 2x margin below how fast BadNets plants afresh;
* backdoored model, and the same after fine-tuning with a tiny rate (0.001, 5 epochs; ASR stays
  0.99): step 0 — tiny-rate fine-tuning does not even hide this backdoor;
* "superficially cleaned" — fine-tuned 10 epochs on the clean subset under a cosine rate peaking
  at 0.02 (ASR 0.06-0.27, CA 0.93): 5-20 steps; peaking at 0.05 (ASR 0.01, CA 0.93): 25-40
  steps. Final ASR 0.89-1.00 at unchanged CA: the backdoor was hidden, not removed;
* fine-tuned 10 epochs at a constant 0.05 (ASR 0.004, CA 0.86): not reached (max 0.02), like
  the clean model.

Why these values: at lr 0.005 the clean model already reaches 0.5 by step 65 (and at 0.01 by
step 35) while the hidden backdoors need 10-30 steps, too thin a margin; 0.002 separates them
3x. Ten poisons (3 % of the set) are what the hidden models need to come back within the
budget; five made the clean model's curve noisy without slowing it much. The step budget does
not scale with the data: on other models and data sets re-measure the clean model's time first.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bdaudit.attacks.base import Attack
from bdaudit.core.data import ImageSet
from bdaudit.core.errors import BdauditError
from bdaudit.detect.probe import attack_success_rates, trigger_fit_error
from bdaudit.engine.loop import Hooks, Plan, Runtime, predict, train
from bdaudit.engine.recipe import make_optimizer, steps_per_epoch
from bdaudit.engine.schedules import Constant
from bdaudit.triggers import Trigger

DEFAULT_BUDGET_STEPS = 60
DEFAULT_N_CLEAN = 300
DEFAULT_N_POISON = 10
DEFAULT_LR = 0.002
DEFAULT_BATCH_SIZE = 32
DEFAULT_EVAL_EVERY = 5
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # the planting recipe's (plant.TrainSettings)
REGAINED_ASR = 0.5  # "the backdoor is back": most non-target images go to the target


class ReinjectionError(BdauditError):
    """The retuning attack cannot be set up with the given data or settings."""


@dataclass(frozen=True)
class ReinjectionSettings:
    """The retuning attacker's budget and recipe: ``budget_steps`` SGD steps on ``n_clean`` clean +
    ``n_poison`` triggered-and-relabelled samples, measured every ``eval_every`` steps; the
    backdoor counts as back at ``regained_asr``."""

    budget_steps: int = DEFAULT_BUDGET_STEPS
    n_clean: int = DEFAULT_N_CLEAN
    n_poison: int = DEFAULT_N_POISON
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    eval_every: int = DEFAULT_EVAL_EVERY
    regained_asr: float = REGAINED_ASR
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget_steps < 1 or self.eval_every < 1 or self.batch_size < 1:
            raise ReinjectionError("`budget_steps`, `eval_every` and `batch_size` must be at least 1")
        if self.n_poison < 1 or self.n_clean < 0:
            raise ReinjectionError("the retuning attack needs `n_poison` >= 1 and `n_clean` >= 0")
        if not self.lr > 0:
            raise ReinjectionError(f"`lr` must be > 0, not {self.lr}")


@dataclass(frozen=True)
class CurvePoint:
    step: int
    asr: float
    clean_accuracy: float


@dataclass
class ReinjectionResult:
    """ASR/CA along the retuning run; ``steps_to_regain`` is the first evaluated step with
    ASR >= ``regained_asr`` (0 when the model starts there; None when the budget ran out)."""

    trigger: str
    target: int
    initial_asr: float
    initial_clean_accuracy: float
    final_asr: float
    final_clean_accuracy: float
    steps_to_regain: int | None
    regained_asr: float
    curve: list[CurvePoint] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def regained(self) -> bool:
        return self.steps_to_regain is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger, "target": self.target,
            "initial_asr": float(self.initial_asr),
            "initial_clean_accuracy": float(self.initial_clean_accuracy),
            "final_asr": float(self.final_asr),
            "final_clean_accuracy": float(self.final_clean_accuracy),
            "steps_to_regain": self.steps_to_regain, "regained": self.regained,
            "regained_asr": float(self.regained_asr),
            "curve": [asdict(point) for point in self.curve],
            "settings": dict(self.settings),
        }


class _BudgetSpent(Exception):
    """Raised from the step hook: ``train`` runs whole epochs, the budget is in steps."""


def _measure(classifier: nn.Module, data: ImageSet, trigger: Trigger, target: int,
             batch_size: int, device: torch.device) -> tuple[float, float]:
    """(ASR at ``target`` over non-target images, clean accuracy) on ``data``."""
    clean = predict(classifier, data.images, batch_size, device)
    triggered = predict(classifier, data.images, batch_size, device, transform=trigger.apply)
    asr = attack_success_rates(triggered, data.labels, data.num_classes)[target]
    return float(asr), float((clean == data.labels).float().mean())


def _retuning_set(clean: ImageSet, target: int, n_clean: int, n_poison: int,
                  gen: torch.Generator) -> tuple[ImageSet, torch.Tensor]:
    """``n_clean`` clean images plus ``n_poison`` non-target ones to be triggered, all distinct;
    returns the set and the mask of rows to poison."""
    if n_clean + n_poison > len(clean):
        raise ReinjectionError(f"the retuning attack needs {n_clean} clean + {n_poison} poisoned "
                               f"images but the clean data has {len(clean)}; lower n_clean/n_poison")
    order = torch.randperm(len(clean), generator=gen)
    non_target = order[clean.labels[order] != target]
    if len(non_target) < n_poison:
        raise ReinjectionError(f"{n_poison} poisoned images must come from non-target classes; "
                               f"the clean data has only {len(non_target)}")
    poison = non_target[:n_poison]
    rest = order[~torch.isin(order, poison)][:n_clean]
    index = torch.cat([poison, rest])
    mask = torch.zeros(len(index), dtype=torch.bool)
    mask[:n_poison] = True
    return clean.subset(index), mask


def _check_trigger(trigger: Trigger, data: ImageSet) -> None:
    """Fail before training, not in its middle, when the trigger cannot stamp these images."""
    problem = trigger_fit_error(trigger, data)
    if problem:
        raise ReinjectionError(problem)


def reinjection_attack(classifier: nn.Module, clean: ImageSet, trigger: Trigger, target: int, *,
                       eval_data: ImageSet, device: torch.device | str,
                       settings: ReinjectionSettings | None = None) -> ReinjectionResult:
    """Retune a deep copy of ``classifier`` (taking [0, 1] images) for ``budget_steps`` SGD steps
    on ``n_clean`` clean + ``n_poison`` triggered-and-relabelled samples drawn from ``clean``;
    ASR and CA are measured on ``eval_data`` every ``eval_every`` steps. The caller's model is
    never touched."""
    s = settings or ReinjectionSettings()
    budget_steps, n_clean, n_poison, lr = s.budget_steps, s.n_clean, s.n_poison, s.lr
    batch_size, eval_every, regained_asr, seed = s.batch_size, s.eval_every, s.regained_asr, s.seed
    if not 0 <= target < eval_data.num_classes:
        raise ReinjectionError(f"`target` {target} is not a class index (0..{eval_data.num_classes - 1})")
    _check_trigger(trigger, clean)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    retune, poisoned = _retuning_set(clean, target, n_clean, n_poison, gen)
    poisoner = Attack(trigger=trigger, target=target, poison_rate=n_poison / len(retune))
    model = copy.deepcopy(classifier).to(device)

    curve = [CurvePoint(0, *_measure(model, eval_data, trigger, target, 256, device))]
    step = 0

    def on_step() -> None:
        nonlocal step
        step += 1
        if step % eval_every == 0 or step == budget_steps:
            curve.append(CurvePoint(step, *_measure(model, eval_data, trigger, target, 256, device)))
            model.train()  # _measure left it in eval mode; training goes on
        if step >= budget_steps:
            raise _BudgetSpent

    optimizer = make_optimizer(model.parameters(), "sgd", lr, MOMENTUM, WEIGHT_DECAY)
    epochs = -(-budget_steps // steps_per_epoch(len(retune), batch_size))
    try:
        train(model, retune, Plan(epochs, batch_size, Constant(lr)), optimizer, Runtime(gen, device),
              Hooks(batch_transform=poisoner.stamping(poisoned), on_step=on_step))
    except _BudgetSpent:
        model.eval()
    reached = next((p.step for p in curve if p.asr >= regained_asr), None)
    return ReinjectionResult(
        trigger=trigger.spec(), target=target, initial_asr=curve[0].asr,
        initial_clean_accuracy=curve[0].clean_accuracy, final_asr=curve[-1].asr,
        final_clean_accuracy=curve[-1].clean_accuracy, steps_to_regain=reached,
        regained_asr=regained_asr, curve=curve,
        settings={"budget_steps": budget_steps, "n_clean": n_clean, "n_poison": n_poison,
                  "lr": lr, "batch_size": batch_size, "eval_every": eval_every, "seed": seed,
                  "optimizer": "sgd", "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                  "n_eval": len(eval_data)})
