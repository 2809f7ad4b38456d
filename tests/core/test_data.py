"""Clean-data loading: layout, preprocessing, the shared split and every bad-input error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bdaudit.core.config import ModelConfig
from bdaudit.core.data import Preprocessing, load_image_folder, resolve_data, stratified_split
from bdaudit.core.errors import DataError

GRAY28 = Preprocessing(1, (28, 28))


def make_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 24),
                mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")
    return root


def test_images_are_converted_to_the_models_channels_and_size(tmp_path: Path) -> None:
    data = load_image_folder(make_folder(tmp_path, {"a": 3, "b": 2}), GRAY28)
    assert data.images.shape == (5, 1, 28, 28) and data.images.dtype.is_floating_point is False
    assert data.class_names == ("a", "b") and data.class_source == "folder"
    rgb = load_image_folder(tmp_path, Preprocessing(3, (8, 8)))
    assert rgb.images.shape == (5, 3, 8, 8)


def test_class_order_follows_the_model(tmp_path: Path) -> None:
    make_folder(tmp_path, {"cat": 2, "dog": 2})
    data = load_image_folder(tmp_path, GRAY28, class_names=("dog", "cat", "bird"))
    assert data.class_source == "model"
    assert data.counts() == {"dog": 2, "cat": 2, "bird": 0}
    assert data.labels[data.files.index("cat/0.png")] == 1


def test_split_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    data = load_image_folder(make_folder(tmp_path, {"a": 10, "b": 20}), GRAY28)
    tune, held = stratified_split(data, 0.2, seed=3)
    again_tune, _ = stratified_split(data, 0.2, seed=3)
    other_tune, _ = stratified_split(data, 0.2, seed=4)
    assert held.counts() == {"a": 2, "b": 4}
    assert set(tune.files).isdisjoint(held.files) and len(tune) + len(held) == 30
    assert tune.files == again_tune.files and tune.files != other_tune.files


def test_eval_data_replaces_the_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "tune", {"0": 4, "1": 4}, mode="L")
    make_folder(tmp_path / "eval", {"0": 3, "1": 3}, mode="L")
    config = ModelConfig(arch="bd_cnn_tiny", num_classes=2, in_chans=1, input_size=(28, 28))
    split = resolve_data(tmp_path / "tune", config, eval_dir=tmp_path / "eval")
    assert len(split.tune) == 8 and len(split.heldout) == 6
    assert split.info["eval_path"].endswith("eval") and split.info["holdout"] is None


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", GRAY28)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path, GRAY28)


def test_empty_class_folders_are_listed(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"empty class folders .*: b, c"):
        load_image_folder(tmp_path, GRAY28)


def test_unreadable_files_are_listed_with_a_count(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 2})
    for i in range(7):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"7 unreadable image file\(s\): a/bad0.png.*\(\+2 more\)"):
        load_image_folder(tmp_path, GRAY28)


def test_classes_the_model_lacks(tmp_path: Path) -> None:
    make_folder(tmp_path, {"cat": 1, "zebra": 1})
    with pytest.raises(DataError, match="class folders the model does not have: zebra"):
        load_image_folder(tmp_path, GRAY28, class_names=("cat", "dog"))


def test_more_folders_than_model_classes(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 2, "b": 2, "c": 2})
    config = ModelConfig(arch="bd_cnn_tiny", num_classes=2, in_chans=1, input_size=(28, 28))
    with pytest.raises(DataError, match="3 class folders but the model has 2 classes"):
        resolve_data(tmp_path, config)


def test_bad_holdout(tmp_path: Path) -> None:
    data = load_image_folder(make_folder(tmp_path, {"a": 4}), GRAY28)
    with pytest.raises(DataError, match="`holdout`"):
        stratified_split(data, 1.5, seed=0)
