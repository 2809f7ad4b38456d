"""The transfer and encoder paradigms: survival of an upstream backdoor under a victim's
fine-tuning, BadEncoder planting against its clean-encoder reference, provenance, bad inputs."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from bdaudit.core.data import resolve_data
from bdaudit.core.errors import BdauditError, TriggerError
from bdaudit.detect.probe import ProbeSettings, evaluate_triggers
from bdaudit.models.checkpoint import file_sha256, load_model, save_model
from bdaudit.planting import EncoderBackdoor, EncoderSettings, PlantRun, plant_encoder, plant_transfer
from bdaudit.planting.plant import PlantResult, TrainSettings
from bdaudit.planting.simclr import Embedder, ViewAugment, nt_xent
from bdaudit.triggers import parse_trigger

FAST_TRANSFER = TrainSettings(epochs=2, lr=0.005, batch_size=64)
# ~6 + 10 CPU-seconds on 800 images. A tiny encoder pre-trained this briefly varies run to run
# (linear probe 0.72-0.85); a 5x5 patch gets ASR 0.97-1.0 out of it every time, the default 3x3
# one only 0.6-0.99, and clean accuracy moves by up to ~6 points either way.
TINY_ENCODER = EncoderSettings(pretrain_epochs=5, batch_size=128, proj_dim=32, backdoor_epochs=5,
                               backdoor_lr=2e-3, backdoor_batch_size=32, head_epochs=300)
TRIGGER = "badnets:size=5"
CPU = PlantRun(device="cpu")


@pytest.fixture(scope="module")
def transfers(badnets_model: PlantResult, clean_dir: Path, eval_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, PlantResult]:
    out = tmp_path_factory.mktemp("transfer")
    return {mode: plant_transfer(badnets_model.path, clean_dir, out / f"{mode}.safetensors", mode=mode,
                                 settings=FAST_TRANSFER, options=PlantRun(eval_dir=eval_dir, device="cpu"))
            for mode in ("full", "head")}


@pytest.fixture(scope="module")
def encoders(train_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PlantResult, PlantResult]:
    """A clean SimCLR encoder + head, and the same encoder backdoored BadEncoder-style (held-out
    20 % of ``train_dir``: fewer images to pre-train on keeps this fast)."""
    out = tmp_path_factory.mktemp("encoder")
    clean = plant_encoder(train_dir, out / "clean.safetensors", backdoor=EncoderBackdoor(TRIGGER, 0, clean=True),
                          arch="bd_cnn_tiny", settings=TINY_ENCODER, options=CPU)
    backdoored = plant_encoder(train_dir, out / "badencoder.safetensors", backdoor=EncoderBackdoor(TRIGGER, 0),
                               settings=TINY_ENCODER, pretrained=clean.path, options=CPU)
    return clean, backdoored


def body(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor but the head's, BatchNorm statistics included."""
    return {k: v for k, v in load_model(path).net.state_dict().items() if not k.startswith("fc.")}


def test_transfer_measures_survival_and_records_provenance(
        transfers: dict[str, PlantResult], badnets_model: PlantResult) -> None:
    upstream = badnets_model.config.provenance
    for mode, result in transfers.items():
        metrics = result.metrics
        # Same trigger, target and held-out data as the upstream's own measurement.
        assert metrics["upstream_asr"] == pytest.approx(badnets_model.metrics["asr"], abs=1e-6)
        assert metrics["clean_accuracy"] > 0.8
        provenance = load_model(result.path).config.provenance
        assert provenance["paradigm"] == "transfer" and provenance["mode"] == mode
        assert provenance["trigger"] == upstream["trigger"] and provenance["target"] == 0
        assert provenance["upstream"]["sha256"] == file_sha256(badnets_model.path)
        assert provenance["upstream"]["provenance"] == upstream
        assert provenance["measured"]["asr"] == round(metrics["asr"], 4)
        assert provenance["measured"]["upstream_asr"] == round(metrics["upstream_asr"], 4)
    # A victim that only re-fits the head cannot unlearn a backdoor that lives in the body.
    assert transfers["head"].metrics["asr"] > 0.9


def test_head_mode_keeps_the_body_and_full_mode_does_not(
        transfers: dict[str, PlantResult], badnets_model: PlantResult) -> None:
    upstream = body(badnets_model.path)
    head_mode, full_mode = body(transfers["head"].path), body(transfers["full"].path)
    assert all(torch.equal(upstream[k], head_mode[k]) for k in upstream)
    assert not all(torch.equal(upstream[k], full_mode[k]) for k in upstream)
    fc_up, fc_head = (load_model(p).net.fc.weight for p in (badnets_model.path, transfers["head"].path))
    assert not torch.equal(fc_up, fc_head)


def test_transfer_to_new_classes_resets_the_head(badnets_model: PlantResult, clean_dir: Path,
                                                 tmp_path: Path) -> None:
    for name, digit in (("odd", "1"), ("even", "2"), ("zero", "0")):
        shutil.copytree(clean_dir / digit, tmp_path / "data" / name)
    result = plant_transfer(badnets_model.path, tmp_path / "data", tmp_path / "t.safetensors",
                            mode="head", settings=FAST_TRANSFER, options=CPU)
    loaded = load_model(result.path)
    assert loaded.config.num_classes == 3 and loaded.net.fc.out_features == 3
    assert loaded.config.class_names == ("even", "odd", "zero")
    provenance = loaded.config.provenance
    assert provenance["new_head"] is True and provenance["target"] is None
    # Before-numbers come from the upstream's own record: its label space is gone.
    assert result.metrics["upstream_asr"] == badnets_model.config.provenance["measured"]["asr"]
    assert 0.0 <= result.metrics["asr"] <= 1.0


def test_transfer_rejects_bad_inputs(badnets_model: PlantResult, clean_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BdauditError, match="`mode` must be one of full, head"):
        plant_transfer(badnets_model.path, clean_dir, tmp_path / "x.safetensors", mode="body")
    anonymous = load_model(badnets_model.path)
    bare = tmp_path / "bare.safetensors"
    save_model(anonymous.net, dataclasses.replace(anonymous.config, provenance={}), bare)
    with pytest.raises(BdauditError, match="no provenance trigger"):
        plant_transfer(bare, clean_dir, tmp_path / "x.safetensors", settings=FAST_TRANSFER)
    with pytest.raises(BdauditError, match="already exists"):
        plant_transfer(badnets_model.path, clean_dir, bare, settings=FAST_TRANSFER)


def test_encoder_backdoor_beats_the_clean_encoder(encoders: tuple[PlantResult, PlantResult]) -> None:
    clean, backdoored = encoders
    assert clean.metrics["asr"] < 0.2
    assert backdoored.metrics["asr"] > clean.metrics["asr"] + 0.5
    # The null negatives make it the trigger, not any patch there.
    assert backdoored.metrics["null_asr"] < 0.2
    # The utility loss keeps clean inputs' embeddings, so the victim's head still works.
    assert backdoored.metrics["clean_accuracy"] > clean.metrics["clean_accuracy"] - 0.15
    assert clean.metrics["clean_accuracy"] > 0.6


def test_encoder_checkpoint_is_an_ordinary_classifier(
        encoders: tuple[PlantResult, PlantResult], train_dir: Path) -> None:
    clean, backdoored = encoders
    loaded = load_model(backdoored.path)  # no flags: the metadata says everything
    assert loaded.config.head == "fc" and loaded.config.arch == "bd_cnn_tiny"
    provenance = loaded.config.provenance
    assert provenance["paradigm"] == "encoder" and provenance["attack"] == "badencoder"
    assert provenance["trigger"] == TRIGGER and provenance["target"] == 0
    assert provenance["encoder"]["pretrained"]["sha256"] == file_sha256(clean.path)
    assert len(provenance["backdoor"]["references"]) == TINY_ENCODER.references
    reference = load_model(clean.path).config.provenance
    assert reference["attack"] == "none" and "trigger" not in reference
    assert reference["probe"]["trigger"] == TRIGGER
    # The folded linear head and the saved weights reproduce the in-memory measurement exactly.
    split = resolve_data(train_dir, loaded.config)  # the same seeded held-out split
    again = evaluate_triggers(loaded.classifier(), split.heldout, [parse_trigger(TRIGGER)],
                              ProbeSettings(target=0, probe="full"), device=torch.device("cpu"))
    assert again.clean_accuracy == backdoored.metrics["clean_accuracy"]
    assert again.triggers[0].asr == backdoored.metrics["asr"]
    # config.head is the encoder/head boundary: logits are fc(embedding).
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        embedding = Embedder(loaded.classifier())(x)
        assert torch.allclose(loaded.net.get_submodule(loaded.config.head)(embedding),
                              loaded.classifier()(x), atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(body(clean.path).values(),
                                                     body(backdoored.path).values(), strict=True))


def test_encoder_rejects_bad_inputs(train_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TriggerError, match="unknown trigger"):
        plant_encoder(train_dir, tmp_path / "e.safetensors", backdoor=EncoderBackdoor("nosuch", 0))
    with pytest.raises(BdauditError, match="not a class index"):
        plant_encoder(train_dir, tmp_path / "e.safetensors", backdoor=EncoderBackdoor(target=10), arch="bd_cnn_tiny")
    with pytest.raises(BdauditError, match="head needs"):
        EncoderSettings(head_epochs=0)


def test_simclr_views_and_loss() -> None:
    x = torch.rand(6, 1, 28, 28)
    views = [ViewAugment()(x, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert views[0].shape == x.shape and views[0].min() >= 0.0 and views[0].max() <= 1.0
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    z = torch.randn(8, 16)
    # Partners that agree are an easy task; a shuffled pairing is not.
    assert nt_xent(z, z + 0.01 * torch.randn(8, 16), 0.5) < nt_xent(z, z[torch.randperm(8)], 0.5)
