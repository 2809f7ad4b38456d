"""The trigger library: shapes, determinism, matched nulls, specs, custom images, YAML lists."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdaudit.core.errors import TriggerError
from bdaudit.triggers import (
    TRIGGERS,
    create_trigger,
    default_triggers,
    load_trigger_file,
    parse_trigger,
)
from bdaudit.triggers.base import seeded_pattern

DEFAULT_NAMES = sorted(t.name for t in default_triggers())
SHAPES = [(2, 1, 28, 28), (2, 3, 32, 32), (2, 3, 8, 8)]
# Families whose default geometry cannot fit an 8x8 image (they must say so, not misbehave).
TOO_BIG_FOR_8 = {"sig"}


def rand_batch(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def ramp(channels: int, height: int, width: int) -> torch.Tensor:
    """A smooth image in [0.3, 0.7]: additive triggers never clip, warps move something."""
    grid = torch.linspace(0, 1, height)[:, None] + torch.linspace(0, 1, width)[None, :]
    return (0.3 + 0.2 * grid).expand(1, channels, height, width).clone()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def test_registry_has_every_family() -> None:
    expected = {"badnets", "blended", "sig", "wanet", "lowfreq", "trojannn", "custom"}
    assert expected <= set(TRIGGERS)
    assert "custom" not in DEFAULT_NAMES
    assert {"blended", "sig", "wanet", "lowfreq", "trojannn"} <= set(DEFAULT_NAMES)
    for cls in TRIGGERS.values():
        assert cls.paper and cls.summary


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[1:])))
@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_apply_and_null_contract(name: str, shape: tuple[int, ...]) -> None:
    trigger = create_trigger(name)
    x = rand_batch(shape)
    before = x.clone()
    if shape[-1] == 8 and name in TOO_BIG_FOR_8:
        with pytest.raises(ValueError, match="8x8"):
            trigger.apply(x)
        return
    out, null = trigger.apply(x), trigger.null(x)
    for y in (out, null):
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.equal(x, before), "apply/null must not modify their input"
    assert not torch.allclose(out, x), "the trigger must change the image"
    assert not torch.allclose(null, x), "the null must change the image"
    assert not torch.allclose(out, null, atol=1e-3), "the null must not be the trigger"
    assert torch.equal(out, trigger.apply(x)) and torch.equal(null, trigger.null(x))
    assert torch.equal(out, create_trigger(name).apply(x)), "a fresh instance gives the same"
    # A pure per-image function: batching does not change any image's result.
    assert torch.allclose(out[1:], trigger.apply(x[1:]), atol=1e-6)


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_keeps_float64(name: str) -> None:
    x = rand_batch((1, 3, 32, 32)).double()
    trigger = create_trigger(name)
    assert trigger.apply(x).dtype == torch.float64 and trigger.null(x).dtype == torch.float64


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_null_matches_strength_not_pattern(name: str) -> None:
    trigger = create_trigger(name)
    x = rand_batch((4, 3, 32, 32), seed=1)
    change = (trigger.apply(x) - x).abs().mean()
    null_change = (trigger.null(x) - x).abs().mean()
    assert 1 / 3 < float(null_change / change) < 3
    # On a smooth image the change is the pattern itself; the null's must not line up with it.
    smooth = ramp(3, 32, 32)
    delta, null_delta = trigger.apply(smooth) - smooth, trigger.null(smooth) - smooth
    assert abs(cosine(delta, null_delta)) < 0.8


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_default_spec_round_trips(name: str) -> None:
    trigger = create_trigger(name)
    assert parse_trigger(trigger.spec()) == trigger


@pytest.mark.parametrize("spec", [
    "blended:alpha=0.3,seed=5",
    "sig:delta=0.05,frequency=3",
    "wanet:k=8,strength=1.0,seed=2",
    "lowfreq:epsilon=0.05,cutoff=0.25,seed=3",
    "trojannn:size=5,position=tl,margin=0,alpha=0.5,seed=1",
])
def test_custom_spec_round_trips(spec: str) -> None:
    trigger = parse_trigger(spec)
    assert trigger != create_trigger(trigger.name), "parameters must take effect"
    assert parse_trigger(trigger.spec()) == trigger
    x = rand_batch((1, 3, 32, 32))
    assert torch.equal(parse_trigger(trigger.spec()).apply(x), trigger.apply(x))


@pytest.mark.parametrize("name", ["blended", "wanet", "lowfreq", "trojannn"])
def test_seed_changes_the_pattern(name: str) -> None:
    x = rand_batch((1, 3, 32, 32))
    a, b = create_trigger(name, seed=0).apply(x), create_trigger(name, seed=1).apply(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("spec", [
    "nosuch",  # unknown family
    "blended:foo=1",  # unknown parameter
    "wanet:k=abc",  # not an int
    "sig:delta=lots",  # not a float
    "badnets:size",  # not key=value
    "blended:alpha=1.5",
    "blended:seed=-1",
    "sig:delta=0",
    "sig:frequency=-2",
    "wanet:k=1",
    "wanet:strength=-1",
    "lowfreq:epsilon=0",
    "lowfreq:cutoff=2",
    "trojannn:position=middle",
    "trojannn:alpha=0",
    "trojannn:size=-3",
    "custom",  # image is required
    "custom:image=/nonexistent/trigger.png",
])
def test_bad_specs_raise_trigger_error(spec: str) -> None:
    with pytest.raises(TriggerError):
        parse_trigger(spec)


def test_create_trigger_rejects_bad_values() -> None:
    with pytest.raises(TriggerError, match="unknown parameter"):
        create_trigger("lowfreq", radius=3)
    with pytest.raises(TriggerError, match="is not a int"):
        create_trigger("wanet", k="four")
    with pytest.raises(TriggerError, match="alpha"):
        create_trigger("blended", alpha=0)


@pytest.mark.parametrize(("spec", "shape"), [
    ("trojannn:size=40", (1, 3, 32, 32)),
    ("wanet:k=16", (1, 3, 8, 8)),
    ("sig:frequency=16", (1, 3, 32, 32)),
])
def test_geometry_that_does_not_fit_names_the_sizes(spec: str, shape: tuple[int, ...]) -> None:
    x = rand_batch(shape)
    size = f"{shape[2]}x{shape[3]}"
    trigger = parse_trigger(spec)
    with pytest.raises(ValueError, match=size):
        trigger.apply(x)
    with pytest.raises(ValueError, match=size):
        trigger.null(x)


def test_blended_is_the_documented_blend() -> None:
    x = rand_batch((2, 3, 16, 16))
    pattern = seeded_pattern(3, (3, 16, 16), torch.device("cpu"))
    expected = x * 0.75 + pattern * 0.25
    assert torch.allclose(create_trigger("blended", alpha=0.25, seed=3).apply(x), expected)


def test_blended_with_a_user_image(tmp_path: Path) -> None:
    image = write_png(tmp_path / "p.png", np.full((5, 7, 3), (255, 0, 0)))
    trigger = create_trigger("blended", image=str(image), alpha=0.5)
    x = torch.zeros(1, 3, 12, 10)
    out = trigger.apply(x)
    assert torch.allclose(out[0, 0], torch.full((12, 10), 0.5)) and out[0, 1:].abs().max() == 0
    assert trigger.apply(torch.zeros(1, 1, 12, 10)).shape == (1, 1, 12, 10)


def test_sig_is_a_horizontal_sinusoid_and_null_keeps_magnitudes() -> None:
    x = torch.full((1, 3, 20, 32), 0.5)
    trigger = create_trigger("sig", delta=0.1, frequency=2)
    delta = trigger.apply(x) - x
    cols = torch.arange(32, dtype=torch.float64)
    expected = 0.1 * torch.sin(2 * math.pi * cols * 2 / 32)
    assert torch.allclose(delta[0, 0, 7].double(), expected, atol=1e-6)
    assert torch.equal(delta[0, 0], delta[0, 0, :1].expand(20, 32)), "constant down columns"
    assert torch.equal(delta[0, 0], delta[0, 2]), "the same on every channel"
    null_delta = trigger.null(x) - x
    assert torch.allclose(null_delta.abs(), delta.abs(), atol=1e-6)
    assert abs(cosine(delta, null_delta)) < 0.3


def test_wanet_is_a_small_warp_and_noise_mode_jitters() -> None:
    trigger = create_trigger("wanet")
    grid = trigger.grid(32, 32)
    assert grid.shape == (1, 32, 32, 2)
    # Strength 0.5: displacements stay below about a pixel (2 / 31 grid units per pixel).
    identity = create_trigger("wanet", strength=1e-9).grid(32, 32)
    assert float((grid - identity).abs().max()) < 2 / 31
    x = rand_batch((3, 3, 32, 32))
    warped = trigger.apply(x)
    noisy = trigger.noise_warp(x, torch.Generator().manual_seed(5))
    again = trigger.noise_warp(x, torch.Generator().manual_seed(5))
    other = trigger.noise_warp(x, torch.Generator().manual_seed(6))
    assert torch.equal(noisy, again) and not torch.allclose(noisy, other)
    assert not torch.allclose(noisy, warped)
    assert (noisy - warped).abs().mean() < (warped - x).abs().mean() * 3


def test_lowfreq_is_smooth_with_epsilon_peak_and_null_matches_l2() -> None:
    x = torch.full((1, 3, 32, 32), 0.5)
    trigger = create_trigger("lowfreq", epsilon=0.08, cutoff=0.125)
    delta = trigger.apply(x) - x
    assert math.isclose(float(delta.abs().max()), 0.08, rel_tol=1e-4)
    spectrum = torch.fft.fft2(delta[0].double()).abs()
    freqs = torch.fft.fftfreq(32, d=1 / 32).abs()
    high = (freqs[:, None] > 2) | (freqs[None, :] > 2)  # 0.125 * 32 / 2 = 2 periods kept
    assert float(spectrum[:, high].max()) < 1e-4
    assert float(spectrum[:, 0, 0].max()) < 1e-4, "no global brightness shift"
    null_delta = trigger.null(x) - x
    assert math.isclose(float(null_delta.norm()), float(delta.norm()), rel_tol=1e-4)


def test_trojannn_stays_in_its_box() -> None:
    x = rand_batch((1, 3, 32, 32))
    trigger = create_trigger("trojannn", size=6, position="tl", margin=2)
    for out in (trigger.apply(x), trigger.null(x)):
        changed = (out != x).any(dim=1)[0]
        assert changed.any() and changed[2:8, 2:8].any()
        changed[2:8, 2:8] = False
        assert not changed.any()
    black = torch.zeros(1, 1, 32, 32)
    glyph, scattered = trigger.apply(black) > 0, trigger.null(black) > 0
    assert 0.3 * 36 <= float(glyph.sum()) <= 0.7 * 36, "an irregular glyph, not a full square"
    assert glyph.sum() == scattered.sum(), "the null covers the same area"
    assert not torch.equal(glyph, scattered), "the null does not keep the glyph's shape"


def test_custom_trigger_from_png_and_mask(tmp_path: Path) -> None:
    image = write_png(tmp_path / "t.png", np.full((4, 4, 3), (0, 255, 0)))
    mask = np.zeros((4, 4))
    mask[:, :2] = 255
    mask_path = write_png(tmp_path / "m.png", mask)
    x = torch.zeros(1, 3, 8, 8)
    full = create_trigger("custom", image=str(image), mask=str(mask_path)).apply(x)
    assert torch.all(full[0, 1, :, :3] == 1.0) and torch.all(full[0, 1, :, 5:] == 0.0)
    assert full[0, 0].abs().max() == 0 and full[0, 2].abs().max() == 0

    placed = create_trigger("custom", image=str(image), size=4, position="br", margin=0)
    out = placed.apply(x)
    assert torch.all(out[0, 1, 4:, 4:] == 1.0) and out[0, :, :4].abs().max() == 0
    null = placed.null(x)
    assert not torch.allclose(null, out) and null[0, :, :4].abs().max() == 0
    assert placed.apply(torch.zeros(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    assert parse_trigger(placed.spec()) == placed


def test_custom_uses_the_image_alpha_as_default_mask(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4))
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # only the top half is opaque
    path = tmp_path / "logo.png"
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(path)
    out = create_trigger("custom", image=str(path)).apply(torch.zeros(1, 3, 8, 8))
    assert torch.all(out[0, 0, :3] == 1.0) and torch.all(out[0, 0, 5:] == 0.0)


def test_load_trigger_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    write_png(tmp_path / "img" / "t.png", np.full((4, 4, 3), 200))
    listing = tmp_path / "triggers.yaml"
    listing.write_text("- {name: badnets, size: 4}\n"
                       "- name: custom\n  image: img/t.png\n  size: 3\n"
                       "- {name: sig, delta: 0.05}\n")
    triggers = load_trigger_file(listing)
    assert [t.name for t in triggers] == ["badnets", "custom", "sig"]
    assert triggers[0] == create_trigger("badnets", size=4)
    assert Path(triggers[1].image) == (tmp_path / "img" / "t.png").resolve()
    wrapped = tmp_path / "wrapped.yml"
    wrapped.write_text("triggers:\n  - name: wanet\n    k: 8\n")
    assert load_trigger_file(wrapped) == [create_trigger("wanet", k=8)]


@pytest.mark.parametrize(("text", "needle"), [
    ("- {name: badnets, size: [1, 2]}\n", "entry 1 (badnets)"),
    ("- {name: sig}\n- {name: nosuch}\n", "entry 2 (nosuch)"),
    ("- {name: sig}\n- {size: 4}\n", "entry 2: missing 'name'"),
    ("- {name: blended, alpha: 3}\n", "entry 1 (blended)"),
    ("- {name: custom, image: missing.png}\n", "entry 1 (custom)"),
    ("- badnets\n", "entry 1: expected a mapping"),
    ("[]\n", "non-empty list"),
    ("42\n", "non-empty list"),
    ("{triggers: [{name: sig}], extra: 1}\n", "only a 'triggers' key"),
    ("- {name: sig\n", "not valid YAML"),
])
def test_load_trigger_file_errors(tmp_path: Path, text: str, needle: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(TriggerError) as info:
        load_trigger_file(bad)
    message = str(info.value)
    assert needle in message and "bad.yaml" in message and "\n" not in message


def test_load_trigger_file_missing(tmp_path: Path) -> None:
    with pytest.raises(TriggerError, match="nope.yaml"):
        load_trigger_file(tmp_path / "nope.yaml")
