"""The library API behind every CLI command: each returns a Report (and writes nothing else
unless asked), so Python users and CI scripts get exactly what the CLI prints."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bdaudit.core.data import DataSplit, load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.core.outputs import check_outputs, refuse_existing
from bdaudit.core.runtime import environment_info, resolve_device, resolve_device_name, seed_everything
from bdaudit.defenses import DEFENSES, DefenseContext, create_defense
from bdaudit.defenses.sft import SuperFineTuning, build_schedule, choose_peak1
from bdaudit.defenses.unlearning import check_unlearn_fraction
from bdaudit.detect.probe import Gates, ProbeSettings, evaluate_triggers
from bdaudit.models.checkpoint import LoadedModel
from bdaudit.planting.plant import PlantResult
from bdaudit.report.document import Report, model_section
from bdaudit.sequela.audit import SequelaAudit, SequelaGates, audit_sequela, reinjection_probe
from bdaudit.workflows.batch import BatchReport, ModelEntry, ModelOutcome, resolve_models
from bdaudit.workflows.bench import (
    BenchPlan,
    BenchResult,
    CellCallback,
    Subject,
    clean_sizes_from,
    method_label,
    plant_subjects,
    run_bench,
    subjects_from_manifest,
)
from bdaudit.workflows.clean import (
    CleanGates,
    DefenseRun,
    run_defense,
    save_cleaned,
)
from bdaudit.workflows.clean_result import CleanFindings
from bdaudit.workflows.executors import Executor, LocalExecutor
from bdaudit.workflows.options import (
    CleanOptions,
    DataOptions,
    ModelOptions,
    OutputOptions,
    ProbeOptions,
    Runtime,
    SequelaOptions,
)
from bdaudit.workflows.plant import PlantOptions, PlantProgress, TransferOptions, parse_params, plant_model
from bdaudit.workflows.scan import (
    add_inverted,
    open_model_and_data,
    run_detector,
    run_scan,
    select_triggers,
)

__all__ = ["DEFENSES", "BatchReport", "BenchPlan", "BenchResult", "CleanGates", "CleanOptions", "DataOptions",
           "Gates", "ModelOptions", "OutputOptions", "PlantOptions", "ProbeOptions", "Report", "Runtime",
           "SequelaGates", "SequelaOptions", "Subject", "TransferOptions", "bench", "clean", "clean_many",
           "clean_sizes_from", "method_label", "parse_params", "plan_schedule", "plant", "plant_subjects", "scan",
           "scan_many", "select_triggers", "sequela", "subjects_from_manifest"]

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)
ModelLike = str | Path | ModelOptions  # a checkpoint path, or one with its flags and config


def _open(model: ModelOptions, data: DataOptions, runtime: Runtime) -> tuple[Any, Any, LoadedModel, DataSplit]:
    """Every command's start: the device, the seeded generator, the model and its data split."""
    device = resolve_device(runtime.device)
    gen = seed_everything(runtime.seed)
    loaded, split = open_model_and_data(model, data, runtime)
    return device, gen, loaded, split


def scan(model: ModelLike, data: DataOptions, probe: ProbeOptions | None = None, *,
         gates: Gates | None = None, runtime: Runtime | None = None,
         progress: Progress | None = None) -> Report:
    """Probe a checkpoint with known triggers on held-out clean images and (``probe.detect``, on by
    default) look for *unknown* triggers with ``bdaudit.detect.unknown``; with ``probe.invert``,
    also run Neural Cleanse over every class."""
    started = time.perf_counter()
    model, probe = ModelOptions.of(model), probe or ProbeOptions()
    runtime = runtime or Runtime()
    gates = gates or Gates()
    device, _, loaded, split = _open(model, data, runtime)
    advance = progress("scanning", len(split.heldout)) if progress else None
    outcome = run_scan(loaded, split, probe, gates, runtime, device, advance)
    return Report.of("scan", [outcome], model=model_section(loaded), data=split.info,
                     environment=environment_info(device, runtime.seed), gates=gates.to_dict(),
                     wall_time_s=time.perf_counter() - started,
                     artifacts={"inversion": outcome.inversion} if outcome.inversion is not None else {})


def clean(model: ModelLike, data: DataOptions, options: CleanOptions | None = None,
          probe: ProbeOptions | None = None, *, output: OutputOptions | None = None,
          gates: CleanGates | None = None, runtime: Runtime | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Report:
    """Remove a backdoor from a copy of the model; ``output.out`` (if given) receives the cleaned
    checkpoint, written atomically and never over the input. ``options.unlearn_fraction`` of each
    tuning batch carries a trigger the first scan flagged, with its true label (0: off). With
    ``probe.invert``, Neural Cleanse first reverses a trigger per class and the outliers join the
    probed (and so the unlearned) triggers: for backdoors outside the library. ``probe.detect`` (on
    by default) does the same with ``bdaudit.detect.unknown`` before cleaning, and again from scratch
    (a fresh seed) on the cleaned model: the after-clean verdict does not rest only on the triggers
    that were unlearned."""
    started = time.perf_counter()
    model, options, probe = ModelOptions.of(model), options or CleanOptions(), probe or ProbeOptions()
    output = output or OutputOptions()
    runtime = runtime or Runtime()
    gates = gates or CleanGates()
    out = Path(output.out) if output.out is not None else None
    if out is not None:
        refuse_existing(out, output.force)
        if out.suffix != ".safetensors":
            raise BdauditError(f"output {out} must end in .safetensors")
    check_outputs([("`out`", out)], [model.path, data.path, data.eval_path])
    defense = create_defense(options.method, options.settings)
    check_unlearn_fraction(options.unlearn_fraction)
    device, gen, loaded, split = _open(model, data, runtime)
    chosen = select_triggers(loaded, probe.triggers, probe.triggers_file, split.heldout)
    detection = run_detector(loaded.classifier(), split, device, runtime.seed, probe.detect, probe.explicit,
                             confirm_all=True)  # every confirmed class is unlearned
    if detection is not None:
        chosen += detection.unlearn_triggers()
    inversion = None
    if probe.invert:
        inversion, chosen = add_inverted(loaded.classifier(), split, device, runtime.seed, chosen)
    run = DefenseRun(scope=options.scope, gates=gates, target=probe.target, batch_size=runtime.batch_size,
                     unlearn_fraction=options.unlearn_fraction, history=options.history)
    outcome = run_defense(defense, loaded, split, chosen, run, device=device, gen=gen, on_epoch=on_epoch)
    # Independent check: a fresh seed and a fresh inversion on the cleaned model, so the verdict
    # does not rest on re-measuring the very triggers that were unlearned.
    verification = None if detection is None else \
        run_detector(outcome.classifier, split, device, runtime.seed + 1, "on", False, confirm_all=True)
    audit = None
    if options.sequela is not None:
        models = {"model": outcome.classifier, "original": loaded.classifier(),
                  **_reference(options.sequela, model)}
        section = audit_sequela(models, tune=split.tune, heldout=split.heldout,
                                probe=reinjection_probe(outcome.before, chosen), device=device,
                                seed=runtime.seed, members=_members(options.sequela, loaded),
                                reinjection=options.sequela.reinjection)
        audit = SequelaAudit(section, options.sequela.gates)
    findings = CleanFindings(outcome, defense, options.scope, out, gates, split.tune.class_names, probe.detect,
                             detection, verification, inversion, audit)
    if out is not None:
        save_cleaned(outcome, loaded, split, defense, options.scope, out, output.force)
    return Report.of("clean", [findings], model=model_section(loaded), data=split.info,
                     environment=environment_info(device, runtime.seed), gates=findings.gate_values(),
                     wall_time_s=time.perf_counter() - started,
                     artifacts={"inversion": inversion} if inversion is not None else {})


def plan_schedule(model: ModelLike, data: DataOptions, options: CleanOptions | None = None, *,
                  runtime: Runtime | None = None) -> dict[str, Any]:
    """The SFT schedule ``clean`` would use (running the LR range test if needed), untrained."""
    model, options = ModelOptions.of(model), options or CleanOptions(method="sft")
    runtime = runtime or Runtime()
    defense = create_defense(options.method, options.settings)
    if not isinstance(defense, SuperFineTuning):
        raise BdauditError(f"only SFT has a cyclic schedule to plan; `method` {options.method} has none: "
                           "use `method` sft")
    device, gen, loaded, split = _open(model, data, runtime)
    ctx = DefenseContext(classifier=loaded.classifier(), config=loaded.config, tune=split.tune,
                         device=device, gen=gen, scope=options.scope)
    peak1, selection = choose_peak1(ctx, defense.settings)
    schedule = build_schedule(defense.settings, len(split.tune), peak1)
    return {"schedule": schedule, "peak_selection": selection}


def _reference(options: SequelaOptions, model: ModelOptions) -> dict[str, Any]:
    if options.reference is None:
        return {}
    return {"reference": model.load(options.reference).classifier()}


def _members(options: SequelaOptions, loaded: LoadedModel) -> Any:
    if options.members is None:
        return None
    return load_image_folder(options.members, resolve_preprocessing(loaded.config),
                             loaded.config.class_names)


def sequela(model: ModelLike, data: DataOptions, *, original: str | Path | None = None,
            options: SequelaOptions | None = None, probe: ProbeOptions | None = None,
            runtime: Runtime | None = None) -> Report:
    """Membership exposure and re-injection speed of MODEL (members: the tuning part of
    ``data``, or ``options.members``), beside its ``original`` and a clean ``reference``; the
    retuning attack uses the trigger of ``probe`` that beats its null rate by most."""
    started = time.perf_counter()
    model, probe = ModelOptions.of(model), probe or ProbeOptions()
    runtime = runtime or Runtime()
    options = options or SequelaOptions()
    device, _, loaded, split = _open(model, data, runtime)
    models: dict[str, Any] = {"model": loaded.classifier()}
    probe_model = loaded.classifier()
    if original is not None:
        models["original"] = probe_model = model.load(original).classifier()
    models.update(_reference(options, model))
    chosen = select_triggers(loaded, probe.triggers, probe.triggers_file, split.heldout)
    found = evaluate_triggers(probe_model, split.heldout, chosen,
                              ProbeSettings(target=probe.target, batch_size=runtime.batch_size), device=device)
    section = audit_sequela(models, tune=split.tune, heldout=split.heldout,
                            probe=reinjection_probe(found, chosen), device=device, seed=runtime.seed,
                            members=_members(options, loaded), reinjection=options.reinjection)
    return Report.of("sequela", [SequelaAudit(section, options.gates)], model=model_section(loaded),
                     data=split.info, environment=environment_info(device, runtime.seed),
                     gates=options.gates.to_dict(), wall_time_s=time.perf_counter() - started)


def plant(data: DataOptions, output: OutputOptions, options: PlantOptions | None = None, *,
          transfer: TransferOptions | None = None, runtime: Runtime | None = None,
          on_epoch: PlantProgress | None = None) -> PlantResult:
    """Plant a backdoored (or, with ``attack="none"``, a clean reference) model in one of three
    paradigms (``bdaudit.workflows.plant``); ``output.out`` receives it with its provenance."""
    return plant_model(data, output, options or PlantOptions(), transfer=transfer,
                       runtime=runtime or Runtime(), on_epoch=on_epoch)


def bench(subjects: Sequence[Subject], data: DataOptions, plan: BenchPlan, out_dir: str | Path, *,
          runtime: Runtime | None = None, on_cell: CellCallback | None = None,
          executor: Executor | None = None) -> BenchResult:
    """Every subject x clean size x method of ``plan``; ``data.path`` is the clean pool the
    defenses tune on, ``data.eval_path`` the held-out images (required). ``out_dir`` receives
    cells.jsonl (the resume cache), bench.json, bench.csv and scatter.png."""
    if data.eval_path is None:
        raise BdauditError("`eval_data` is required: bench measures every cell on the same held-out images")
    device = (runtime or Runtime()).device
    return run_bench(subjects, data.path, data.eval_path, plan, Path(out_dir), device=device, on_cell=on_cell,
                     executor=executor)


# -- many models -----------------------------------------------------------------------------------
# One task per model on an executor (this process, or Ray): the task functions live at module level
# so Ray workers import them by name.

OnModel = Callable[[int, int, "ModelOutcome"], None]  # (done, total, outcome) as each model finishes


def _model_for(path: Path, options: dict[str, Any]) -> ModelOptions:
    return dataclasses.replace(options.pop("model", None) or ModelOptions(), path=path)


def _scan_task(model_path: Path, data: DataOptions, options: dict[str, Any]) -> Report:
    options = dict(options)
    return scan(_model_for(model_path, options), data, **options)


def _clean_task(model_path: Path, data: DataOptions, out: Path | None, options: dict[str, Any]) -> Report:
    options = dict(options)
    output = dataclasses.replace(options.pop("output", None) or OutputOptions(), out=out)
    return clean(_model_for(model_path, options), data, output=output, **options)


def _run_many(kind: str, task: Callable[..., Any], entries: list[ModelEntry], calls: list[tuple[Any, ...]],
              device: str, executor: Executor | None, report_dir: str | Path | None,
              on_model: OnModel | None) -> BatchReport:
    started = time.perf_counter()
    executor = executor or LocalExecutor()
    # A bad --device is one error for the batch, not one per model; Ray's workers resolve their own.
    if isinstance(executor, LocalExecutor):
        resolve_device(device)
    else:
        resolve_device_name(device)
    folder = Path(report_dir) if report_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    outcomes: list[ModelOutcome | None] = [None] * len(entries)
    for done, result in enumerate(executor.map(task, calls, device=device), start=1):
        entry = entries[result.index]
        outcome = ModelOutcome(entry, report=result.value) if result.ok else \
            ModelOutcome(entry, error=result.error, error_code=result.exit_code)
        outcomes[result.index] = outcome
        if folder is not None and outcome.report is not None:  # as it finishes: an interrupt keeps it
            outcome.report.write_json(folder / f"{entry.name}.json")
        if on_model is not None:
            on_model(done, len(entries), outcome)
    batch = BatchReport(kind=kind, outcomes=[o for o in outcomes if o is not None], executor=executor.info(),
                        wall_time_s=time.perf_counter() - started, report_dir=folder)
    if folder is not None:
        batch.write_json(folder / "summary.json")
    return batch


def scan_many(models: Sequence[str | Path], data: DataOptions, *, executor: Executor | None = None,
              report_dir: str | Path | None = None, on_model: OnModel | None = None,
              **options: Any) -> BatchReport:
    """``scan`` each model (paths, folders of checkpoints or manifests; see ``resolve_models``) with
    the same ``options`` (``scan``'s keywords; ``model`` gives the flags and config every model is
    read with); a model that fails (e.g. does not load) is reported, the others still run.
    ``report_dir`` receives ``<name>.json`` per model and ``summary.json``."""
    entries = resolve_models(models)
    options.pop("progress", None)  # progress bars belong to one in-process scan
    device = (options.get("runtime") or Runtime()).device
    calls = [(e.path, data, options) for e in entries]
    return _run_many("scan", _scan_task, entries, calls, device, executor, report_dir, on_model)


def clean_many(models: Sequence[str | Path], data: DataOptions, out_dir: str | Path | None = None, *,
               executor: Executor | None = None, report_dir: str | Path | None = None,
               on_model: OnModel | None = None, **options: Any) -> BatchReport:
    """``clean`` each model; ``out_dir`` (if given) receives ``<name>.safetensors`` per model
    (``output.force`` still applies to each)."""
    entries = resolve_models(models)
    options.pop("on_epoch", None)  # per-epoch lines of several models would interleave
    device = (options.get("runtime") or Runtime()).device
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None and folder.suffix == ".safetensors" and len(entries) == 1:
        outs: list[Path | None] = [folder]  # one model (e.g. with --report-dir): --out is its file
    elif folder is not None:
        if folder.suffix == ".safetensors":
            raise BdauditError(f"with several models `out` is a folder for <name>.safetensors, not {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        outs = [folder / f"{e.name}.safetensors" for e in entries]
    else:
        outs = [None] * len(entries)
    calls = [(e.path, data, out, options) for e, out in zip(entries, outs, strict=True)]
    return _run_many("clean", _clean_task, entries, calls, device, executor, report_dir, on_model)
