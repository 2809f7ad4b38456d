"""``bdaudit bench``: every defense on every backdoored model, at several clean-data sizes.

One *cell* = one model x one clean-subset size x one method. A cell's key hashes everything that
determines its numbers (model digest, trigger, method settings, the exact clean and evaluation
images, seed, sequela settings, bdaudit version), so an interrupted or extended bench recomputes
only what is new: ``cells.jsonl`` in the output folder is the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from bdaudit import __version__
from bdaudit.core.data import DataSplit, ImageSet, load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.core.runtime import environment_info, resolve_device, resolve_device_name, seed_everything
from bdaudit.defenses import DEFENSES, create_defense
from bdaudit.defenses.unlearning import UNLEARN_FAMILY_SHARE
from bdaudit.models.checkpoint import LoadedModel, atomic_output, load_model
from bdaudit.models.intake import HF_PREFIX
from bdaudit.report.plots import plot_scatter
from bdaudit.sequela.mia import membership_inference
from bdaudit.sequela.reinjection import ReinjectionSettings, reinjection_attack
from bdaudit.triggers import Trigger, create_trigger, parse_trigger
from bdaudit.triggers.base import model_triggers
from bdaudit.workflows.clean import DefenseRun, run_defense
from bdaudit.workflows.executors import Executor, LocalExecutor
from bdaudit.workflows.options import DataOptions, OutputOptions, Runtime
from bdaudit.workflows.plant import PlantOptions, plant_model
from bdaudit.workflows.scan import add_inverted

BENCH_VERSION = "1.0.0"
# The default-method rule: lowest worst-case ASR among methods within clean's own accuracy gate
# (2 points) on every model. The 1-point version is degenerate on the MNIST samples: plain
# fine-tuning on 250 images already costs 1.2 points, and at 50 images only no-op methods qualify.
MAX_ACCURACY_COST = 0.02
CSV_COLUMNS = ("model", "attack", "clean_images", "method", "ca_before", "ca_after", "accuracy_drop",
               "asr_before", "asr_after", "mia_auc", "reinjection_asr", "reinjection_steps", "seconds", "error")


@dataclass(frozen=True)
class Subject:
    """A backdoored model under test and the trigger that probes it."""

    name: str
    path: Path
    attack: str
    trigger: str | None  # a trigger spec; None: the triggers the checkpoint carries
    target: int | None = None
    # The manifest is the user's own file, so its model keys count as the user's flags.
    model_flags: dict[str, Any] = field(default_factory=dict)
    model_config: Path | None = None

    def load(self) -> LoadedModel:
        return load_model(self.path, self.model_flags, self.model_config)

    def triggers(self, loaded: LoadedModel) -> list[Trigger]:
        if self.trigger is None:
            carried = model_triggers(loaded.aux)
            if not carried:
                raise BdauditError(f"bench model {self.name}: no trigger given and the checkpoint carries none")
            return carried[:1]
        return [parse_trigger(self.trigger)]


def method_base(label: str) -> str:
    """``sft_sam=sft`` names a variant of ``sft`` (its own --set settings); a plain name is itself."""
    return label.partition("=")[2] or label


def method_label(label: str) -> str:
    return label.partition("=")[0]


@dataclass(frozen=True)
class BenchPlan:
    """What to run: methods (``NAME`` or a variant ``LABEL=NAME``, each with optional settings) x
    clean-subset sizes."""

    methods: tuple[str, ...]
    clean_sizes: tuple[int, ...]
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    sequela: bool = True
    reinjection_steps: int = 60
    reinjection_eval_every: int = 10  # ASR checks during the retuning attack (they dominate its cost)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if method_base(m) not in DEFENSES]
        if unknown:
            raise BdauditError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(DEFENSES))}")
        if not self.methods or not self.clean_sizes:
            raise BdauditError("bench needs at least one `methods` entry and one clean size")
        if any(n < 1 for n in self.clean_sizes):
            raise BdauditError("`clean_size` / `clean_fraction` must give at least one image")


@dataclass
class BenchResult:
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    recommended: dict[int, str | None]
    computed: int
    reused: int
    seconds: float
    environment: dict[str, Any]
    failed: int = 0  # cells whose task raised: rows with an ``error``, retried by the next run

    def to_dict(self) -> dict[str, Any]:
        return {"bench_version": BENCH_VERSION, "tool": {"name": "bdaudit", "version": __version__},
                "environment": self.environment, "wall_time_s": round(self.seconds, 1),
                "computed": self.computed, "reused": self.reused, "failed": self.failed,
                "rule": f"recommended: lowest worst-case ASR (ties: mean ASR, then mean accuracy cost) among "
                        f"methods whose accuracy cost is <= {MAX_ACCURACY_COST:.0%} on every model",
                "recommended": {str(k): v for k, v in self.recommended.items()},
                "summary": self.summary, "cells": self.rows}


# -- subjects --------------------------------------------------------------------------------------

MANIFEST_MODEL_KEYS = ("arch", "num_classes", "in_chans", "input_size", "mean", "std", "class_names")


def subjects_from_manifest(manifest: str | Path, names: Sequence[str] = ()) -> list[Subject]:
    """Backdoored models listed in a ``sample_models/manifest.yaml``-style file (clean ones skipped)."""
    path = Path(manifest)
    try:
        entries = yaml.safe_load(path.read_text())["models"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise BdauditError(f"cannot read model manifest {path}: {exc}; expected a YAML file with a "
                           "'models' mapping (see sample_models/manifest.yaml)") from None
    chosen = [n for n, e in entries.items() if (e or {}).get("attack") not in (None, "none")]
    if names:
        missing = [n for n in names if n not in entries]
        if missing:
            raise BdauditError(f"{path} lists no model(s) {', '.join(missing)}; it has {', '.join(entries)}")
        chosen = list(names)
    subjects = []
    for name in chosen:
        entry = entries[name]
        trigger = entry.get("trigger")
        if trigger == "input_aware":
            trigger = None  # rebuilt from the generator the checkpoint carries
        elif trigger is not None and entry.get("trigger_params"):
            trigger = create_trigger(trigger, **entry["trigger_params"]).spec()
        model_file = str(entry["file"])
        config_file = entry.get("model_config")
        subjects.append(Subject(name=name, attack=entry.get("attack", name),
                                path=Path(model_file) if model_file.startswith(HF_PREFIX) else path.parent / model_file,
                                trigger=trigger, target=entry.get("target"),
                                model_flags={k: entry[k] for k in MANIFEST_MODEL_KEYS if k in entry},
                                model_config=path.parent / config_file if config_file else None))
    return subjects


def plant_subjects(data: DataOptions, attacks: Sequence[str], folder: Path, options: PlantOptions,
                   runtime: Runtime, on_plant: Callable[[str], None] | None = None) -> list[Subject]:
    """Plant each attack once (``options`` with each attack in turn, standalone); a model already
    planted in ``folder`` is reused."""
    subjects = []
    for attack in attacks:
        out = folder / f"{attack}-{options.arch}-p{options.poison_rate:g}-t{options.target}-s{runtime.seed}.safetensors"
        if not out.exists():
            if on_plant is not None:
                on_plant(attack)
            plant_model(data, OutputOptions(out), dataclasses.replace(options, attack=attack, paradigm="standalone"),
                        runtime=runtime)
        subjects.append(Subject(name=attack, path=out, attack=attack,
                                trigger=None if attack == "input_aware" else attack, target=options.target))
    return subjects


# -- data -----------------------------------------------------------------------------------------

def stratified_subset(data: ImageSet, n_images: int, seed: int) -> ImageSet:
    """``n_images`` spread evenly over the classes; smaller subsets are prefixes of larger ones."""
    gen = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(data.labels == c).flatten() for c in range(data.num_classes)]
    per_class = [idx[torch.randperm(idx.numel(), generator=gen)] for idx in per_class]
    quota, extra = divmod(n_images, max(1, data.num_classes))
    chosen = [idx[:quota + (1 if c < extra else 0)] for c, idx in enumerate(per_class)]
    short = [data.class_names[c] for c, idx in enumerate(chosen)
             if idx.numel() < quota + (1 if c < extra else 0)]
    if short:
        raise BdauditError(f"the clean data has too few images of class(es) {', '.join(short[:8])} for a "
                           f"{n_images}-image subset; lower `clean_size` or add images")
    return data.subset(torch.cat(chosen).sort().values)


def clean_sizes_from(fractions: Sequence[float], sizes: Sequence[int], train_size: int | None) -> tuple[int, ...]:
    """Absolute sizes, plus fractions of the models' training-set size."""
    result = list(sizes)
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise BdauditError(f"`clean_fraction` must be in (0, 1], not {fraction}")
        if train_size is None:
            raise BdauditError("`clean_fraction` needs the models' training-set size: pass `train_size` N "
                               "(or use `clean_size`)")
        result.append(max(1, round(fraction * train_size)))
    return tuple(dict.fromkeys(result))


# -- cells ----------------------------------------------------------------------------------------

def cell_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """Finished cells by key; a line cut short by an interrupt is ignored."""
    cache: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row:
                cache[row["key"]] = row
    return cache


# Variant settings any method accepts: they are ``clean``'s trigger unlearning
# (``defenses.unlearning``), not settings of the defense.
# ``unlearn_source``: ``scan`` unlearns the probed trigger when flagged (as ``clean`` does with the
# library); ``inverted`` unlearns only what Neural Cleanse reverses (``clean --invert``), so the planted
# trigger is measured but never shown: the bench's stand-in for a backdoor outside the library.
CLEAN_OPTIONS: dict[str, Any] = {"unlearn_fraction": 0.0, "unlearn_family": UNLEARN_FAMILY_SHARE,
                                 "unlearn_source": "scan"}
UNLEARN_SOURCES = ("scan", "inverted")


def split_clean_options(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A variant's ``--set`` values split into the defense's settings and ``run_defense`` options."""
    method_only = {k: v for k, v in settings.items() if k not in CLEAN_OPTIONS}
    options = {k: type(default)(settings.get(k, default)) for k, default in CLEAN_OPTIONS.items()}
    if options["unlearn_source"] not in UNLEARN_SOURCES:
        raise BdauditError(f"unlearn_source must be one of {', '.join(UNLEARN_SOURCES)}, "
                           f"not '{options['unlearn_source']}'")
    return method_only, options


class SubjectData(NamedTuple):
    """What the driver loads once per subject and shares with every cell of it."""

    loaded: LoadedModel
    triggers: list[Trigger]
    pool: ImageSet  # the whole clean pool: tuning subsets are drawn from it
    heldout: ImageSet


def run_cell(subject: Subject, model_data: SubjectData, split: DataSplit, method: str,
             settings: dict[str, Any], plan: BenchPlan, device: torch.device) -> dict[str, Any]:
    """Clean a copy of one model with one method; measure utility, ASR and (optionally) sequela.

    Sequela: membership inference of the tuning subset against the held-out images, and the
    retuning attack drawn from the whole clean pool, so every clean size faces the same attacker."""
    loaded, triggers, attacker_data = model_data.loaded, model_data.triggers, model_data.pool
    method_only, options = split_clean_options(settings)
    defense = create_defense(method, method_only)
    gen = seed_everything(plan.seed)
    started = time.perf_counter()
    unlearn_only = None
    if options.pop("unlearn_source") == "inverted":
        _, triggers = add_inverted(loaded.classifier(), split, device, plan.seed, triggers)
        unlearn_only = triggers[len(model_data.triggers):]
    # Every image probed: the bench's numbers are research measurements, not gate verdicts.
    outcome = run_defense(defense, loaded, split, triggers,
                          DefenseRun(target=subject.target, history="off", probe="full",
                                     unlearn_only=unlearn_only, **options), device=device, gen=gen)
    seconds = time.perf_counter() - started
    before, after = outcome.before.triggers[0], outcome.after.triggers[0]
    row: dict[str, Any] = {
        "model": subject.name, "attack": subject.attack, "trigger": before.spec, "target": before.target,
        "clean_images": len(split.tune), "method": method,
        "ca_before": outcome.before.clean_accuracy, "ca_after": outcome.after.clean_accuracy,
        "accuracy_drop": outcome.before.clean_accuracy - outcome.after.clean_accuracy,
        "asr_before": before.asr, "asr_after": after.asr, "seconds": round(seconds, 2),
        "settings": json.loads(json.dumps(outcome.used.get("settings", {}), default=str)),
        "unlearning": outcome.used.get("unlearning"),
        "mia_auc": None, "reinjection_asr": None, "reinjection_steps": None,
    }
    if plan.sequela:
        mia = membership_inference(outcome.classifier, split.tune, split.heldout, device=device, seed=plan.seed)
        retuned = reinjection_attack(outcome.classifier, attacker_data, triggers[0], before.target,
                                     eval_data=split.heldout, device=device,
                                     settings=ReinjectionSettings(budget_steps=plan.reinjection_steps,
                                                                  eval_every=plan.reinjection_eval_every,
                                                                  n_clean=min(300, len(attacker_data) - 10),
                                                                  seed=plan.seed))
        row.update(mia_auc=mia.to_dict()["best_auc"], reinjection_asr=float(retuned.final_asr),
                   reinjection_steps=retuned.steps_to_regain)
    return row


def bench_cell(subject: Subject, model_data: SubjectData, size: int, method: str, settings: dict[str, Any],
               plan: BenchPlan, device: str) -> dict[str, Any]:
    """One cell from what the driver loaded once per model: the unit an executor runs (in this
    process or as a Ray task), so both compute from the same inputs and seed."""
    model_data = SubjectData(*model_data)
    tune = stratified_subset(model_data.pool, size, plan.seed)
    split = DataSplit(tune=tune, heldout=model_data.heldout, info={"tune_sha256": tune.digest()})
    return run_cell(subject, model_data, split, method, settings, plan, resolve_device(device))


CellCallback = Callable[[int, int, dict[str, Any], bool], None]  # (index, total, row, reused)


def run_bench(subjects: Sequence[Subject], clean_data: Path, eval_data: Path, plan: BenchPlan, out_dir: Path,
              *, device: str = "auto", on_cell: CellCallback | None = None,
              executor: Executor | None = None) -> BenchResult:
    """Every subject x clean size x method; results appended to ``out_dir/cells.jsonl`` as they finish.

    The driver loads each model and its data once (their digests key the cells); the cells not yet
    in the cache run on ``executor`` (default: this process). A cell that fails becomes a row with an
    ``error`` and is not cached, so the next run retries it and only it."""
    started = time.perf_counter()
    executor = executor or LocalExecutor()
    # Under Ray the workers pick the device (a GPU task sees its GPU); locally, a bad name fails here.
    torch_device = resolve_device(device) if isinstance(executor, LocalExecutor) else None
    resolve_device_name(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / "cells.jsonl"
    cache = read_cache(cache_path)
    total = len(subjects) * len(plan.clean_sizes) * len(plan.methods)
    rows: list[dict[str, Any] | None] = []
    jobs: list[tuple[int, str, str, tuple[Any, ...]]] = []  # (row slot, key, label, call args)
    reused = 0
    for subject in subjects:
        loaded = subject.load()
        triggers = subject.triggers(loaded)
        prep = resolve_preprocessing(loaded.config)
        names = loaded.config.class_names
        pool = load_image_folder(clean_data, prep, names)
        heldout = load_image_folder(eval_data, prep, pool.class_names)
        shared = None
        for size in plan.clean_sizes:
            tune = stratified_subset(pool, size, plan.seed)
            for entry in plan.methods:
                method, base = method_label(entry), method_base(entry)
                settings = plan.method_settings.get(method, {})
                method_only, options = split_clean_options(settings)
                parts = {"model": loaded.sha256, "trigger": [t.spec() for t in triggers],
                         "target": subject.target, "method": base,
                         "settings": dataclasses.asdict(create_defense(base, method_only).settings),
                         "tune": tune.digest(), "eval": heldout.digest(), "seed": plan.seed,
                         "sequela": plan.sequela and (plan.reinjection_steps, plan.reinjection_eval_every),
                         "version": __version__}
                # Only non-default options enter the key, so cells from before each option stay valid.
                parts.update({k: v for k, v in options.items() if v != CLEAN_OPTIONS[k]})
                if DEFENSES[base].revision:
                    parts["revision"] = DEFENSES[base].revision
                key = cell_key(parts)
                if key in cache:
                    rows.append({**cache[key], "model": subject.name, "method": method})
                    reused += 1
                    if on_cell is not None:
                        on_cell(len(rows), total, rows[-1], True)
                    continue
                if shared is None:  # sent to the workers once per model, only if a cell needs it
                    shared = executor.share(SubjectData(loaded, triggers, pool, heldout))
                rows.append(None)
                jobs.append((len(rows) - 1, key, method,
                             (subject, shared, size, base, settings, plan, device)))
    computed = failed = 0
    done = reused
    for outcome in executor.map(bench_cell, [job[3] for job in jobs], device=device):
        slot, key, method, args = jobs[outcome.index]
        if outcome.ok:
            row = {"key": key, **outcome.value, "method": method}
            with cache_path.open("a") as handle:  # at once: a later interrupt keeps this cell
                handle.write(json.dumps(row) + "\n")
            computed += 1
        else:
            subject = args[0]
            row = {"key": key, "model": subject.name, "attack": subject.attack, "clean_images": args[2],
                   "method": method, "error": outcome.error, "exit_code": outcome.exit_code}
            failed += 1
        rows[slot] = row
        done += 1
        if on_cell is not None:
            on_cell(done, total, row, False)
    finished = [r for r in rows if r is not None]
    summary = summarize([r for r in finished if "error" not in r])
    env = environment_info(torch_device, plan.seed) if torch_device is not None else {"device": device,
                                                                                       "seed": plan.seed}
    result = BenchResult(rows=finished, summary=summary, recommended=recommend(summary), computed=computed,
                         reused=reused, seconds=time.perf_counter() - started,
                         environment={**env, "executor": executor.info()}, failed=failed)
    write_outputs(result, out_dir)
    return result


# -- summary and outputs --------------------------------------------------------------------------

def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per clean size x method: worst and mean residual ASR, mean and worst accuracy cost."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["clean_images"], row["method"]), []).append(row)
    summary = []
    for (size, method), cells in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        summary.append({
            "clean_images": size, "method": method, "models": len(cells),
            "worst_asr": max(c["asr_after"] for c in cells),
            "mean_asr": sum(c["asr_after"] for c in cells) / len(cells),
            "mean_accuracy_drop": sum(c["accuracy_drop"] for c in cells) / len(cells),
            "worst_accuracy_drop": max(c["accuracy_drop"] for c in cells),
            "mean_seconds": sum(c["seconds"] for c in cells) / len(cells),
        })
    return summary


def recommend(summary: Sequence[dict[str, Any]]) -> dict[int, str | None]:
    """Per clean size: the lowest worst-case ASR among methods within the accuracy gate on every model."""
    best: dict[int, str | None] = {}
    for size in sorted({s["clean_images"] for s in summary}, reverse=True):
        eligible = [s for s in summary if s["clean_images"] == size
                    and round(s["worst_accuracy_drop"], 6) <= MAX_ACCURACY_COST]  # as clean's gate
        best[size] = min(eligible, key=lambda s: (s["worst_asr"], s["mean_asr"], s["mean_accuracy_drop"]),
                         )["method"] if eligible else None
    return best


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def _fmt(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else value


def write_outputs(result: BenchResult, out_dir: Path) -> None:
    """bench.json, bench.csv and scatter.png, each written atomically."""
    with atomic_output(out_dir / "bench.json", force=True) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    with atomic_output(out_dir / "bench.csv", force=True) as tmp:
        tmp.write_text(to_csv(result.rows))
    with atomic_output(out_dir / "scatter.png", force=True) as tmp:
        plot_scatter(result.rows, tmp)
