"""``bdaudit scan`` and the probing steps ``clean`` and ``sequela`` share: open the model and data,
choose the triggers, look for unknown ones, and turn each result into its report section and gate
reasons (here, next to the results, so the report object stays a plain container)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdaudit.core.data import DataSplit, ImageSet, resolve_data
from bdaudit.core.errors import TriggerError
from bdaudit.detect.inversion import InversionResult, inversion_reasons, invert_seeded
from bdaudit.detect.probe import Gates, ProbeSettings, ScanResult, evaluate_triggers, trigger_fit_error
from bdaudit.detect.unknown import DetectResult, DetectSettings, detect_reasons, detect_unknown, detector_enabled
from bdaudit.models.checkpoint import LoadedModel
from bdaudit.models.intake import check_data_channels
from bdaudit.triggers import Trigger, default_triggers, load_trigger_file, parse_trigger
from bdaudit.triggers.base import model_triggers
from bdaudit.workflows.options import DataOptions, ModelOptions, ProbeOptions, Runtime


def open_model_and_data(model: str | Path | ModelOptions, data: DataOptions,
                        runtime: Runtime) -> tuple[LoadedModel, DataSplit]:
    loaded = ModelOptions.of(model).load()
    check_data_channels(data.path, loaded.config.in_chans)
    split = resolve_data(data.path, loaded.config, data.holdout, runtime.seed, data.eval_path)
    return loaded, split


def select_triggers(loaded: LoadedModel, specs: Sequence[str] = (),
                    file: str | Path | None = None, data: ImageSet | None = None) -> list[Trigger]:
    """Trigger ``specs`` and the triggers ``file`` if given, else the whole default library plus
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


def add_inverted(classifier: Any, split: DataSplit, device: Any, seed: int,
                 triggers: Sequence[Trigger]) -> tuple[InversionResult, list[Trigger]]:
    """Neural Cleanse over every class on the tuning images; the outliers' reversed triggers join
    ``triggers`` (so they are probed and, when cleaning, unlearned)."""
    inversion = invert_seeded(classifier, split.tune, device, seed)
    return inversion, [*triggers, *inversion.flagged_triggers()]


def run_detector(classifier: Any, split: DataSplit, device: Any, seed: int, mode: str,
                 explicit: bool, confirm_all: bool = False) -> DetectResult | None:
    """The unknown-trigger detector on the tuning images, if ``mode`` (auto/on/off) asks for it;
    ``confirm_all`` when every suspected class matters (what ``clean`` unlearns), not just a verdict."""
    if not detector_enabled(mode, explicit):
        return None
    return detect_unknown(classifier, split.tune, device=device, seed=seed,
                          settings=DetectSettings(confirm_all=confirm_all))


def detection_section(detection: DetectResult | None, mode: str) -> dict[str, Any]:
    if detection is not None:
        return {"ran": True, "mode": mode, **detection.to_dict()}
    why = ("--detect off" if mode == "off" else
           "--trigger/--triggers asked for specific triggers (add --detect on to also look for unknown ones)")
    return {"ran": False, "mode": mode, "skipped_because": why}


def scan_section(result: ScanResult) -> dict[str, Any]:
    return {"clean_accuracy": result.clean_accuracy, "n_images": result.n_images,
            "triggers": [t.to_dict() for t in result.triggers]}


def scan_reasons(result: ScanResult, gates: Gates) -> list[str]:
    return [f"trigger {t.spec} sends {t.asr:.1%} of held-out images to class "
            f"{t.target_name!r} (null {t.null_asr:.1%}; gate {gates.fail_asr:.0%})"
            + (f"; the whole {t.trigger} family does (family gate {gates.family_asr:.0%})"
               if t.flag_reason == "family" else "")
            for t in result.flagged]


@dataclass
class ScanOutcome:
    """What a scan found: known-trigger probes, the detector (if it ran) and the inversion (with
    ``invert``); it knows its own report sections and gate reasons."""

    result: ScanResult
    gates: Gates
    detect_mode: str
    detection: DetectResult | None = None
    inversion: InversionResult | None = None

    def sections(self) -> dict[str, dict[str, Any]]:
        sections = {"scan": scan_section(self.result),
                    "detection": detection_section(self.detection, self.detect_mode)}
        if self.inversion is not None:
            sections["inversion"] = self.inversion.to_dict()
        return sections

    def reasons(self) -> list[str]:
        reasons = scan_reasons(self.result, self.gates)
        if self.detection is not None:
            reasons += detect_reasons(detection_section(self.detection, self.detect_mode))
        if self.inversion is not None:
            reasons += inversion_reasons(self.inversion.to_dict())
        return reasons


def run_scan(loaded: LoadedModel, split: DataSplit, probe: ProbeOptions, gates: Gates, runtime: Runtime,
             device: Any, advance: Any = None) -> ScanOutcome:
    """Probe ``loaded`` with the chosen triggers and those the detector flags (``api.scan``)."""
    chosen = select_triggers(loaded, probe.triggers, probe.triggers_file, split.heldout)
    detection = run_detector(loaded.classifier(), split, device, runtime.seed, probe.detect, probe.explicit,
                             probe.confirm_all)
    if detection is not None:
        chosen += detection.flagged_triggers()  # their held-out ASR (with its interval) is reported
    result = evaluate_triggers(loaded.classifier(), split.heldout, chosen,
                               ProbeSettings(gates, probe.target, batch_size=runtime.batch_size),
                               device=device, advance=advance)
    inversion = invert_seeded(loaded.classifier(), split.tune, device, runtime.seed) if probe.invert else None
    return ScanOutcome(result, gates, probe.detect, detection, inversion)
