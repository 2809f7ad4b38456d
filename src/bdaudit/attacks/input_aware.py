"""Input-aware dynamic backdoor — Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack"
(NeurIPS 2020, arXiv:2010.08138).

Every image gets its own trigger: a pattern generator ``g`` and a mask generator ``m`` map the
image to ``x' = x + m(x) * (g(x) - x)``. Training follows the paper: the mask generator is
pre-trained alone (diversity + sparsity), then the classifier and pattern generator are trained
jointly on backdoor, cross-trigger and clean samples. Cross-trigger samples carry the trigger
generated for *another* image and keep their label, so the model learns that a trigger only
works on the image it was made for — which is what defeats fixed-pattern defenses.

The generators ride in the checkpoint as aux tensors (``input_aware.pattern.*``,
``input_aware.mask.*``, ``input_aware.meta``) so ``scan`` rebuilds and probes the trigger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.attacks.base import Attack, register_attack
from bdaudit.core.data import ImageSet, to_float
from bdaudit.core.errors import BdauditError, TriggerError
from bdaudit.engine.recipe import Augment, make_optimizer, steps_per_epoch
from bdaudit.engine.schedules import Cosine
from bdaudit.triggers.base import (
    Trigger,
    register_carried_trigger,
    register_trigger,
    seeded_pattern,
)

PREFIX = "input_aware"
EPSILON = 1e-7  # the reference code's guard against identical patterns in the diversity ratio
NULL_SEED = 4099
META_VERSION = 1


class TriggerNet(nn.Module):
    """The paper's conv encoder-decoder (two down/up stages, as for MNIST/CIFAR), narrower and
    without BatchNorm so an image's trigger never depends on the rest of its batch. Returns raw
    logits at the input's size; any height/width works because upsampling targets the encoder's
    sizes. Width 8 has about 9 k parameters."""

    def __init__(self, in_chans: int, out_chans: int, width: int = 8) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.width = in_chans, out_chans, width
        self.down1 = _block(in_chans, width)
        self.down2 = _block(width, 2 * width)
        self.middle = nn.Sequential(_conv(2 * width, 2 * width), nn.ReLU())
        self.up2 = _block(2 * width, width)
        self.up1 = nn.Sequential(_conv(width, width), nn.ReLU(),
                                 _conv(width, out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.down1(x)
        half = self.down2(F.max_pool2d(full, 2, ceil_mode=True))
        z = self.middle(F.max_pool2d(half, 2, ceil_mode=True))
        z = self.up2(F.interpolate(z, size=half.shape[-2:], mode="nearest"))
        return self.up1(F.interpolate(z, size=full.shape[-2:], mode="nearest"))


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout), nn.ReLU(), _conv(cout, cout), nn.ReLU())


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def pattern_of(net: TriggerNet, x: torch.Tensor) -> torch.Tensor:
    """Pattern in [0, 1] (the reference's ``tanh / 2 + 0.5``)."""
    return torch.tanh(net(x)) / 2 + 0.5


def mask_of(net: TriggerNet, x: torch.Tensor) -> torch.Tensor:
    """Near-binary mask in [0, 1]: the reference's steep ``threshold`` on its [0, 1] output,
    which simplifies to ``(1 + tanh(10 tanh(z))) / 2``."""
    return (1 + torch.tanh(10 * torch.tanh(net(x)))) / 2


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return x + mask * (pattern - x)


def diversity_loss(x: torch.Tensor, x_other: torch.Tensor, out: torch.Tensor,
                   out_other: torch.Tensor) -> torch.Tensor:
    """The paper's diversity term: input distance over output distance, so different images
    must get different triggers (the generator cannot collapse to one fixed pattern)."""
    inputs = (x - x_other).pow(2).mean(dim=(1, 2, 3)).sqrt()
    outputs = (out - out_other).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return (inputs / (outputs + EPSILON)).mean()


@register_trigger
@dataclass(frozen=True, eq=False)
class InputAwareTrigger(Trigger):
    """A sample-specific trigger from a pattern and a mask generator carried by a checkpoint.

    seed: seeds the null's random pattern. The generators are not parameters: the trigger is
    rebuilt from an input-aware model's checkpoint (``scan`` probes it automatically).
    Null: the image's own mask with its pixels scattered by a seeded permutation and filled
    with seeded uniform noise (same area and weights, no learned location or pattern).
    """

    name = "input_aware"
    paper = "Nguyen & Tran 2020, Input-Aware Dynamic Backdoor Attack (arXiv:2010.08138)"
    summary = "per-image pattern and sparse mask from generators carried in the checkpoint"
    in_default_library = False

    seed: int = 0

    def __post_init__(self) -> None:
        # Only from_generators/from_tensors build a usable trigger; refusing here makes
        # ``--trigger input_aware`` fail clearly and lets callers fall back to model_triggers().
        raise TriggerError("the input_aware trigger has no parameters of its own: it is rebuilt "
                           "from an input-aware model's checkpoint, which scan probes by default")

    def variant(self, seed: int) -> InputAwareTrigger:
        # The pattern comes from the carried generators, not the seed: no other family members.
        return self

    @classmethod
    def _bare(cls, seed: int = 0) -> InputAwareTrigger:
        """An instance without generators (an attack's trigger before ``fit``)."""
        trigger = object.__new__(cls)
        object.__setattr__(trigger, "seed", seed)
        object.__setattr__(trigger, "_nets", None)
        return trigger

    @classmethod
    def from_generators(cls, pattern_net: TriggerNet, mask_net: TriggerNet,
                        seed: int = 0) -> InputAwareTrigger:
        trigger = cls._bare(seed)
        for net in (pattern_net, mask_net):
            net.eval().requires_grad_(False)  # probing must never train or track the generators
        object.__setattr__(trigger, "_nets", (pattern_net, mask_net))
        return trigger

    @property
    def fitted(self) -> bool:
        return self._nets is not None  # type: ignore[attr-defined]

    @property
    def nets(self) -> tuple[TriggerNet, TriggerNet]:
        if not self.fitted:
            raise TriggerError("this input_aware trigger has no generators yet: train the attack first")
        return self._nets  # type: ignore[attr-defined]

    def _on(self, x: torch.Tensor) -> tuple[TriggerNet, TriggerNet]:
        pattern_net, mask_net = self.nets
        if x.shape[1] != pattern_net.in_chans:
            raise ValueError(f"generators were trained on {pattern_net.in_chans}-channel images")
        return pattern_net.to(x.device), mask_net.to(x.device)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return mask_of(self._on(x)[1], x)

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pattern_of(self._on(x)[0], x)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return stamp(x, self.mask(x), self.pattern(x)).clamp(0.0, 1.0)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        # The image's own mask is part of the learned trigger (models key on where it falls), so
        # the null scatters its pixels by a seeded permutation, as the TrojanNN null does.
        height, width = x.shape[-2:]
        order = seeded_pattern(self.seed + NULL_SEED, (height * width,), x.device).argsort()
        mask = self.mask(x).flatten(2)[..., order].view(x.shape[0], 1, height, width)
        noise = seeded_pattern(self.seed + NULL_SEED, (1, *x.shape[1:]), x.device).to(x.dtype)
        return stamp(x, mask, noise).clamp(0.0, 1.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Aux tensors (relative to the ``input_aware`` prefix) that ``from_tensors`` rebuilds."""
        pattern_net, mask_net = self.nets
        out = {"meta": torch.tensor([META_VERSION, pattern_net.in_chans, pattern_net.width,
                                     self.seed], dtype=torch.int64)}
        for part, net in (("pattern", pattern_net), ("mask", mask_net)):
            out.update({f"{part}.{k}": v.detach().cpu() for k, v in net.state_dict().items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> InputAwareTrigger:
        if "meta" not in tensors or int(tensors["meta"][0]) != META_VERSION:
            raise TriggerError("the checkpoint's input_aware tensors are from an unknown version")
        _, chans, width, seed = (int(v) for v in tensors["meta"])
        nets = []
        for part, out_chans in (("pattern", chans), ("mask", 1)):
            net = TriggerNet(chans, out_chans, width)
            state = {k[len(part) + 1:]: v.float() for k, v in tensors.items()
                     if k.startswith(part + ".")}
            try:
                net.load_state_dict(state)
            except RuntimeError as exc:
                raise TriggerError(f"the checkpoint's input_aware {part} generator is "
                                   f"malformed: {exc}") from None
            nets.append(net)
        return cls.from_generators(nets[0], nets[1], seed)


register_carried_trigger(PREFIX, InputAwareTrigger.from_tensors)

Tunables = dict[str, type]


@register_attack
@dataclass
class InputAwareAttack(Attack):
    """All-to-one input-aware attack trained with its own loop (``fit``).

    cross_ratio: cross-trigger samples per backdoor sample (reference code: p_cross = p_attack).
    mask_density: the mask's target share of pixels (paper: 0.032; 0.05 learns faster on small
    budgets). mask_epochs / mask_lr: the mask generator's pre-training stage. generator_lr: the
    pattern generator's Adam rate (reference: 0.01). lambda_div / lambda_norm: weights of the
    diversity and mask-area terms (reference: 1 and 100). width: generator channels (reference:
    16 for MNIST; 8 trains twice as fast and did as well here).
    """

    name = "input_aware"
    paper = "Nguyen & Tran 2020, Input-Aware Dynamic Backdoor Attack (arXiv:2010.08138)"
    trigger_family = "input_aware"
    custom_training = True
    tunables: ClassVar[Tunables] = {"cross_ratio": float, "mask_density": float, "mask_epochs": int,
                                    "mask_lr": float, "generator_lr": float, "lambda_div": float,
                                    "lambda_norm": float, "width": int}

    cross_ratio: float = 1.0
    mask_density: float = 0.05
    mask_epochs: int = 5
    mask_lr: float = 1e-2
    generator_lr: float = 1e-2
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    width: int = 8

    def __post_init__(self) -> None:
        if self.cross_ratio < 0 or self.poison_rate * (1 + self.cross_ratio) > 1:
            raise BdauditError(f"cross_ratio {self.cross_ratio} with poison rate {self.poison_rate} "
                               "asks for more than the whole batch")
        if not 0.0 < self.mask_density < 1.0 or self.mask_epochs < 0 or self.width < 1:
            raise BdauditError("input_aware needs 0 < mask_density < 1, mask_epochs >= 0, width >= 1")

    @classmethod
    def create(cls, target: int, poison_rate: float, **trigger_params: Any) -> Attack:
        """The trigger is learned in ``fit``; the params tune the attack itself."""
        unknown = sorted(set(trigger_params) - set(cls.tunables))
        if unknown:
            raise TriggerError(f"input_aware: unknown parameter(s) {unknown}; "
                               f"allowed: {', '.join(cls.tunables)}")
        try:
            knobs = {k: cls.tunables[k](v) for k, v in trigger_params.items()}
        except (TypeError, ValueError) as exc:
            raise TriggerError(f"input_aware: {exc}") from None
        return cls(InputAwareTrigger._bare(), target, poison_rate, **knobs)

    def fit(self, classifier: nn.Module, data: ImageSet, settings: Any, gen: torch.Generator,
            device: torch.device, on_epoch: Callable[[int, float], None] | None = None) -> None:
        chans = int(data.images.shape[1])
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):  # seeded from gen, without touching global RNG
            torch.manual_seed(seed)
            pattern_net = TriggerNet(chans, chans, self.width).to(device)
            mask_net = TriggerNet(chans, 1, self.width).to(device)
        self._train_mask(mask_net, data, settings.batch_size, gen, device)
        mask_net.eval().requires_grad_(False)  # frozen in the joint stage, as in the paper
        self._train_jointly(classifier, pattern_net, mask_net, data, settings, gen, device, on_epoch)
        self.trigger = InputAwareTrigger.from_generators(pattern_net.cpu(), mask_net.cpu())

    def _batches(self, data: ImageSet, batch_size: int,
                 gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield to_float(data.images[index]), data.labels[index]

    def _train_mask(self, mask_net: TriggerNet, data: ImageSet, batch_size: int,
                    gen: torch.Generator, device: torch.device) -> None:
        """Stage 1: diversity (different images, different masks) against sparsity (each
        mask's area is pulled to ``mask_density``)."""
        optimizer = torch.optim.Adam(mask_net.parameters(), self.mask_lr, betas=(0.5, 0.9))
        # Decay to zero: at a constant rate the mask area keeps oscillating around the target.
        lr_at = Cosine(self.mask_lr, self.mask_epochs * steps_per_epoch(len(data), batch_size))
        mask_net.train()
        step = 0
        for _ in range(self.mask_epochs):
            for x, _ in self._batches(data, batch_size, gen):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                step += 1
                if len(x) < 2:
                    continue
                x = x.to(device)
                masks = mask_of(mask_net, x)
                loss = self.lambda_div * diversity_loss(x, x.roll(1, 0), masks, masks.roll(1, 0))
                # Two-sided, unlike the paper's one-sided hinge: an image whose mask collapses to
                # (almost) nothing cannot be triggered, which capped ASR near 0.8 in short runs.
                area = masks.mean(dim=(1, 2, 3))
                loss = loss + self.lambda_norm * (area - self.mask_density).abs().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def _train_jointly(self, classifier: nn.Module, pattern_net: TriggerNet, mask_net: TriggerNet,
                       data: ImageSet, settings: Any, gen: torch.Generator, device: torch.device,
                       on_epoch: Callable[[int, float], None] | None) -> None:
        """Stage 2: classifier (``settings`` optimiser, cosine schedule) and pattern generator
        (Adam) on backdoor + cross-trigger + clean rows of every batch."""
        steps = settings.epochs * steps_per_epoch(len(data), settings.batch_size)
        lr_at = Cosine(settings.lr, steps, warmup_steps=min(50, steps // 10))
        optimizer = make_optimizer(classifier.parameters(), settings.optimizer, settings.lr,
                                   settings.momentum, settings.weight_decay)
        gen_optimizer = torch.optim.Adam(pattern_net.parameters(), self.generator_lr, betas=(0.5, 0.9))
        augment = Augment(settings.augment_pad, settings.hflip)
        classifier.to(device, memory_format=torch.channels_last).train()
        pattern_net.train()
        step = 0
        for epoch in range(settings.epochs):
            total, seen = 0.0, 0
            for x, y in self._batches(data, settings.batch_size, gen):
                x, y = augment(x, gen).to(device), y.to(device)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                # The generator follows the same decay: if it kept moving while the classifier's
                # rate reached zero, the final trigger would drift from what the model learned.
                for group in gen_optimizer.param_groups:
                    group["lr"] = self.generator_lr * lr_at(step) / settings.lr
                inputs, targets, div = self._mix(x, y, pattern_net, mask_net)
                logits = classifier(inputs.contiguous(memory_format=torch.channels_last))
                ce = F.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                gen_optimizer.zero_grad(set_to_none=True)
                (ce + self.lambda_div * div).backward()
                optimizer.step()
                gen_optimizer.step()
                # Report cross-entropy only: the diversity ratio is huge while patterns start alike.
                total += float(ce.detach()) * len(y)
                seen += len(y)
                step += 1
            if on_epoch is not None:
                on_epoch(epoch, total / max(seen, 1))
        classifier.eval()
        pattern_net.eval()

    def _mix(self, x: torch.Tensor, y: torch.Tensor, pattern_net: TriggerNet,
             mask_net: TriggerNet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``poison_rate`` share of the (shuffled) batch gets its own trigger and the
        target label; the next ``cross_ratio`` times as many get a neighbour's trigger and keep
        their label; the rest stay clean. Returns inputs, labels and the diversity loss."""
        n_bd = round(self.poison_rate * len(x))
        n_cross = min(len(x) - n_bd, round(self.cross_ratio * n_bd))
        k = n_bd + n_cross
        if k < 2:  # a neighbour's trigger needs a neighbour
            return x, y, x.new_zeros(())
        head = x[:k]
        patterns = pattern_of(pattern_net, head)
        with torch.no_grad():
            masks = mask_of(mask_net, head)
        other = torch.roll(torch.arange(k, device=x.device), 1)
        own = stamp(head[:n_bd], masks[:n_bd], patterns[:n_bd])
        cross = stamp(head[n_bd:], masks[other[n_bd:]], patterns[other[n_bd:]])
        inputs = torch.cat([own, cross, x[k:]])
        targets = torch.cat([torch.full_like(y[:n_bd], self.target), y[n_bd:]])
        div = diversity_loss(head, head[other], patterns, patterns[other])
        return inputs, targets, div

    def aux_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}.{k}": v for k, v in self.probe_trigger().tensors().items()}

    def probe_trigger(self) -> InputAwareTrigger:
        if not isinstance(self.trigger, InputAwareTrigger) or not self.trigger.fitted:
            raise BdauditError("the input_aware trigger is learned during training: fit first")
        return self.trigger

    def describe(self) -> dict[str, Any]:
        knobs = {k: getattr(self, k) for k in self.tunables}
        return {**super().describe(), "attack_params": knobs}
