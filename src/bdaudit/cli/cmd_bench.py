"""``bdaudit bench``: compare defenses on the same backdoored models and clean data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bdaudit.cli.app import app, guard_outputs, guarded, parse_settings, with_flags, write_rendered
from bdaudit.cli.batch import ExecutorName, RayAddress
from bdaudit.cli.options import Debug, Device, HtmlOut, Quiet, Seed
from bdaudit.core.errors import BdauditError

PLANT = "Planting (without --models)"
BENCH_OUTPUTS = ("cells.jsonl", "bench.json", "bench.csv", "scatter.png")


def split_names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def method_settings(items: list[str] | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--set METHOD.KEY=VALUE`` → per-method settings."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in parse_settings(items).items():
        method, dot, name = key.partition(".")
        if not dot or method not in methods:
            raise BdauditError(f"--set takes METHOD.KEY=VALUE with METHOD one of {', '.join(methods)}, "
                               f"not '{key}={value}'")
        grouped.setdefault(method, {})[name] = value
    return grouped


@app.command()
@guarded(rollback=False)
def bench(
    clean_data: Annotated[Path, typer.Option(help="Clean labelled images the defenses tune on "
                                             "(subsets of it are drawn per --clean-size).", show_default=False)],
    eval_data: Annotated[Path, typer.Option(help="Held-out images for accuracy and ASR.", show_default=False)],
    models: Annotated[Path | None, typer.Option(help="A manifest of backdoored models (e.g. "
                                                "sample_models/manifest.yaml).")] = None,
    attacks: Annotated[str | None, typer.Option(help="Comma-separated: manifest entries to use, or attacks "
                                                "to plant on --data.")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated defenses (default: all); LABEL=NAME "
                                                "adds a variant of NAME with its own --set LABEL.KEY=VALUE.")] = None,
    clean_size: Annotated[list[int] | None, typer.Option(help="Clean images per cell (repeatable).")] = None,
    clean_fraction: Annotated[list[float] | None, typer.Option(help="Clean images as a share of the models' "
                                                               "training set (repeatable; needs "
                                                               "--train-size with --models).")] = None,
    train_size: Annotated[int | None, typer.Option(help="The models' training-set size (default: the "
                                                   "number of images in --data when planting).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="METHOD.KEY=VALUE method setting "
                                                   "(repeatable), e.g. sft.epochs=30.")] = None,
    no_sequela: Annotated[bool, typer.Option("--no-sequela", help="Skip the MIA and re-injection "
                                             "probes per cell.")] = False,
    reinjection_steps: Annotated[int, typer.Option(help="Retuning-attack budget per cell.")] = 60,
    out_dir: Annotated[Path, typer.Option(help="Results folder: cells.jsonl (the resume cache), bench.json, "
                                          "bench.csv, scatter.png.")] = Path("bench_out"),
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Training images to plant on.",
                                              rich_help_panel=PLANT)] = None,
    arch: Annotated[str, typer.Option(help="Architecture to plant.", rich_help_panel=PLANT)] = "bd_cnn_small",
    poison_rate: Annotated[float, typer.Option(rich_help_panel=PLANT)] = 0.1,
    target: Annotated[int, typer.Option(rich_help_panel=PLANT)] = 0,
    epochs: Annotated[int, typer.Option(help="Planting epochs.", rich_help_panel=PLANT)] = 15,
    device: Device = "auto",
    seed: Seed = 0,
    html: HtmlOut = None,
    quiet: Quiet = False,
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    debug: Debug = False,
) -> None:
    """Apply each defense to each backdoored model at each clean-data size; tables, JSON, CSV, plot.

    Cells already in OUT_DIR/cells.jsonl (same model, data, settings, seed) are reused, so an
    interrupted bench resumes where it stopped. Exit 0 on completion, 2 on bad input; a cell that
    fails is reported (and retried by the next run) while the others go on, then exit 2 (bad input)
    or 3 (anything else).
    """
    # Heavy imports (torch, timm) only once a command runs: `bdaudit --help` and usage errors stay fast.
    from bdaudit import api
    from bdaudit.report.render import bench_tables
    from bdaudit.workflows.executors import create_executor

    guard_outputs([*(("--out-dir", out_dir / name) for name in BENCH_OUTPUTS), ("--html", html)],
                  [clean_data, eval_data, models, data])
    console = Console(highlight=False)
    chosen_methods = split_names(methods) or sorted(api.DEFENSES)
    subjects: list[api.Subject]
    if (models is None) == (data is None):
        raise BdauditError("bench needs exactly one source of models: --models MANIFEST or --data DIR to plant on")
    if models is not None:
        subjects = api.subjects_from_manifest(models, split_names(attacks))
        guard_outputs([("--out-dir", out_dir / name) for name in BENCH_OUTPUTS], [s.path for s in subjects])
    else:
        assert data is not None
        names = split_names(attacks)
        if not names:
            raise BdauditError("--data plants models: name the attacks with --attacks badnets,blended,...")
        train_size = train_size or sum(1 for p in data.rglob("*") if p.is_file())
        subjects = api.plant_subjects(api.DataOptions(data, eval_data), names, out_dir / "models",
                                  api.PlantOptions(arch=arch, poison_rate=poison_rate, target=target, epochs=epochs),
                                  api.Runtime(device, 128, seed),
                                  on_plant=lambda a: None if quiet else console.print(f"planting {a} ..."))
    sizes = api.clean_sizes_from(clean_fraction or (), clean_size or (), train_size)
    plan = api.BenchPlan(methods=tuple(chosen_methods), clean_sizes=sizes or (100,),
                     method_settings=method_settings(set_, [api.method_label(m) for m in chosen_methods]),
                     sequela=not no_sequela,
                     reinjection_steps=reinjection_steps, seed=seed)

    def progress(index: int, total: int, row: dict[str, Any], reused: bool) -> None:
        if "error" in row:
            console.print(f"[{index}/{total}] {row['model']} {row['clean_images']} clean {row['method']}: "
                          f"FAILED: {with_flags(row['error'])}", markup=False)
        elif not quiet:
            took = "cached" if reused else f"{row['seconds']:.0f}s"
            console.print(f"[{index}/{total}] {row['model']} {row['clean_images']} clean {row['method']}: "
                          f"CA {row['ca_after']:.1%} ASR {row['asr_before']:.1%} -> {row['asr_after']:.1%} "
                          f"({took})", markup=False)

    with create_executor(executor, ray_address) as engine:
        result = api.bench(subjects, api.DataOptions(clean_data, eval_data), plan, out_dir,
                           runtime=api.Runtime(device, seed=seed), on_cell=progress, executor=engine)
    if html is not None:
        write_rendered(result.to_dict(), None, html)
    if not quiet:
        for table in bench_tables(result.to_dict()):
            console.print(table)
    console.print(f"bench: {result.computed} cells computed, {result.reused} reused, {result.failed} failed, "
                  f"{result.seconds:.0f}s; results in {out_dir}/ (bench.json, bench.csv, scatter.png)")
    if result.failed:
        codes = [row.get("exit_code", 3) for row in result.rows if "error" in row]
        raise typer.Exit(max(codes))
