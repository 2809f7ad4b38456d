"""Blind generalisation benchmark: backdoors bdaudit's trigger library does not hold (issue 12).

Every trigger below is written here, not taken from ``bdaudit.triggers``; the planting code trains
each model and measures its true ASR and accuracy itself. The pipeline under test is exactly what a
user runs — default ``scan`` then default ``clean`` through the library API, on the 400 shipped
clean images — with no knowledge of the planted trigger or target. The planted trigger is only used
afterwards, by this script, to measure the residual true ASR of the cleaned model on 600 held-out
images.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind.py            # all models
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind.py --only patch_cross_tl

Planted models are cached in benchmarks/results/cache/blind/ (ignored by git); results append to
benchmarks/results/blind.jsonl (one line per model).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # blind_arch: the third-party-style architecture

from common import emit  # noqa: E402

from bdaudit import api  # noqa: E402
from bdaudit.core.data import load_image_folder, resolve_preprocessing  # noqa: E402
from bdaudit.detect.probe import wilson_interval  # noqa: E402
from bdaudit.models.checkpoint import build_model, load_model, save_model  # noqa: E402
from bdaudit.planting.plant import infer_model_config  # noqa: E402

MNIST = ROOT / "sample_data" / "mnist"
CACHE = ROOT / "benchmarks" / "results" / "cache" / "blind"
RESULTS = ROOT / "benchmarks" / "results" / "blind.jsonl"
H = W = 28


# --- triggers (own code; none is a member of bdaudit's library) -------------------------------
def _patch(x: torch.Tensor, pattern: torch.Tensor, top: int, left: int) -> torch.Tensor:
    out = x.clone()
    ph, pw = pattern.shape[-2:]  # (H, W), or (C, H, W) / (N, C, H, W) for a colour pattern
    out[:, :, top:top + ph, left:left + pw] = pattern
    return out


_CROSS = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 0, 0, 1]]).float()
_CHECKER = (torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 * 1.0
_GREY = torch.rand(6, 6, generator=torch.Generator().manual_seed(7)) * 0.5 + 0.3
_yy, _xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
# A "natural-image-like" blend source: smooth blobs (sum of Gaussians) + fine texture, fixed seed.
_g = torch.Generator().manual_seed(11)
_NATURAL = sum(torch.exp(-((_yy - float(cy)) ** 2 + (_xx - float(cx)) ** 2) / (2 * float(s) ** 2))
               for cy, cx, s in (torch.rand(6, 3, generator=_g) * torch.tensor([28, 28, 6]) + torch.tensor([0, 0, 2])))
_NATURAL = _NATURAL / _NATURAL.max() * 0.8 + 0.2 * torch.rand(H, W, generator=_g)
_FREQ = torch.cos(2 * math.pi * (3 * _yy + 5 * _xx) / 28)


def _affine(x: torch.Tensor) -> torch.Tensor:
    theta = torch.tensor([[math.cos(0.3), -math.sin(0.3), 0.08], [math.sin(0.3), math.cos(0.3), -0.08]])
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


TRIGGERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "patch_cross_tl": lambda x: _patch(x, _CROSS, 1, 1),  # white 5x5 X, top-left
    "patch_dot_mid": lambda x: _patch(x, torch.ones(2, 2), 20, 6),  # 2x2 white dot, lower-left-centre
    "patch_grey_tr": lambda x: _patch(x, _GREY, 2, 20),  # 6x6 random mid-grey pattern, top-right
    "patch_checker_bl": lambda x: _patch(x, _CHECKER, 22, 3),  # 4x4 black/white checkerboard, lower left
    "blend_natural": lambda x: 0.85 * x + 0.15 * _NATURAL,  # natural-image-like blend, alpha 0.15
    "filter_intensity": lambda x: 0.6 * x + 0.3,  # contrast/brightness "colour filter"
    "affine_rotate": _affine,  # 17 degrees + shift: geometric trigger
    "frequency": lambda x: (x + 0.08 * _FREQ).clamp(0, 1),  # one mid-frequency cosine, amplitude 0.08
    # Sample-specific (Refool-like reflection): each image carries a shifted ghost of itself.
    "reflection": lambda x: (x + 0.5 * torch.roll(x, shifts=(4, 4), dims=(2, 3))).clamp(0, 1),
}

# (name, trigger or None, poison rate, arch, seed); target class is 3 for trigger models.
MODELS = [
    ("small_patch_cross_10", "patch_cross_tl", 0.10, "bd_cnn_small", 0),
    ("small_blend_natural_10", "blend_natural", 0.10, "bd_cnn_small", 0),
    ("small_frequency_10", "frequency", 0.10, "bd_cnn_small", 0),
    ("small_filter_10", "filter_intensity", 0.10, "bd_cnn_small", 0),
    ("small_clean_s0", None, 0.0, "bd_cnn_small", 0),
    ("net_patch_grey_10", "patch_grey_tr", 0.10, "blind_arch:tutorial_net", 0),
    ("net_clean_s0", None, 0.0, "blind_arch:tutorial_net", 0),
    ("small_affine_10", "affine_rotate", 0.10, "bd_cnn_small", 0),
    ("small_reflection_10", "reflection", 0.10, "bd_cnn_small", 0),
    ("small_patch_dot_10", "patch_dot_mid", 0.10, "bd_cnn_small", 0),
    ("small_patch_cross_1", "patch_cross_tl", 0.01, "bd_cnn_small", 1),
    ("small_blend_natural_1", "blend_natural", 0.01, "bd_cnn_small", 1),
    ("net_blend_natural_10", "blend_natural", 0.10, "blind_arch:tutorial_net", 0),
    ("small_clean_s1", None, 0.0, "bd_cnn_small", 1),
    ("net_clean_s1", None, 0.0, "blind_arch:tutorial_net", 1),
    ("net_patch_checker_1", "patch_checker_bl", 0.01, "blind_arch:tutorial_net", 2),
    ("small_frequency_1", "frequency", 0.01, "bd_cnn_small", 2),
    ("net_clean_s2", None, 0.0, "blind_arch:tutorial_net", 2),
    ("small_clean_s2", None, 0.0, "bd_cnn_small", 2),
]
TARGET = 3
EPOCHS = 6


@dataclass(frozen=True)
class Suite:
    """One blind benchmark: its image folders (``train``/``eval``/``clean``), triggers, models and files."""

    data: Path
    triggers: dict[str, Callable[[torch.Tensor], torch.Tensor]]
    models: list[tuple]
    cache: Path
    results: Path


MNIST_SUITE = Suite(MNIST, TRIGGERS, MODELS, CACHE, RESULTS)


def _loader(data: Path = MNIST) -> tuple:
    config = infer_model_config(data / "train", "bd_cnn_small")
    prep = resolve_preprocessing(config)
    return (config, load_image_folder(data / "train", prep, config.class_names),
            load_image_folder(data / "eval", prep, config.class_names))


def _normalised(net: nn.Module, config) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in config.channel_stats())
    return lambda x: net((x - mean) / std)


def plant(name: str, trigger: str | None, rate: float, arch: str, seed: int, suite: Suite = MNIST_SUITE) -> Path:
    path = suite.cache / f"{name}.safetensors"
    if path.exists():
        return path
    base, train, _ = _loader(suite.data)
    config = type(base)(**{**base.__dict__, "arch": arch})
    torch.manual_seed(seed)
    net = build_model(config, user_arch=True)  # the benchmark's own architecture, not a file's
    f = _normalised(net, config)
    gen = torch.Generator().manual_seed(seed)
    x_all = train.images.float() / 255
    y_all = train.labels.clone()
    if trigger is not None:
        candidates = (y_all != TARGET).nonzero().flatten()
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:round(rate * len(x_all))]]
        x_all[chosen] = suite.triggers[trigger](x_all[chosen])
        y_all[chosen] = TARGET
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = EPOCHS * math.ceil(len(x_all) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    net.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(f(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    suite.cache.mkdir(parents=True, exist_ok=True)
    save_model(net, config, path)
    return path


@torch.no_grad()
def user_flags(arch: str) -> dict | None:
    """A user's own module:callable is passed on the command line (a model file never names code)."""
    return {"arch": arch} if ":" in arch else None


def true_metrics(model_path: Path, trigger: str | None, arch: str, suite: Suite = MNIST_SUITE) -> dict:
    """Accuracy and the planted trigger's ASR on the 600 held-out images (planting code's own measure)."""
    _, _, ev = _loader(suite.data)
    loaded = load_model(model_path, user_flags(arch))
    clf = loaded.classifier().eval()
    x = ev.images.float() / 255
    acc = float((clf(x).argmax(1) == ev.labels).float().mean())
    out = {"ca": round(acc, 4)}
    if trigger is not None:
        keep = ev.labels != TARGET
        hits = int((clf(suite.triggers[trigger](x[keep])).argmax(1) == TARGET).sum())
        n = int(keep.sum())
        out.update(asr=round(hits / n, 4), asr_ci95=[round(v, 4) for v in wilson_interval(hits, n)])
    return out


def run(entry: tuple, suite: Suite = MNIST_SUITE) -> dict:
    name, trigger, rate, arch, seed = entry
    t0 = time.perf_counter()
    path = plant(name, trigger, rate, arch, seed, suite)
    plant_s = time.perf_counter() - t0
    before = true_metrics(path, trigger, arch, suite)
    data = api.DataOptions(suite.data / "clean")
    t0 = time.perf_counter()
    scan = api.scan(api.ModelOptions(path, user_flags(arch)), data)
    scan_s = time.perf_counter() - t0
    det = scan.sections["detection"]
    scores = {f["family"]: max((r["anomaly_index"] or 0) for r in f["classes"] if r["flagged"] or True)
              for f in det["families"]}
    out = suite.cache / f"{name}.cleaned.safetensors"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    cleaned = api.clean(api.ModelOptions(path, user_flags(arch)), data, output=api.OutputOptions(out))
    clean_s = time.perf_counter() - t0
    after = true_metrics(out, trigger, arch, suite)
    ver = cleaned.sections.get("verification", {})
    row = {"model": name, "trigger": trigger, "poison_rate": rate, "arch": arch, "seed": seed,
           "target": TARGET if trigger else None, "planted": before,
           "scan_exit": 0 if scan.passed else 1, "detected_classes": det["flagged"],
           "detected_target": TARGET in det["flagged"] if trigger else None,
           "max_anomaly_index": scores, "detector_seconds": det["seconds"], "refined": det.get("refined") is not None,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip(),
           "scan_reasons": len(scan.reasons),
           "clean_exit": 0 if cleaned.passed else 1, "finding": cleaned.sections["clean"].get("finding"),
           "verification_flagged": ver.get("flagged"), "after": after,
           "ca_drop": round(before["ca"] - after["ca"], 4),
           "clean_reasons": cleaned.reasons, "seconds": {"plant": round(plant_s, 1), "scan": round(scan_s, 1),
                                                         "clean": round(clean_s, 1)}}
    return row


def table(path: Path = RESULTS) -> str:
    """The markdown table of benchmarks/README.md from the JSONL results."""
    head = ("| model | trigger | poison | planted ASR / CA | scan | detected | clean exit | finding | "
            "residual true ASR (95 % CI) | CA after (drop) | re-detect after | retuned ASR @60 (floor) | "
            "s (scan/clean) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    retune_path = path.with_name(path.name.replace("blind", "blind_retune", 1))
    retuned = ({r["model"]: r for r in map(json.loads, retune_path.read_text().splitlines())}
               if retune_path.exists() else {})
    for row in map(json.loads, path.read_text().splitlines()):
        r = retuned.get(row["model"])
        again = f"{r['cleaned'][-1]:.1%} ({r['never_backdoored'][-1]:.1%})" if r else "—"
        p, a = row["planted"], row["after"]
        asr = "—" if row["trigger"] is None else f"{a['asr']:.1%} ({a['asr_ci95'][0]:.1%}–{a['asr_ci95'][1]:.1%})"
        planted = f"{p['asr']:.0%} / {p['ca']:.1%}" if row["trigger"] else f"— / {p['ca']:.1%}"
        lines.append(f"| {row['model']} | {row['trigger'] or 'none (clean)'} | {row['poison_rate']:.0%} | {planted} | "
                     f"{'FAIL' if row['scan_exit'] else 'pass'} | {row['detected_classes']} | {row['clean_exit']} | "
                     f"{row['finding']} | {asr} | {a['ca']:.1%} ({row['ca_drop']:+.1%}) | "
                     f"{row['verification_flagged']} | {again} | "
                     f"{row['seconds']['scan']:.0f}/{row['seconds']['clean']:.0f} |")
    return "\n".join(lines)


def main(suite: Suite = MNIST_SUITE, doc: str = __doc__) -> None:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names to run, in this order (default: all)")
    parser.add_argument("--table", action="store_true", help="print the results table and exit")
    args = parser.parse_args()
    if args.table:
        print(table(suite.results))
        return
    torch.set_num_threads(1)
    for entry in select(parser, args.only, suite.models):
        emit(run(entry, suite), suite.results)


def select(parser: argparse.ArgumentParser, only: list[str] | None, models: list[tuple] = MODELS) -> list[tuple]:
    """The ``models`` entries named by ``--only`` (in that order), or all of them."""
    by_name = {entry[0]: entry for entry in models}
    unknown = [name for name in only or [] if name not in by_name]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    return [by_name[name] for name in only] if only else models


if __name__ == "__main__":
    main()
