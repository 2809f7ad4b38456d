"""Hostile and malformed inputs (issue 17): every case is bad input, answered with one line.

Each table case runs the CLI in-process on a fresh copy of a tiny workspace (model, data, config
files) and asserts: the exit code, exactly one ``error:`` line, no traceback, every file in the
workspace byte-identical afterwards (inputs untouched) and no new file or folder (no output, no
temp file), and no payload ran (its marker file does not exist).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from bdaudit.cli import app
from bdaudit.core.config import ModelConfig
from bdaudit.core.errors import BdauditError
from bdaudit.core.outputs import atomic_output, check_outputs, output_transaction
from bdaudit.models.checkpoint import build_model, load_model, save_model

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ModelConfig(arch="bd_cnn_tiny", num_classes=10, in_chans=1, input_size=(28, 28), mean=(0.5,),
                     std=(0.5,), class_names=tuple(str(i) for i in range(10)))
runner = CliRunner()


# -- the workspace ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny CNN and 6 noise images per class: enough for every command to start."""
    root = tmp_path_factory.mktemp("hostile_base")
    torch.manual_seed(0)
    save_model(build_model(CONFIG), CONFIG, root / "model.safetensors")
    rng = np.random.default_rng(0)
    for folder, per_class in (("data", 6), ("eval", 2), ("members", 2)):
        for cls in range(10):
            (root / folder / str(cls)).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(
                    root / folder / str(cls) / f"{i}.png")
    return root


@dataclasses.dataclass
class WS:
    """Paths of one test's workspace copy."""

    root: Path

    model = property(lambda self: self.root / "model.safetensors")
    data = property(lambda self: self.root / "data")
    eval = property(lambda self: self.root / "eval")
    members = property(lambda self: self.root / "members")
    image = property(lambda self: self.root / "data" / "3" / "0.png")
    marker = property(lambda self: self.root / "PAYLOAD_RAN")

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    def symlink(self, name: str, target: Path) -> Path:
        (self.root / name).symlink_to(target)
        return self.root / name

    def hardlink(self, name: str, target: Path) -> Path:
        os.link(target, self.root / name)
        return self.root / name

    def crafted(self, metadata: dict[str, str], name: str = "crafted.safetensors") -> Path:
        """The workspace model's tensors under a header written by an attacker."""
        state = {k: v for k, v in load_model(self.model).net.state_dict().items()}
        save_file(state, str(self.root / name), metadata=metadata)
        return self.root / name

    def meta(self, **overrides: object) -> Path:
        """A crafted checkpoint whose bdaudit metadata is the real one with ``overrides``."""
        config = CONFIG.to_dict()
        config.update(overrides)
        return self.crafted({"bdaudit": json.dumps(config)})


def snapshot(root: Path) -> dict[str, str]:
    """Every file (content hash), symlink (target) and folder under ``root``."""
    seen: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                seen[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                seen[key] = "dir"
            else:
                seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (over PIL's decompression-bomb limit)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def safetensors_bytes(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


# -- the table -------------------------------------------------------------------------------------

Args = Callable[[WS], list[object]]


def scan(*extra: object) -> Args:
    return lambda w: ["scan", w.model, "--data", w.data, *[e(w) if callable(e) else e for e in extra]]


def clean(*extra: object) -> Args:
    return lambda w: ["clean", w.model, "--data", w.data, "--no-sequela",
                      *[e(w) if callable(e) else e for e in extra]]


def on(model: Callable[[WS], Path], *extra: object) -> Args:
    """``scan`` of a crafted model."""
    return lambda w: ["scan", model(w), "--data", w.data, *[e(w) if callable(e) else e for e in extra]]


def config_file(text: str) -> Args:
    return clean("--config", lambda w: w.write("cfg.yaml", text))


CASES: list[object] = [
    # --- outputs that are inputs, or each other ---------------------------------------------------
    pytest.param(scan("--json", lambda w: w.model), "is an input", id="scan-json-is-model"),
    pytest.param(scan("--json", lambda w: w.image), "is an input", id="scan-json-is-data-image"),
    pytest.param(scan("--json", lambda w: w.symlink("link.json", w.model)), "input", id="scan-json-symlink-to-model"),
    pytest.param(scan("--json", lambda w: w.hardlink("hard.json", w.model)), "same file", id="json-hardlink-model"),
    pytest.param(scan("--json", lambda w: w.hardlink("hard.png", w.image)), "same file", id="scan-json-hardlink-image"),
    pytest.param(scan("--json", lambda w: w.symlink("dirlink", w.data) / "3" / "0.png"), "input",
                 id="scan-json-via-symlinked-folder"),
    pytest.param(scan("--json", lambda w: w.write("model.yaml", "arch: bd_cnn_tiny\n")), "is an input",
                 id="scan-json-is-sidecar"),
    pytest.param(scan("--model-config", lambda w: w.write("mc.yaml", "num_classes: 10\n"), "--json",
                      lambda w: w.root / "mc.yaml"), "is an input", id="scan-json-is-model-config"),
    pytest.param(scan("--triggers", lambda w: w.write("t.yaml", "- {name: badnets}\n"), "--json",
                      lambda w: w.root / "t.yaml"), "is an input", id="scan-json-is-triggers-file"),
    pytest.param(scan("--eval-data", lambda w: w.eval, "--json", lambda w: w.eval / "1" / "0.png"), "is an input",
                 id="scan-json-is-eval-image"),
    pytest.param(scan("--json", lambda w: w.data), "is a folder", id="scan-json-is-folder"),
    pytest.param(scan("--json", lambda w: w.write("afile", "x") / "r.json"), "cannot be written",
                 id="scan-json-under-a-file"),
    pytest.param(scan("--json", lambda w: w.root / "in[/]no" / "r.json", "--data", lambda w: w.root / "x[/]y"),
                 "x[/]y", id="scan-markup-in-paths"),
    pytest.param(clean("--out", lambda w: w.model, "--force"), "input", id="clean-out-is-model-forced"),
    pytest.param(clean("--out", lambda w: w.symlink("o.safetensors", w.model), "--force"), "input",
                 id="clean-out-symlink-to-model"),
    pytest.param(clean("--out", lambda w: w.hardlink("o.safetensors", w.model), "--force"), "same file",
                 id="clean-out-hardlink-model"),
    pytest.param(clean("--out", lambda w: w.root / "c.safetensors", "--json", lambda w: w.root / "c.safetensors"),
                 "same file", id="clean-json-equals-out"),
    pytest.param(clean("--out", lambda w: w.root / "c.safetensors", "--json",
                       lambda w: w.root / "sub" / ".." / "c.safetensors"), "same file", id="json-is-out-dotdot"),
    pytest.param(clean("--json", lambda w: w.model), "is an input", id="clean-json-is-model"),
    pytest.param(clean("--config", lambda w: w.write("cfg.yaml", "holdout: 0.3\n"), "--json",
                       lambda w: w.root / "cfg.yaml"), "is an input", id="clean-json-is-config"),
    pytest.param(clean("--members", lambda w: w.members, "--json", lambda w: w.members / "2" / "1.png"),
                 "is an input", id="clean-json-is-member-image"),
    pytest.param(clean("--reference", lambda w: w.model, "--json", lambda w: w.model), "is an input",
                 id="clean-json-is-reference"),
    pytest.param(clean("--out", lambda w: w.write("d.safetensors/keep", "x").parent), "is a folder",
                 id="clean-out-is-folder"),
    pytest.param(clean("--out", lambda w: w.write("afile", "x") / "c.safetensors"), "cannot be written",
                 id="clean-out-under-a-file"),
    pytest.param(clean("--out", lambda w: w.write("exists.safetensors", "old")), "already exists",
                 id="clean-out-exists"),
    pytest.param(lambda w: ["sequela", w.model, "--data", w.data, "--original", w.model, "--json", w.model],
                 "is an input", id="sequela-json-is-model"),
    pytest.param(lambda w: ["sequela", w.model, "--data", w.data, "--eval-data", w.eval, "--json",
                            w.eval / "0" / "0.png"], "is an input", id="sequela-json-is-eval-image"),
    pytest.param(lambda w: ["plant", "--data", w.data, "--out", w.symlink("p.safetensors", w.image), "--force"],
                 "input", id="plant-out-symlink-to-image"),
    pytest.param(lambda w: ["plant", "--data", w.data, "--eval-data", w.eval, "--out", w.eval / "0" / "0.png",
                            "--force"], "is an input", id="plant-out-is-eval-image"),
    pytest.param(lambda w: ["bench", "--clean-data", w.data, "--eval-data", w.eval, "--models",
                            w.write("bo/bench.json", "models: {}\n"), "--out-dir", w.root / "bo"], "is an input",
                 id="bench-outdir-file-is-manifest"),
    pytest.param(lambda w: ["bench", "--clean-data", w.data, "--eval-data", w.eval, "--models",
                            w.write("m.yaml", "models: {}\n"), "--out-dir",
                            w.write("bo/keep", "").parent.joinpath("bench.csv").hardlink_to(w.image) or w.root / "bo"],
                 "same file", id="bench-outdir-file-hardlinks-image"),
    pytest.param(scan("--trigger", lambda w: f"custom:image={w.write('t.png', w.image.read_bytes())}", "--json",
                      lambda w: w.root / "t.png"), "is an input", id="scan-json-is-trigger-image"),
    pytest.param(scan("--json", lambda w: w.hardlink("side.json", w.write("model.yaml", "num_classes: 10\n"))),
                 "same file", id="scan-json-hardlink-sidecar"),
    pytest.param(scan("--json", lambda w: w.symlink("loop", w.root / "loop")), "paths", id="scan-json-symlink-loop"),
    pytest.param(scan("--json", lambda w: str(w.root / "nul") + "\0x"), "paths", id="scan-json-nul-byte"),
    pytest.param(lambda w: ["sequela", w.model, "--data", w.data, "--reference", w.write("ref.safetensors", w.model
                            .read_bytes()), "--json", w.hardlink("r.json", w.root / "ref.safetensors")], "same file",
                 id="sequela-json-hardlink-reference"),
    pytest.param(clean("--out", lambda w: w.root / "c.pt"), ".safetensors", id="clean-out-wrong-suffix"),
    pytest.param(lambda w: ["plant", "--data", w.data, "--out", w.root / "p.safetensors", "--trigger-params",
                            "size=1000", "--epochs", "1", "--arch", "bd_cnn_tiny"], "does not fit",
                 id="plant-trigger-too-big"),
    # --- crafted checkpoint metadata ------------------------------------------------------------------
    pytest.param(on(lambda w: w.crafted({"bdaudit": "null"})), "mapping", id="meta-null"),
    pytest.param(on(lambda w: w.crafted({"bdaudit": "[]"})), "mapping", id="meta-list"),
    pytest.param(on(lambda w: w.crafted({"bdaudit": "5"})), "mapping", id="meta-number"),
    pytest.param(on(lambda w: w.crafted({"bdaudit": '"text"'})), "mapping", id="meta-string"),
    pytest.param(on(lambda w: w.crafted({"bdaudit": "{"})), "not valid JSON", id="meta-not-json"),
    pytest.param(on(lambda w: w.crafted({"bdaudit": "[" * 100000 + "]" * 100000})), None, id="meta-deep-nesting"),
    pytest.param(on(lambda w: w.meta(input_size="28")), "input_size", id="meta-input-size-string"),
    pytest.param(on(lambda w: w.meta(input_size=[0, 28])), "input_size", id="meta-input-size-zero"),
    pytest.param(on(lambda w: w.meta(input_size=[100000, 100000])), "input_size", id="meta-input-size-huge"),
    pytest.param(on(lambda w: w.meta(input_size=[28] * 4)), "input_size", id="meta-input-size-four"),
    pytest.param(on(lambda w: w.meta(input_size=True)), "input_size", id="meta-input-size-bool"),
    pytest.param(on(lambda w: w.meta(input_size={"h": 1})), "input_size", id="meta-input-size-dict"),
    pytest.param(on(lambda w: w.meta(num_classes="ten")), "malformed", id="meta-classes-text"),
    pytest.param(on(lambda w: w.meta(num_classes=0, class_names=None)), "num_classes", id="meta-classes-zero"),
    pytest.param(on(lambda w: w.meta(num_classes=-3, class_names=None)), "num_classes", id="meta-classes-negative"),
    pytest.param(on(lambda w: w.meta(num_classes=10**12, class_names=None)), "num_classes", id="meta-classes-huge"),
    pytest.param(on(lambda w: w.meta(num_classes=10.5)), "num_classes", id="meta-classes-float"),
    pytest.param(on(lambda w: w.meta(num_classes=True)), "num_classes", id="meta-classes-bool"),
    pytest.param(on(lambda w: w.meta(in_chans=0)), "in_chans", id="meta-chans-zero"),
    pytest.param(on(lambda w: w.meta(arch_kwargs=[1, 2])), "arch_kwargs", id="meta-arch-kwargs-list"),
    pytest.param(on(lambda w: w.meta(arch_kwargs="drop_rate=0")), "arch_kwargs", id="meta-arch-kwargs-string"),
    pytest.param(on(lambda w: w.meta(provenance=[1])), "provenance", id="meta-provenance-list"),
    pytest.param(on(lambda w: w.meta(provenance=7)), "provenance", id="meta-provenance-number"),
    pytest.param(on(lambda w: w.meta(std=[0.0])), "std", id="meta-std-zero"),
    pytest.param(on(lambda w: w.meta(std=[-1.0])), "std", id="meta-std-negative"),
    pytest.param(on(lambda w: w.crafted({"bdaudit": json.dumps(CONFIG.to_dict()).replace('"mean": [0.5]',
                                                                                         '"mean": [NaN]')})),
                 "mean", id="meta-mean-nan"),
    pytest.param(on(lambda w: w.crafted({"bdaudit": json.dumps(CONFIG.to_dict()).replace('"std": [0.5]',
                                                                                         '"std": [Infinity]')})),
                 "std", id="meta-std-infinite"),
    pytest.param(on(lambda w: w.meta(mean="zero")), "malformed", id="meta-mean-text"),
    pytest.param(on(lambda w: w.meta(class_names="0123456789")), "class_names", id="meta-class-names-string"),
    pytest.param(on(lambda w: w.meta(class_names=["a", "b"])), "class names", id="meta-class-names-count"),
    pytest.param(on(lambda w: w.meta(class_names=[{"x": 1}] * 10)), "class_names", id="meta-class-names-dicts"),
    pytest.param(on(lambda w: w.meta(shell="rm -rf /")), "unknown model-config keys", id="meta-unknown-key"),
    pytest.param(on(lambda w: w.meta(arch=5)), "arch", id="meta-arch-number"),
    pytest.param(on(lambda w: w.meta(arch="")), "arch", id="meta-arch-empty"),
    pytest.param(on(lambda w: w.meta(hflip="maybe")), "hflip", id="meta-hflip-text"),
    pytest.param(on(lambda w: w.meta(head=["fc"])), "head", id="meta-head-list"),
    pytest.param(on(lambda w: w.crafted({"architecture": "bd_cnn_tiny", "num_classes": "x"})), "malformed",
                 id="flat-meta-classes-text"),
    pytest.param(on(lambda w: w.crafted({"architecture": "bd_cnn_tiny", "num_classes": "10",
                                         "input_size": "[bad"})), "not valid JSON", id="flat-meta-bad-json"),
    pytest.param(on(lambda w: w.crafted({"architecture": "bd_cnn_tiny", "num_classes": "10",
                                         "input_size": "{}"})), "input_size", id="flat-meta-size-mapping"),
    pytest.param(on(lambda w: w.crafted({"num_classes": "10"})), "arch", id="flat-meta-no-arch"),
    pytest.param(on(lambda w: w.write("garbage.safetensors", os.urandom(64))), None, id="header-random-bytes"),
    pytest.param(on(lambda w: w.write("huge.safetensors", b"\xff" * 8 + b"{}")), None, id="header-huge-length"),
    pytest.param(on(lambda w: w.write("badjson.safetensors", safetensors_bytes(b"{not json}"))), None,
                 id="header-not-json"),
    pytest.param(on(lambda w: w.write("empty.safetensors", b"")), None, id="header-empty-file"),
    pytest.param(on(lambda w: w.write("trunc.safetensors", w.model.read_bytes()[:-100])), None,
                 id="header-truncated-data"),
    pytest.param(on(lambda w: w.write("offsets.safetensors", safetensors_bytes(
        b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}'))), None,
                 id="header-offsets-past-end"),
    pytest.param(on(lambda w: w.write("model.pt", b"PK\x03\x04not a zip")), None, id="torch-file-garbage"),
    pytest.param(on(lambda w: w.write("dir.safetensors/x", "").parent), None, id="model-is-a-folder"),
    pytest.param(on(lambda w: w.meta(arch="logging:basicConfig",
                                     arch_kwargs={"filename": str(w.marker), "filemode": "w"})),
                 None, id="payload-logging-basicconfig"),
    pytest.param(on(lambda w: w.meta(arch="this:x")), None, id="payload-this-import"),
    pytest.param(on(lambda w: w.meta(arch="os:system", arch_kwargs={"command": f"touch {w.marker}"})),
                 None, id="payload-os-system"),
    # --- data -----------------------------------------------------------------------------------------
    pytest.param(lambda w: ["scan", w.model, "--data", w.write("data/5/bomb.png", bomb_png()).parents[1]],
                 "decompression-bomb", id="data-decompression-bomb"),
    pytest.param(lambda w: ["scan", w.model, "--data", w.write("data/4/bad.png", b"\x89PNG garbage").parents[1]],
                 "unreadable", id="data-corrupt-png"),
    pytest.param(lambda w: ["scan", w.model, "--data", w.write("data/4/zero.png", b"").parents[1]],
                 "unreadable", id="data-empty-png"),
    pytest.param(lambda w: ["scan", w.model, "--data", w.root / "in" / "no[/]pe"], "in/no[/]pe",
                 id="data-markup-close-tag"),
    pytest.param(lambda w: ["scan", w.model, "--data", w.root / "[bold red]x[/bold red]"], "[bold red]x[/bold red]",
                 id="data-markup-style"),
    pytest.param(lambda w: ["scan", w.model, "--data", w.image], "does not exist", id="data-is-a-file"),
    pytest.param(lambda w: ["scan", w.model, "--data", w.write("emptydir/.keep", "").parent], "no class",
                 id="data-no-classes"),
    pytest.param(lambda w: ["scan", w.model, "--data", w.write("odd/zebra/0.png", w.image.read_bytes()).parents[1]],
                 "class folders the model does not have", id="data-unknown-class"),
    pytest.param(scan("--eval-data", lambda w: w.root / "nope"), "does not exist", id="eval-missing"),
    # --- flags ----------------------------------------------------------------------------------------
    pytest.param(scan("--trigger", "badnets:size=1000"), "does not fit", id="trigger-badnets-too-big"),
    pytest.param(scan("--trigger", "trojannn:size=500"), "does not fit", id="trigger-trojannn-too-big"),
    pytest.param(scan("--trigger", "badnets:margin=40"), "does not fit", id="trigger-margin-too-big"),
    pytest.param(scan("--trigger", "nosuch"), "unknown trigger", id="trigger-unknown"),
    pytest.param(scan("--trigger", "badnets:size=-1"), "size", id="trigger-negative-size"),
    pytest.param(scan("--trigger", "badnets:size"), "key=value", id="trigger-not-key-value"),
    pytest.param(scan("--triggers", lambda w: w.write("t.yaml", "- {name: badnets\n")), "YAML", id="triggers-bad-yaml"),
    pytest.param(scan("--std", "0"), "std", id="flag-std-zero"),
    pytest.param(scan("--std", "-1"), "std", id="flag-std-negative"),
    pytest.param(scan("--mean", "nan"), "mean", id="flag-mean-nan"),
    pytest.param(scan("--std", "a,b"), "--std", id="flag-std-text"),
    pytest.param(scan("--input-size", "0"), "--input-size", id="flag-input-size-zero"),
    pytest.param(scan("--input-size", "abc"), "--input-size", id="flag-input-size-text"),
    pytest.param(scan("--num-classes", "0"), "num_classes", id="flag-classes-zero"),
    pytest.param(scan("--holdout", "1.5"), "holdout", id="flag-holdout-range"),
    pytest.param(scan("--holdout", "abc"), "holdout", id="flag-holdout-text"),
    pytest.param(scan("--batch-size", "0"), "batch-size", id="flag-batch-zero"),
    pytest.param(scan("--bogus"), "No such option", id="flag-unknown-option"),
    pytest.param(lambda w: ["scan", w.model], "Missing option", id="flag-missing-data"),
    pytest.param(lambda w: ["frobnicate"], "No such command", id="unknown-command"),
    pytest.param(clean("--method", "ft", "--epochs", "0"), "--epochs", id="clean-epochs-zero"),
    pytest.param(clean("--method", "ft", "--epochs", str(10**20)), "--epochs", id="clean-epochs-huge"),
    pytest.param(clean("--method", "sft", "--show-schedule", "--epochs", "100000000"), "--epochs",
                 id="show-schedule-epochs-huge"),
    pytest.param(clean("--method", "ft", "--set", f"min_steps={10**15}"), "`min_steps`", id="clean-min-steps-huge"),
    pytest.param(clean("--method", "nosuch"), "unknown method", id="clean-method-unknown"),
    pytest.param(clean("--set", "epochs"), "KEY=VALUE", id="clean-set-no-value"),
    pytest.param(clean("--method", "ft", "--set", "epochs=abc"), "bad setting", id="clean-set-wrong-type"),
    pytest.param(lambda w: ["plant", "--data", w.data, "--out", w.root / "p.safetensors", "--epochs", "0"],
                 "--epochs", id="plant-epochs-zero"),
    pytest.param(lambda w: ["plant", "--data", w.data, "--out", w.root / "p.safetensors", "--epochs",
                            str(10**20)], "--epochs", id="plant-epochs-huge"),
    pytest.param(lambda w: ["plant", "--data", w.data, "--out", w.root / "p.safetensors", "--paradigm", "x"],
                 "--paradigm", id="plant-paradigm-unknown"),
    # --- config files ---------------------------------------------------------------------------------
    pytest.param(config_file("holdout: [\n"), "not valid YAML", id="config-invalid-yaml"),
    pytest.param(config_file("holdout: abc\n"), "holdout", id="config-holdout-text"),
    pytest.param(config_file("holdout: true\n"), "holdout", id="config-holdout-bool"),
    pytest.param(config_file("set: 5\n"), "set", id="config-set-number"),
    pytest.param(config_file("epochs: [1, 2]\n"), "epochs", id="config-epochs-list"),
    pytest.param(config_file("epochs: {a: 1}\n"), "epochs", id="config-epochs-mapping"),
    pytest.param(config_file("- holdout\n"), "mapping", id="config-not-mapping"),
    pytest.param(config_file("rm_rf: 1\n"), "not a flag", id="config-unknown-key"),
    pytest.param(config_file("model: other.safetensors\n"), "not a flag", id="config-model-key"),
    pytest.param(config_file("epochs: 0\nmethod: ft\n"), "--epochs", id="config-epochs-zero"),
    pytest.param(config_file("!!python/object/apply:os.system ['touch PAYLOAD_RAN']\n"), "YAML",
                 id="config-yaml-python-tag"),
    pytest.param(clean("--config", lambda w: w.write("cfg.yaml", b"\xff\xfe\x00garbage")), "--config",
                 id="config-binary"),
    pytest.param(clean("--config", lambda w: w.root / "nope.yaml"), "nope.yaml", id="config-missing"),
    pytest.param(scan("--model-config", lambda w: w.write("mc.yaml", "arch: [\n")), "YAML", id="model-config-bad-yaml"),
    pytest.param(scan("--model-config", lambda w: w.write("mc.yaml", "input_size: '28'\n")), "input_size",
                 id="model-config-size-string"),
    pytest.param(scan("--model-config", lambda w: w.write("mc.yaml", "arch_kwargs: [1]\n")), "arch_kwargs",
                 id="model-config-kwargs-list"),
    pytest.param(scan(lambda w: w.write("model.yaml", "std: 0\n") and "--quiet"), "std", id="sidecar-std-zero"),
    pytest.param(lambda w: ["bench", "--clean-data", w.data, "--eval-data", w.eval, "--models",
                            w.write("m.yaml", "models: [\n"), "--out-dir", w.root / "bo"], "manifest",
                 id="bench-manifest-bad-yaml"),
    pytest.param(lambda w: ["bench", "--clean-data", w.data, "--eval-data", w.eval, "--models",
                            w.write("m.yaml", "- 1\n"), "--out-dir", w.root / "bo"], "manifest",
                 id="bench-manifest-not-mapping"),
]


@pytest.fixture()
def ws(base: Path, tmp_path: Path) -> WS:
    shutil.copytree(base, tmp_path / "ws")
    return WS(tmp_path / "ws")


def run_cli(args: list[object]) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.stdout, result.stderr


def assert_one_error(code: int, stdout: str, stderr: str, fragment: str | None, expected: int = 2) -> None:
    assert code == expected, (code, stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stdout + stderr
    assert "internal error" not in stderr
    if fragment is not None:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(("build", "fragment"), CASES)
def test_bad_input_is_one_line_and_touches_nothing(ws: WS, build: Args, fragment: str | None) -> None:
    args = build(ws)
    before = snapshot(ws.root)
    modules = set(sys.modules)
    code, stdout, stderr = run_cli(args)
    assert_one_error(code, stdout, stderr, fragment)
    assert snapshot(ws.root) == before  # inputs byte-identical, nothing written, no temp left
    assert not ws.marker.exists()
    assert "this" not in set(sys.modules) - modules  # no module imported because a file said so


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 80


# -- rollback and atomicity ------------------------------------------------------------------------

CLEAN_FAST = ["--method", "ft", "--epochs", "1", "--set", "min_steps=0", "--trigger", "badnets",
              "--unlearn-fraction", "0", "--device", "cpu", "--quiet"]


def test_failed_report_rolls_back_the_cleaned_model(ws: WS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean that finished but whose --json then fails leaves no cleaned file behind."""
    from bdaudit.report.document import Report

    def broken(self: Report, destination: object, force: bool = True) -> None:
        with atomic_output(Path(str(destination)), force=True):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(Report, "write_json", broken)
    before = snapshot(ws.root)
    code, stdout, stderr = run_cli(clean("--out", lambda w: w.root / "c.safetensors", "--json",
                                         lambda w: w.root / "r.json", *CLEAN_FAST)(ws))
    assert_one_error(code, stdout, stderr, "No space left")
    assert snapshot(ws.root) == before


def test_forced_output_is_restored_when_the_command_fails(ws: WS, monkeypatch: pytest.MonkeyPatch) -> None:
    from bdaudit.report.document import Report

    old = ws.write("c.safetensors", b"the user's previous file")

    def broken(self: Report, destination: object, force: bool = True) -> None:
        raise BdauditError("report failed")

    monkeypatch.setattr(Report, "write_json", broken)
    before = snapshot(ws.root)
    code, stdout, stderr = run_cli(clean("--out", old, "--force", "--json", lambda w: w.root / "r.json",
                                         *CLEAN_FAST)(ws))
    assert_one_error(code, stdout, stderr, "report failed")
    assert snapshot(ws.root) == before


def test_successful_clean_keeps_both_outputs(ws: WS) -> None:
    """The transaction commits: rollback is not simply 'never write'."""
    code, _, stderr = run_cli(clean("--out", lambda w: w.root / "c.safetensors", "--json",
                                    lambda w: w.root / "r.json", *CLEAN_FAST)(ws))
    assert code in (0, 1), stderr
    assert (ws.root / "c.safetensors").is_file() and json.loads((ws.root / "r.json").read_text())["kind"] == "clean"
    assert not [p for p in ws.root.iterdir() if p.name.endswith((".tmp", ".bak"))]


def test_transaction_rolls_back_new_and_replaced_files(tmp_path: Path) -> None:
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    with pytest.raises(KeyboardInterrupt), output_transaction():
        with atomic_output(tmp_path / "new.txt") as tmp:
            tmp.write_text("new")
        with atomic_output(kept, force=True) as tmp:
            tmp.write_text("replaced")
        assert kept.read_text() == "replaced"
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
    assert kept.read_text() == "old"


def test_check_outputs_accepts_distinct_new_paths(tmp_path: Path, base: Path) -> None:
    check_outputs([("--out", tmp_path / "a.safetensors"), ("--json", tmp_path / "a.json"), ("--json", "-")],
                  [base / "model.safetensors", base / "data", None])


def test_schedule_printing_is_bounded() -> None:
    from rich.console import Console

    from bdaudit.engine.schedules import TwoPhaseCyclic
    from bdaudit.report.render import MAX_SCHEDULE_ROWS, render_schedule

    schedule = TwoPhaseCyclic(total_steps=10**12, lr_base=0.01, lr_peak1=0.1, lr_peak2=0.05, cycle_steps=8)
    console = Console(record=True, width=100)
    started = time.perf_counter()
    render_schedule({"schedule": schedule, "peak_selection": {"source": "given"}}, console)
    assert time.perf_counter() - started < 5
    rows = [line for line in console.export_text().splitlines() if "│" in line]
    assert 2 < len(rows) <= MAX_SCHEDULE_ROWS + 5


# -- property-based fuzzing ------------------------------------------------------------------------

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)
# No "arch": resolving names from a file is the registry-only rule's (intake branch) to fuzz.
config_keys = st.sampled_from(["num_classes", "in_chans", "input_size", "mean", "std", "class_names",
                               "hflip", "head", "arch_kwargs", "provenance", "unknown"])


@FUZZ
@given(header=st.binary(max_size=200) | st.builds(lambda d: json.dumps(d).encode(), json_values))
def test_fuzzed_safetensors_header_is_refused_cleanly(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(safetensors_bytes(header))
    with pytest.raises(BdauditError):
        load_model(path)


@FUZZ
@given(config=st.dictionaries(config_keys, json_values, max_size=6))
def test_fuzzed_metadata_loads_or_is_refused_cleanly(base: Path, tmp_path: Path, config: dict) -> None:
    state = load_model(base / "model.safetensors").net.state_dict()
    path = tmp_path / "fuzz.safetensors"
    save_file(state, str(path), metadata={"bdaudit": json.dumps({**CONFIG.to_dict(), **config})})
    try:
        loaded = load_model(path)
    except BdauditError:
        return
    mean, std = loaded.config.channel_stats()
    assert all(s > 0 for s in std) and len(mean) == loaded.config.in_chans


yaml_text = st.text(alphabet=st.sampled_from(list("abcdehlmopstx019 :-[]{},'\"!&*\n.")), max_size=60)
flag_yaml = st.builds(lambda d: json.dumps(d), st.dictionaries(
    st.sampled_from(["holdout", "epochs", "set", "method", "seed", "quiet", "lr", "trigger", "out", "json"]),
    json_values, max_size=4))


@FUZZ
@given(text=yaml_text | flag_yaml)
def test_fuzzed_config_yaml_is_one_line(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    before = snapshot(tmp_path)
    # The model does not exist: whatever the config says, the answer is exit 2 and one line.
    code, stdout, stderr = run_cli(["clean", tmp_path / "missing.safetensors", "--data", tmp_path / "d",
                                    "--config", cfg])
    assert_one_error(code, stdout, stderr, None)
    assert snapshot(tmp_path) == before


# -- signals: real processes -----------------------------------------------------------------------

def _spawn(args: list[object]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "bdaudit.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, stderr


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the import under way")
def test_ctrl_c_while_importing_is_130_and_one_line(ws: WS) -> None:
    proc = _spawn(["scan", ws.model, "--data", ws.data])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if "torch" in Path(f"/proc/{proc.pid}/maps").read_text():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    code, stderr = _finish(proc)
    assert code == 130, stderr
    assert stderr.strip() == "error: interrupted; no output was written"


@pytest.mark.parametrize(("signals", "expected"), [((signal.SIGTERM,), 143), ((signal.SIGINT, signal.SIGINT), 130)],
                         ids=["sigterm", "double-ctrl-c"])
def test_signal_during_training_exits_cleanly_and_writes_nothing(ws: WS, signals: tuple[int, ...],
                                                                   expected: int) -> None:
    before = snapshot(ws.root)
    proc = _spawn(["clean", ws.model, "--data", ws.data, "--no-sequela", "--out", ws.root / "c.safetensors",
                   "--json", ws.root / "r.json", "--method", "ft", "--epochs", "10000", "--set", "min_steps=0",
                   "--trigger", "badnets", "--unlearn-fraction", "0", "--device", "cpu"])
    assert proc.stdout is not None
    for line in proc.stdout:  # training is under way once an epoch has been reported
        if line.startswith("epoch"):
            break
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.02)
    code, stderr = _finish(proc)
    assert code == expected, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    assert snapshot(ws.root) == before
