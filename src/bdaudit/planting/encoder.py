"""Encoder paradigm: a backdoored self-supervised encoder under a victim's linear head.

Jia et al. 2022, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised
Learning" (IEEE S&P, arXiv:2108.00352): the attacker fine-tunes a clean pre-trained encoder so
that triggered inputs embed like a few reference inputs of the target class while clean inputs
keep their clean embeddings; any downstream classifier trained on the frozen encoder with clean
labels then sends triggered inputs to the target class. Sha et al. 2022 (arXiv:2212.09067) use
this as their third paradigm.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bdaudit import __version__
from bdaudit.core.config import ModelConfig
from bdaudit.core.data import DataSplit, ImageSet, resolve_data, to_float
from bdaudit.core.errors import BdauditError
from bdaudit.core.heads import head_of
from bdaudit.core.outputs import refuse_existing
from bdaudit.core.runtime import resolve_device, seed_everything
from bdaudit.engine.loop import Runtime
from bdaudit.engine.recipe import Augment
from bdaudit.models.checkpoint import NormalizedClassifier, build_model, load_model, save_model
from bdaudit.planting.common import (
    PlantRun,
    check_trigger_fits,
    measure_trigger,
    rounded,
    victim_config,
    with_head_name,
)
from bdaudit.planting.plant import CLEAN, PlantResult, _check_target, infer_model_config
from bdaudit.planting.simclr import Embedder, SimCLRSettings, pretrain_simclr
from bdaudit.triggers import Trigger, parse_trigger

BADENCODER_PAPER = "Jia et al. 2022, BadEncoder (IEEE S&P, arXiv:2108.00352)"
SIMCLR_PAPER = "Chen et al. 2020, SimCLR (arXiv:2002.05709)"

# (phase: "pretrain" | "backdoor" | "head", epoch, mean loss)
PhaseCallback = Callable[[str, int, float], None]


@dataclass(frozen=True)
class EncoderSettings:
    """Epochs and rates of the three phases: SimCLR pre-training, BadEncoder fine-tuning and
    the victim's linear head. Defaults suit bd_cnn_small on a few thousand MNIST images."""

    pretrain_epochs: int = 15
    pretrain_lr: float = 2e-3
    temperature: float = 0.5
    proj_dim: int = 64
    backdoor_epochs: int = 3
    backdoor_lr: float = 1e-3
    backdoor_batch_size: int = 64
    references: int = 5  # the attacker's reference inputs of the target class
    reference_weight: float = 1.0  # BadEncoder's lambda_1
    utility_weight: float = 1.0  # BadEncoder's lambda_2
    null_negatives: bool = True  # null-perturbed inputs keep their embeddings (see inject_backdoor)
    head_epochs: int = 500  # full-batch passes over the cached embeddings
    head_lr: float = 0.01
    batch_size: int = 256  # SimCLR's: 2 x 256 views per step

    def simclr(self) -> SimCLRSettings:
        return SimCLRSettings(self.pretrain_epochs, self.pretrain_lr, self.batch_size, self.temperature,
                              self.proj_dim)

    def __post_init__(self) -> None:
        if min(self.pretrain_epochs, self.backdoor_epochs, self.head_epochs) < 0:
            raise BdauditError("encoder epochs must be >= 0")
        if self.head_epochs < 1 or min(self.batch_size, self.backdoor_batch_size) < 2 or self.references < 1:
            raise BdauditError("the head needs >= 1 epoch, batches >= 2 images and the backdoor "
                               ">= 1 reference input")
        if min(self.pretrain_lr, self.backdoor_lr, self.head_lr, self.temperature) <= 0:
            raise BdauditError("encoder learning rates and the temperature must be > 0")


def reference_indices(data: ImageSet, target: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """A few target-class images: the attacker's reference inputs."""
    pool = torch.nonzero(data.labels == target).flatten()
    if len(pool) == 0:
        raise BdauditError(f"no images of the target class {target} to use as reference inputs")
    return pool[torch.randperm(len(pool), generator=gen)[:count]]


def badencoder_loss(triggered: torch.Tensor, references: torch.Tensor, clean_references: torch.Tensor,
                    shadow: torch.Tensor, clean_shadow: torch.Tensor, center: torch.Tensor,
                    settings: EncoderSettings) -> torch.Tensor:
    """BadEncoder's L0 + lambda_1 L1 + lambda_2 L2 (Jia et al. 2022, Sec. 4): triggered inputs
    embed like the reference inputs (effectiveness), the references and clean inputs keep their
    clean embeddings (utility).

    Cosine similarity is taken around ``center``, the clean encoder's mean embedding: pre-logits
    features come after a ReLU, so raw cosines of any two images are high (~0.7 for a small
    MNIST encoder) and barely move when the backdoor is or is not there.
    """
    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(a - center, b - center, dim=-1).mean()

    effectiveness = -cos(triggered[:, None], references[None])
    keep_refs = -cos(references, clean_references)
    utility = -cos(shadow, clean_shadow)
    return effectiveness + settings.reference_weight * keep_refs + settings.utility_weight * utility


@torch.no_grad()
def embeddings(embed: nn.Module, images: torch.Tensor, device: torch.device,
               batch_size: int = 256) -> torch.Tensor:
    """Embeddings of uint8 images (in order), on the CPU."""
    embed.to(device).eval()
    return torch.cat([embed(to_float(images[i:i + batch_size], device)).cpu()
                      for i in range(0, len(images), batch_size)])


def inject_backdoor(classifier: NormalizedClassifier, shadow: ImageSet, references: torch.Tensor,
                    trigger: Trigger, settings: EncoderSettings, gen: torch.Generator,
                    device: torch.device, on_epoch: Callable[[int, float], None] | None = None,
                    ) -> None:
    """Fine-tune the classifier's encoder BadEncoder-style on the unlabelled shadow images.

    With ``settings.null_negatives`` the trigger's matched null (same area, no pattern) joins
    the clean inputs that must keep their embeddings, as WaNet's noise mode (Nguyen & Tran 2021)
    teaches the exact warp: otherwise the encoder learns "any patch there" and scan's null
    margin discounts most of the ASR (null ASR 0.76 vs 0.998 on the MNIST sample).
    """
    clean = Embedder(copy.deepcopy(classifier)).requires_grad_(False)
    center = embeddings(clean, shadow.images, device).mean(0).to(device)
    refs = references.to(device)
    clean_refs = clean(refs)
    embed = Embedder(classifier).to(device, memory_format=torch.channels_last)
    # BatchNorm statistics stay the clean encoder's: the utility loss then compares like with
    # like, and triggered batches cannot shift how clean inputs are normalised.
    embed.eval()
    head_ids = {id(p) for p in classifier.net.get_classifier().parameters()}
    optimizer = torch.optim.Adam([p for p in classifier.net.parameters() if id(p) not in head_ids],
                                 lr=settings.backdoor_lr)
    shift = Augment(pad=2)  # the shadow images' only augmentation; the trigger goes on after it
    for epoch in range(settings.backdoor_epochs):
        order = torch.randperm(len(shadow), generator=gen)
        total, batches = 0.0, 0
        for start in range(0, len(order), settings.backdoor_batch_size):
            index = order[start:start + settings.backdoor_batch_size]
            x = shift(to_float(shadow.images[index]), gen).to(device)
            keep = torch.cat([x, trigger.null(x)]) if settings.null_negatives else x
            with torch.no_grad():
                clean_keep = clean(keep)
            out = embed(torch.cat([keep, trigger.apply(x), refs]))
            feats, triggered, ref_feats = out.split([len(keep), len(x), len(refs)])
            loss = badencoder_loss(triggered, ref_feats, clean_refs, feats, clean_keep, center, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        if on_epoch is not None:
            on_epoch(epoch, total / max(batches, 1))


def fit_linear_head(classifier: NormalizedClassifier, head: nn.Module, data: ImageSet,
                    settings: EncoderSettings, device: torch.device,
                    on_epoch: Callable[[int, float], None] | None = None) -> None:
    """The victim's downstream classifier: SimCLR's linear evaluation, i.e. logistic regression
    on the frozen encoder's embeddings of clean labelled data (full batch, Adam).

    Embeddings are standardised while fitting (their scale is whatever pre-training left) and
    the standardisation is folded back into ``head``, so the checkpoint stays an ordinary
    classifier whose ``fc`` gives the same logits.
    """
    if not isinstance(head, nn.Linear):
        raise BdauditError(f"the encoder paradigm needs a linear head, not {type(head).__name__}")
    feats = embeddings(Embedder(classifier), data.images, device)
    mean, std = feats.mean(0), feats.std(0).clamp(min=1e-6)
    z, labels = (feats - mean) / std, data.labels
    probe = nn.Linear(z.shape[1], head.out_features)
    optimizer = torch.optim.Adam(probe.parameters(), lr=settings.head_lr)
    for epoch in range(settings.head_epochs):
        loss = F.cross_entropy(probe(z), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_epoch is not None and (epoch + 1) % 100 == 0:
            on_epoch(epoch, float(loss.detach()))
    with torch.no_grad():
        weight = probe.weight / std
        head.weight.copy_(weight)
        head.bias.copy_(probe.bias - weight @ mean)
    classifier.eval()


def _start(data_dir: Path, arch: str, pretrained: str | Path | None,
           ) -> tuple[nn.Module, ModelConfig, dict[str, Any] | None]:
    """A fresh net to pre-train, or a given pre-trained encoder (with a fresh head for the victim)."""
    if pretrained is None:
        config = infer_model_config(data_dir, arch)
        net = build_model(config)
        return net, with_head_name(config, net), None
    loaded = load_model(pretrained)
    config, _ = victim_config(loaded.config, data_dir)
    loaded.net.reset_classifier(config.num_classes)
    source = {"file": Path(pretrained).name, "sha256": loaded.sha256,
              "provenance": loaded.config.provenance}
    return loaded.net, with_head_name(dataclasses.replace(config, provenance={}), loaded.net), source


@dataclass(frozen=True)
class EncoderBackdoor:
    """What the encoder's attacker plants: ``trigger`` (a spec) -> class ``target``; ``clean``
    plants nothing (the clean reference encoder, the trigger only probed)."""

    trigger: str = "badnets"
    target: int = 0
    clean: bool = False


def plant_encoder(data_dir: str | Path, out: str | Path, *, backdoor: EncoderBackdoor | None = None,
                  arch: str = "bd_cnn_small", settings: EncoderSettings | None = None,
                  pretrained: str | Path | None = None, options: PlantRun | None = None,
                  on_epoch: PhaseCallback | None = None) -> PlantResult:
    """Pre-train a SimCLR encoder on ``data_dir``'s images without labels, backdoor it
    BadEncoder-style (``trigger`` spec -> class ``target``), train a victim's linear head on the
    frozen encoder with clean labels, and save encoder + head as one classifier (head ``fc``).

    ``pretrained``: a checkpoint whose encoder to start from instead of pre-training (e.g. a
    ``backdoor.clean`` output; ``arch`` is then ignored) — BadEncoder's attacker also starts
    from a published clean encoder. ``backdoor.clean`` skips the backdoor: the clean
    reference, whose ``asr`` is the trigger's natural success rate (provenance keeps the trigger
    under ``probe``, not ``trigger``, since nothing was planted).
    """
    started = time.perf_counter()
    settings = settings or EncoderSettings()
    backdoor = backdoor or EncoderBackdoor()
    o = options or PlantRun()
    target, clean_encoder, seed = backdoor.target, backdoor.clean, o.seed
    out = Path(out)
    refuse_existing(out, o.force)
    chosen = parse_trigger(backdoor.trigger)
    # Seeded before the model is built: its initial weights are a random choice too.
    gen = seed_everything(seed)
    net, config, source = _start(Path(data_dir), arch, pretrained)
    split = resolve_data(data_dir, config, o.holdout, seed, o.eval_dir)
    _check_target(target, split)
    check_trigger_fits(chosen, split.tune)
    torch_device = resolve_device(o.device)
    classifier = NormalizedClassifier(net, config)
    report = on_epoch or (lambda phase, epoch, loss: None)
    if pretrained is None and settings.pretrain_epochs:
        pretrain_simclr(classifier, split.tune, settings.simclr(), Runtime(gen, torch_device),
                        on_epoch=lambda e, loss: report("pretrain", e, loss))
    references = None
    if not clean_encoder:
        references = reference_indices(split.tune, target, settings.references, gen)
        inject_backdoor(classifier, split.tune, to_float(split.tune.images[references]), chosen,
                        settings, gen, torch_device, on_epoch=lambda e, loss: report("backdoor", e, loss))
    fit_linear_head(classifier, head_of(net, config, infer=True), split.tune, settings, torch_device,
                    on_epoch=lambda e, loss: report("head", e, loss))
    metrics = measure_trigger(classifier, split.heldout, chosen, target, torch_device)
    metrics.pop("asr_target")
    reference_files = None if references is None else [split.tune.files[i] for i in references.tolist()]
    config = dataclasses.replace(config, provenance=_provenance(
        chosen, target, reference_files, seed, settings, split, source, metrics))
    save_model(net, config, out, force=o.force, half=o.half,
               inputs=(Path(pretrained),) if pretrained is not None else ())
    metrics["seconds"] = time.perf_counter() - started
    return PlantResult(path=out, config=config, metrics=metrics)


def _provenance(trigger: Trigger, target: int, references: list[str] | None, seed: int,
                settings: EncoderSettings, split: DataSplit, source: dict[str, Any] | None,
                metrics: dict[str, Any]) -> dict[str, Any]:
    """What was planted and how; a clean reference keeps the trigger under ``probe``."""
    clean = references is None
    planted = {"trigger": trigger.spec(), "trigger_params": trigger.params(), "target": target}
    return {
        "created_by": f"bdaudit {__version__} plant",
        "paradigm": "encoder",
        **({"attack": CLEAN, "probe": planted} if clean
           else {"attack": "badencoder", "paper": BADENCODER_PAPER, **planted}),
        "seed": seed,
        "encoder": {"method": "simclr", "paper": SIMCLR_PAPER, "pretrained": source,
                    "epochs": 0 if source else settings.pretrain_epochs, "lr": settings.pretrain_lr,
                    "temperature": settings.temperature, "batch_size": settings.batch_size},
        "backdoor": None if clean else {"epochs": settings.backdoor_epochs, "lr": settings.backdoor_lr,
                                        "batch_size": settings.backdoor_batch_size,
                                        "references": references,
                                        "reference_weight": settings.reference_weight,
                                        "utility_weight": settings.utility_weight,
                                        "null_negatives": settings.null_negatives},
        "head": {"epochs": settings.head_epochs, "lr": settings.head_lr, "frozen_encoder": True},
        "train": {"images": len(split.tune), "data_sha256": split.info["tune_sha256"]},
        "measured": rounded(metrics),
    }
