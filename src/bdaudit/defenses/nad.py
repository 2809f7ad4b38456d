"""Neural Attention Distillation (Li et al. 2021, "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks", ICLR 2021, arXiv:2101.05930).

A teacher — a copy of the backdoored model fine-tuned on the clean data for ``teacher_epochs`` —
guides the backdoored model (the student), which is trained on the same clean data with
``CE + beta * sum_l ||A_s^l - A_t^l||_2``. The attention map of a feature map ``a`` (N, C, H, W)
is ``mean_c |a_c|^p`` flattened and L2-normalised per sample (the paper's Eq. 1-2, ``p = 2``); the
distance is averaged over the batch. Matching the teacher's attention on clean images erases the
neurons the trigger activates even when the teacher itself keeps part of the backdoor.

Layers: by default the outputs of the last ``n_layers`` (3) stages, found generically from one
probe forward pass — for each spatial resolution, the module that finishes last at it (the ReLU
before each max-pool and the final block of ``bd_cnn_*``; a ResNet's ``layerN``; the last block of
each stage of ``preact_resnet18_cifar``); the paper uses the outputs of WRN's groups 2-4. Built for
CNNs: for other architectures name the layers with ``layers`` (comma-separated module names).

Knobs (besides ``TuneSettings``: epochs, batch size, optimizer, momentum, weight decay, augment):

- ``beta`` (20): the attention-loss weight, one for all layers. The paper's 5000 (and
  BackdoorBench's 500-1000 per layer) multiply the official code's mean *squared* error over the
  H*W attention entries, which is tiny; the paper's own per-sample L2 distance used here is
  ~0.1-0.2 per layer between a model and its fine-tuned copy, so its weight is far smaller. On
  bdaudit's tiny MNIST BadNets model: beta 0 (plain tuning) leaves ASR 0.57, 5 -> 0.19,
  10 -> 0.08, 20 -> 0.004 at a 1.7-point accuracy cost; 50+ wrecks accuracy.
- ``power`` (2): the exponent ``p``.
- ``lr`` (0.01), ``schedule`` (cosine, or constant), ``epochs`` (20): the student's training (the
  paper: 20 epochs).
- ``teacher_epochs`` (10), ``teacher_lr`` (0.01): the teacher's plain fine-tuning (constant rate).
  Per-epoch progress is reported for the student only.

Full scope only: distillation moves the intermediate layers.
bdaudit's change to the paper: the teacher's BatchNorm layers normalise with the batch's
statistics, as the student's do in training (see ``train_teacher``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit.core.data import to_float
from bdaudit.core.errors import BdauditError
from bdaudit.defenses.base import Defense, DefenseContext, DefenseResult, register_defense
from bdaudit.defenses.layers import capture_outputs
from bdaudit.defenses.tuning import RateSettings, fine_tune
from bdaudit.engine.recipe import check_lr
from bdaudit.engine.schedules import Constant


@dataclass(frozen=True)
class NADSettings(RateSettings):
    lr: float = 0.01
    schedule: str = "cosine"  # or constant
    beta: float = 20.0
    power: float = 2.0
    teacher_epochs: int = 10
    teacher_lr: float = 0.01
    n_layers: int = 3
    layers: str = ""  # comma-separated module names; empty: the last n_layers stage outputs

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr(self.teacher_lr, "teacher_lr")
        if not self.beta >= 0:
            raise BdauditError(f"`beta` must be >= 0, not {self.beta}")
        if not self.power > 0:
            raise BdauditError(f"`power` must be > 0, not {self.power}")
        if self.teacher_epochs < 1:
            raise BdauditError(f"`teacher_epochs` must be at least 1, not {self.teacher_epochs}")
        if self.n_layers < 1:
            raise BdauditError(f"`n_layers` must be at least 1, not {self.n_layers}")


def attention_map(features: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): the channel mean of ``|a|^p``, L2-normalised per sample."""
    return F.normalize(features.abs().pow(power).mean(dim=1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """The batch mean of the per-sample L2 distance between the two attention maps."""
    return (attention_map(student, power) - attention_map(teacher, power)).norm(dim=1).mean()


# Modules whose outputs never end a stage: normalisation (a pre-activation net's last BatchNorm would
# otherwise win over its block), pass-throughs and regularisers.
_NOT_STAGE_ENDS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Identity, nn.Dropout)


@torch.no_grad()
def stage_outputs(classifier: nn.Module, net: nn.Module, probe: torch.Tensor, n_layers: int) -> list[str]:
    """Names of the modules of ``net`` (run by ``classifier`` on ``probe``) whose outputs end its
    last ``n_layers`` spatial stages: for each resolution of a 4-D output, the module that finishes
    last at it. Forward hooks fire when a module finishes, so a block or stage container wins over
    its own last layer. Skipped: modules called more than once, normalisation/identity/dropout
    layers, 1x1 outputs (pooled), and outputs larger than an earlier one (a CNN's stages only
    shrink; this drops e.g. a transformer's (N, heads, tokens, dim) tensors)."""
    finished: list[tuple[str, tuple[int, int]]] = []
    calls: dict[str, int] = {}

    def hook_for(name: str):  # noqa: ANN202
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
                finished.append((name, (int(output.shape[-2]), int(output.shape[-1]))))
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in net.named_modules()
               if name and not isinstance(m, _NOT_STAGE_ENDS)]
    was_training = classifier.training
    try:
        classifier.eval()
        classifier(probe)
    finally:
        classifier.train(was_training)
        for handle in handles:
            handle.remove()
    last: dict[tuple[int, int], tuple[int, str]] = {}
    smallest = (float("inf"), float("inf"))
    for order, (name, (h, w)) in enumerate(finished):
        if calls[name] == 1 and h <= smallest[0] and w <= smallest[1]:
            smallest = (h, w)
            last[(h, w)] = (order, name)
    stages = [name for _, name in sorted(last.values())]
    if not stages:
        raise BdauditError("nad needs convolutional feature maps (4-D activations) and found none; "
                           "name the layers to distil with `layers`")
    return stages[-n_layers:]


def resolve_layers(ctx: DefenseContext, settings: NADSettings) -> list[str]:
    """The ``--layers`` names (checked), else the last ``n_layers`` stage outputs."""
    if settings.layers:
        names = [n.strip() for n in settings.layers.split(",") if n.strip()]
        for name in names:
            try:
                ctx.net.get_submodule(name)
            except AttributeError:
                raise BdauditError(f"`layers`: the model has no module '{name}'") from None
        return names
    ctx.classifier.to(ctx.device)
    return stage_outputs(ctx.classifier, ctx.net, to_float(ctx.tune.images[:2], ctx.device), settings.n_layers)


def train_teacher(ctx: DefenseContext, settings: NADSettings) -> nn.Module:
    """A copy of the model fine-tuned on the clean data (silently: progress is the student's),
    frozen, in eval mode except that its BatchNorm layers normalise with the batch's statistics
    (without updating the running ones), as the student's do in training: otherwise the
    train/eval gap alone separates the attention maps, which on small tuning sets is as large as
    what distillation is meant to correct."""
    teacher = copy.deepcopy(ctx.classifier)
    teacher_ctx = DefenseContext(classifier=teacher, config=ctx.config, tune=ctx.tune, device=ctx.device,
                                 gen=ctx.gen, scope="full")
    fine_tune(teacher_ctx, dataclasses.replace(settings, epochs=settings.teacher_epochs),
              Constant(settings.teacher_lr))
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    for module in teacher.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
    return teacher


@register_defense
class NeuralAttentionDistillation(Defense):
    name = "nad"
    paper = ("Li et al. 2021, Neural Attention Distillation: Erasing Backdoor Triggers from Deep "
             "Neural Networks (ICLR 2021, arXiv:2101.05930)")
    needs = "clean labelled data (no knowledge of the trigger or target); convolutional feature maps"

    settings_cls = NADSettings
    settings: NADSettings

    def run(self, ctx: DefenseContext) -> DefenseResult:
        s = self.settings
        ctx.require_full_scope(self.name, "distils the intermediate layers, so it tunes the whole model")
        names = resolve_layers(ctx, s)
        teacher = train_teacher(ctx, s)
        student_modules = [ctx.net.get_submodule(n) for n in names]
        teacher_modules = [teacher.net.get_submodule(n) for n in names]  # type: ignore[operator]

        def loss_fn(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with capture_outputs(student_modules) as student:
                logits = classifier(x)
            with torch.no_grad(), capture_outputs(teacher_modules) as target:
                teacher(x)
            if any(a is None for a in student):
                unused = [n for n, a in zip(names, student, strict=True) if a is None]
                raise BdauditError(f"`layers`: module(s) {', '.join(unused)} are not used in the forward pass")
            distill = sum(attention_loss(a, b, s.power) for a, b in zip(student, target, strict=True))
            return F.cross_entropy(logits, y) + s.beta * distill

        lr_at = s.lr_function(len(ctx.tune))
        fine_tune(ctx, s, lr_at, loss_fn=loss_fn)
        return DefenseResult(asdict(s), {"layers": names})
