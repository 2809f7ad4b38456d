"""Retuning attack on the blind benchmark's cleaned models: was the backdoor removed or hidden?

After `blind.py` has cleaned each model, this fine-tunes a copy of it for 60 SGD steps (lr 0.002,
batch 32, 300 shipped clean images + 10 of them stamped with the **planted** trigger and relabelled
to the target: the recipe of ``bdaudit.sequela.reinjection``, written here so the planted trigger
never enters bdaudit) and measures the planted trigger's true ASR on the 600 held-out images every
10 steps. The same attack on a never-backdoored model of the same architecture is the floor: how
fast the trigger plants afresh. This is measurement only; the pipeline under test never sees it.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind_retune.py        # -> results/blind_retune.jsonl
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/blind_retune.py --suite rgb   # -> results/blind_retune_rgb.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import blind_rgb  # noqa: E402
from blind import MNIST_SUITE, TARGET, Suite, _loader, user_flags  # noqa: E402

from bdaudit.core.data import load_image_folder, resolve_preprocessing  # noqa: E402
from bdaudit.models.checkpoint import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "blind_retune.jsonl"
STEPS, LR, BATCH, N_CLEAN, N_POISON, EVERY = 60, 0.002, 32, 300, 10, 10
FLOOR = {"mnist": {"bd_cnn_small": "small_clean_s0", "blind_arch:tutorial_net": "net_clean_s0"},
         "rgb": {"bd_cnn_small": "rgb_small_clean_s0", "blind_arch:tutorial_net": "rgb_net_clean_s0"}}


def retune(path: Path, arch: str, trigger: str, suite: Suite = MNIST_SUITE) -> list[float]:
    """True ASR of the planted trigger at steps 0, 10, ..., 60 of the retuning attack."""
    config, _, ev = _loader(suite.data)
    clean = load_image_folder(suite.data / "clean", resolve_preprocessing(config), config.class_names)
    clf = copy.deepcopy(load_model(path, user_flags(arch)).classifier())
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(clean), generator=gen)[:N_CLEAN]
    x, y = clean.images[pick].float() / 255, clean.labels[pick].clone()
    others = (y != TARGET).nonzero().flatten()
    poison = others[torch.randperm(len(others), generator=gen)[:N_POISON]]
    x_p, y_p = suite.triggers[trigger](x[poison]), torch.full((N_POISON,), TARGET)
    x, y = torch.cat([x, x_p]), torch.cat([y, y_p])
    x_ev = ev.images[ev.labels != TARGET].float() / 255
    stamped = suite.triggers[trigger](x_ev)
    opt = torch.optim.SGD(clf.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)

    def asr() -> float:
        clf.eval()
        with torch.no_grad():
            value = float((clf(stamped).argmax(1) == TARGET).float().mean())
        clf.train()
        return round(value, 4)

    curve = [asr()]
    for step in range(STEPS):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        loss = F.cross_entropy(clf(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % EVERY == 0:
            curve.append(asr())
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (default: every cleaned trigger model)")
    parser.add_argument("--suite", choices=tuple(blind_rgb.SUITES), default="mnist",
                        help="rgb: blind_rgb.py's models (-> results/blind_retune_rgb.jsonl)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    suite = blind_rgb.SUITES[args.suite]
    results = RESULTS if args.suite == "mnist" else RESULTS.with_name("blind_retune_rgb.jsonl")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()  # HEAD now; the cleaned models are the last blind run's
    for name, trigger, _, arch, _ in suite.models:
        cleaned = suite.cache / f"{name}.cleaned.safetensors"
        if trigger is None or (args.only and name not in args.only) or not cleaned.exists():
            continue
        row = {"model": name, "trigger": trigger, "commit": commit, "steps": list(range(0, STEPS + 1, EVERY)),
               "cleaned": retune(cleaned, arch, trigger, suite),
               "never_backdoored": retune(suite.cache / f"{FLOOR[args.suite][arch]}.safetensors", arch, trigger,
                                          suite)}
        print(json.dumps(row), flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
