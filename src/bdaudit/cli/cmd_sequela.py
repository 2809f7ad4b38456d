"""``bdaudit sequela``: membership exposure and re-injection risk of a (cleaned) model."""

from __future__ import annotations

from bdaudit.cli.app import app, consoles, finish, guard_outputs, guarded, model_inputs, trigger_inputs
from bdaudit.cli.options import (
    DataDir,
    Debug,
    Device,
    EvalDir,
    Holdout,
    HtmlOut,
    JsonOut,
    ModelFlags,
    ModelPath,
    Original,
    Quiet,
    Seed,
    SequelaFlags,
    Target,
    TriggerSpecs,
    option_groups,
)


@app.command()
@guarded
@option_groups
def sequela(
    model: ModelPath,
    data: DataDir,
    original: Original = None,
    sequela_flags: SequelaFlags = SequelaFlags(),
    eval_data: EvalDir = None,
    holdout: Holdout = 0.2,
    trigger: TriggerSpecs = None,
    target: Target = None,
    model_flags: ModelFlags = ModelFlags(),
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
                  [*model_flags.inputs(model), *model_inputs(original, None),
                   *model_inputs(sequela_flags.reference, None), data, eval_data, sequela_flags.members,
                   *trigger_inputs(trigger)])
    console, show = consoles(json_out, quiet)
    from bdaudit import api

    report = api.sequela(model_flags.options(model), api.DataOptions(data, eval_data, holdout), original=original,
                         options=sequela_flags.options(), probe=api.ProbeOptions(trigger or (), target=target),
                         runtime=api.Runtime(device, None, seed))
    finish(report, json_out, console, show, html_out=html)
