"""Clean labelled data: ImageFolder loading, preprocessing and the shared tuning/held-out split.

Images are kept as uint8 tensors at the model's channels and input size; batches are served as
floats in [0, 1] (triggers act there) and the classifier normalises (see ``NormalizedClassifier``).
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bdaudit.core.config import ModelConfig
from bdaudit.core.errors import DataError, missing_data, summarize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Preprocessing:
    """What every command does to a file before the model sees it."""

    in_chans: int
    input_size: tuple[int, int]

    @property
    def pil_mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"


def resolve_preprocessing(config: ModelConfig) -> Preprocessing:
    """The one place that turns a model config into image preprocessing."""
    if config.in_chans not in (1, 3):
        raise DataError(f"models with {config.in_chans} input channels are not supported; "
                        "bdaudit reads 1-channel (grayscale) or 3-channel (RGB) images")
    return Preprocessing(in_chans=config.in_chans, input_size=config.input_size)


@dataclass
class ImageSet:
    """Labelled images as uint8 (N, C, H, W) with their class names and source files."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    files: list[str] = field(default_factory=list)
    root: Path | None = None
    class_source: str = "folder"  # "model": order from the model's class names

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: torch.Tensor) -> ImageSet:
        files = [self.files[i] for i in index.tolist()] if self.files else []
        return ImageSet(self.images[index], self.labels[index], self.class_names, files,
                        self.root, self.class_source)

    def counts(self) -> dict[str, int]:
        per_class = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return {name: int(n) for name, n in zip(self.class_names, per_class, strict=True)}

    def digest(self) -> str:
        """sha256 of pixels and labels: identifies the exact data a model was tuned on."""
        digest = hashlib.sha256(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int, device: torch.device | str = "cpu",
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In-order float batches in [0, 1]."""
        for start in range(0, len(self), batch_size):
            yield (to_float(self.images[start:start + batch_size], device),
                   self.labels[start:start + batch_size].to(device))


def to_float(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    if torch.device(device).type == "cuda":  # pinned host pages: an asynchronous uint8 copy (4x smaller than float)
        return images.pin_memory().to(device, non_blocking=True).float().div_(255.0)
    return images.to(device).float().div_(255.0)


def _read_image(path: Path, prep: Preprocessing) -> np.ndarray:
    # PIL only warns between its pixel limit and twice it; a file that size is refused as well.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _decode(path, prep)


def _decode(path: Path, prep: Preprocessing) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert(prep.pil_mode)
        height, width = prep.input_size
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise missing_data(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data folder {root} has no class sub-folders; lay it out as "
                        "DIR/<class>/<image files>")
    return folders


def load_image_folder(root: str | Path, prep: Preprocessing,
                      class_names: tuple[str, ...] | None = None) -> ImageSet:
    """Read ``root/<class>/*`` into an ImageSet; every problem is reported in one error."""
    root = Path(root)
    folders = _class_folders(root)
    if class_names:
        unknown = [f.name for f in folders if f.name not in class_names]
        if unknown:
            raise DataError(f"{root}: class folders the model does not have: {summarize(unknown)}"
                            f"; the model's classes are {summarize(list(class_names), 12)}")
        names, source = tuple(class_names), "model"
    else:
        names, source = tuple(f.name for f in folders), "folder"
    files_by_class = {f.name: sorted(p for p in f.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                      for f in folders}
    empty = [name for name, files in files_by_class.items() if not files]
    if empty:
        raise DataError(f"{root}: empty class folders (no {'/'.join(IMAGE_SUFFIXES)} files): "
                        f"{summarize(empty)}")
    arrays, labels, files, unreadable = [], [], [], []
    for name, paths in files_by_class.items():
        for path in paths:
            try:
                arrays.append(_read_image(path, prep))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise DataError(f"{root}: image {path.relative_to(root)} has more pixels than the "
                                f"decompression-bomb limit ({Image.MAX_IMAGE_PIXELS}); remove or shrink "
                                "it") from None
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error):
                unreadable.append(str(path.relative_to(root)))
                continue
            labels.append(names.index(name))
            files.append(str(path.relative_to(root)))
    if unreadable:
        raise DataError(f"{root}: {len(unreadable)} unreadable image file(s): "
                        f"{summarize(unreadable)}; remove or re-encode them")
    return ImageSet(torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.long),
                    names, files, root, source)


def stratified_split(data: ImageSet, holdout: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Seeded per-class split into (tuning, held-out); the same for every command."""
    if not 0.0 < holdout < 1.0:
        raise DataError(f"`holdout` must be between 0 and 1 (exclusive), not {holdout}")
    gen = torch.Generator().manual_seed(seed)
    tune_idx, held_idx = [], []
    for cls in range(data.num_classes):
        members = torch.nonzero(data.labels == cls).flatten()
        if members.numel() == 0:
            continue
        members = members[torch.randperm(members.numel(), generator=gen)]
        count = members.numel()
        n_held = min(max(1, round(count * holdout)), count - 1) if count > 1 else 0
        held_idx.append(members[:n_held])
        tune_idx.append(members[n_held:])
    return data.subset(torch.cat(tune_idx).sort().values), data.subset(torch.cat(held_idx).sort().values)


@dataclass
class DataSplit:
    """The tuning part and the held-out part every command shares, and how they were made."""

    tune: ImageSet
    heldout: ImageSet
    info: dict[str, Any]


def resolve_data(data_dir: str | Path, config: ModelConfig, holdout: float = 0.2, seed: int = 0,
                 eval_dir: str | Path | None = None) -> DataSplit:
    """Load ``--data`` (and ``--eval-data``) for a model and split it reproducibly."""
    prep = resolve_preprocessing(config)
    names = config.class_names
    data = load_image_folder(data_dir, prep, names)
    if names is None and data.num_classes > config.num_classes:
        raise DataError(f"{data_dir} has {data.num_classes} class folders but the model has "
                        f"{config.num_classes} classes; pass `class_names` or fix the folders")
    if names is None:  # folders name the first classes; pad so indices match the model's outputs
        data.class_names = data.class_names + tuple(
            f"class_{i}" for i in range(data.num_classes, config.num_classes))
    if eval_dir is not None:
        heldout = load_image_folder(eval_dir, prep, data.class_names)
        heldout.class_source = data.class_source
        tune = data
    else:
        tune, heldout = stratified_split(data, holdout, seed)
    if len(heldout) == 0:
        raise DataError(f"{data_dir}: no held-out images; add images or use `eval_path` DIR")
    info = {
        "path": str(data_dir),
        "eval_path": str(eval_dir) if eval_dir is not None else None,
        "class_order": data.class_source,
        "holdout": None if eval_dir is not None else holdout,
        "split_seed": seed,
        "tune_counts": tune.counts(),
        "heldout_counts": heldout.counts(),
        "tune_sha256": tune.digest(),
    }
    return DataSplit(tune=tune, heldout=heldout, info=info)
