"""``bdaudit plant``: make backdoored (or clean reference) models to test defenses with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from bdaudit.cli.app import app, guard_outputs, guarded
from bdaudit.cli.options import BatchSize, Debug, Device, EvalDir, Holdout, Quiet, Seed

if TYPE_CHECKING:
    from bdaudit.planting.plant import PlantResult


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
    guard_outputs([("--out", out)], [data, eval_data, upstream, downstream_data])
    # Heavy imports (torch, timm) only once a command runs: `bdaudit --help` and usage errors stay fast.
    from bdaudit import api

    options = api.PlantOptions(attack=attack, target=target, poison_rate=poison_rate,
                               trigger_params=api.parse_params(trigger_params), arch=arch, paradigm=paradigm,
                               epochs=epochs, lr=lr, hflip=hflip, half=half)
    console = Console(highlight=False, markup=False)

    def progress(phase: str, epoch: int, epochs: int | None, loss: float) -> None:
        if phase:
            console.print(f"{phase} epoch {epoch + 1} loss {loss:.4f}")
        else:
            console.print(f"epoch {epoch + 1}/{epochs}  loss {loss:.4f}")

    result = api.plant(api.DataOptions(data, eval_data, holdout), api.OutputOptions(out, force), options,
                       transfer=api.TransferOptions(upstream, downstream_data, mode),
                       runtime=api.Runtime(device, batch_size, seed), on_epoch=None if quiet else progress)
    if not quiet:
        show_result(result, console)
