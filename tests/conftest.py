"""Shared fixtures: small real-MNIST folders and tiny models planted once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from bdaudit.planting.common import PlantRun
from bdaudit.planting.plant import AttackChoice, PlantResult, TrainSettings, plant

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "sample_data" / "mnist"
TINY_SETTINGS = TrainSettings(epochs=8, lr=0.05, batch_size=64)

# One thread: small models gain nothing from more, and oversubscribed threads crawl under load.
torch.set_num_threads(1)


def copy_subset(source: Path, dest: Path, per_class: int) -> Path:
    """An ImageFolder with the first ``per_class`` images of each class of ``source``."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        target = dest / class_dir.name
        target.mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, target / image.name)
    return dest


@pytest.fixture(scope="session")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 real MNIST digits (100 per class) to plant tiny models on."""
    return copy_subset(MNIST / "train", tmp_path_factory.mktemp("mnist") / "train", 100)


@pytest.fixture(scope="session")
def clean_dir() -> Path:
    """The shipped clean subset (40 per class)."""
    return MNIST / "clean"


@pytest.fixture(scope="session")
def eval_dir() -> Path:
    """The shipped held-out subset (60 per class)."""
    return MNIST / "eval"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def badnets_model(train_dir: Path, eval_dir: Path, models_dir: Path) -> PlantResult:
    """A tiny CNN with a BadNets backdoor to class 0 (trained once per session)."""
    return plant(train_dir, models_dir / "badnets.safetensors", attack=AttackChoice("badnets", 0, 0.1),
                 arch="bd_cnn_tiny", settings=TINY_SETTINGS, options=PlantRun(eval_dir=eval_dir, device="cpu"))


@pytest.fixture(scope="session")
def clean_model(train_dir: Path, eval_dir: Path, models_dir: Path) -> PlantResult:
    """The same tiny CNN trained on the same data without poisoning."""
    return plant(train_dir, models_dir / "clean.safetensors", attack=AttackChoice("none"), arch="bd_cnn_tiny",
                 settings=TINY_SETTINGS, options=PlantRun(eval_dir=eval_dir, device="cpu"))
