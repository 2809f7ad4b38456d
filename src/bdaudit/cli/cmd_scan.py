"""``bdaudit scan``: probe a checkpoint with known triggers."""

from __future__ import annotations

from typing import Annotated

import typer

from bdaudit.cli.app import app, consoles, finish, guard_outputs, guarded, require_inputs, trigger_inputs
from bdaudit.cli.batch import ExecutorName, ModelPaths, RayAddress, ReportDir, one_report_only, run_batch, wants_batch
from bdaudit.cli.options import (
    ConfigFile,
    DataDir,
    Debug,
    Detect,
    Device,
    EvalBatchSize,
    EvalDir,
    GateFlags,
    Holdout,
    HtmlOut,
    JsonOut,
    ModelFlags,
    Quiet,
    SarifOut,
    Seed,
    Target,
    TriggersFile,
    TriggerSpecs,
    option_groups,
)


@app.command()
@guarded
@option_groups
def scan(
    ctx: typer.Context,
    model: ModelPaths,
    data: DataDir,
    eval_data: EvalDir = None,
    holdout: Holdout = 0.2,
    trigger: TriggerSpecs = None,
    triggers_file: TriggersFile = None,
    target: Target = None,
    gate_flags: GateFlags = GateFlags(),
    invert: Annotated[bool, typer.Option("--invert", help="Also reverse-engineer a trigger per class "
                                         "(Neural Cleanse) to find unknown triggers; fails when a class "
                                         "is an outlier. Slower (~20 s for 10 classes of a small CNN).")] = False,
    detect: Detect = "auto",
    confirm_all: Annotated[bool, typer.Option("--confirm-all", help="Have the detector test every class it "
                                              "suspects instead of stopping at the first finding (slower on a "
                                              "backdoored model; for triage, e.g. several targets).")] = False,
    model_flags: ModelFlags = ModelFlags(),
    device: Device = "auto",
    batch_size: EvalBatchSize = None,
    seed: Seed = 0,
    config: ConfigFile = None,
    json_out: JsonOut = None,
    sarif: SarifOut = None,
    html: HtmlOut = None,
    quiet: Quiet = False,
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    report_dir: ReportDir = None,
    debug: Debug = False,
) -> None:
    """Probe MODEL with known backdoor triggers on held-out clean images; report ASR per trigger.

    Also reverses unknown triggers (patch and whole-image; --detect). Exit 0 when no trigger reaches
    --fail-asr and no class is an outlier, 1 when one does, 2 on bad input. With several models
    (files, folders, a manifest): one report each, a summary, the worst model's exit code.
    """
    require_inputs(model, [data, eval_data])
    batch = wants_batch(model, executor, report_dir)
    guard_outputs([("--json", json_out), ("--sarif", sarif), ("--html", html)],
                  [*(p for m in model for p in model_flags.inputs(m)), data, eval_data, triggers_file, config,
                   *trigger_inputs(trigger)])
    one_report_only(batch, sarif, html)
    console, show = consoles(json_out, quiet)
    # Heavy imports (torch, timm) only once a command runs: `bdaudit --help` and usage errors stay fast.
    from bdaudit import api
    from bdaudit.report.render import progress_bars

    options = dict(probe=api.ProbeOptions(trigger or (), triggers_file, target, detect, invert, confirm_all),
                   gates=gate_flags.gates(), runtime=api.Runtime(device, batch_size, seed))
    data_options = api.DataOptions(data, eval_data, holdout)
    if batch:
        run_batch(api.scan_many, model, data_options, executor=executor, ray_address=ray_address,
                  report_dir=report_dir, json_out=json_out, console=console, show=show,
                  model=model_flags.options(), **options)
        return
    with progress_bars(console, show and console.is_terminal) as progress:
        report = api.scan(model_flags.options(model[0]), data_options, progress=progress, **options)
    finish(report, json_out, console, show, sarif, html)
