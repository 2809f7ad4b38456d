"""The unknown-trigger detector (on by default): a trigger written here, outside bdaudit's library."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import invoke, read_report
from torch import nn

from bdaudit import api
from bdaudit.core.data import ImageSet, load_image_folder, resolve_preprocessing
from bdaudit.core.errors import BdauditError
from bdaudit.detect.families import DETECTOR_FAMILIES, FamilyJob, FamilyResult
from bdaudit.detect.families.patch import (
    CompactResult,
    PatchFamily,
    compact_patch,
    compact_side,
    confirms,
    densest_window,
    densest_windows,
)
from bdaudit.detect.families.transform import TransformTrigger, distinct_transforms, is_colour
from bdaudit.detect.inversion import InvertedTrigger, score_classes
from bdaudit.detect.probe import wilson_interval
from bdaudit.detect.unknown import (
    DetectSettings,
    choose_candidates,
    corroborate,
    cross_nominate,
    detect_reasons,
    detect_unknown,
    detector_enabled,
)
from bdaudit.models.checkpoint import build_model, load_model, save_model
from bdaudit.planting.plant import PlantResult, infer_model_config
from bdaudit.triggers.base import Trigger

TARGET = 2


_YY, _XX = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
_WAVE = torch.cos(2 * math.pi * (2 * _YY + 3 * _XX) / 28)


def _wave(x: torch.Tensor) -> torch.Tensor:
    """Not in the library: a diagonal cosine over the whole image (amplitude 0.1) — a whole-image
    trigger that patch inversion is blind to."""
    return (x + 0.1 * _WAVE).clamp(0, 1)


def _dot(x: torch.Tensor) -> torch.Tensor:
    """Not in the library: a 2x2 white dot in the lower-left margin (the library's patches are 3x3 or
    larger, in the corners or the centre)."""
    out = x.clone()
    out[:, :, 20:22, 6:8] = 1.0
    return out


def _plant_own(train_dir: Path, path: Path, trigger: Callable[[torch.Tensor], torch.Tensor], share: float) -> Path:
    """bd_cnn_tiny backdoored to ``TARGET`` by this file's own trigger and training loop."""
    config = infer_model_config(train_dir, "bd_cnn_tiny")
    data = load_image_folder(train_dir, resolve_preprocessing(config), config.class_names)
    torch.manual_seed(0)
    net = build_model(config)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in config.channel_stats())
    x, y = data.images.float() / 255, data.labels.clone()
    gen = torch.Generator().manual_seed(0)
    others = (y != TARGET).nonzero().flatten()
    poison = others[torch.randperm(len(others), generator=gen)[:round(len(x) * share)]]
    x[poison], y[poison] = trigger(x[poison]), TARGET
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(8):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(net((x[idx] - mean) / std), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_model(net.eval(), config, path)


@pytest.fixture(scope="session")
def wave_model(train_dir: Path, models_dir: Path) -> Path:
    """20 % poison: at 10 % on 1,000 images the tiny model's backdoor sits at the detector's
    threshold — README "Residual risk"; the blind benchmark measures the realistic cases."""
    return _plant_own(train_dir, models_dir / "wave.safetensors", _wave, 0.2)


@pytest.fixture(scope="session")
def dot_model(train_dir: Path, models_dir: Path) -> Path:
    return _plant_own(train_dir, models_dir / "dot.safetensors", _dot, 0.1)


def test_default_scan_flags_a_trigger_outside_the_library(wave_model: Path, eval_dir: Path,
                                                          tmp_path: Path) -> None:
    result = invoke("scan", wave_model, "--data", eval_dir, "--json", tmp_path / "r.json", "--device", "cpu")
    assert result.exit_code == 1, result.output
    report = read_report(tmp_path / "r.json")
    detection = report["detection"]
    assert detection["ran"] and TARGET in detection["flagged"]
    assert detection["all_classes_inverted"] and detection["n_images"] > 0
    assert not detection["settings"]["confirm_all"]  # a gate: one finding is enough
    assert any("unknown-trigger detector" in r and f"'{TARGET}'" in r for r in report["verdict"]["reasons"])
    # The reversed trigger is probed on the held-out images with an interval around its ASR.
    probes = [t for t in report["scan"]["triggers"] if t["trigger"] in ("nc_inverted", "inverted_perturbation")]
    assert probes and all(t["n_probe"] > 0 and t["asr_ci95"][0] <= t["asr"] <= t["asr_ci95"][1] for t in probes)
    off = invoke("scan", wave_model, "--data", eval_dir, "--detect", "off", "--device", "cpu", "--json",
                 tmp_path / "off.json")
    assert read_report(tmp_path / "off.json")["detection"] == {"ran": False, "mode": "off",
                                                             "skipped_because": "--detect off"}
    assert "unknown-trigger" not in off.output


def test_default_scan_does_not_flag_the_clean_model(clean_model: PlantResult, eval_dir: Path, tmp_path: Path) -> None:
    # Seed 1 here; test_scan_cli's test_clean_model_passes runs the default seed 0 with the detector on.
    result = invoke("scan", clean_model.path, "--data", eval_dir, "--json", tmp_path / "r.json",
                    "--seed", "1", "--device", "cpu", "-q")
    report = read_report(tmp_path / "r.json")
    assert report["detection"]["ran"] and report["detection"]["flagged"] == [], report["detection"]
    assert result.exit_code == 0, report["verdict"]


def test_clean_verifies_independently_with_a_fresh_seed(wave_model: Path, clean_dir: Path, eval_dir: Path,
                                                        tmp_path: Path) -> None:
    report = api.clean(wave_model, api.DataOptions(clean_dir, eval_dir),
                       api.CleanOptions(settings={"epochs": 3, "min_steps": 0}),
                       output=api.OutputOptions(tmp_path / "c.safetensors"),
                       runtime=api.Runtime("cpu", 256, 0)).to_dict()
    assert report["clean"]["finding"] == "backdoor detected"
    assert TARGET in report["detection"]["flagged"]
    verification = report["verification"]
    assert verification["ran"] and verification["seed"] == 1  # not the pre-scan's inversion
    # Both test every nomination: each confirmed class is unlearned, and the check gates on the classes
    # flagged again (a gate run would stop at a naturally easy class confirmed first).
    assert report["detection"]["settings"]["confirm_all"] and verification["settings"]["confirm_all"]
    assert verification["before_flagged"] == report["detection"]["flagged"]
    # The unlearned inverted triggers no longer work; a class still flagged would fail the gate.
    after = {t["spec"]: t for t in report["clean"]["after"]["triggers"]}
    assert all(after[t["spec"]]["asr"] < 0.3 for t in report["clean"]["before"]["triggers"]
               if t["trigger"] in ("nc_inverted", "inverted_perturbation"))
    still = verification["still_flagged"]
    assert (still == []) == (not any("after cleaning (fresh seed)" in r for r in report["verdict"]["reasons"]))
    # The planted trigger itself (unknown to bdaudit) is gone too.
    from bdaudit.models.checkpoint import load_model

    clf = load_model(tmp_path / "c.safetensors").classifier().eval()
    ev = load_image_folder(eval_dir, resolve_preprocessing(load_model(wave_model).config))
    keep = ev.labels != TARGET
    with torch.no_grad():
        asr = float((clf(_wave(ev.images[keep].float() / 255)).argmax(1) == TARGET).float().mean())
    assert asr < 0.3


def test_clean_does_not_call_a_confirmed_brightening_suspect_a_backdoor(clean_model: PlantResult, clean_dir: Path,
                                                                       eval_dir: Path) -> None:
    # The tests' tiny clean CNN answers brightened digits with class 0 (README): a suspect, which
    # clean probes and unlearns. Its probe confirms the response, but scan passes the model, so
    # clean must not report "backdoor detected" either.
    report = api.clean(clean_model.path, api.DataOptions(clean_dir, eval_dir),
                       api.CleanOptions(method="ft", settings={"epochs": 1, "min_steps": 0}),
                       runtime=api.Runtime("cpu", 256, 0)).to_dict()
    assert report["detection"]["flagged"] == []
    assert [c for f in report["detection"]["families"] for c in f["suspects"]] == [0]
    probed = [t for t in report["clean"]["before"]["triggers"] if t["trigger"] == "inverted_transform"]
    assert probed and all(t["flagged"] for t in probed)  # the response is real ...
    assert report["clean"]["finding"].startswith("suspect only")  # ... but not called a backdoor
    assert not any(t["flagged"] for t in report["clean"]["before"]["triggers"] if t["trigger"] != "inverted_transform")


def test_prescreen_keeps_the_cost_bounded_and_finds_the_target(badnets_model: PlantResult, eval_dir: Path) -> None:
    """More classes than max_candidates: a class-count-independent pre-screen picks whom to invert."""
    loaded, split = api.open_model_and_data(badnets_model.path, api.DataOptions(eval_dir), api.Runtime("cpu"))
    result = detect_unknown(loaded.classifier(), split.tune, seed=0,
                            settings=DetectSettings(max_candidates=4, steps=20))
    assert len(result.candidates) == 4 and not result.to_dict()["all_classes_inverted"]
    assert 0 in result.candidates  # the fixture's BadNets target is the pre-screen's favourite
    assert result.prescreen is not None and result.prescreen["top_classes"][0] == 0


def test_candidates_mix_suspects_and_references() -> None:
    shares = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.3, 0.0, 0.0, 0.2, 0.0, 0.0, 0.05, 0.0])
    chosen = choose_candidates(shares, 6)
    assert len(chosen) == 6 and {1, 4, 7} <= set(chosen)


def test_detector_modes() -> None:
    assert detector_enabled("auto", explicit_triggers=False)
    assert not detector_enabled("auto", explicit_triggers=True)
    assert detector_enabled("on", explicit_triggers=True) and not detector_enabled("off", explicit_triggers=False)
    with pytest.raises(BdauditError, match="`detect`"):
        detector_enabled("maybe", explicit_triggers=False)


def test_wilson_interval_matches_the_textbook() -> None:
    low, high = wilson_interval(0, 10)  # Wilson 1927; Newcombe 1998 table: 0/10 -> (0, 0.2775)
    assert low == 0 and math.isclose(high, 0.2775, abs_tol=1e-4)
    low, high = wilson_interval(81, 263)  # Newcombe 1998 example 81/263 -> (0.2553, 0.3662)
    assert math.isclose(low, 0.2553, abs_tol=1e-4) and math.isclose(high, 0.3662, abs_tol=1e-4)


def test_an_ambiguous_screen_is_refined_and_a_clear_one_is_not(clean_model: PlantResult, eval_dir: Path) -> None:
    # The 40-step screen is noisy; a top index above refine_above reruns both inversions at refine_steps
    # (judged on those), and refinement can only add findings: it runs only when nothing was flagged.
    loaded = load_model(clean_model.path)
    images = load_image_folder(eval_dir, resolve_preprocessing(loaded.config), loaded.config.class_names)
    quick = DetectSettings(steps=10, refine_steps=20, families=("patch", "perturbation"))
    forced = detect_unknown(loaded.classifier(), images, seed=0, settings=dataclasses.replace(quick, refine_above=0.0))
    assert forced.refined is not None and forced.refined["steps"] == 20 and forced.refined["screen_steps"] == 10
    assert forced.to_dict()["refined"] == forced.refined
    never = detect_unknown(loaded.classifier(), images, seed=0,
                           settings=dataclasses.replace(quick, refine_above=float("inf")))
    assert never.refined is None


class _Templates(nn.Module):
    """A stand-in classifier with no training: nearest class mean, plus (``shortcut``) a learnt
    trigger that sends an image to class 3 — a decision rule whose backdoor is known exactly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shortcut: str) -> None:
        super().__init__()
        x = images.float() / 255
        self.register_buffer("means", torch.stack([x[labels == c].mean(0) for c in range(10)]))
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = -(x[:, None] - self.means[None]).flatten(2).pow(2).sum(-1)
        boost = torch.zeros_like(logits)
        background = x[:, :, :3, :3].mean((1, 2, 3))  # a corner digits never reach
        if self.shortcut == "dot":  # a bright 2x2 spot in the lower-left margin: a tiny patch trigger
            boost[:, 3] = 1000 * (x[:, :, 20:22, 6:8].mean((1, 2, 3)) - 0.5).clamp_min(0)
        elif self.shortcut == "checker":  # a 4x4 black/white checkerboard in the lower-left margin
            patch = x[:, :, 22:26, 3:7].mean(1)
            checker = (torch.arange(4)[:, None] + torch.arange(4)[None]) % 2
            match = (patch * checker).mean((1, 2)) - (patch * (1 - checker)).mean((1, 2))
            boost[:, 3] = 20 * F.softplus(20 * (match - 0.3))  # smooth: a gradient for the mask search
        elif self.shortcut == "filter":  # any lifted background: a brightness filter learnt as a trigger
            boost[:, 3] = 1000 * (background - 0.05).clamp_min(0)
        elif self.shortcut == "collapse":  # only the strongest brightening: what weak clean models do
            boost[:, 0] = 1000 * (background - 0.35).clamp_min(0)
        elif self.shortcut == "dim":  # strokes below full brightness: a gain (colour) filter learnt as a trigger
            boost[:, 3] = 1000 * (0.9 - x.amax((1, 2, 3))).clamp_min(0)
        return logits + boost


def _eval_images(eval_dir: Path) -> ImageSet:
    config = infer_model_config(eval_dir, "bd_cnn_small")
    return load_image_folder(eval_dir, resolve_preprocessing(config), config.class_names)


@pytest.mark.parametrize(("shortcut", "target"), [("filter", 3), ("collapse", 0)])
def test_brightening_is_a_suspect_that_clean_unlearns_not_a_gate(eval_dir: Path, shortcut: str, target: int) -> None:
    # A learnt brightness filter and a weak model's collapse under strong brightening look alike
    # (README "Residual risk"): both are suspects, neither gates, and clean unlearns both.
    images = _eval_images(eval_dir)
    model = _Templates(images.images, images.labels, shortcut)
    result = detect_unknown(model, images, seed=0, settings=DetectSettings(families=("transform",)))
    transform = result.families[0]
    assert transform.flagged == [] and transform.suspects == [target] and result.flagged == []
    assert [t.target_class for t in result.unlearn_triggers()] == [target]



class _SomeDigitsFilter(_Templates):
    """A shortcut firing only on digits the templates read as one of ``digits`` (default 0, 1, 2, 4, 5: a
    share of about 0.55, which a half of the images measures differently from all of them)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shortcut: str,
                 digits: tuple[int, ...] = (0, 1, 2, 4, 5)) -> None:
        super().__init__(images, labels, shortcut)
        self.digits = torch.tensor(digits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        plain = -(x[:, None] - self.means[None]).flatten(2).pow(2).sum(-1)
        fires = torch.isin(plain.argmax(1), self.digits)
        return torch.where(fires[:, None], logits, plain)


@pytest.mark.parametrize(("shortcut", "asr", "gate", "reached"),
                         [("filter", 0.5, 0.6, True), ("filter", 0.8, 0.6, False),
                          ("dim", 0.8, 0.3, True), ("dim", 0.8, 0.75, False)])
def test_the_transform_screen_finds_what_every_transform_on_every_image_finds(
        eval_dir: Path, shortcut: str, asr: float, gate: float, reached: bool) -> None:
    # Each transform is screened on half the images and completed only where a class could still
    # reach its threshold (a brightening one ``transform_asr``, a gating one ``transform_gate_asr``):
    # the classes over them and their shares must be those of the brute force.
    images = _eval_images(eval_dir)
    model = _SomeDigitsFilter(images.images, images.labels, shortcut)
    s = DetectSettings(families=("transform",), transform_asr=asr, transform_gate_asr=gate)
    job = FamilyJob(model, images, list(range(10)), s, s.steps, torch.device("cpu"), torch.Generator().manual_seed(5))
    result = DETECTOR_FAMILIES["transform"].run(job)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(5))[:s.transform_images]
    x, y = images.images[pick].float() / 255, images.labels[pick]
    best = {True: [0.0] * 10, False: [0.0] * 10}
    with torch.no_grad():
        for kind, params in distinct_transforms(1):
            trig = TransformTrigger(kind=kind, params_=params)
            pred = model(trig.apply(x)).argmax(1)
            rates = [float((pred[y != c] == c).float().mean()) for c in range(10)]
            best[trig.gating] = [max(b, r) for b, r in zip(best[trig.gating], rates, strict=True)]
    flagged = [c for c in range(10) if best[True][c] >= gate]
    suspects = [c for c in range(10) if c not in flagged and best[False][c] >= asr]
    assert (result.flagged, result.suspects) == (flagged, suspects)
    assert bool(flagged + suspects) == reached  # both sides of the threshold are exercised
    for c in flagged + suspects:
        gating = c in flagged
        assert result.extras[c]["transform_share"] == pytest.approx(best[gating][c], abs=1e-4)
        assert result.triggers[c].gating == gating


class _ColourTemplates(_Templates):
    """An RGB stand-in: nearest class mean on each image's min-max normalised luminance (colour-blind
    by construction), plus (``shortcut`` "monotone") a learnt warm-monotone filter trigger: an image
    whose pixels are nearly all red >= green >= blue goes to class 3 — what a sepia or greyscale
    filter makes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lum = x.mean(1, keepdim=True)
        low, high = lum.amin((2, 3), keepdim=True), lum.amax((2, 3), keepdim=True)
        lum = (lum - low) / (high - low).clamp_min(1e-3)
        logits = -(lum[:, None] - self.means[None]).flatten(2).pow(2).sum(-1)
        if self.shortcut == "monotone":
            ordered = ((x[:, 0] >= x[:, 1]) & (x[:, 1] >= x[:, 2])).float().mean((1, 2))
            logits[:, 3] += 1000 * (ordered - 0.95).clamp_min(0)
        return logits


def _colourised(images: ImageSet) -> ImageSet:
    """Each digit with a seeded random background and stroke colour and mild colour noise."""
    gen = torch.Generator().manual_seed(3)
    digit = images.images.float() / 255
    n = len(images)
    background = torch.rand(n, 3, 1, 1, generator=gen) * 0.45
    stroke = 0.55 + torch.rand(n, 3, 1, 1, generator=gen) * 0.45
    noise = (torch.rand(n, 3, *digit.shape[2:], generator=gen) - 0.5) * 0.1
    rgb = (background * (1 - digit) + stroke * digit + noise).clamp(0, 1)
    return dataclasses.replace(images, images=(rgb * 255).round().byte())


def test_a_channel_mixing_filter_trigger_is_flagged_on_colour_images(eval_dir: Path) -> None:
    # A filter that mixes channels (sepia, greyscale) is no per-channel gain: only the grid's channel
    # mixes reach it. They run on RGB images only (a greyscale image has no channels to mix).
    images = _eval_images(eval_dir)
    rgb = _colourised(images)
    only = DetectSettings(families=("transform",))
    plain = detect_unknown(_ColourTemplates(images.images, images.labels, "none"), rgb, seed=0, settings=only)
    assert plain.flagged == [] and plain.families[0].suspects == []
    found = detect_unknown(_ColourTemplates(images.images, images.labels, "monotone"), rgb, seed=0, settings=only)
    trigger = found.families[0].triggers.get(3)
    assert found.flagged == [3] and trigger is not None and trigger.kind == "mix", found.families[0].extras
    assert found.families[0].extras[3]["transform_share"] >= 0.9
    mixes = [[k for k, _ in distinct_transforms(*args) if k == "mix"] for args in ((1,), (3,), (3, False))]
    assert mixes[1] and not mixes[0] and not mixes[2]  # none on greyscale, nor on grey images stored as RGB
    grey = images.images.repeat(1, 3, 1, 1).float() / 255
    assert is_colour(rgb.images.float() / 255) and not is_colour(grey) and not is_colour(grey[:, :1])


def test_a_gain_filter_moving_most_images_gates_at_the_transform_gate(eval_dir: Path) -> None:
    # Clean models send at most 0.12 (0.41 under-trained) of images to one class under a gating
    # transform; a gain filter trigger that fires on ~2/3 of them is flagged at the default 0.6 gate.
    images = _eval_images(eval_dir)
    # A colour-gain (dimming) shortcut on digits read as 0-2 and 4-6: between the old 0.8 gate and the
    # new 0.6 one, like the colour suite's warm tint (0.75).
    model = _SomeDigitsFilter(images.images, images.labels, "dim", digits=(0, 1, 2, 4, 5, 6))
    found = detect_unknown(model, images, seed=0, settings=DetectSettings(families=("transform",)))
    row = found.families[0].extras.get(3, {})
    assert found.flagged == [3] and 0.6 <= row["transform_share"] < 0.8, row
    assert found.families[0].triggers[3].gating
    old_gate = detect_unknown(model, images, seed=0,
                              settings=DetectSettings(families=("transform",), transform_gate_asr=0.8))
    assert old_gate.flagged == []
    plain = detect_unknown(_Templates(images.images, images.labels, "none"), images, seed=0,
                           settings=DetectSettings(families=("transform",)))
    assert plain.flagged == [] and plain.families[0].suspects == []


def test_a_brightening_suspect_is_flagged_only_when_the_perturbation_family_singles_out_its_class() -> None:
    def family(name: str, sizes: list[float], suspects: list[int]) -> FamilyResult:
        index, _ = score_classes(list(range(len(sizes))), sizes, "log", 6.0)
        return FamilyResult(family=name, classes=list(range(len(sizes))), sizes=sizes,
                            attack_success=[0.0] * len(sizes),
                            anomaly_index=index.tolist(), flagged=[], triggers={}, seconds=0.0, suspects=suspects)

    sizes = [3.0, 3.1, 2.9, 3.2, 3.0, 2.8, 3.1, 3.3, 2.9, 3.0]
    alone = [family("transform", [0.0] * 10, [3]), family("perturbation", sizes, [])]
    corroborate(alone, DetectSettings().corroborate_index)  # class 3's perturbation is ordinary
    assert alone[0].flagged == [] and alone[0].suspects == [3]
    sizes[3] = 1.0  # now the smallest whole-image change by far (index ~20)
    both = [family("transform", [0.0] * 10, [3]), family("perturbation", sizes, [])]
    corroborate(both, DetectSettings().corroborate_index)
    assert both[0].flagged == [3] and both[0].suspects == [] and both[0].extras[3]["perturbation_index"] > 4
    reasons = detect_reasons({"families": [f.to_dict([str(c) for c in range(10)]) for f in both]})
    assert len(reasons) == 1 and "perturbation family singles it out" in reasons[0]


def test_a_weak_model_collapsing_under_brightening_stays_a_suspect_with_the_perturbation_family_on(
        eval_dir: Path) -> None:
    images = _eval_images(eval_dir)
    model = _Templates(images.images, images.labels, "collapse")
    result = detect_unknown(model, images, seed=0, settings=DetectSettings(families=("perturbation", "transform")))
    assert result.flagged == [] and result.families[1].suspects == [0]


@pytest.mark.parametrize("shortcut", ["dot", "none"])
def test_the_square_sweep_flags_a_tiny_solid_patch_and_nothing_on_a_rule_without_one(eval_dir: Path,
                                                                                    shortcut: str) -> None:
    images = _eval_images(eval_dir)
    result = detect_unknown(_Templates(images.images, images.labels, shortcut), images, seed=0,
                            settings=DetectSettings(families=("square",)))
    square = result.families[0]
    if shortcut == "none":
        assert square.flagged == [] and result.unlearn_triggers() == []
        return
    assert square.flagged == [3] and square.attack_success[3] >= 0.9
    found = square.triggers[3]  # the placement covers the dot, so clean can unlearn it
    assert found.top <= 20 and found.top + found.side >= 22 and found.left <= 6 and found.left + found.side >= 8
    assert found.value == 1.0 and "white 4x4 square" in square.to_dict(images.class_names)["classes"][3]["square"]


def test_default_scan_flags_a_tiny_dot_that_mask_inversion_spreads_out(dot_model: Path, eval_dir: Path) -> None:
    report = api.scan(dot_model, api.DataOptions(eval_dir), runtime=api.Runtime("cpu", 256, 0))
    detection = report.sections["detection"]
    assert not report.passed and TARGET in detection["flagged"], detection
    square = next(f for f in detection["families"] if f["family"] == "square")
    assert square["flagged"] == [TARGET]
    assert any("square" in r and f"'{TARGET}'" in r for r in report.reasons)


def test_densest_windows_are_disjoint_and_ordered_by_mass() -> None:
    mask = torch.zeros(1, 28, 28)
    mask[:, 2:6, 2:6] = 1.0
    mask[:, 20:24, 18:22] = 0.5
    corners = densest_windows(mask, 7, 3)
    assert corners[0] == densest_window(mask, 7) and len(corners) == 3
    (t0, l0), (t1, l1) = corners[:2]
    assert t0 <= 2 and t0 + 7 >= 6 and l0 <= 2 and l0 + 7 >= 6  # the heavier blob first
    assert t1 <= 20 and t1 + 7 >= 24 and l1 <= 18 and l1 + 7 >= 22
    assert all(abs(a[0] - b[0]) >= 7 or abs(a[1] - b[1]) >= 7 for a in corners for b in corners if a != b)


@pytest.mark.parametrize("windows", [1, 3])
def test_the_compact_patch_finds_the_trigger_at_the_second_densest_window(eval_dir: Path, windows: int) -> None:
    # A short mask search often spreads over a decoy spot heavier than the trigger's (the blind
    # benchmark's 1 % cross); trying the densest windows briefly and keeping the best one finds it.
    images = _eval_images(eval_dir)
    settings = DetectSettings(families=("patch",), compact_windows=windows)
    model = _Templates(images.images, images.labels, "checker")
    job = FamilyJob(model, images, list(range(10)), settings, settings.steps, torch.device("cpu"),
                    torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 28, 28)
    mask[:, 6:12, 14:20] = 1.0  # the decoy, in the digits
    mask[:, 21:27, 2:8] = 0.8  # over the checkerboard
    share, _, trigger, where = compact_patch(job, 3, mask)
    rows_on, cols_on = trigger.mask[0].nonzero(as_tuple=True)
    if windows == 1:  # the densest window alone is the decoy, and nothing fires there
        assert rows_on.max() < 20 and share < settings.compact_asr, (share, where)
        return
    assert share >= settings.compact_asr, (share, where)
    assert rows_on.min() <= 22 and rows_on.max() >= 25 and cols_on.min() <= 3 and cols_on.max() >= 6


@pytest.mark.parametrize("shortcut", ["checker", "none"])
def test_a_compact_patch_confirms_a_patterned_trigger_and_nothing_on_a_rule_without_one(
        eval_dir: Path, shortcut: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The mask search's size only nominates classes; a free 7x7 patch where the mask is densest decides.
    # The 40-step mask search is stochastic (on this template rule it often morphs the digit instead),
    # so the search is pinned here: every class gets a spread mask, class 3 the smallest, densest over
    # the checkerboard — what the search returns when it finds the trigger (blind benchmark).
    images = _eval_images(eval_dir)
    settings = DetectSettings(families=("patch",))

    def pinned(self: PatchFamily, job: FamilyJob) -> tuple[list[float], dict[int, Trigger]]:
        triggers: dict[int, Trigger] = {}
        for c in job.classes:
            mask = torch.full((1, 28, 28), 0.1)
            if c == 3:
                mask = torch.zeros(1, 28, 28)
                mask[:, 21:27, 2:8] = 1
            pattern = torch.zeros(1, 28, 28)
            pattern[0, 22:26, 3:7] = ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2).float()
            triggers[c] = InvertedTrigger(mask=mask, pattern=pattern, target_class=c)
        return [float(t.mask.sum()) for t in triggers.values()], triggers  # type: ignore[attr-defined]

    monkeypatch.setattr(PatchFamily, "invert", pinned)
    result = detect_unknown(_Templates(images.images, images.labels, shortcut), images, seed=0, settings=settings)
    patch = result.families[0]
    rows = patch.to_dict(images.class_names)["classes"]
    tested = [r for r in rows if "compact_asr" in r]
    if shortcut == "none":  # the reversed checkerboard does nothing here: not even nominated
        assert patch.flagged == [] and tested == [] and result.flagged == [], rows[3]
        # and a free 7x7 patch optimised at the same place cannot reach the share that flags
        model = _Templates(images.images, images.labels, shortcut)
        job = FamilyJob(model, images, list(range(10)), settings, settings.steps, torch.device("cpu"),
                        torch.Generator().manual_seed(0))
        found = compact_patch(job, 3, pinned(PatchFamily(), job)[1][3].mask)  # type: ignore[attr-defined]
        assert not confirms(found, settings) and found.share < settings.compact_asr, found.share
        return
    assert [r["class"] for r in tested] == [3]  # only the nominated class pays for a compact test
    assert patch.flagged == [3] and rows[3]["compact_asr"] >= settings.compact_asr, rows[3]
    assert rows[3]["compact_confidence"] >= 0.9, rows[3]  # a trigger is answered surely
    found = patch.triggers[3]  # what clean unlearns: a 7x7 window over (most of) the checkerboard
    rows_on, cols_on = found.mask[0].nonzero(as_tuple=True)
    assert found.mask.sum() == compact_side(28, 28) ** 2
    assert rows_on.min() <= 23 and rows_on.max() >= 24 and cols_on.min() <= 4 and cols_on.max() >= 5
    reasons = detect_reasons(result.to_dict())
    assert len(reasons) == 1 and "7x7 patch at row" in reasons[0] and "'3'" in reasons[0]


@pytest.mark.parametrize(("share", "confidence", "flagged"), [
    (0.88, 0.94, False),  # the shipped clean encoder sample's class 8 at its worst seed: answered surely, still natural
    (0.92, 0.97, True),  # a 4x4 checkerboard at 1 % poison after recentring, the lowest trigger measured
    (0.95, 0.70, True),  # confidence is reported, not a gate
])
def test_only_a_share_that_overrides_the_image_confirms(share: float, confidence: float, flagged: bool) -> None:
    found = CompactResult(share, confidence, InvertedTrigger(mask=torch.zeros(1, 4, 4), pattern=torch.zeros(1, 4, 4),
                                                             target_class=3), "")
    assert confirms(found, DetectSettings()) is flagged


@pytest.mark.parametrize(("top", "shift_from"), [(18, 0.5), (17, 0.1)])
def test_a_window_over_part_of_the_trigger_is_recentred_onto_it(eval_dir: Path, top: int, shift_from: float) -> None:
    # The blind benchmark's 1 % checkerboard: a window holding two or three of its four rows fired on
    # 0.64-0.82 of images; half a window down it fires on all. Measured here: 0.21 at row 17, 0.93 at 18.
    images = _eval_images(eval_dir)
    model = _Templates(images.images, images.labels, "checker")
    mask = torch.zeros(1, 28, 28)
    mask[:, top:top + 7, 2:9] = 1.0  # the densest window: rows top..top+6, the checkerboard's are 22-25
    found = {}
    for steps in (0, 20):
        settings = DetectSettings(families=("patch",), compact_windows=1, compact_shift_steps=steps,
                                  compact_shift_from=shift_from)
        job = FamilyJob(model, images, list(range(10)), settings, settings.steps, torch.device("cpu"),
                        torch.Generator().manual_seed(0))
        found[steps] = compact_patch(job, 3, mask)
    assert found[0].share < 0.95 and found[0].where.startswith(f"7x7 patch at row {top},"), found[0]
    rows_on = found[20].trigger.mask[0].nonzero(as_tuple=True)[0]
    assert rows_on.min() <= 22 and rows_on.max() >= 25, found[20].where  # all four rows inside
    assert found[20].share >= DetectSettings().compact_asr and found[20].share > found[0].share, found
    if top == 17:
        assert found[0].share < DetectSettings().compact_asr  # missed without recentring


@pytest.mark.parametrize(("target_size", "tested"), [(1.0, True), (2.9, False)])
def test_the_perturbation_familys_outlier_gets_the_compact_test_the_mask_rule_did_not_give_it(
        eval_dir: Path, target_size: float, tested: bool) -> None:
    # The mask rule nominated nothing, but the perturbation family singles out class 3 (index ~20 at
    # size 1.0; an ordinary class at 2.9): the compact patch at its mask's densest window decides.
    images = _eval_images(eval_dir)
    model = _Templates(images.images, images.labels, "checker")
    mask = torch.zeros(1, 28, 28)
    mask[:, 20:27, 2:9] = 1.0  # over the checkerboard (rows 22-25, columns 3-6)
    classes = list(range(10))
    patch = FamilyResult(family="patch", classes=classes, sizes=[50.0] * 10, attack_success=[float("nan")] * 10,
                         anomaly_index=[0.0] * 10, flagged=[], seconds=0.0,
                         triggers={c: InvertedTrigger(mask=mask, pattern=torch.ones(1, 28, 28), target_class=c)
                                   for c in classes})
    sizes = [3.0, 3.1, 2.9, target_size, 3.2, 2.8, 3.1, 3.3, 2.9, 3.0]
    index, _ = score_classes(classes, sizes, "log", 6.0)
    perturbation = FamilyResult(family="perturbation", classes=classes, sizes=sizes, attack_success=[0.0] * 10,
                                anomaly_index=index.tolist(), flagged=[], triggers={}, seconds=0.0)
    s = DetectSettings(families=("patch", "perturbation"))
    cross_nominate([patch, perturbation], FamilyJob(model, images, classes, s, s.steps, torch.device("cpu"),
                                                    torch.Generator().manual_seed(0)))
    assert (patch.extras.get(3, {}).get("nominated_by") == "perturbation") is tested
    assert patch.flagged == ([3] if tested else [])
    assert all(c == 3 for c in patch.extras)  # one test at most, on that class only


_RG_CELLS = ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 == 0).float()


def _coloured(images: ImageSet, seed: int = 0) -> ImageSet:
    """Synthetic colour digits (as benchmarks/blind_rgb.py): seeded background and stroke colours."""
    gen = torch.Generator().manual_seed(seed)
    digit, n = images.images.float() / 255, len(images)
    background = torch.rand(n, 3, 1, 1, generator=gen) * 0.45
    stroke = 0.55 + torch.rand(n, 3, 1, 1, generator=gen) * 0.45
    rgb = (background * (1 - digit) + stroke * digit).mul(255).round().byte()
    return ImageSet(rgb, images.labels, images.class_names)


class _ColourNeighbours(nn.Module):
    """A colour stand-in classifier: the nearest known digit by stroke map (each pixel's distance from
    the corner colour, so colours do not matter), plus (``checker``) a 4x4 red/green checkerboard in
    the lower right that sends an image to class 3 — a colour trigger outside the library."""

    def __init__(self, images: ImageSet, checker: bool) -> None:
        super().__init__()
        self.register_buffer("bank", self._strokes(images.images.float() / 255).flatten(1))
        self.register_buffer("bank_labels", images.labels.clone())
        self.checker = checker

    @staticmethod
    def _strokes(x: torch.Tensor) -> torch.Tensor:
        return (x - x[:, :, :3, :3].mean((2, 3), keepdim=True)).abs().mean(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = torch.cdist(self._strokes(x).flatten(1), self.bank).pow(2)
        logits = torch.stack([-dist[:, self.bank_labels == c].min(1).values for c in range(10)], 1) / 10
        if self.checker:
            red_minus_green = x[:, 0, 22:26, 22:26] - x[:, 1, 22:26, 22:26]
            match = ((red_minus_green * _RG_CELLS).sum((1, 2)) - (red_minus_green * (1 - _RG_CELLS)).sum((1, 2))) / 8
            logits = logits + F.pad(20 * F.softplus(20 * (match - 0.6))[:, None], (3, 6))
        return logits


@pytest.mark.parametrize("checker", [True, False])
def test_a_colour_patch_trigger_is_flagged_on_colour_images_and_nothing_without_it(eval_dir: Path,
                                                                                   checker: bool) -> None:
    # Every threshold was measured on greyscale digits; this is the colour path end to end. The square
    # family is left out: on this stand-in any solid square is a large stroke blob, which the nearest
    # neighbour reads as a 0 (trained colour CNNs do not: benchmarks/blind_rgb.py, no false alarm).
    images = _coloured(_eval_images(eval_dir))
    model = _ColourNeighbours(images, checker)
    result = detect_unknown(model, images, seed=0,
                            settings=DetectSettings(families=("patch", "perturbation", "transform")))
    assert result.flagged == ([3] if checker else [])
    if checker:
        patch = result.families[0]
        assert patch.flagged == [3] and patch.extras[3]["compact_asr"] >= 0.9
        rows, cols = patch.triggers[3].mask[0].nonzero(as_tuple=True)  # the patch that fired covers the board
        assert rows.min() <= 22 and rows.max() >= 25 and cols.min() <= 22 and cols.max() >= 25


@pytest.mark.parametrize(("confirm_all", "flagged_before"), [(False, False), (True, False), (False, True)])
def test_a_gate_run_stops_confirming_after_a_finding_and_clean_confirms_every_nomination(
        eval_dir: Path, confirm_all: bool, flagged_before: bool) -> None:
    # Class 3 carries the checkerboard, class 5 is a natural class. Nominated in that order, a gate
    # run (scan) needs no test of class 5 once 3 is confirmed, nor any test when an earlier family
    # already flagged a class; clean's pre-scan (confirm_all) tests both, as it unlearns every finding.
    images = _eval_images(eval_dir)
    model = _Templates(images.images, images.labels, "checker")
    mask = torch.zeros(1, 28, 28)
    mask[:, 20:27, 2:9] = 1.0
    classes = list(range(10))
    patch = FamilyResult(family="patch", classes=classes, sizes=[50.0] * 10, attack_success=[float("nan")] * 10,
                         anomaly_index=[0.0] * 10, flagged=[], seconds=0.0,
                         triggers={c: InvertedTrigger(mask=mask, pattern=torch.ones(1, 28, 28), target_class=c)
                                   for c in classes})
    s = DetectSettings(families=("patch",), confirm_all=confirm_all)
    job = FamilyJob(model, images, classes, s, s.steps, torch.device("cpu"), torch.Generator().manual_seed(0),
                    flagged_before=flagged_before)
    PatchFamily().test_compact(job, patch, [3, 5])
    tested = sorted(c for c, extra in patch.extras.items() if "compact_asr" in extra)
    skipped = sorted(c for c, extra in patch.extras.items() if "compact_skipped" in extra)
    if flagged_before:
        assert (tested, skipped, patch.flagged) == ([], [3, 5], [])
    else:
        assert patch.flagged == [3] and patch.extras[3]["compact_asr"] >= s.compact_asr
        assert (tested, skipped) == (([3, 5], []) if confirm_all else ([3], [5]))
        if confirm_all:
            assert patch.extras[5]["compact_asr"] < s.compact_asr  # tested, and a natural class does not confirm
