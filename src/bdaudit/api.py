"""The library API behind every CLI command: each returns a Report (and writes nothing else
unless asked), so Python users and CI scripts get exactly what the CLI prints."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdaudit.core.data import DataSplit, ImageSet, load_image_folder, resolve_data, resolve_preprocessing
from bdaudit.core.defaults import DEFAULT_METHOD, DEFAULT_UNLEARN_FRACTION
from bdaudit.core.errors import BdauditError, TriggerError
from bdaudit.core.outputs import check_outputs
from bdaudit.core.runtime import environment_info, resolve_device, resolve_device_name, seed_everything
from bdaudit.defenses import DefenseContext, create_defense
from bdaudit.defenses.sft import SuperFineTuning, build_schedule, choose_peak1
from bdaudit.defenses.unlearning import check_unlearn_fraction
from bdaudit.detect.inversion import inversion_reasons, invert_seeded
from bdaudit.detect.probe import Gates, ProbeSettings, evaluate_triggers, trigger_fit_error
from bdaudit.detect.unknown import detect_reasons, detect_unknown, detector_enabled
from bdaudit.models.checkpoint import LoadedModel, load_model
from bdaudit.models.intake import check_data_channels
from bdaudit.report.document import Report, model_section, scan_reasons, scan_section
from bdaudit.sequela.audit import SequelaGates, audit_sequela, reinjection_probe, sequela_reasons
from bdaudit.triggers import Trigger, default_triggers, load_trigger_file, parse_trigger
from bdaudit.triggers.base import model_triggers
from bdaudit.workflows.batch import BatchReport, ModelEntry, ModelOutcome, resolve_models
from bdaudit.workflows.clean import (
    CleanGates,
    DefenseRun,
    clean_reasons,
    clean_section,
    run_defense,
    save_cleaned,
)
from bdaudit.workflows.executors import Executor, LocalExecutor

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


@dataclass(frozen=True)
class Runtime:
    """Where and how to compute: shared by every command."""

    device: str = "auto"
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise BdauditError(f"--batch-size must be at least 1, not {self.batch_size}")


@dataclass(frozen=True)
class SequelaOptions:
    """What the sequela audit may use beyond the clean data."""

    members: Path | None = None  # known training samples of the original model
    reference: Path | None = None  # a clean reference model of the same kind
    gates: SequelaGates = SequelaGates()
    reinjection: dict[str, Any] | None = None  # retuning-attack settings (budget_steps, lr, ...)


@dataclass(frozen=True)
class DataOptions:
    """The clean data and how it is split into tuning and held-out parts."""

    path: Path
    eval_path: Path | None = None
    holdout: float = 0.2


def select_triggers(loaded: LoadedModel, specs: Sequence[str] = (),
                    file: str | Path | None = None, data: ImageSet | None = None) -> list[Trigger]:
    """``--trigger`` specs and ``--triggers FILE`` if given, else the whole default library plus
    any trigger the checkpoint itself carries (e.g. an Input-aware generator). A trigger the user
    named that does not fit ``data``'s images is bad input (a library default is only skipped)."""
    chosen = [parse_trigger(spec) for spec in specs]
    if file is not None:
        chosen += load_trigger_file(Path(file))
    for trigger in chosen if data is not None and len(data) else ():
        problem = trigger_fit_error(trigger, data)
        if problem is not None:
            raise TriggerError(f"{problem}; choose parameters that fit the images")
    return chosen or default_triggers() + model_triggers(loaded.aux)


def open_model_and_data(model_path: str | Path, data: DataOptions, runtime: Runtime,
                        model_flags: dict[str, Any] | None = None,
                        model_config: str | Path | None = None) -> tuple[LoadedModel, DataSplit]:
    loaded = load_model(model_path, model_flags, model_config)
    check_data_channels(data.path, loaded.config.in_chans)
    split = resolve_data(data.path, loaded.config, data.holdout, runtime.seed, data.eval_path)
    return loaded, split


def scan(model_path: str | Path, data: DataOptions, *, triggers: Sequence[str] = (),
         triggers_file: str | Path | None = None, target: int | None = None,
         gates: Gates | None = None, runtime: Runtime | None = None,
         model_flags: dict[str, Any] | None = None, model_config: str | Path | None = None,
         progress: Progress | None = None, invert: bool = False, detect: str = "auto") -> Report:
    """Probe a checkpoint with known triggers on held-out clean images and (``detect``, on by
    default) look for *unknown* triggers with ``bdaudit.detect.unknown``; with ``invert``, also run Neural
    Cleanse over every class."""
    started = time.perf_counter()
    runtime = runtime or Runtime()
    gates = gates or Gates()
    device = resolve_device(runtime.device)
    seed_everything(runtime.seed)
    loaded, split = open_model_and_data(model_path, data, runtime, model_flags, model_config)
    chosen = select_triggers(loaded, triggers, triggers_file, split.heldout)
    detection = _detect(loaded.classifier(), split, device, runtime.seed, detect, bool(triggers or triggers_file))
    if detection is not None:
        chosen += detection.flagged_triggers()  # their held-out ASR (with its interval) is reported
    advance = progress("scanning", len(split.heldout)) if progress else None
    result = evaluate_triggers(loaded.classifier(), split.heldout, chosen,
                               ProbeSettings(gates, target, batch_size=runtime.batch_size),
                               device=device, advance=advance)
    sections, reasons = {"scan": scan_section(result)}, scan_reasons(result, gates)
    sections["detection"] = _detection_section(detection, detect)
    if detection is not None:
        reasons += detect_reasons(sections["detection"])
    if invert:
        inversion = invert_seeded(loaded.classifier(), split.tune, device, runtime.seed)
        sections["inversion"] = inversion.to_dict()
        reasons += inversion_reasons(sections["inversion"])
    return Report(
        kind="scan", model=model_section(loaded), data=split.info,
        environment=environment_info(device, runtime.seed),
        gates=gates.to_dict(), sections=sections, reasons=reasons,
        wall_time_s=time.perf_counter() - started, artifacts={"inversion": inversion} if invert else {})


def clean(model_path: str | Path, data: DataOptions, out: str | Path | None, *,
          method: str = DEFAULT_METHOD, settings: dict[str, Any] | None = None, scope: str = "full",
          triggers: Sequence[str] = (), triggers_file: str | Path | None = None,
          target: int | None = None, gates: CleanGates | None = None,
          runtime: Runtime | None = None, model_flags: dict[str, Any] | None = None,
          model_config: str | Path | None = None, force: bool = False,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          sequela: SequelaOptions | None = None,
          unlearn_fraction: float = DEFAULT_UNLEARN_FRACTION, invert: bool = False,
          detect: str = "auto", history: str = "sparse") -> Report:
    """Remove a backdoor from a copy of the model; ``out`` (if given) receives the cleaned
    checkpoint, written atomically and never over the input. ``unlearn_fraction`` of each tuning
    batch carries a trigger the first scan flagged, with its true label (0: off). With ``invert``,
    Neural Cleanse first reverses a trigger per class and the outliers join the probed (and so the
    unlearned) triggers: for backdoors outside the library. ``detect`` (on by default) does the same
    with ``bdaudit.detect.unknown`` before cleaning, and again from scratch (a fresh seed) on the cleaned
    model: the after-clean verdict does not rest only on the triggers that were unlearned.
    ``history``: ``sparse`` (default) probes the flagged triggers on a small fixed subset every few
    epochs; ``full`` probes everything after every epoch (``workflows.clean.DefenseRun``)."""
    started = time.perf_counter()
    runtime = runtime or Runtime()
    gates = gates or CleanGates()
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not force:
        raise BdauditError(f"output {out} already exists; choose another path or pass --force")
    if out is not None and out.suffix != ".safetensors":
        raise BdauditError(f"output {out} must end in .safetensors")
    check_outputs([("--out", out)], [model_path, data.path, data.eval_path])
    defense = create_defense(method, settings)
    check_unlearn_fraction(unlearn_fraction)
    device = resolve_device(runtime.device)
    gen = seed_everything(runtime.seed)
    loaded, split = open_model_and_data(model_path, data, runtime, model_flags, model_config)
    chosen = select_triggers(loaded, triggers, triggers_file, split.heldout)
    explicit = bool(triggers or triggers_file)
    detection = _detect(loaded.classifier(), split, device, runtime.seed, detect, explicit)
    if detection is not None:
        chosen += detection.unlearn_triggers()
    inversion = None
    if invert:
        inversion = invert_seeded(loaded.classifier(), split.tune, device, runtime.seed)
        chosen += inversion.flagged_triggers()
    options = DefenseRun(scope=scope, gates=gates, target=target, batch_size=runtime.batch_size,
                           unlearn_fraction=unlearn_fraction, history=history)
    outcome = run_defense(defense, loaded, split, chosen, options, device=device, gen=gen, on_epoch=on_epoch)
    sections = {"scan": scan_section(outcome.after), "clean": clean_section(defense, scope, outcome, out)}
    if inversion is not None:
        sections["inversion"] = inversion.to_dict()
    reasons = clean_reasons(outcome, gates)
    sections["detection"] = _detection_section(detection, detect)
    found = bool(outcome.before.flagged) or bool(detection is not None and detection.flagged)
    sections["clean"]["finding"] = "backdoor detected" if found else "no backdoor detected; tuned anyway"
    if detection is not None:
        # Independent check: a fresh seed and a fresh inversion on the cleaned model, so the verdict
        # does not rest on re-measuring the very triggers that were unlearned.
        verify = _detect(outcome.classifier, split, device, runtime.seed + 1, "on", False)
        still = [c for c in verify.flagged if c in detection.flagged]
        sections["verification"] = {**_detection_section(verify, "on"), "before_flagged": detection.flagged,
                                    "still_flagged": still,
                                    "new_flagged": [c for c in verify.flagged if c not in detection.flagged]}
        # A class reversed, unlearned and reversed again is a finding. A class flagged only after
        # tuning is reported, not gated: tuning on a few hundred images shifts every class's margin,
        # and on the blind benchmark such new flags were naturally easy classes (benchmarks/README.md).
        reasons += [line for line in detect_reasons(sections["verification"], " after cleaning (fresh seed)")
                    if any(f"class {split.tune.class_names[c]!r}" in line for c in still)]
    all_gates: dict[str, float | None] = gates.to_dict()
    if sequela is not None:
        models = {"model": outcome.classifier, "original": loaded.classifier(),
                  **_reference(sequela, model_flags, model_config)}
        section = audit_sequela(models, tune=split.tune, heldout=split.heldout,
                                probe=reinjection_probe(outcome.before, chosen), device=device,
                                seed=runtime.seed, members=_members(sequela, loaded),
                                reinjection=sequela.reinjection)
        sections["sequela"] = section
        reasons += sequela_reasons(section, sequela.gates)
        all_gates.update(sequela.gates.to_dict())
    if out is not None:
        save_cleaned(outcome, loaded, split, defense, scope, out, force)
    return Report(
        kind="clean", model=model_section(loaded), data=split.info,
        environment=environment_info(device, runtime.seed), gates=all_gates, sections=sections,
        reasons=reasons, wall_time_s=time.perf_counter() - started,
        artifacts={"inversion": inversion} if inversion is not None else {})


def _detect(classifier: Any, split: DataSplit, device: Any, seed: int, mode: str,
            explicit: bool) -> Any:
    if not detector_enabled(mode, explicit):
        return None
    return detect_unknown(classifier, split.tune, device=device, seed=seed)


def _detection_section(detection: Any, mode: str) -> dict[str, Any]:
    if detection is not None:
        return {"ran": True, "mode": mode, **detection.to_dict()}
    why = ("--detect off" if mode == "off" else
           "--trigger/--triggers asked for specific triggers (add --detect on to also look for unknown ones)")
    return {"ran": False, "mode": mode, "skipped_because": why}


def plan_schedule(model_path: str | Path, data: DataOptions, *, method: str = "sft",
                  settings: dict[str, Any] | None = None, scope: str = "full",
                  runtime: Runtime | None = None, model_flags: dict[str, Any] | None = None,
                  model_config: str | Path | None = None) -> dict[str, Any]:
    """The SFT schedule ``clean`` would use (running the LR range test if needed), untrained."""
    runtime = runtime or Runtime()
    defense = create_defense(method, settings)
    if not isinstance(defense, SuperFineTuning):
        raise BdauditError(f"--show-schedule prints SFT's cyclic schedule; --method {method} has none: "
                           "add --method sft")
    device = resolve_device(runtime.device)
    gen = seed_everything(runtime.seed)
    loaded, split = open_model_and_data(model_path, data, runtime, model_flags, model_config)
    ctx = DefenseContext(classifier=loaded.classifier(), config=loaded.config, tune=split.tune,
                         device=device, gen=gen, scope=scope)
    peak1, selection = choose_peak1(ctx, defense.settings)
    schedule = build_schedule(defense.settings, len(split.tune), peak1)
    return {"schedule": schedule, "peak_selection": selection}


def _reference(options: SequelaOptions, model_flags: dict[str, Any] | None,
               model_config: str | Path | None) -> dict[str, Any]:
    if options.reference is None:
        return {}
    return {"reference": load_model(options.reference, model_flags, model_config).classifier()}


def _members(options: SequelaOptions, loaded: LoadedModel) -> ImageSet | None:
    if options.members is None:
        return None
    return load_image_folder(options.members, resolve_preprocessing(loaded.config),
                             loaded.config.class_names)


def sequela(model_path: str | Path, data: DataOptions, *, original: str | Path | None = None,
            options: SequelaOptions | None = None, triggers: Sequence[str] = (),
            triggers_file: str | Path | None = None, target: int | None = None,
            runtime: Runtime | None = None, model_flags: dict[str, Any] | None = None,
            model_config: str | Path | None = None) -> Report:
    """Membership exposure and re-injection speed of MODEL (members: the tuning part of
    ``data``, or ``options.members``), beside its ``original`` and a clean ``reference``."""
    started = time.perf_counter()
    runtime = runtime or Runtime()
    options = options or SequelaOptions()
    device = resolve_device(runtime.device)
    seed_everything(runtime.seed)
    loaded, split = open_model_and_data(model_path, data, runtime, model_flags, model_config)
    models: dict[str, Any] = {"model": loaded.classifier()}
    probe_model = loaded.classifier()
    if original is not None:
        models["original"] = probe_model = load_model(original, model_flags, model_config).classifier()
    models.update(_reference(options, model_flags, model_config))
    chosen = select_triggers(loaded, triggers, triggers_file, split.heldout)
    found = evaluate_triggers(probe_model, split.heldout, chosen,
                              ProbeSettings(target=target, batch_size=runtime.batch_size), device=device)
    section = audit_sequela(models, tune=split.tune, heldout=split.heldout,
                            probe=reinjection_probe(found, chosen), device=device, seed=runtime.seed,
                            members=_members(options, loaded), reinjection=options.reinjection)
    return Report(
        kind="sequela", model=model_section(loaded), data=split.info,
        environment=environment_info(device, runtime.seed), gates=options.gates.to_dict(),
        sections={"sequela": section}, reasons=sequela_reasons(section, options.gates),
        wall_time_s=time.perf_counter() - started)


# -- many models -----------------------------------------------------------------------------------
# One task per model on an executor (this process, or Ray): the task functions live at module level
# so Ray workers import them by name.

OnModel = Callable[[int, int, "ModelOutcome"], None]  # (done, total, outcome) as each model finishes


def _scan_task(model_path: Path, data: DataOptions, options: dict[str, Any]) -> Report:
    return scan(model_path, data, **options)


def _clean_task(model_path: Path, data: DataOptions, out: Path | None, options: dict[str, Any]) -> Report:
    return clean(model_path, data, out, **options)


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
    the same ``options``; a model that fails (e.g. does not load) is reported, the others still run.
    ``report_dir`` receives ``<name>.json`` per model and ``summary.json``."""
    entries = resolve_models(models)
    options.pop("progress", None)  # progress bars belong to one in-process scan
    device = (options.get("runtime") or Runtime()).device
    calls = [(e.path, data, options) for e in entries]
    return _run_many("scan", _scan_task, entries, calls, device, executor, report_dir, on_model)


def clean_many(models: Sequence[str | Path], data: DataOptions, out_dir: str | Path | None = None, *,
               executor: Executor | None = None, report_dir: str | Path | None = None,
               on_model: OnModel | None = None, **options: Any) -> BatchReport:
    """``clean`` each model; ``out_dir`` (if given) receives ``<name>.safetensors`` per model."""
    entries = resolve_models(models)
    options.pop("on_epoch", None)  # per-epoch lines of several models would interleave
    device = (options.get("runtime") or Runtime()).device
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None and folder.suffix == ".safetensors" and len(entries) == 1:
        outs: list[Path | None] = [folder]  # one model (e.g. with --report-dir): --out is its file
    elif folder is not None:
        if folder.suffix == ".safetensors":
            raise BdauditError(f"with several models --out is a folder for <name>.safetensors, not {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        outs = [folder / f"{e.name}.safetensors" for e in entries]
    else:
        outs = [None] * len(entries)
    calls = [(e.path, data, out, options) for e, out in zip(entries, outs, strict=True)]
    return _run_many("clean", _clean_task, entries, calls, device, executor, report_dir, on_model)
