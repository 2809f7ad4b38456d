"""``bdaudit clean``: remove a backdoor with a defense (FT-SAM plus trigger unlearning by default)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from bdaudit.cli.app import (
    app,
    consoles,
    finish,
    guard_outputs,
    guarded,
    model_inputs,
    parse_settings,
    require_inputs,
    trigger_inputs,
)
from bdaudit.cli.batch import ExecutorName, ModelPaths, RayAddress, ReportDir, one_report_only, run_batch, wants_batch
from bdaudit.cli.options import (
    ConfigFile,
    DataDir,
    Debug,
    Detect,
    Device,
    EvalDir,
    GateFlags,
    Holdout,
    HtmlOut,
    JsonOut,
    MethodSettings,
    ModelFlags,
    Quiet,
    SarifOut,
    Seed,
    SequelaFlags,
    Target,
    TriggersFile,
    TriggerSpecs,
    option_groups,
)
from bdaudit.core.defaults import DEFAULT_METHOD, DEFAULT_UNLEARN_FRACTION
from bdaudit.core.errors import BdauditError

TUNE = "Tuning"
OptFloat = Annotated[float | None, typer.Option(rich_help_panel=TUNE)]
OptInt = Annotated[int | None, typer.Option(rich_help_panel=TUNE)]


@dataclass(frozen=True)
class TuneFlags:
    """Flags that become defense settings (None: the method's default)."""

    epochs: OptInt = None
    batch_size: OptInt = None
    optimizer: Annotated[str | None, typer.Option(help="sgd, adam or adamw.", rich_help_panel=TUNE)] = None
    momentum: OptFloat = None
    weight_decay: OptFloat = None
    lr_base: OptFloat = None
    lr_peak1: Annotated[float | None, typer.Option(help="SFT phase-1 peak (default: from the LR range "
                                                   "test).", rich_help_panel=TUNE)] = None
    lr_peak2: OptFloat = None
    phase1_fraction: OptFloat = None
    cycle_iters: OptInt = None
    cycle_epochs: OptFloat = None
    lr: Annotated[float | None, typer.Option(help="FT learning rate.", rich_help_panel=TUNE)] = None
    schedule: Annotated[str | None, typer.Option(help="FT: constant or cosine.", rich_help_panel=TUNE)] = None

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@app.command()
@guarded
@option_groups
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
    tune_flags: TuneFlags = TuneFlags(),
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
    sequela_flags: SequelaFlags = SequelaFlags(),
    show_schedule: Annotated[bool, typer.Option(help="Print SFT's learning-rate schedule and exit "
                                                "(with --method sft).")] = False,
    eval_data: EvalDir = None,
    holdout: Holdout = 0.2,
    trigger: TriggerSpecs = None,
    triggers_file: TriggersFile = None,
    target: Target = None,
    gate_flags: GateFlags = GateFlags(),
    max_accuracy_drop: Annotated[float, typer.Option(help="Gate: largest tolerated fall in clean "
                                                     "accuracy (0.02 = 2 points).",
                                                     rich_help_panel="Gates")] = 0.02,
    model_flags: ModelFlags = ModelFlags(),
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
    require_inputs(model, [data, eval_data, sequela_flags.members])
    batch = wants_batch(model, executor, report_dir)
    # With several models --out is a folder: each cleaned file is checked against its inputs by api.clean.
    guard_outputs([("--out", None if batch else out), ("--json", json_out), ("--sarif", sarif), ("--html", html)],
                  [*(p for m in model for p in model_flags.inputs(m)), data, eval_data, sequela_flags.members,
                   *model_inputs(sequela_flags.reference, None), config, triggers_file, *trigger_inputs(trigger)])
    one_report_only(batch, sarif, html)
    console, show = consoles(json_out, quiet)
    # Heavy imports (torch, timm) only once a command runs: `bdaudit --help` and usage errors stay fast.
    from bdaudit import api
    from bdaudit.report.render import epoch_progress, render_schedule

    options = api.CleanOptions(method, {**parse_settings(set_), **tune_flags.settings()}, scope, unlearn_fraction,
                               None if no_sequela else sequela_flags.options(), history)
    runtime = api.Runtime(device, None, seed)
    data_options = api.DataOptions(data, eval_data, holdout)
    if show_schedule:
        if batch:
            raise BdauditError("--show-schedule prints one model's schedule: name a single model")
        render_schedule(api.plan_schedule(model_flags.options(model[0]), data_options, options, runtime=runtime),
                        console)
        return

    common: dict[str, Any] = dict(
        probe=api.ProbeOptions(trigger or (), triggers_file, target, detect, invert),
        gates=api.CleanGates(gate_flags.gates(), max_accuracy_drop), runtime=runtime)
    if batch:
        run_batch(api.clean_many, model, data_options, out, executor=executor, ray_address=ray_address,
                  report_dir=report_dir, json_out=json_out, console=console, show=show, model=model_flags.options(),
                  options=options, output=api.OutputOptions(None, force), **common)
        return
    with epoch_progress(console, show) as progress:
        report = api.clean(model_flags.options(model[0]), data_options, options,
                           output=api.OutputOptions(out, force), on_epoch=progress, **common)
    finish(report, json_out, console, show, sarif, html)
