"""``bdaudit clean``: remove a backdoor by super-fine-tuning (or another defense)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bdaudit.cli.app import (
    Arch,
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
    MethodSettings,
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
    parse_settings,
    require_inputs,
    trigger_inputs,
)
from bdaudit.cli.batch import ExecutorName, ModelPaths, RayAddress, ReportDir, run_batch, wants_batch
from bdaudit.cli.cmd_sequela import (
    MaxMiaAuc,
    MaxReinjection,
    Members,
    Reference,
    ReinjectionSteps,
    sequela_options,
)
from bdaudit.core.defaults import (
    DEFAULT_FAIL_ASR,
    DEFAULT_FAMILY_ASR,
    DEFAULT_METHOD,
    DEFAULT_NULL_MARGIN,
    DEFAULT_UNLEARN_FRACTION,
)
from bdaudit.core.errors import BdauditError

TUNE = "Tuning"
OptFloat = Annotated[float | None, typer.Option(rich_help_panel=TUNE)]
OptInt = Annotated[int | None, typer.Option(rich_help_panel=TUNE)]

# Flags that become defense settings (None = the method's default).
SETTING_FLAGS = ("epochs", "batch_size", "optimizer", "momentum", "weight_decay", "lr_base", "lr_peak1",
                 "lr_peak2", "phase1_fraction", "cycle_iters", "cycle_epochs", "lr", "schedule")


@app.command()
@guarded
def clean(
    ctx: typer.Context,
    model: ModelPaths,
    data: DataDir,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the cleaned "
                                             ".safetensors (omit to only measure).")] = None,
    method: Annotated[str, typer.Option(help="Defense: ftsam (default), sft, ft, fp, nad, anp, ibau, fst, nc "
                                                 "(`bdaudit methods` lists them).")] = DEFAULT_METHOD,
    scope: Annotated[str, typer.Option(help="full: tune every weight; head: only the classifier "
                                       "head (the encoder/head boundary from metadata).")] = "full",
    epochs: OptInt = None,
    batch_size: OptInt = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd, adam or adamw.", rich_help_panel=TUNE)] = None,
    momentum: OptFloat = None,
    weight_decay: OptFloat = None,
    lr_base: OptFloat = None,
    lr_peak1: Annotated[float | None, typer.Option(help="SFT phase-1 peak (default: from the LR range "
                                                   "test).", rich_help_panel=TUNE)] = None,
    lr_peak2: OptFloat = None,
    phase1_fraction: OptFloat = None,
    cycle_iters: OptInt = None,
    cycle_epochs: OptFloat = None,
    lr: Annotated[float | None, typer.Option(help="FT learning rate.", rich_help_panel=TUNE)] = None,
    schedule: Annotated[str | None, typer.Option(help="FT: constant or cosine.",
                                                 rich_help_panel=TUNE)] = None,
    unlearn_fraction: Annotated[float, typer.Option(
        help="Share of each tuning batch stamped with the triggers the pre-clean scan flagged (true "
             "labels kept), so tuning unlearns them; 0 turns it off.", rich_help_panel=TUNE)
    ] = DEFAULT_UNLEARN_FRACTION,
    invert: Annotated[bool, typer.Option(
        "--invert", help="Also reverse-engineer a trigger per class (Neural Cleanse) before cleaning; "
                         "outlier classes' triggers are probed and unlearned (for backdoors outside the "
                         "library; ~40 s per 10 classes on a small CPU model).", rich_help_panel=TUNE)
    ] = False,
    detect: Detect = "auto",
    history: Annotated[str, typer.Option(
        help="Per-epoch history in the report: sparse (clean accuracy and the flagged triggers on 200 "
             "fixed held-out images every 5 epochs and at the end) or full (every trigger on every "
             "held-out image after every epoch: slower, for research). Training is the same either way.",
        rich_help_panel=TUNE)] = "sparse",
    set_: MethodSettings = None,
    config: ConfigFile = None,
    no_sequela: Annotated[bool, typer.Option("--no-sequela", help="Skip the sequela audit.")] = False,
    members: Members = None,
    reference: Reference = None,
    max_mia_auc: MaxMiaAuc = None,
    max_reinjection_asr: MaxReinjection = None,
    reinjection_steps: ReinjectionSteps = None,
    show_schedule: Annotated[bool, typer.Option(help="Print SFT's learning-rate schedule and exit "
                                                "(with --method sft).")] = False,
    eval_data: EvalDir = None,
    holdout: Holdout = 0.2,
    trigger: TriggerSpecs = None,
    triggers_file: TriggersFile = None,
    target: Target = None,
    fail_asr: FailAsr = DEFAULT_FAIL_ASR,
    null_margin: NullMargin = DEFAULT_NULL_MARGIN,
    family_asr: FamilyAsr = DEFAULT_FAMILY_ASR,
    max_accuracy_drop: Annotated[float, typer.Option(help="Gate: largest tolerated fall in clean "
                                                     "accuracy (0.02 = 2 points).",
                                                     rich_help_panel="Gates")] = 0.02,
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
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
    json_out: JsonOut = None,
    sarif: SarifOut = None,
    html: HtmlOut = None,
    quiet: Quiet = False,
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    report_dir: ReportDir = None,
    debug: Debug = False,
) -> None:
    """Remove MODEL's backdoor by fine-tuning on the clean data; report utility and residual ASR.

    Exit 0 when every gate passes, 1 when a trigger stays at or above --fail-asr or accuracy falls
    more than --max-accuracy-drop, 2 on bad input; MODEL is never modified. With several models
    (files, folders, a manifest), --out is a folder for <name>.safetensors; one report each, a
    summary, the worst model's exit code.
    """
    v = merge_config(ctx, config, dict(locals()))
    v.pop("ctx")
    require_inputs(v["model"], [v["data"], v["eval_data"], v["members"]])
    batch = wants_batch(v["model"], v["executor"], v["report_dir"])
    # With several models --out is a folder: each cleaned file is checked against its inputs by api.clean.
    guard_outputs([("--out", None if batch else v["out"]), ("--json", v["json_out"]), ("--sarif", v["sarif"]),
                   ("--html", v["html"])],
                  [*(p for m in v["model"] for p in model_inputs(m, v["model_config"])), v["data"], v["eval_data"],
                   v["members"], *model_inputs(v["reference"], None), config, v["triggers_file"],
                   *trigger_inputs(v["trigger"])])
    if batch and (v["sarif"] is not None or v["html"] is not None):
        raise BdauditError("--sarif/--html render one model's report: with several models use --report-dir "
                           "and `bdaudit report DIR/NAME.json --html OUT.html`")
    settings: dict[str, Any] = {**parse_settings(v["set_"]),
                                **{k: v[k] for k in SETTING_FLAGS if v[k] is not None}}
    console, show = consoles(v["json_out"], v["quiet"])
    # Heavy imports (torch, timm) only once a command runs: `bdaudit --help` and usage errors stay fast.
    from bdaudit import api
    from bdaudit.detect.probe import Gates
    from bdaudit.report.render import epoch_progress, render_schedule
    from bdaudit.workflows.clean import CleanGates

    common: dict[str, Any] = dict(
        method=v["method"], settings=settings, scope=v["scope"],
        runtime=api.Runtime(v["device"], 256, v["seed"]),
        model_flags=model_flags(v["arch"], v["num_classes"], v["in_chans"], v["input_size"], v["mean"],
                                v["std"], v["class_names"]),
        model_config=v["model_config"])
    data_options = api.DataOptions(v["data"], v["eval_data"], v["holdout"])
    if v["show_schedule"]:
        if batch:
            raise BdauditError("--show-schedule prints one model's schedule: name a single model")
        render_schedule(api.plan_schedule(v["model"][0], data_options, **common), console)
        return

    common.update(
        triggers=v["trigger"] or (), triggers_file=v["triggers_file"], target=v["target"],
        gates=CleanGates(Gates(v["fail_asr"], v["null_margin"], v["family_asr"] or None), v["max_accuracy_drop"]),
        force=v["force"], unlearn_fraction=v["unlearn_fraction"], invert=v["invert"], detect=v["detect"],
        history=v["history"],
        sequela=None if v["no_sequela"] else sequela_options(
            v["members"], v["reference"], v["max_mia_auc"], v["max_reinjection_asr"], v["reinjection_steps"]))
    if batch:
        run_batch(api.clean_many, v["model"], data_options, v["out"], executor=v["executor"],
                  ray_address=v["ray_address"], report_dir=v["report_dir"], json_out=v["json_out"],
                  console=console, show=show, **common)
        return
    with epoch_progress(console, show) as progress:
        report = api.clean(v["model"][0], data_options, v["out"], on_epoch=progress, **common)
    finish(report, v["json_out"], console, show, v["sarif"], v["html"])
