"""``bdaudit plant``: make backdoored (or clean reference) models to test defenses with."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from bdaudit.cli.app import BatchSize, Debug, Device, EvalDir, Holdout, Quiet, Seed, app, guard_outputs, guarded
from bdaudit.core.errors import BdauditError

if TYPE_CHECKING:
    from bdaudit.planting.common import PlantOptions
    from bdaudit.planting.plant import PlantResult, TrainSettings

PARADIGMS = ("standalone", "transfer", "encoder")


def parse_params(text: str | None) -> dict[str, str]:
    """``key=value,key=value`` → dict (values are coerced by the trigger's field types)."""
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise BdauditError(f"--trigger-params item '{item}' is not key=value")
        params[key.strip()] = value.strip()
    return params


def show_result(result: PlantResult, console: Console) -> None:
    table = Table(title=f"planted {result.path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
@guarded
def plant(
    data: Annotated[Path, typer.Option("--data", "-d", help="Clean training images, DIR/<class>/*.",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors.", show_default=False)],
    attack: Annotated[str, typer.Option(help="Attack name (bdaudit triggers / README), or 'none' for "
                                        "a clean reference.")] = "badnets",
    target: Annotated[int, typer.Option(help="Target class index.")] = 0,
    poison_rate: Annotated[float, typer.Option(help="Share of training images poisoned (clean-label "
                                               "attacks: share of target-class images).")] = 0.1,
    trigger_params: Annotated[str | None, typer.Option(help="Trigger parameters, key=value,...")] = None,
    arch: Annotated[str, typer.Option(help="timm architecture.")] = "bd_cnn_small",
    paradigm: Annotated[str, typer.Option(help="standalone, transfer or encoder.")] = "standalone",
    upstream: Annotated[Path | None, typer.Option(help="transfer: the backdoored upstream model "
                                                  "(default: plant one on --data first).")] = None,
    downstream_data: Annotated[Path | None, typer.Option(help="transfer: the victim's clean data.")] = None,
    mode: Annotated[str, typer.Option(help="transfer: fine-tune the full model or the head only.")] = "full",
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: 15; transfer 5).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate, SGD with cosine decay (default: "
                                             "0.05; transfer 0.005).")] = None,
    hflip: Annotated[bool, typer.Option(help="Allow horizontal flips (never for digits/text).")] = False,
    half: Annotated[bool, typer.Option(help="Store weights as fp16 (smaller files).")] = False,
    eval_data: EvalDir = None,
    holdout: Holdout = 0.2,
    batch_size: BatchSize = 128,
    device: Device = "auto",
    seed: Seed = 0,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train a backdoored model on clean data (or a clean reference with --attack none)."""
    if paradigm not in PARADIGMS:
        raise BdauditError(f"--paradigm must be one of {', '.join(PARADIGMS)}, not '{paradigm}'")
    guard_outputs([("--out", out)], [data, eval_data, upstream, downstream_data])
    # Heavy imports (torch, timm) only once a command runs: `bdaudit --help` and usage errors stay fast.
    from bdaudit.planting import TRANSFER_SETTINGS, AttackChoice, EncoderBackdoor, PlantOptions, plant_encoder
    from bdaudit.planting.plant import CLEAN, TrainSettings
    from bdaudit.planting.plant import plant as plant_standalone

    console = Console(highlight=False, markup=False)
    defaults = TRANSFER_SETTINGS if paradigm == "transfer" else TrainSettings()
    # `is None`, not `or`: an explicit 0 must be refused by TrainSettings, not replaced by the default.
    settings = TrainSettings(epochs=defaults.epochs if epochs is None else epochs,
                             lr=defaults.lr if lr is None else lr, batch_size=batch_size, hflip=hflip)

    def progress(epoch: int, loss: float) -> None:
        if not quiet:
            console.print(f"epoch {epoch + 1}/{settings.epochs}  loss {loss:.4f}")

    common = PlantOptions(eval_dir=eval_data, holdout=holdout, seed=seed, device=device, force=force, half=half)
    if paradigm == "standalone":
        choice = AttackChoice(attack, target, poison_rate, parse_params(trigger_params))
        result = plant_standalone(data, out, attack=choice, arch=arch, settings=settings, options=common,
                                  on_epoch=progress)
    elif paradigm == "encoder":
        spec = attack if not trigger_params else f"{attack}:{trigger_params}"
        result = plant_encoder(data, out, backdoor=EncoderBackdoor("badnets" if attack == CLEAN else spec, target,
                                                                  clean=attack == CLEAN),
                               arch=arch, options=common,
                               on_epoch=None if quiet else
                               lambda phase, epoch, loss: console.print(f"{phase} epoch {epoch + 1} "
                                                                        f"loss {loss:.4f}"))
    else:
        result = _plant_transfer(data, out, upstream, downstream_data, mode, attack, target, poison_rate,
                                 arch, trigger_params, settings, progress, common)
    if not quiet:
        show_result(result, console)


def _plant_transfer(data: Path, out: Path, upstream: Path | None, downstream: Path | None, mode: str,
                    attack: str, target: int, poison_rate: float, arch: str, trigger_params: str | None,
                    settings: TrainSettings, progress: Callable[[int, float], None],
                    common: PlantOptions) -> PlantResult:
    """Plant an upstream on --data (unless --upstream is given), then fine-tune it as the victim."""
    from bdaudit.planting import AttackChoice, plant_transfer
    from bdaudit.planting.plant import TrainSettings
    from bdaudit.planting.plant import plant as plant_standalone

    if downstream is None:
        raise BdauditError("--paradigm transfer needs --downstream-data DIR (the victim's clean data)")
    if out.exists() and not common.force:
        raise BdauditError(f"output {out} already exists; choose another path or pass --force")
    with tempfile.TemporaryDirectory() as tmp:
        if upstream is None:
            upstream = Path(tmp) / "upstream.safetensors"
            upstream_settings = TrainSettings(batch_size=settings.batch_size, hflip=settings.hflip)
            choice = AttackChoice(attack, target, poison_rate, parse_params(trigger_params))
            plant_standalone(data, upstream, attack=choice, arch=arch, settings=upstream_settings, on_epoch=progress,
                             options=dataclasses.replace(common, eval_dir=None, force=True))
        return plant_transfer(upstream, downstream, out, mode=mode, settings=settings, on_epoch=progress,
                              options=common)
