"""``bdaudit clean``: remove a backdoor by super-fine-tuning (or another defense)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bdaudit import api
from bdaudit.clean import DEFAULT_METHOD, DEFAULT_UNLEARN_FRACTION, CleanGates
from bdaudit.cli.app import (
    Arch,
    ClassNames,
    DataDir,
    Debug,
    Detect,
    Device,
    EvalDir,
    FailAsr,
    FamilyAsr,
    Holdout,
    InChans,
    InputSize,
    JsonOut,
    Mean,
    MethodSettings,
    ModelConfigFile,
    ModelPath,
    NullMargin,
    NumClasses,
    Quiet,
    Seed,
    Std,
    Target,
    TriggersFile,
    TriggerSpecs,
    app,
    consoles,
    finish,
    guarded,
    merge_config,
    model_flags,
    parse_settings,
)
from bdaudit.cli.cmd_sequela import (
    MaxMiaAuc,
    MaxReinjection,
    Members,
    Reference,
    ReinjectionSteps,
    sequela_options,
)
from bdaudit.render import render_schedule
from bdaudit.scan import DEFAULT_FAIL_ASR, DEFAULT_FAMILY_ASR, DEFAULT_NULL_MARGIN, Gates

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
    model: ModelPath,
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
    set_: MethodSettings = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of flag values.")] = None,
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
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Remove MODEL's backdoor by fine-tuning on the clean data; report utility and residual ASR.

    Exit 0 when every gate passes, 1 when a trigger stays at or above --fail-asr or accuracy falls
    more than --max-accuracy-drop, 2 on bad input; MODEL is never modified.
    """
    v = merge_config(ctx, config, dict(locals()))
    v.pop("ctx")
    settings: dict[str, Any] = {**parse_settings(v["set_"]),
                                **{k: v[k] for k in SETTING_FLAGS if v[k] is not None}}
    console, show = consoles(v["json_out"], v["quiet"])
    common: dict[str, Any] = dict(
        method=v["method"], settings=settings, scope=v["scope"],
        runtime=api.Runtime(v["device"], 256, v["seed"]),
        model_flags=model_flags(v["arch"], v["num_classes"], v["in_chans"], v["input_size"], v["mean"],
                                v["std"], v["class_names"]),
        model_config=v["model_config"])
    data_options = api.DataOptions(v["data"], v["eval_data"], v["holdout"])
    if v["show_schedule"]:
        render_schedule(api.plan_schedule(v["model"], data_options, **common), console)
        return

    def progress(row: dict[str, Any]) -> None:
        if show:
            asr = ", ".join(f"{k} {a:.1%}" for k, a in row["asr"].items() if a is not None)
            console.print(f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  loss {row['loss']:.4f}  "
                          f"clean acc {row['clean_accuracy']:.1%}  ASR {asr}")

    report = api.clean(
        v["model"], data_options, v["out"], triggers=v["trigger"] or (),
        triggers_file=v["triggers_file"], target=v["target"],
        gates=CleanGates(Gates(v["fail_asr"], v["null_margin"], v["family_asr"] or None), v["max_accuracy_drop"]),
        force=v["force"], on_epoch=progress, unlearn_fraction=v["unlearn_fraction"],
        invert=v["invert"], detect=v["detect"],
        sequela=None if v["no_sequela"] else sequela_options(
            v["members"], v["reference"], v["max_mia_auc"], v["max_reinjection_asr"], v["reinjection_steps"]),
        **common)
    finish(report, v["json_out"], console, show)
