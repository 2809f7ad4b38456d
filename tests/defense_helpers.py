"""Run a defense on the session's tiny BadNets model through the library API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bdaudit import api
from bdaudit.defenses import DEFENSES
from bdaudit.planting.plant import PlantResult
from bdaudit.workflows.clean import CleanGates


def clean_badnets(method: str, model: PlantResult, clean_dir: Path, eval_dir: Path,
                  unlearn_fraction: float = 0.0, **settings: Any) -> dict[str, Any]:
    """The ``clean`` section of the report: before/after accuracy and BadNets ASR, hyper-parameters.
    Tests give short budgets in epochs, so the step floor is off unless a test sets it; trigger
    unlearning is off unless asked, so each defense is tested on its own."""
    if "min_steps" in DEFENSES[method].settings_cls.__dataclass_fields__:
        settings.setdefault("min_steps", 0)
    report = api.clean(model.path, api.DataOptions(clean_dir, eval_dir),
                       api.CleanOptions(method, settings, unlearn_fraction=unlearn_fraction,
                                        history="full"),  # these tests count the defense's per-epoch reports
                       api.ProbeOptions(triggers=("badnets",)), gates=CleanGates(max_accuracy_drop=None),
                       runtime=api.Runtime("cpu", 256, 0))
    section = report.sections["clean"]
    return {"asr_before": section["before"]["triggers"][0]["asr"],
            "asr_after": section["after"]["triggers"][0]["asr"],
            "acc_before": section["before"]["clean_accuracy"],
            "acc_after": section["after"]["clean_accuracy"],
            "hyperparameters": section["hyperparameters"], "report": report}
