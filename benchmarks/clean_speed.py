"""Issue 16: default `clean` CPU time, this tree vs a base tree ("today"), beside plain FT at the
same epochs measured on the base tree; plus the library-probe forward passes of default `scan`.

Each run is its own process (one thread), runs are interleaved (the order rotates per sample) so
load on the shared machine hits every variant alike, and the cleaned weights of the base and new
default runs are compared tensor by tensor (the history must not change training).

Usage: OMP_NUM_THREADS=1 python benchmarks/clean_speed.py --base /work/wt/base/src [--models badnets wanet]
       [--repeats 1] [--scan]   (appends to results/clean_speed.jsonl and prints Markdown tables)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
DATA = ROOT / "sample_data" / "mnist"
MODELS = ["badnets", "blended", "wanet", "lowfreq", "trojannn", "input_aware", "badencoder"]
# label -> (tree, method, unlearn fraction)
VARIANTS = {"today_default": ("base", "ftsam", 0.3), "new_default": ("new", "ftsam", 0.3),
            "today_ft": ("base", "ft", 0.0)}


def child_clean(model: str, method: str, fraction: float, out: str) -> dict[str, Any]:
    import torch

    from bdaudit import api

    torch.set_num_threads(1)
    started_cpu, started = time.process_time(), time.perf_counter()
    path, data, runtime = SAMPLES / f"{model}.safetensors", api.DataOptions(DATA / "clean", DATA / "eval"), \
        api.Runtime("cpu", 256, 0)
    if hasattr(api, "CleanOptions"):  # this tree's api takes option objects; the base tree's keywords
        report = api.clean(path, data, api.CleanOptions(method, unlearn_fraction=fraction),
                           output=api.OutputOptions(Path(out)), runtime=runtime)
    else:
        report = api.clean(path, data, out, method=method, unlearn_fraction=fraction, runtime=runtime)
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    clean = report.sections["clean"]
    planted = next(t for t in clean["before"]["triggers"] if not t["error"] and t["flagged"]) \
        if any(t["flagged"] for t in clean["before"]["triggers"]) else clean["before"]["triggers"][0]
    after = {t["spec"]: t for t in clean["after"]["triggers"]}
    return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "verdict": report.to_dict()["verdict"]["status"],
            "flagged_before": sorted(t["spec"] for t in clean["before"]["triggers"] if t["flagged"]),
            "flagged_after": sorted(t["spec"] for t in clean["after"]["triggers"] if t["flagged"]),
            "ca_before": clean["before"]["clean_accuracy"], "ca_after": clean["after"]["clean_accuracy"],
            "asr_spec": planted["spec"], "asr_after": after[planted["spec"]]["asr"],
            "asr_after_ci95": after[planted["spec"]].get("asr_ci95"),
            "n_probe_after": after[planted["spec"]].get("n_probe"),
            "history_rows": len(clean["history"])}


def child_scan(model: str, data: str) -> dict[str, Any]:
    """Library probes only (detection off: measured separately): forward passes through the model
    counted by a global forward hook on the classifier wrapper, in either tree."""
    import torch

    from bdaudit import api

    torch.set_num_threads(1)
    count = [0]

    def hook(module: Any, args: Any) -> None:
        if type(module).__name__ == "NormalizedClassifier":
            count[0] += len(args[0])

    torch.nn.modules.module.register_module_forward_pre_hook(hook)
    started_cpu = time.process_time()
    # "eval": --data sample_data/mnist/eval (its 20 % holdout: 120 images); "clean+eval": --data
    # sample_data/mnist/clean --eval-data sample_data/mnist/eval (600 held-out images, as clean uses).
    options = api.DataOptions(DATA / "eval") if data == "eval" else api.DataOptions(DATA / "clean", DATA / "eval")
    if hasattr(api, "ProbeOptions"):  # this tree's api takes option objects; the base tree's keywords
        report = api.scan(SAMPLES / f"{model}.safetensors", options, api.ProbeOptions(detect="off"),
                          runtime=api.Runtime("cpu", 256, 0))
    else:
        report = api.scan(SAMPLES / f"{model}.safetensors", options, runtime=api.Runtime("cpu", 256, 0),
                          detect="off")
    scan = report.sections["scan"]
    return {"cpu_s": round(time.process_time() - started_cpu, 2), "forwards": count[0],
            "flagged": sorted(t["spec"] for t in scan["triggers"] if t["flagged"]),
            "n_probe": {t["spec"]: t.get("n_probe") for t in scan["triggers"]}}


def spawn(tree: str, args: list[str], base: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": base if tree == "base" else str(ROOT / "src")}
    done = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def run_clean(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    out = ROOT / "benchmarks" / "results" / "clean_speed.jsonl"
    labels = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        for i, model in enumerate(args.models):
            for rep in range(args.repeats):
                order = labels[(i + rep) % 3:] + labels[:(i + rep) % 3]  # rotate: load hits each alike
                row: dict[str, Any] = {"kind": "clean", "model": model, "repeat": rep,
                                       "date": time.strftime("%Y-%m-%d"), "order": order}
                for label in order:
                    tree, method, fraction = VARIANTS[label]
                    path = str(Path(tmp) / f"{model}_{label}.safetensors")
                    row[label] = spawn(tree, ["clean", model, method, str(fraction), path], args.base)
                    print(model, label, row[label], flush=True)
                row["weights_identical"] = bool(same_weights(Path(tmp) / f"{model}_today_default.safetensors",
                                                             Path(tmp) / f"{model}_new_default.safetensors"))
                for p in Path(tmp).glob(f"{model}_*.safetensors"):
                    p.unlink()
                rows.append(row)
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print("| sample | today default CPU s | new default CPU s | today plain FT CPU s | new/today | new/FT "
          "| verdict (today → new) | flagged after (today / new) | planted ASR after (today → new, new 95 % CI, n) "
          "| weights identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, n, f = r["today_default"], r["new_default"], r["today_ft"]
        ci = n["asr_after_ci95"] or [float("nan")] * 2
        print(f"| {r['model']} | {t['cpu_s']:.1f} | {n['cpu_s']:.1f} | {f['cpu_s']:.1f} | "
              f"{n['cpu_s'] / t['cpu_s']:.2f} | {n['cpu_s'] / f['cpu_s']:.2f} | {t['verdict']} → {n['verdict']} | "
              f"{', '.join(t['flagged_after']) or '—'} / {', '.join(n['flagged_after']) or '—'} | "
              f"{t['asr_after']:.1%} → {n['asr_after']:.1%} ({ci[0]:.1%}–{ci[1]:.1%}, {n['n_probe_after']}) | "
              f"{r['weights_identical']} |")
    if rows:
        vs_today = statistics.median(r["new_default"]["cpu_s"] / r["today_default"]["cpu_s"] for r in rows)
        vs_ft = statistics.median(r["new_default"]["cpu_s"] / r["today_ft"]["cpu_s"] for r in rows)
        print(f"median new/today {vs_today:.2f}, median new/FT {vs_ft:.2f}")


def run_scan(args: argparse.Namespace) -> None:
    out = ROOT / "benchmarks" / "results" / "clean_speed.jsonl"
    print("| sample | forward passes today | new | new/today | CPU s today / new | flagged (today / new) "
          "| images per trigger (new) |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for i, model in enumerate(args.models):
        trees = ["base", "new"] if i % 2 == 0 else ["new", "base"]
        row: dict[str, Any] = {"kind": "scan", "model": model, "data": args.scan_data,
                               "date": time.strftime("%Y-%m-%d")}
        for tree in trees:
            row[tree] = spawn(tree, ["scan", model, args.scan_data], args.base)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        b, n = row["base"], row["new"]
        ratios.append(n["forwards"] / b["forwards"])
        print(f"| {model} | {b['forwards']} | {n['forwards']} | {ratios[-1]:.2f} | "
              f"{b['cpu_s']:.2f} / {n['cpu_s']:.2f} | "
              f"{', '.join(b['flagged']) or '—'} / {', '.join(n['flagged']) or '—'} | "
              f"{', '.join(str(v) for v in n['n_probe'].values())} |", flush=True)
    print(f"median forward-pass ratio {statistics.median(ratios):.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        result = (child_clean(rest[0], rest[1], float(rest[2]), rest[3]) if kind == "clean"
                  else child_scan(rest[0], rest[1]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="/work/wt/base/src", help="PYTHONPATH of the 'today' tree")
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scan", action="store_true", help="the scan forward-pass table instead")
    parser.add_argument("--scan-data", choices=["clean+eval", "eval"], default="clean+eval")
    args = parser.parse_args()
    run_scan(args) if args.scan else run_clean(args)


if __name__ == "__main__":
    main()
