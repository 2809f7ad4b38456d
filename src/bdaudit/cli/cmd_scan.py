"""``bdaudit scan``: probe a checkpoint with known triggers."""

from __future__ import annotations

from typing import Annotated

import typer

from bdaudit.cli.app import (
    Arch,
    BatchSize,
    ClassNames,
    ConfigFile,
    DataDir,
    Debug,
    Detect,
    Device,
    EvalDir,
    FailAsr,
    FamilyAsr,
    Holdout,
    HtmlOut,
    InChans,
    InputSize,
    JsonOut,
    Mean,
    ModelConfigFile,
    NullMargin,
    NumClasses,
    Quiet,
    SarifOut,
    Seed,
    Std,
    Target,
    TriggersFile,
    TriggerSpecs,
    app,
    consoles,
    finish,
    guard_outputs,
    guarded,
    merge_config,
    model_flags,
    model_inputs,
    require_inputs,
    trigger_inputs,
)
from bdaudit.cli.batch import ExecutorName, ModelPaths, RayAddress, ReportDir, run_batch, wants_batch
from bdaudit.core.defaults import DEFAULT_FAIL_ASR, DEFAULT_FAMILY_ASR, DEFAULT_NULL_MARGIN
from bdaudit.core.errors import BdauditError


@app.command()
@guarded
def scan(
    ctx: typer.Context,
    model: ModelPaths,
    data: DataDir,
    eval_data: EvalDir = None,
    holdout: Holdout = 0.2,
    trigger: TriggerSpecs = None,
    triggers_file: TriggersFile = None,
    target: Target = None,
    fail_asr: FailAsr = DEFAULT_FAIL_ASR,
    null_margin: NullMargin = DEFAULT_NULL_MARGIN,
    family_asr: FamilyAsr = DEFAULT_FAMILY_ASR,
    invert: Annotated[bool, typer.Option("--invert", help="Also reverse-engineer a trigger per class "
                                         "(Neural Cleanse) to find unknown triggers; fails when a class "
                                         "is an outlier. Slower (~20 s for 10 classes of a small CNN).")] = False,
    detect: Detect = "auto",
    arch: Arch = None,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    class_names: ClassNames = None,
    model_config: ModelConfigFile = None,
    device: Device = "auto",
    batch_size: BatchSize = 256,
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
    v = merge_config(ctx, config, dict(locals()))
    require_inputs(v["model"], [v["data"], v["eval_data"]])
    batch = wants_batch(v["model"], v["executor"], v["report_dir"])
    guard_outputs([("--json", v["json_out"]), ("--sarif", v["sarif"]), ("--html", v["html"])],
                  [*(p for m in v["model"] for p in model_inputs(m, v["model_config"])), v["data"], v["eval_data"],
                   v["triggers_file"], config, *trigger_inputs(v["trigger"])])
    if batch and (v["sarif"] is not None or v["html"] is not None):
        raise BdauditError("--sarif/--html render one model's report: with several models use --report-dir "
                           "and `bdaudit report DIR/NAME.json --html OUT.html`")
    console, show = consoles(v["json_out"], v["quiet"])
    # Heavy imports (torch, timm) only once a command runs: `bdaudit --help` and usage errors stay fast.
    from bdaudit import api
    from bdaudit.detect.probe import Gates
    from bdaudit.report.render import progress_bars

    options = dict(
        triggers=v["trigger"] or (), triggers_file=v["triggers_file"], target=v["target"],
        gates=Gates(v["fail_asr"], v["null_margin"], v["family_asr"] or None),
        runtime=api.Runtime(v["device"], v["batch_size"], v["seed"]), invert=v["invert"], detect=v["detect"],
        model_flags=model_flags(v["arch"], v["num_classes"], v["in_chans"], v["input_size"], v["mean"],
                                v["std"], v["class_names"]),
        model_config=v["model_config"])
    data_options = api.DataOptions(v["data"], v["eval_data"], v["holdout"])
    if batch:
        run_batch(api.scan_many, v["model"], data_options, executor=v["executor"], ray_address=v["ray_address"],
                  report_dir=v["report_dir"], json_out=v["json_out"], console=console, show=show, **options)
        return
    with progress_bars(console, show and console.is_terminal) as progress:
        report = api.scan(v["model"][0], data_options, progress=progress, **options)
    finish(report, v["json_out"], console, show, v["sarif"], v["html"])
