"""Scan throughput vs the bare forward passes it needs (same model, images, batch size).

scan runs 1 + 2 x (number of triggers) forward passes over the held-out images (clean, each
trigger, each null); the target is scan time <= 1.25 x the time of those bare passes.
Usage: python benchmarks/scan_throughput.py [--model sample_models/badnets.safetensors] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import DATA, SAMPLES, machine

from bdaudit.core.data import resolve_data
from bdaudit.detect.probe import ProbeOptions, evaluate_triggers
from bdaudit.engine.loop import predict
from bdaudit.models.checkpoint import load_model
from bdaudit.triggers import default_triggers


def best_of(repeats: int, func) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(SAMPLES / "badnets.safetensors"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model)
    split = resolve_data(DATA / "train", loaded.config, eval_dir=DATA / "eval")
    images = split.tune.images[:2000]
    data = split.tune.subset(torch.arange(len(images)))
    triggers = default_triggers()
    classifier, device = loaded.classifier(), torch.device("cpu")
    passes = 1 + 2 * len(triggers)
    bare = best_of(args.repeats, lambda: [predict(classifier, images, args.batch_size, device)
                                          for _ in range(passes)])
    scan = best_of(args.repeats, lambda: evaluate_triggers(
        classifier, data, triggers, ProbeOptions(batch_size=args.batch_size, probe="full"), device=device))
    n = passes * len(images)
    print(f"machine: {machine()}")
    print(f"{len(images)} images x {passes} passes, batch {args.batch_size}")
    print(f"bare forward: {bare:.2f}s ({n / bare:.0f} img/s); scan: {scan:.2f}s ({n / scan:.0f} img/s); "
          f"ratio {scan / bare:.2f}")


if __name__ == "__main__":
    main()
