"""A model file never chooses code: architecture names from inside a file resolve only through
registries, file arch_kwargs never reach user code, refused pickles say why (without running them)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_usage_error, invoke
from safetensors.torch import save_file
from thirdparty_models import Net

from bdaudit.core.errors import CheckpointError
from bdaudit.core.picklescan import scan_pickle_file
from bdaudit.models.checkpoint import load_model
from bdaudit.workflows.bench import subjects_from_manifest


@pytest.fixture(scope="module")
def net_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in Net().state_dict().items()}


@pytest.fixture(scope="module")
def gray_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic: 10 class folders of 2 random 28x28 grayscale images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("gray")
    gen = torch.Generator().manual_seed(0)
    for c in range(10):
        (root / str(c)).mkdir()
        for i in range(2):
            pixels = torch.randint(0, 256, (28, 28), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / str(c) / f"{i}.png")
    return root


def crafted(tmp_path: Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    path = tmp_path / "crafted.safetensors"
    save_file(state, str(path), metadata={"bdaudit": json.dumps(meta)})
    return path


def test_file_arch_logging_basicconfig_cannot_truncate_a_user_file(tmp_path: Path, net_state, gray_data) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("user data")
    path = crafted(tmp_path, net_state, {"arch": "logging:basicConfig", "num_classes": 10, "in_chans": 1,
                                         "input_size": [28, 28],
                                         "arch_kwargs": {"filename": str(victim), "filemode": "w"}})
    result = invoke("scan", path, "--data", gray_data)
    assert_usage_error(result, "never imports code named by a model file")
    assert victim.read_text() == "user data"


def test_file_arch_import_path_imports_nothing(tmp_path: Path, net_state, gray_data) -> None:
    sys.modules.pop("this", None)
    path = crafted(tmp_path, net_state, {"arch": "this:x", "num_classes": 10, "in_chans": 1})
    assert_usage_error(invoke("scan", path, "--data", gray_data), "pass --arch this:x")
    assert "this" not in sys.modules  # the module (whose import prints the Zen) was never imported


def test_flat_architecture_key_is_also_registry_only(tmp_path: Path, net_state) -> None:
    path = tmp_path / "flat.safetensors"
    save_file(net_state, str(path), metadata={"architecture": "os:system", "num_classes": "10"})
    with pytest.raises(CheckpointError, match="never imports code"):
        load_model(path)


def test_model_folder_config_cannot_name_code(tmp_path: Path, net_state) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file(net_state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "subprocess:call", "num_classes": 10}))
    with pytest.raises(CheckpointError, match="never imports code"):
        load_model(folder)


def test_file_arch_kwargs_never_reach_a_user_callable(tmp_path: Path, net_state) -> None:
    """Even when the user names the callable, the file's arch_kwargs are dropped: logging.basicConfig
    then gets only num_classes/in_chans (rejected, or ignored when logging is set up) and no file is created."""
    marker = tmp_path / "marker.log"
    path = crafted(tmp_path, net_state, {"arch": "logging:basicConfig", "num_classes": 10, "in_chans": 1,
                                         "arch_kwargs": {"filename": str(marker), "filemode": "w"}})
    with pytest.raises(CheckpointError, match="raised ValueError|returned NoneType"):
        load_model(path, {"arch": "logging:basicConfig"})
    assert not marker.exists()


@pytest.mark.parametrize("kwargs", [{"checkpoint_path": "/etc/passwd"}, {"pretrained_cfg_overlay": "x"},
                                    {"drop_rate": {"nested": 1}}, {"act": "../../x"}])
def test_file_arch_kwargs_for_registries_are_plain_settings_only(tmp_path: Path, kwargs: dict) -> None:
    import timm

    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=3).state_dict().items()}
    path = crafted(tmp_path, state, {"arch": "test_resnet", "num_classes": 3, "arch_kwargs": kwargs})
    with pytest.raises(CheckpointError, match="not a plain setting"):
        load_model(path)


def test_auto_sidecar_cannot_name_code_but_the_users_model_config_can(tmp_path: Path, net_state) -> None:
    path = tmp_path / "m.safetensors"
    save_file(net_state, str(path))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"arch": "thirdparty_models:Net", "num_classes": 10,
                                                              "input_size": 28}))
    with pytest.raises(CheckpointError, match="never imports code"):
        load_model(path)
    loaded = load_model(path, config_file=tmp_path / "m.yaml")
    assert loaded.config.provenance["arch_source"] == "user-supplied callable (model config m.yaml)"
    assert loaded.channels_last is False  # the tutorial net flattens with .view
    assert loaded.config.head == "fc2"  # the last linear layer giving one logit per class (for fp/fst, --scope head)


@pytest.mark.parametrize(("arch", "message"), [
    ("thirdparty_models:raises", "raised RuntimeError: this factory is broken"),
    ("thirdparty_models:not_a_module", "returned dict, not a torch nn.Module"),
    ("thirdparty_models:nothing_here", "cannot import architecture"),
])
def test_bad_user_factories_are_one_line_exit_2(tmp_path: Path, net_state, gray_data, arch: str, message: str) -> None:
    path = tmp_path / "m.pt"
    torch.save(net_state, path)
    assert_usage_error(invoke("scan", path, "--data", gray_data, "--arch", arch), message)


def test_nan_weights_and_a_directory_named_like_a_model(tmp_path: Path, net_state, gray_data) -> None:
    state = dict(net_state)
    state["fc2.bias"] = torch.full_like(state["fc2.bias"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    assert_usage_error(invoke("scan", tmp_path / "nan.pt", "--data", gray_data, "--arch", "thirdparty_models:Net"),
                       "NaN or infinite weights")
    (tmp_path / "model.safetensors").mkdir()
    assert_usage_error(invoke("scan", tmp_path / "model.safetensors", "--data", gray_data), "is a directory")


class _System:
    def __reduce__(self):  # noqa: ANN204 - the classic malicious-pickle shape
        import os

        return (os.system, ("touch should-not-exist",))


def test_refused_pickles_name_what_they_would_import(tmp_path: Path, gray_data) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"w": _System()}, evil)
    result = invoke("scan", evil, "--data", gray_data, "--arch", "thirdparty_models:Net")
    assert_usage_error(result, "can run code")
    assert "system" in result.stderr and not (Path.cwd() / "should-not-exist").exists()

    whole = tmp_path / "whole.pth"
    torch.save(Net(), whole)  # the whole module pickled, as many tutorials do
    result = invoke("scan", whole, "--data", gray_data, "--arch", "thirdparty_models:Net")
    assert_usage_error(result, "whole pickled model")
    assert "thirdparty_models.Net" in result.stderr and "export model.state_dict()" in result.stderr


def test_names_from_a_pickle_are_printed_without_control_characters(tmp_path: Path) -> None:
    # A legacy (non-zip) pickle whose GLOBAL names carry terminal escape codes.
    path = tmp_path / "escape.pt"
    path.write_bytes(b"\x80\x02cos\x1b[2J\nsystem\x07\n)R.")
    findings = scan_pickle_file(path)
    assert findings.dangerous and all(ch.isprintable() for ch in findings.explain())
    assert "\x1b" not in findings.explain()
    with path.open("wb") as handle:
        pickle.dump({"weight": _System()}, handle, protocol=4)  # STACK_GLOBAL form
    assert any("system" in name for name in scan_pickle_file(path).dangerous)


def test_sequela_takes_the_model_flags(tmp_path: Path, net_state, gray_data) -> None:
    path = tmp_path / "m.pt"
    torch.save(net_state, path)
    assert_usage_error(invoke("sequela", path, "--data", gray_data, "--arch", "no_such_arch_xyz"),
                       "unknown architecture 'no_such_arch_xyz'")


def test_bench_manifest_entries_carry_model_flags(tmp_path: Path, net_state) -> None:
    torch.save(net_state, tmp_path / "m.pt")
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump({"models": {"tut": {
        "file": "m.pt", "attack": "badnets", "trigger": "badnets", "arch": "thirdparty_models:Net",
        "input_size": [28, 28]}}}))
    (subject,) = subjects_from_manifest(tmp_path / "manifest.yaml")
    loaded = subject.load()
    assert loaded.config.num_classes == 10 and loaded.config.in_chans == 1  # inferred from the weights


def test_input_size_one_number_and_class_count_checked_against_data(tmp_path: Path, gray_data) -> None:
    from thirdparty_models import sequential

    torch.save(sequential(num_classes=4, in_chans=1).state_dict(), tmp_path / "seq.pt")
    result = invoke("scan", tmp_path / "seq.pt", "--data", gray_data, "--arch", "thirdparty_models:sequential",
                    "--input-size", "28")
    assert_usage_error(result, "has 10 class folders but the model has 4 classes")
    assert_usage_error(invoke("scan", tmp_path / "seq.pt", "--data", gray_data, "--arch",
                              "thirdparty_models:sequential", "--input-size", "28,28,3"), "--input-size takes")



def test_colour_images_for_a_grayscale_model_are_refused(tmp_path: Path, net_state) -> None:
    from PIL import Image

    torch.save(net_state, tmp_path / "m.pt")
    gen = torch.Generator().manual_seed(1)
    for c in range(10):
        (tmp_path / "rgb" / str(c)).mkdir(parents=True)
        pixels = torch.randint(0, 256, (28, 28, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, mode="RGB").save(tmp_path / "rgb" / str(c) / "0.png")
        for i in range(1, 4):
            Image.fromarray(pixels[..., i - 1], mode="L").convert("RGB").save(tmp_path / "rgb" / str(c) / f"{i}.png")
    args = ("--arch", "thirdparty_models:Net", "--input-size", "28")
    result = invoke("scan", tmp_path / "m.pt", "--data", tmp_path / "rgb", *args)
    assert_usage_error(result, "is a colour image but the model takes 1 input channel")
    for c in range(10):  # grey pictures stored as RGB are fine
        (tmp_path / "rgb" / str(c) / "0.png").unlink()
    assert invoke("scan", tmp_path / "m.pt", "--data", tmp_path / "rgb", *args, "-q").exit_code in (0, 1)


def test_legacy_whole_model_pickle_and_hf_hub_ids(tmp_path: Path, gray_data, monkeypatch: pytest.MonkeyPatch) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save(Net(), legacy, _use_new_zipfile_serialization=False)  # pre-1.6 format: no zip, several pickles
    findings = scan_pickle_file(legacy)
    assert "thirdparty_models.Net" in findings.custom and not findings.dangerous
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert_usage_error(invoke("scan", "hf-hub:acme/absent", "--data", gray_data), "not in the local Hugging Face cache")
    assert_usage_error(invoke("scan", "hf-hub:../../etc", "--data", gray_data), "is not a Hugging Face model id")
