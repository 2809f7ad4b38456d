"""The sequela audit behind ``bdaudit sequela`` and ``clean``'s sequela section: membership
exposure and re-injection speed for a model, its original and an optional clean reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bdaudit.core.data import ImageSet
from bdaudit.detect.probe import ScanResult
from bdaudit.sequela.mia import MIAResult, compare, membership_inference
from bdaudit.sequela.reinjection import ReinjectionSettings, reinjection_attack
from bdaudit.triggers import Trigger


@dataclass(frozen=True)
class SequelaGates:
    """``max_mia_auc``: best-attack AUC on the audited model; ``max_reinjection_asr``: ASR the
    retuning attack regains on it. None disables a gate."""

    max_mia_auc: float | None = None
    max_reinjection_asr: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"max_mia_auc": self.max_mia_auc, "max_reinjection_asr": self.max_reinjection_asr}


def reinjection_probe(scan: ScanResult, triggers: list[Trigger]) -> tuple[Trigger, int] | None:
    """The trigger to retune with: the one that beat its null rate by most (a backdoor that
    was found, or was removed), at its suspected target."""
    rows = [(r.asr - (r.null_asr or 0.0), trig, r.target)
            for trig, r in zip(triggers, scan.triggers, strict=True)
            if r.error is None and r.asr is not None and r.target is not None]
    if not rows:
        return None
    _, trigger, target = max(rows, key=lambda row: row[0])
    return trigger, int(target)


def mia_pair(models: dict[str, nn.Module], members: ImageSet, nonmembers: ImageSet,
             device: torch.device, seed: int) -> dict[str, Any]:
    results: dict[str, MIAResult] = {
        name: membership_inference(model, members, nonmembers, device=device, seed=seed)
        for name, model in models.items()}
    out: dict[str, Any] = {name: result.to_dict() for name, result in results.items()}
    if "original" in results and "model" in results:
        out["change"] = compare(results["original"], results["model"])
    return out


def audit_sequela(models: dict[str, nn.Module], *, tune: ImageSet, heldout: ImageSet,
                  probe: tuple[Trigger, int] | None, device: torch.device, seed: int = 0,
                  members: ImageSet | None = None, reinjection: dict[str, Any] | None = None,
                  ) -> dict[str, Any]:
    """``models`` maps roles (``model``, ``original``, ``reference``) to classifiers.

    Membership: the tuning subset vs the held-out part (what tuning on the user's data exposes)
    and, with ``members``, known training samples vs held-out (the original's exposure).
    Re-injection: the retuning attack with ``probe`` on every model.
    """
    section: dict[str, Any] = {"membership": {}, "reinjection": None}
    mia_models = {k: v for k, v in models.items() if k in ("model", "original")}
    section["membership"]["tuning_subset"] = mia_pair(mia_models, tune, heldout, device, seed)
    if members is not None:
        section["membership"]["given_members"] = mia_pair(mia_models, members, heldout, device, seed)
    if probe is not None:
        trigger, target = probe
        section["reinjection"] = {
            "trigger": trigger.spec(), "target": target,
            "models": {name: reinjection_attack(model, tune, trigger, target, eval_data=heldout, device=device,
                                                settings=ReinjectionSettings(seed=seed, **(reinjection or {}))
                                                ).to_dict()
                       for name, model in models.items()}}
    return section


@dataclass
class SequelaAudit:
    """The sequela audit's result: its report section (``audit_sequela``) and gate reasons."""

    section: dict[str, Any]
    gates: SequelaGates

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"sequela": self.section}

    def reasons(self) -> list[str]:
        return sequela_reasons(self.section, self.gates)


def sequela_reasons(section: dict[str, Any], gates: SequelaGates) -> list[str]:
    reasons = []
    if gates.max_mia_auc is not None:
        for set_name, result in section["membership"].items():
            auc = result["model"]["best_auc"]
            if auc > gates.max_mia_auc:
                reasons.append(f"membership inference on the {set_name.replace('_', ' ')} reaches AUC "
                               f"{auc:.3f} ({result['model']['best_attack']}; gate {gates.max_mia_auc})")
    reinjection = section.get("reinjection")
    if gates.max_reinjection_asr is not None and reinjection:
        final = reinjection["models"]["model"]["final_asr"]
        if final > gates.max_reinjection_asr:
            reasons.append(f"a {reinjection['models']['model']['settings']['budget_steps']}-step retuning "
                           f"attack brings {reinjection['trigger']} back to {final:.1%} ASR "
                           f"(gate {gates.max_reinjection_asr:.0%})")
    return reasons
