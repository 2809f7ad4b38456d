"""Checkpoint IO: safe loading, metadata precedence, strict shapes, round trips."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from bdaudit.core.config import ModelConfig
from bdaudit.core.errors import BdauditError, CheckpointError
from bdaudit.models.checkpoint import atomic_output, load_model, save_model


def tiny_net(num_classes: int = 10, in_chans: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("bd_cnn_tiny", num_classes=num_classes, in_chans=in_chans).eval()


CONFIG = ModelConfig(arch="bd_cnn_tiny", num_classes=10, in_chans=1, input_size=(28, 28),
                     mean=(0.13,), std=(0.31,), class_names=tuple(str(i) for i in range(10)))


def test_round_trip_reloads_with_no_flags_and_identical_logits(tmp_path: Path) -> None:
    net = tiny_net()
    path = save_model(net, CONFIG.with_provenance(note="x"), tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.config.arch == "bd_cnn_tiny" and loaded.config.class_names == CONFIG.class_names
    assert loaded.config.provenance == {"note": "x"}
    assert loaded.config.head == "fc"  # filled from timm's pretrained_cfg
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded.classifier()(x), type(loaded.classifier())(net, CONFIG)(x))
    assert len(loaded.sha256) == 64


def test_state_dict_with_module_prefix_loads_from_flags(tmp_path: Path) -> None:
    net = tiny_net()
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_model(path, {"arch": "bd_cnn_tiny", "num_classes": 10, "in_chans": 1,
                               "input_size": [28, 28]})
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.net(x), net(x))


def test_precedence_flags_over_sidecar_over_metadata(tmp_path: Path) -> None:
    path = save_model(tiny_net(), CONFIG, tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"mean": [0.5], "std": [0.5]}))
    assert load_model(path).config.mean == (0.5,)
    assert load_model(path, {"mean": [0.2]}).config.mean == (0.2,)
    assert load_model(path).config.arch == "bd_cnn_tiny"  # untouched fields keep metadata's value


class _CreatesFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204 - the classic malicious-pickle shape
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"weight": _CreatesFile(str(marker))}, handle)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_model(path, {"arch": "bd_cnn_tiny", "num_classes": 10})
    assert not marker.exists()


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    path = save_model(tiny_net(num_classes=10), CONFIG, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \(10, 32\) vs model \(5, 32\)"):
        load_model(path, {"num_classes": 5, "class_names": list("abcde")})


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = tiny_net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys.*fc.bias.*unexpected keys.*extra.weight"):
        load_model(path, {"arch": "bd_cnn_tiny", "num_classes": 10, "in_chans": 1})


def test_channel_mismatch_is_reported(tmp_path: Path) -> None:
    path = save_model(tiny_net(in_chans=1), CONFIG, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="stem.0.weight"):
        load_model(path, {"in_chans": 3, "mean": [0.5], "std": [0.5]})


@pytest.mark.parametrize(("flags", "message"), [
    ({}, "does not say its arch"),
    ({"arch": "no_such_model_xyz", "num_classes": 10}, "unknown architecture"),
    ({"arch": "nowhere.module:make", "num_classes": 10}, "cannot import architecture"),
])
def test_bare_state_dict_needs_a_valid_architecture(tmp_path: Path, flags: dict, message: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_net().state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=message):
        load_model(path, flags)


def test_custom_architecture_by_import_path(tmp_path: Path) -> None:
    net = tiny_net()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "arch": "bdaudit.models.small:BdCNN", "num_classes": 10, "in_chans": 1,
        "arch_kwargs": {"widths": [8, 16, 32]}}))
    # Only a config file the user names may pick code; one found beside the checkpoint may have
    # come with the download, so its import path is refused.
    with pytest.raises(CheckpointError, match="never imports code named by a model file"):
        load_model(path)
    loaded = load_model(path, config_file=tmp_path / "m.yaml")
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.net(x), net(x))
    assert "user-supplied" in loaded.config.provenance["arch_source"]


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported model file type"):
        load_model(tmp_path / "m.onnx")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_save_refuses_existing_output_and_the_input(tmp_path: Path) -> None:
    path = save_model(tiny_net(), CONFIG, tmp_path / "m.safetensors")
    with pytest.raises(BdauditError, match="already exists"):
        save_model(tiny_net(), CONFIG, path)
    with pytest.raises(BdauditError, match="input model"):
        save_model(tiny_net(), CONFIG, path, force=True, inputs=(path,))


def test_atomic_output_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
