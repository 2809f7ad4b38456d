"""The report as SARIF 2.1.0, so findings reach code-scanning views (GitHub, GitLab, Azure DevOps).

One rule per trigger family (and one for trigger inversion, one for gates that are not about a
trigger); one result per probed trigger, inverted outlier class and failed non-trigger gate.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
INVERSION_RULE = "bdaudit.inversion.neural-cleanse"
GATE_RULE = "bdaudit.gate"
NEURAL_CLEANSE = "Wang et al. 2019, Neural Cleanse (IEEE S&P 2019)"


def trigger_rule_id(family: str) -> str:
    # Stable across runs and versions: code-scanning views match alerts by ruleId.
    return f"bdaudit.trigger.{family}"


def _rule(rule_id: str, name: str, short: str, full: str, paper: str) -> dict[str, Any]:
    help_text = f"{full} Reference: {paper}." if paper else full
    return {"id": rule_id, "name": name, "shortDescription": {"text": short},
            "fullDescription": {"text": full}, "help": {"text": help_text},
            "properties": {"tags": ["security", "backdoor", "machine-learning"]}}


def _scan_section(payload: dict[str, Any]) -> dict[str, Any] | None:
    # After clean, the "scan" section is the cleaned model's scan (the one the gates judged).
    return payload.get("scan") or (payload.get("clean") or {}).get("after")


def _confidence(row: dict[str, Any]) -> dict[str, Any]:
    """Confidence-interval fields if the scan recorded any (newer schema versions add them)."""
    return {key: value for key, value in row.items()
            if key.endswith(("_ci", "_ci95")) or key in ("ci", "confidence_interval", "asr_interval", "n_probe")}


def _trigger_level(row: dict[str, Any], gates: dict[str, Any]) -> str:
    if row["flagged"]:
        return "error"
    fail_asr = gates.get("fail_asr") or 1.0
    null_margin = gates.get("null_margin") or 0.0
    # Half-way to the gate and clearly above its null: worth a look even though it passed.
    if row["asr"] >= fail_asr / 2 and row["asr"] - (row["null_asr"] or 0.0) >= null_margin:
        return "warning"
    return "note"


def _location(model: dict[str, Any]) -> dict[str, Any]:
    raw = model.get("path") or "model"
    path = Path(raw)
    artifact: dict[str, Any]
    try:
        relative = path.resolve().relative_to(Path.cwd().resolve())
        artifact = {"uri": relative.as_posix(), "uriBaseId": "%SRCROOT%"}
    except ValueError:
        artifact = {"uri": path.resolve().as_uri() if path.is_absolute() or path.exists() else raw}
    # A model file has no lines, but code-scanning views place an alert only with a start line.
    return {"physicalLocation": {"artifactLocation": artifact, "region": {"startLine": 1}}}


def _trigger_result(row: dict[str, Any], payload: dict[str, Any], stage: str) -> dict[str, Any]:
    level = _trigger_level(row, payload["gates"])
    what = "sends" if row["flagged"] else "probe: sends"
    message = (f"{row['spec']} {what} {row['asr']:.1%} of held-out images to class "
               f"'{row['target_name']}' (matched null {row['null_asr']:.1%}, gate "
               f"{payload['gates'].get('fail_asr')}){' after cleaning' if stage == 'after' else ''}.")
    properties = {"trigger": row["spec"], "asr": row["asr"], "null_asr": row["null_asr"],
                  "target_class": row["target"], "target_name": row["target_name"],
                  "target_fixed": row["target_fixed"], "robust_accuracy": row["robust_accuracy"],
                  "flag_reason": row.get("flag_reason"), "stage": stage, **_confidence(row)}
    return {"ruleId": trigger_rule_id(row["trigger"]), "level": level, "message": {"text": message},
            "locations": [_location(payload["model"])],
            "partialFingerprints": {"bdauditFinding/v1": f"{payload['model'].get('sha256')}:{row['spec']}"},
            "properties": properties}


def to_sarif(payload: dict[str, Any], exit_code: int | None = None,
             argv: list[str] | None = None) -> dict[str, Any]:
    """A SARIF log with one run for the report dict ``payload`` (``Report.to_dict()``)."""
    rules: dict[str, dict[str, Any]] = {}
    results: list[dict[str, Any]] = []
    scan = _scan_section(payload)
    stage = "after" if payload["kind"] == "clean" else "scan"
    for row in (scan or {}).get("triggers", []):
        family = row["trigger"]
        rules.setdefault(trigger_rule_id(family), _rule(
            trigger_rule_id(family), f"Backdoor{family.title().replace('_', '')}Trigger",
            f"The model answers the {family} trigger family",
            f"A {family} trigger stamped on held-out images sends them to one class far more often than "
            "a matched null perturbation does: the model carries a backdoor for this trigger family.",
            row.get("paper", "")))
        if row.get("error") or row.get("asr") is None:
            continue  # a trigger that could not be probed is not a finding
        results.append(_trigger_result(row, payload, stage))
    inversion = payload.get("inversion")
    if inversion:
        rules[INVERSION_RULE] = _rule(
            INVERSION_RULE, "ReverseEngineeredTriggerOutlier", "A class has an anomalously small reversed trigger",
            "Neural Cleanse reverse-engineers the smallest patch that sends every image to each class; a class "
            "whose patch is an outlier (anomaly index above the threshold) likely has a planted trigger, "
            "even one outside bdaudit's library.", NEURAL_CLEANSE)
        for row in inversion["classes"]:
            if not row["flagged"]:
                continue
            results.append({
                # Gated in scan; in clean it is the pre-clean search whose triggers were then unlearned.
                "ruleId": INVERSION_RULE, "level": "error" if payload["kind"] == "scan" else "warning",
                "message": {"text": f"class '{row['name']}' has a reversed trigger with mask L1 "
                                    f"{row['mask_l1']:.1f} and anomaly index {row['anomaly_index']}."},
                "locations": [_location(payload["model"])],
                "partialFingerprints": {"bdauditFinding/v1": f"{payload['model'].get('sha256')}:nc:{row['class']}"},
                "properties": {"target_class": row["class"], "target_name": row["name"],
                               "mask_l1": row["mask_l1"], "anomaly_index": row["anomaly_index"],
                               "attack_success": row["attack_success"]}})
    trigger_reasons = {r for r in payload["verdict"]["reasons"] if r.startswith(("trigger ", "class "))}
    for reason in payload["verdict"]["reasons"]:
        if reason in trigger_reasons:
            continue  # already a result of its own
        rules.setdefault(GATE_RULE, _rule(GATE_RULE, "GateFailed", "A bdaudit gate failed",
                                          "A policy gate other than a trigger's ASR failed (accuracy drop "
                                          "after cleaning, membership exposure or re-injection speed).", ""))
        # The reason's first words without its numbers: stable across runs, distinct per gate and set.
        gate = " ".join(w for w in reason.split()[:6] if not any(c.isdigit() for c in w))
        results.append({"ruleId": GATE_RULE, "level": "error", "message": {"text": reason},
                        "locations": [_location(payload["model"])],
                        "partialFingerprints": {"bdauditFinding/v1": f"{payload['model'].get('sha256')}:gate:{gate}"}})
    rule_list = list(rules.values())
    index = {rule["id"]: i for i, rule in enumerate(rule_list)}
    for result in results:
        result["ruleIndex"] = index[result["ruleId"]]
    argv = list(sys.argv if argv is None else argv)
    invocation: dict[str, Any] = {
        "executionSuccessful": exit_code in (None, 0, 1),  # a failed gate is a successful scan
        "commandLine": " ".join(shlex.quote(a) for a in ["bdaudit", *argv[1:]]),
        "arguments": argv[1:], "startTimeUtc": payload["created"],
        "workingDirectory": {"uri": Path.cwd().resolve().as_uri()},
        "properties": {"verdict": payload["verdict"]["status"], "gates": payload["gates"],
                       "wall_time_s": payload.get("wall_time_s")}}
    if exit_code is not None:
        invocation["exitCode"] = exit_code
    return {
        "$schema": SARIF_SCHEMA, "version": SARIF_VERSION,
        "runs": [{
            "tool": {"driver": {"name": "bdaudit", "version": payload["tool"]["version"],
                                "semanticVersion": payload["tool"]["version"],
                                "rules": rule_list}},
            "invocations": [invocation],
            "originalUriBaseIds": {"%SRCROOT%": {"uri": Path.cwd().resolve().as_uri() + "/"}},
            "artifacts": [{"location": _location(payload["model"])["physicalLocation"]["artifactLocation"],
                           "hashes": {"sha-256": payload["model"].get("sha256")}}
                          if payload["model"].get("sha256") else
                          {"location": _location(payload["model"])["physicalLocation"]["artifactLocation"]}],
            "results": results,
            "properties": {"report_kind": payload["kind"], "schema_version": payload["schema_version"]},
        }],
    }
