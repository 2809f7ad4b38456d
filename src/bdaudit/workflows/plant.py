"""``bdaudit plant``: a backdoored (or clean reference) model in one of three paradigms.

``standalone`` trains from scratch; ``transfer`` fine-tunes a backdoored upstream (planted here on
the same data unless one is given) on the victim's clean data; ``encoder`` backdoors a
self-supervised encoder and trains a victim's linear head on it (``bdaudit.planting``)."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bdaudit.core.errors import BdauditError
from bdaudit.core.outputs import refuse_existing
from bdaudit.planting import TRANSFER_SETTINGS, EncoderBackdoor, PlantRun, plant_encoder, plant_transfer
from bdaudit.planting.plant import CLEAN, AttackChoice, PlantResult, TrainSettings
from bdaudit.planting.plant import plant as plant_standalone
from bdaudit.workflows.options import DataOptions, OutputOptions, Runtime

PARADIGMS = ("standalone", "transfer", "encoder")
PLANT_BATCH = 128  # training batch when the runtime leaves it open

# (phase, epoch, epochs, loss): phase is "" for supervised training, epochs None when unknown.
PlantProgress = Callable[[str, int, "int | None", float], None]


@dataclass(frozen=True)
class PlantOptions:
    """What to plant: ``attack`` (or ``none`` for a clean reference) at class ``target`` with
    ``trigger_params`` (strings, coerced by the trigger's fields), in ``paradigm``; ``epochs`` and
    ``lr`` default per paradigm (None)."""

    attack: str = "badnets"
    target: int = 0
    poison_rate: float = 0.1
    trigger_params: dict[str, str] | None = None
    arch: str = "bd_cnn_small"
    paradigm: str = "standalone"
    epochs: int | None = None
    lr: float | None = None
    hflip: bool = False
    half: bool = False

    def __post_init__(self) -> None:
        if self.paradigm not in PARADIGMS:
            raise BdauditError(f"`paradigm` must be one of {', '.join(PARADIGMS)}, not '{self.paradigm}'")

    def train_settings(self, batch_size: int) -> TrainSettings:
        defaults = TRANSFER_SETTINGS if self.paradigm == "transfer" else TrainSettings()
        # `is None`, not `or`: an explicit 0 must be refused by TrainSettings, not replaced by the default.
        return TrainSettings(epochs=defaults.epochs if self.epochs is None else self.epochs,
                             lr=defaults.lr if self.lr is None else self.lr, batch_size=batch_size,
                             hflip=self.hflip)


@dataclass(frozen=True)
class TransferOptions:
    """``transfer`` only: the backdoored ``upstream`` (None: plant one on the data first), the
    victim's ``downstream_data`` and whether it tunes the ``full`` model or the ``head``."""

    upstream: Path | None = None
    downstream_data: Path | None = None
    mode: str = "full"


def parse_params(text: str | None) -> dict[str, str]:
    """``key=value,key=value`` → dict (values are coerced by the trigger's field types)."""
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise BdauditError(f"`trigger_params` item '{item}' is not key=value")
        params[key.strip()] = value.strip()
    return params


def plant_model(data: DataOptions, output: OutputOptions, options: PlantOptions, *,
                transfer: TransferOptions | None = None, runtime: Runtime | None = None,
                on_epoch: PlantProgress | None = None) -> PlantResult:
    """Plant one model into ``output.out`` (never over an existing file unless ``output.force``)."""
    runtime = runtime or Runtime()
    if output.out is None:
        raise BdauditError("`out` is required: where to write the planted .safetensors")
    out = Path(output.out)
    common = PlantRun(eval_dir=data.eval_path, holdout=data.holdout, seed=runtime.seed, device=runtime.device,
                      force=output.force, half=options.half)
    choice = AttackChoice(options.attack, options.target, options.poison_rate, options.trigger_params)
    settings = options.train_settings(runtime.batch_size or PLANT_BATCH)
    if options.paradigm == "encoder":
        spec = options.attack
        if options.trigger_params:
            spec += ":" + ",".join(f"{k}={v}" for k, v in options.trigger_params.items())
        phased = None if on_epoch is None else (lambda phase, epoch, loss: on_epoch(phase, epoch, None, loss))
        backdoor = EncoderBackdoor("badnets" if options.attack == CLEAN else spec, options.target,
                                   clean=options.attack == CLEAN)
        return plant_encoder(data.path, out, backdoor=backdoor, arch=options.arch, options=common, on_epoch=phased)
    progress = None if on_epoch is None else (lambda epoch, loss: on_epoch("", epoch, settings.epochs, loss))
    if options.paradigm == "standalone":
        return plant_standalone(data.path, out, attack=choice, arch=options.arch, settings=settings,
                                options=common, on_epoch=progress)
    transfer = transfer or TransferOptions()
    if transfer.downstream_data is None:
        raise BdauditError("`paradigm` transfer needs `downstream_data` (the victim's clean data)")
    refuse_existing(out, output.force)
    with tempfile.TemporaryDirectory() as tmp:
        upstream = transfer.upstream
        if upstream is None:  # the upstream is planted with the standalone recipe on the same data
            upstream = Path(tmp) / "upstream.safetensors"
            upstream_settings = TrainSettings(batch_size=settings.batch_size, hflip=settings.hflip)
            plant_standalone(data.path, upstream, attack=choice, arch=options.arch, settings=upstream_settings,
                             options=dataclasses.replace(common, eval_dir=None, force=True), on_epoch=progress)
        return plant_transfer(upstream, transfer.downstream_data, out, mode=transfer.mode, settings=settings,
                              options=common, on_epoch=progress)
