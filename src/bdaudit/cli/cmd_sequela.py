"""``bdaudit sequela``: membership exposure and re-injection risk of a (cleaned) model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bdaudit import api
from bdaudit.cli.app import (
    DataDir,
    Debug,
    Device,
    EvalDir,
    Holdout,
    HtmlOut,
    JsonOut,
    ModelPath,
    Quiet,
    Seed,
    Target,
    TriggerSpecs,
    app,
    consoles,
    finish,
    guarded,
)
from bdaudit.sequela.audit import SequelaGates

SEQ = "Sequela"
Original = Annotated[Path | None, typer.Option(help="The model before cleaning.", rich_help_panel=SEQ)]
Members = Annotated[Path | None, typer.Option(help="Known training samples of the original (ImageFolder).",
                                             rich_help_panel=SEQ)]
Reference = Annotated[Path | None, typer.Option(help="A clean reference model of the same kind.",
                                               rich_help_panel=SEQ)]
MaxMiaAuc = Annotated[float | None, typer.Option(help="Gate: highest tolerated membership-inference AUC.",
                                                 rich_help_panel="Gates")]
MaxReinjection = Annotated[float | None, typer.Option(help="Gate: highest tolerated ASR after the "
                                                      "retuning attack.", rich_help_panel="Gates")]
ReinjectionSteps = Annotated[int | None, typer.Option(help="Retuning attack budget in SGD steps.",
                                                      rich_help_panel=SEQ)]


def sequela_options(members: Path | None, reference: Path | None, max_mia_auc: float | None,
                    max_reinjection_asr: float | None, reinjection_steps: int | None) -> api.SequelaOptions:
    budget = {"budget_steps": reinjection_steps} if reinjection_steps else None
    return api.SequelaOptions(members, reference, SequelaGates(max_mia_auc, max_reinjection_asr), budget)


@app.command()
@guarded
def sequela(
    model: ModelPath,
    data: DataDir,
    original: Original = None,
    members: Members = None,
    reference: Reference = None,
    max_mia_auc: MaxMiaAuc = None,
    max_reinjection_asr: MaxReinjection = None,
    reinjection_steps: ReinjectionSteps = None,
    eval_data: EvalDir = None,
    holdout: Holdout = 0.2,
    trigger: TriggerSpecs = None,
    target: Target = None,
    device: Device = "auto",
    seed: Seed = 0,
    json_out: JsonOut = None,
    html: HtmlOut = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Backdoor sequela of MODEL: membership-inference exposure (members: the tuning part of --data,
    and --members) and how fast a retuning attack brings the backdoor back, beside --original and
    --reference."""
    console, show = consoles(json_out, quiet)
    report = api.sequela(model, api.DataOptions(data, eval_data, holdout), original=original,
                         options=sequela_options(members, reference, max_mia_auc, max_reinjection_asr,
                                                 reinjection_steps),
                         triggers=trigger or (), target=target, runtime=api.Runtime(device, 256, seed))
    finish(report, json_out, console, show, html_out=html)
