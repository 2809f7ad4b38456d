"""Adversarial Neuron Pruning (Wu & Wang 2021, "Adversarial Neuron Perturbations Expose Backdoored
Models", NeurIPS): backdoor neurons are the ones whose small multiplicative perturbation most
easily flips clean predictions. ANP learns a soft mask m ∈ [0, 1] per neuron that keeps the model
accurate both as it is and under a worst-case neuron perturbation, then prunes the neurons whose
mask fell below a threshold. The model's own weights are never trained.

A "neuron" is an output channel of a BatchNorm2d layer (every affine one, ``layers.norm_layers``),
as in the paper; a model without BatchNorm gets the masks on its convolutions' output channels
(``layers.conv_layers``) instead. Masks and perturbations are temporary parametrizations of the
layer's per-channel weight and bias, ``w → (m + δ)·w`` and ``b → (1 + ξ)·b`` with
``|δ|, |ξ| ≤ eps``, so a BatchNorm output ``w·x̂ + b`` becomes ``(m + δ)·w·x̂ + (1 + ξ)·b``
(likewise a convolution's ``W∗x + b``; acting on parameters, not outputs, keeps it exact for
BatchNorm variants that fuse an activation). Each iteration, on one clean batch:

1. δ, ξ start uniform in [-eps, eps] and take ``pgd_steps`` signed-gradient ascent steps of size
   ``eps / pgd_steps`` on the cross-entropy (the adversarial neuron perturbation);
2. the masks take one SGD step (momentum 0.9) on ``alpha·L_nat + (1 − alpha)·L_adv`` — the loss
   without and with the perturbation — and are clipped to [0, 1].

As in the authors' code, BatchNorm layers use batch statistics while the masks are optimised
(every other module is in eval mode) and batches are augmented like fine-tuning's (random shifts,
horizontal flips where the model's data allows them). At the end the parametrizations are removed and every
parameter and buffer (BatchNorm running statistics included) is restored, then the selected
neurons are pruned for good: their BatchNorm weight is set to 0 (a convolution's output-channel
weights, without BatchNorm), so they emit only their learnt constant bias — exactly what a mask of
0 meant during the optimisation, and what the authors' pruning does.

Knobs (``ANPSettings``; the defaults are the paper's CIFAR-10 settings except ``iterations``):

- ``iterations`` (500): mask-optimisation steps. The paper runs 2000; 500 keeps a CPU run of a
  small CNN to minutes, and the lowest masks single out the backdoor neurons much sooner (on the
  tests' tiny BadNets CNN within 40 iterations).
- ``batch_size`` (128), ``augment_pad`` (2).
- ``eps`` (0.4): perturbation budget; 0 disables the perturbation (masks then only fit L_nat).
- ``pgd_steps`` (1): perturbation steps per batch.
- ``alpha`` (0.2): weight of the natural loss against the adversarial one.
- ``mask_lr`` (0.2): the masks' SGD learning rate.
- ``threshold`` (0.2): prune the neurons whose mask ends below it ...
- ``prune_fraction`` (unset): ... or instead the given fraction of all neurons with the lowest masks.

On very small networks the threshold can under-prune: on the tests' 112-neuron BadNets CNN the
masks of the neurons that carry the backdoor keep oscillating between 0 and ~0.4 under eps = 0.4
rather than settling below 0.2, so the threshold catches one or two and the backdoor survives
(500 iterations: 2 pruned, ASR 0.91). They do rank lowest: ``prune_fraction=0.05`` removed the
backdoor for every seed tried. The report's ``lowest_masks`` shows the ranking to choose from.

Needs clean labelled data (a few hundred images suffice); works on the whole model
(``--scope full``). ``ctx.on_epoch`` is called ten times, evenly through the optimisation, with
the "epoch" being the tenth of it, the mask learning rate and the mean ANP loss; the model it sees
then is the soft-masked one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bdaudit.core.data import to_float
from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import Defense, DefenseContext, DefenseResult, register_defense
from bdaudit.defenses.layers import conv_layers, norm_layers
from bdaudit.engine.recipe import Augment, check_lr

REPORTS = 10  # ctx.on_epoch calls over the optimisation
MASK_MOMENTUM = 0.9


@dataclass(frozen=True)
class ANPSettings:
    """ANP knobs (see the module docstring)."""

    iterations: int = 500
    batch_size: int = 128
    eps: float = 0.4
    pgd_steps: int = 1
    alpha: float = 0.2
    mask_lr: float = 0.2
    threshold: float = 0.2
    prune_fraction: float | None = None
    augment_pad: int = 2

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise BdauditError(f"`iterations` must be at least 1, not {self.iterations}")
        if self.batch_size < 1:
            raise BdauditError(f"`batch_size` must be at least 1, not {self.batch_size}")
        if not 0.0 <= self.eps <= 1.0:
            raise BdauditError(f"`eps` must be in [0, 1], not {self.eps}")
        if self.pgd_steps < 1:
            raise BdauditError(f"`pgd_steps` must be at least 1, not {self.pgd_steps}")
        if not 0.0 <= self.alpha <= 1.0:
            raise BdauditError(f"`alpha` must be in [0, 1], not {self.alpha}")
        check_lr(self.mask_lr, "mask_lr")
        if not 0.0 <= self.threshold <= 1.0:
            raise BdauditError(f"`threshold` must be in [0, 1], not {self.threshold}")
        if self.prune_fraction is not None and not 0.0 <= self.prune_fraction < 1.0:
            raise BdauditError(f"`prune_fraction` must be in [0, 1), not {self.prune_fraction}")
        if self.augment_pad < 0:
            raise BdauditError(f"`augment_pad` must be >= 0, not {self.augment_pad}")


def neuron_layers(net: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]]:
    """The layers whose output channels are ANP's neurons: BatchNorm2d, else Conv2d."""
    norms = norm_layers(net)
    if norms:
        return "batchnorm", list(norms)
    convs = conv_layers(net)
    if convs:
        return "conv", list(convs)
    raise BdauditError("method anp needs BatchNorm2d or Conv2d layers (its neurons); this model has neither")


def channels(module: nn.Module) -> int:
    """Output channels of a BatchNorm or convolution: the first dimension of its weight."""
    return module.weight.shape[0]  # type: ignore[union-attr,index]


class _ChannelScale(nn.Module):
    """A parametrization: scales a weight (by m, or m + δ) or a bias (by 1 + ξ) per output channel."""

    def __init__(self, owner: NeuronPerturbation, index: int, part: str) -> None:
        super().__init__()
        self.owner, self.index, self.part = owner, index, part

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        o, i = self.owner, self.index
        if self.part == "weight":
            coeff = o.masks[i] + o.noise[i] if o.perturbed else o.masks[i]
        elif o.perturbed:
            coeff = 1.0 + o.noise_bias[i]
        else:
            return value
        return value * coeff.view((-1,) + (1,) * (value.dim() - 1))


class NeuronPerturbation:
    """Per-channel masks m and multiplicative perturbations δ, ξ on the given layers, applied as
    parametrizations of their ``weight`` (× (m + δ)) and ``bias`` (× (1 + ξ)). Working on the
    parameters rather than on outputs keeps it exact for BatchNorm variants that fuse an
    activation (timm's ``BatchNormAct2d``). ``remove()`` restores the modules as they were."""

    def __init__(self, layers: list[tuple[str, nn.Module]], device: torch.device) -> None:
        self.names = [name for name, _ in layers]
        self.modules = [module for _, module in layers]
        sizes = [channels(m) for m in self.modules]
        self.masks = [torch.ones(n, device=device, requires_grad=True) for n in sizes]
        self.noise = [torch.zeros(n, device=device) for n in sizes]  # δ: on the weight
        self.noise_bias = [torch.zeros(n, device=device) for n in sizes]  # ξ: on the bias
        self.perturbed = False
        for i, module in enumerate(self.modules):
            parametrize.register_parametrization(module, "weight", _ChannelScale(self, i, "weight"),
                                                 unsafe=True)
            if getattr(module, "bias", None) is not None:
                parametrize.register_parametrization(module, "bias", _ChannelScale(self, i, "bias"),
                                                     unsafe=True)

    def remove(self) -> None:
        for module in self.modules:
            for name in ("weight", "bias"):
                if parametrize.is_parametrized(module, name):
                    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self.modules = []

    def perturb(self, loss_fn: Any, eps: float, steps: int, gen: torch.Generator) -> None:
        """Random start in [-eps, eps], then signed-gradient ascent on the loss, clipped to eps."""
        for tensors in (self.noise, self.noise_bias):
            for k, t in enumerate(tensors):
                start = (torch.rand(t.shape, generator=gen) * 2 - 1) * eps
                tensors[k] = start.to(t.device)
        self.perturbed = True
        for _ in range(steps):
            variables = [t.requires_grad_(True) for t in self.noise + self.noise_bias]
            grads = torch.autograd.grad(loss_fn(), variables)
            with torch.no_grad():
                updated = [(v + eps / steps * g.sign()).clamp_(-eps, eps) for v, g in zip(variables, grads,
                                                                                            strict=True)]
            self.noise, self.noise_bias = updated[:len(self.noise)], updated[len(self.noise):]

    def mask_values(self) -> torch.Tensor:
        return torch.cat([m.detach().cpu() for m in self.masks])


def select_neurons(masks: torch.Tensor, settings: ANPSettings) -> torch.Tensor:
    """Flat indices of the neurons to prune: below the threshold, or the lowest fraction."""
    if settings.prune_fraction is None:
        return torch.nonzero(masks < settings.threshold).flatten()
    count = int(settings.prune_fraction * len(masks))
    return torch.argsort(masks, stable=True)[:count]


def prune_neurons(layers: list[tuple[str, nn.Module]], flat: torch.Tensor) -> dict[str, int]:
    """Silence neurons for good: zero their BatchNorm weight (or conv output-channel weights)."""
    pruned: dict[str, int] = {}
    offset = 0
    with torch.no_grad():
        for name, module in layers:
            n = channels(module)
            local = flat[(flat >= offset) & (flat < offset + n)] - offset
            if len(local):
                module.weight[local.to(module.weight.device)] = 0.0  # type: ignore[index]
                pruned[name] = len(local)
            offset += n
    return pruned


def batches(n: int, batch_size: int, gen: torch.Generator):  # noqa: ANN201
    """Endless shuffled epochs of indices; an incomplete last batch is dropped when a full one exists."""
    while True:
        order = torch.randperm(n, generator=gen)
        stop = n - n % batch_size if n >= batch_size else n
        for start in range(0, stop, batch_size):
            yield order[start:start + batch_size]


def set_modes(ctx: DefenseContext) -> None:
    """Everything in eval mode except BatchNorm, which uses batch statistics (as the authors')."""
    ctx.classifier.eval()
    for module in ctx.net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()


@register_defense
class AdversarialNeuronPruning(Defense):
    name = "anp"
    paper = "Wu & Wang 2021, Adversarial Neuron Perturbations Expose Backdoored Models (NeurIPS)"
    needs = "clean labelled data (a few hundred images; no knowledge of the trigger or target)"

    settings_cls = ANPSettings
    settings: ANPSettings

    def run(self, ctx: DefenseContext) -> DefenseResult:
        s = self.settings
        ctx.require_full_scope(self.name, "prunes neurons across the whole model")
        kind, layers = neuron_layers(ctx.net)
        ctx.classifier.to(ctx.device, memory_format=torch.channels_last)
        net = ctx.net
        saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
        grad_flags = [p.requires_grad for p in net.parameters()]
        for param in net.parameters():
            param.requires_grad_(False)
        anp = NeuronPerturbation(layers, ctx.device)
        try:
            losses = self._optimise(ctx, anp)
        finally:
            anp.remove()
            net.load_state_dict(saved)
            for param, flag in zip(net.parameters(), grad_flags, strict=True):
                param.requires_grad_(flag)
            ctx.classifier.eval()
        masks = anp.mask_values()
        pruned = prune_neurons(layers, select_neurons(masks, s))
        return DefenseResult(asdict(s), {
            "neuron_layers": kind, "neurons": len(masks), "pruned": sum(pruned.values()),
            "pruned_per_layer": pruned, "mask_below_threshold": int((masks < s.threshold).sum()),
            "lowest_masks": [round(float(v), 3) for v in masks.sort().values[:10]],
            "final_loss": losses[-1] if losses else None})

    def _optimise(self, ctx: DefenseContext, anp: NeuronPerturbation) -> list[float]:
        s = self.settings
        optimizer = torch.optim.SGD(anp.masks, lr=s.mask_lr, momentum=MASK_MOMENTUM)
        augment = Augment(s.augment_pad, ctx.config.hflip)
        report_every = -(-s.iterations // REPORTS)
        set_modes(ctx)
        reported: list[float] = []
        window: list[float] = []
        for it, index in zip(range(s.iterations), batches(len(ctx.tune), s.batch_size, ctx.gen), strict=False):
            x = augment(to_float(ctx.tune.images[index]), ctx.gen)
            x = x.to(ctx.device).contiguous(memory_format=torch.channels_last)
            y = ctx.tune.labels[index].to(ctx.device)
            loss_adv = torch.zeros((), device=ctx.device)
            if s.eps > 0:
                anp.perturb(lambda x=x, y=y: F.cross_entropy(ctx.classifier(x), y), s.eps, s.pgd_steps, ctx.gen)
                loss_adv = F.cross_entropy(ctx.classifier(x), y)
            anp.perturbed = False
            loss_nat = F.cross_entropy(ctx.classifier(x), y)
            loss = s.alpha * loss_nat + (1 - s.alpha) * loss_adv
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for mask in anp.masks:
                    mask.clamp_(0.0, 1.0)
            window.append(float(loss.detach()))
            if (it + 1) % report_every == 0 or it + 1 == s.iterations:
                reported.append(sum(window) / len(window))
                if ctx.on_epoch is not None:
                    ctx.on_epoch(len(reported) - 1, s.mask_lr, reported[-1])
                    set_modes(ctx)
                window = []
        return reported
