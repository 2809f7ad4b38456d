"""``bdaudit scan``: probe a checkpoint with known triggers."""

from __future__ import annotations

from typing import Annotated

import typer

from bdaudit import api
from bdaudit.cli.app import (
    Arch,
    BatchSize,
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
    model_flags,
)
from bdaudit.render import progress_bars
from bdaudit.scan import DEFAULT_FAIL_ASR, DEFAULT_FAMILY_ASR, DEFAULT_NULL_MARGIN, Gates


@app.command()
@guarded
def scan(
    model: ModelPath,
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
    json_out: JsonOut = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Probe MODEL with known backdoor triggers on held-out clean images; report ASR per trigger.

    Also reverses unknown triggers (patch and whole-image; --detect). Exit 0 when no trigger reaches
    --fail-asr and no class is an outlier, 1 when one does, 2 on bad input.
    """
    console, show = consoles(json_out, quiet)
    with progress_bars(console, show and console.is_terminal) as progress:
        report = api.scan(
            model, api.DataOptions(data, eval_data, holdout), triggers=trigger or (),
            triggers_file=triggers_file, target=target, gates=Gates(fail_asr, null_margin, family_asr or None),
            runtime=api.Runtime(device, batch_size, seed), invert=invert, detect=detect,
            model_flags=model_flags(arch, num_classes, in_chans, input_size, mean, std,
                                    class_names),
            model_config=model_config, progress=progress)
    finish(report, json_out, console, show)
