"""``bdaudit plant``: train backdoored (or clean reference) models to test defenses with."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdaudit import __version__
from bdaudit.attacks import ATTACKS, Attack
from bdaudit.core.config import ModelConfig
from bdaudit.core.data import (
    IMAGE_SUFFIXES,
    DataSplit,
    Preprocessing,
    load_image_folder,
    resolve_data,
)
from bdaudit.core.errors import BdauditError, DataError
from bdaudit.core.outputs import refuse_existing
from bdaudit.core.runtime import resolve_device, seed_everything
from bdaudit.detect.probe import ProbeSettings, evaluate_triggers, trigger_fit_error
from bdaudit.engine.loop import Hooks, LrFunction, Runtime, accuracy, fit
from bdaudit.engine.recipe import Recipe, check_lr, warm_cosine
from bdaudit.models.checkpoint import NormalizedClassifier, build_model, save_model
from bdaudit.planting.common import PlantRun

CLEAN = "none"  # --attack none plants nothing: a clean reference model


@dataclass(frozen=True)
class TrainSettings(Recipe):
    """The planting recipe (sensible for small CNNs on MNIST/CIFAR scale): a warm cosine from ``lr``."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    hflip: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr(self.lr)

    def lr_function(self, n_images: int) -> LrFunction:
        return warm_cosine(self.lr, self.total_steps(n_images))


@dataclass
class PlantResult:
    path: Path
    config: ModelConfig
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def infer_model_config(data_dir: Path, arch: str, in_chans: int | None = None,
                       input_size: tuple[int, int] | None = None, hflip: bool = False,
                       arch_kwargs: dict[str, Any] | None = None) -> ModelConfig:
    """A config for a model trained on ``data_dir``: channels and size from the first image,
    mean/std measured on the data, classes from the folder names."""
    from PIL import Image

    first = next((p for p in sorted(data_dir.rglob("*")) if p.is_file()
                  and p.suffix.lower() in IMAGE_SUFFIXES), None)
    if first is None:
        raise DataError(f"no images found under {data_dir}")
    with Image.open(first) as img:
        chans = in_chans or (1 if img.mode in ("L", "1", "I", "I;16") else 3)
        size = input_size or (img.height, img.width)
    data = load_image_folder(data_dir, Preprocessing(chans, size))
    pixels = data.images.float().div(255).transpose(0, 1).reshape(chans, -1)
    mean = tuple(round(float(v), 4) for v in pixels.mean(1))
    std = tuple(round(float(v), 4) for v in pixels.std(1).clamp(min=1e-3))
    return ModelConfig(arch=arch, num_classes=data.num_classes, in_chans=chans, input_size=size,
                       mean=mean, std=std, class_names=data.class_names, hflip=hflip, head=None,
                       arch_kwargs=arch_kwargs or {})


def resolve_attack(name: str, target: int, poison_rate: float,
                   trigger_params: dict[str, Any] | None = None) -> Attack | None:
    if name == CLEAN:
        return None
    if name not in ATTACKS:
        raise BdauditError(f"unknown attack '{name}'; choose one of "
                           f"{', '.join(sorted(ATTACKS))} or '{CLEAN}' for a clean model")
    if not 0.0 < poison_rate < 1.0:
        raise BdauditError(f"`poison_rate` must be in (0, 1), not {poison_rate}")
    return ATTACKS[name].create(target, poison_rate, **(trigger_params or {}))


def _check_target(target: int, split: DataSplit) -> None:
    names = split.tune.class_names
    if not 0 <= target < len(names):
        raise BdauditError(f"`target` {target} is not a class index; classes are 0..{len(names) - 1}"
                           f" ({', '.join(names[:10])})")


def train_standalone(net: torch.nn.Module, config: ModelConfig, split: DataSplit,
                     attack: Attack | None, settings: TrainSettings, gen: torch.Generator,
                     device: torch.device, on_epoch: Callable[[int, float], None] | None = None,
                     ) -> NormalizedClassifier:
    """Train from scratch on the tuning part, poisoned by ``attack`` (None: clean)."""
    classifier = NormalizedClassifier(net, config)
    if attack is not None and attack.custom_training:
        attack.fit(classifier, split.tune, settings, gen, device, on_epoch)
        return classifier
    transform = None
    if attack is not None:
        problem = trigger_fit_error(attack.trigger, split.tune)
        if problem is not None:  # found now, not as a crash in the first poisoned batch
            raise BdauditError(f"{problem}; choose `trigger_params` that fit the images")
        transform = attack.stamping(attack.select(split.tune, gen))

    fit(classifier, split.tune, settings, settings.lr_function(len(split.tune)), Runtime(gen, device),
        hflip=settings.hflip, hooks=Hooks(batch_transform=transform, on_epoch=on_epoch))
    return classifier


def measure(classifier: torch.nn.Module, split: DataSplit, attack: Attack | None,
            device: torch.device, batch_size: int = 256) -> dict[str, Any]:
    """Held-out clean accuracy and, for a backdoored model, ASR of its own trigger."""
    if attack is None:
        return {"clean_accuracy": accuracy(classifier, split.heldout, batch_size, device)}
    result = evaluate_triggers(classifier, split.heldout, [attack.probe_trigger()],
                               ProbeSettings(batch_size=batch_size, target=attack.target, probe="full"),
                               device=device)
    probe = result.triggers[0]
    return {"clean_accuracy": result.clean_accuracy, "asr": probe.asr, "null_asr": probe.null_asr}


@dataclass(frozen=True)
class AttackChoice:
    """The attack to plant: a registered ``name`` (or ``none`` for a clean reference), its
    ``target`` class, the share of training images it poisons and its trigger's parameters."""

    name: str = "badnets"
    target: int = 0
    poison_rate: float = 0.1
    trigger_params: dict[str, Any] | None = None


def plant(data_dir: str | Path, out: str | Path, *, attack: AttackChoice | None = None,
          arch: str = "bd_cnn_small", settings: TrainSettings | None = None,
          options: PlantRun | None = None,
          on_epoch: Callable[[int, float], None] | None = None) -> PlantResult:
    """Train a backdoored model from scratch (standalone paradigm) and save it with provenance."""
    started = time.perf_counter()
    settings = settings or TrainSettings()
    attack = attack or AttackChoice()
    o = options or PlantRun()
    seed, force, half, target = o.seed, o.force, o.half, attack.target
    out = Path(out)
    refuse_existing(out, force)
    chosen = resolve_attack(attack.name, target, attack.poison_rate, attack.trigger_params)
    config = infer_model_config(Path(data_dir), arch, hflip=settings.hflip)
    split = resolve_data(data_dir, config, o.holdout, seed, o.eval_dir)
    _check_target(target, split)
    gen = seed_everything(seed)
    torch_device = resolve_device(o.device)
    net = build_model(config)
    classifier = train_standalone(net, config, split, chosen, settings, gen, torch_device, on_epoch)
    metrics = measure(classifier, split, chosen, torch_device)
    provenance = {
        "created_by": f"bdaudit {__version__} plant",
        "paradigm": "standalone",
        **(chosen.describe() if chosen else {"attack": CLEAN}),
        "seed": seed,
        "train": {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                  "optimizer": settings.optimizer, "images": len(split.tune),
                  "data_sha256": split.info["tune_sha256"]},
        "measured": {k: round(v, 4) for k, v in metrics.items() if v is not None},
    }
    config = config.with_provenance(**provenance)
    save_model(net, config, out, force=force, half=half,
               aux=chosen.aux_tensors() if chosen else None)
    metrics["seconds"] = time.perf_counter() - started
    return PlantResult(path=out, config=config, metrics=metrics)
