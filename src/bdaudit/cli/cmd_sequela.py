"""``bdaudit sequela``: membership exposure and re-injection risk of a (cleaned) model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bdaudit.cli.app import (
    Arch,
    ClassNames,
    DataDir,
    Debug,
    Device,
    EvalDir,
    Holdout,
    HtmlOut,
    InChans,
    InputSize,
    JsonOut,
    Mean,
    ModelConfigFile,
    ModelPath,
    NumClasses,
    Quiet,
    Seed,
    Std,
    Target,
    TriggerSpecs,
    app,
    consoles,
    finish,
    guard_outputs,
    guarded,
    model_flags,
    model_inputs,
    trigger_inputs,
)

if TYPE_CHECKING:
    from bdaudit import api

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
    from bdaudit import api
    from bdaudit.sequela.audit import SequelaGates

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
    arch: Arch = None,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    class_names: ClassNames = None,
    model_config: ModelConfigFile = None,
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
    guard_outputs([("--json", json_out), ("--html", html)],
                  [*model_inputs(model, model_config), *model_inputs(original, None), *model_inputs(reference, None),
                   data, eval_data, members, *trigger_inputs(trigger)])
    console, show = consoles(json_out, quiet)
    from bdaudit import api

    report = api.sequela(model, api.DataOptions(data, eval_data, holdout), original=original,
                         options=sequela_options(members, reference, max_mia_auc, max_reinjection_asr,
                                                 reinjection_steps),
                         triggers=trigger or (), target=target, runtime=api.Runtime(device, 256, seed),
                         model_flags=model_flags(arch, num_classes, in_chans, input_size, mean, std, class_names),
                         model_config=model_config)
    finish(report, json_out, console, show, html_out=html)
