"""Evaluation-pass speed: the one predictor (``core.predict``: inference_mode, BatchNorm folded on
an evaluation copy, one copy back) against a bare ``no_grad`` torch loop over the same images at
the same batch size, and a sequential vs a full library scan (forward passes and seconds).

Models: the shipped ``bd_cnn_small`` on real MNIST, and timm ResNet-18 / ViT-tiny at 64x64 RGB with
random weights on synthetic images (timing only: their predictions mean nothing). Runs alternate
(bare, predictor, bare, ...) and the table gives medians, one thread.
Usage: OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/scan_throughput.py [--repeats 5] [--images 512]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import DATA, SAMPLES, machine
from torch import nn

from bdaudit.core import predict as predict_mod
from bdaudit.core.data import resolve_data, to_float
from bdaudit.core.predict import Predictor
from bdaudit.detect.probe import ProbeSettings, evaluate_triggers
from bdaudit.models.checkpoint import load_model
from bdaudit.triggers import default_triggers


@torch.no_grad()
def bare_loop(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """What every evaluation pass did before: no_grad, the model itself, a copy back per batch."""
    model.eval()
    return torch.cat([model(to_float(images[s:s + batch_size])).argmax(1).cpu()
                      for s in range(0, len(images), batch_size)])


def medians(repeats: int, funcs: dict[str, Callable[[], object]]) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeats):  # interleaved, so load on the shared machine hits each alike
        for name, func in funcs.items():
            started = time.process_time()
            func()
            times[name].append(time.process_time() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def timm_model(name: str) -> nn.Module:
    import timm

    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    # Random init leaves BatchNorm at mean 0 / var 1: give it real statistics so folding is not trivial.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval().to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--models", nargs="*", default=["bd_cnn_small", "resnet18", "vit_tiny_patch16_224"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    print(f"machine: {machine()}; {args.images} images, batch {args.batch_size}, median of {args.repeats}")
    print("| model | input | bare no_grad loop img/s | predictor img/s | speed-up | argmax agree | "
          "measured batch | scan full / sequential: forwards | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        scan_cell = "—"
        if name == "bd_cnn_small":
            loaded = load_model(SAMPLES / "badnets.safetensors")
            model = loaded.classifier().to(memory_format=torch.channels_last)
            split = resolve_data(DATA / "train", loaded.config, eval_dir=DATA / "eval")
            images, shape = split.tune.images[:args.images], "1x28x28 MNIST"
            heldout = split.heldout
        else:
            model = timm_model(name)
            gen = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (args.images, 3, 64, 64), generator=gen, dtype=torch.uint8)
            shape, heldout = "3x64x64 synthetic (timing only)", None
        reference = bare_loop(model, images, args.batch_size)
        agree = bool(torch.equal(Predictor(model, device, args.batch_size).labels(images)[0], reference))
        times = medians(args.repeats, {
            "bare": lambda m=model, x=images: bare_loop(m, x, args.batch_size),
            "predictor": lambda m=model, x=images: Predictor(m, device, args.batch_size).labels(x)})
        predict_mod._MEASURED.clear()
        auto = Predictor(model, device)
        auto.labels(images)
        chosen = next(iter(predict_mod._MEASURED.values()), "—")
        if heldout is not None:
            triggers = default_triggers()
            full = evaluate_triggers(model, heldout, triggers, ProbeSettings(probe="full", batch_size=args.batch_size),
                                     device=device)
            seq_t = medians(args.repeats, {
                "full": lambda m=model, h=heldout, t=triggers: evaluate_triggers(m, h, t, ProbeSettings(
                    probe="full", batch_size=args.batch_size), device=device),
                "seq": lambda m=model, h=heldout, t=triggers: evaluate_triggers(m, h, t, ProbeSettings(
                    batch_size=args.batch_size), device=device)})
            seq = evaluate_triggers(model, heldout, triggers, ProbeSettings(batch_size=args.batch_size), device=device)
            scan_cell = (f"{full.forward_passes} / {seq.forward_passes} | {seq_t['full']:.2f} / {seq_t['seq']:.2f}")
        else:
            scan_cell = "— | —"
        n = len(images)
        print(f"| {name} | {shape} | {n / times['bare']:.0f} | {n / times['predictor']:.0f} | "
              f"{times['bare'] / times['predictor']:.2f}x | {agree} | {chosen} | {scan_cell} |", flush=True)


if __name__ == "__main__":
    main()
