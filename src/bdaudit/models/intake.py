"""Where a model comes from and how its weights are packed, as third parties ship them.

A model argument is a weights file (.safetensors, or a PyTorch .pt/.pth/.bin/.ckpt), a timm /
Hugging Face model folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), or
``hf-hub:ORG/NAME`` read from the local Hugging Face cache (bdaudit never downloads). Everything
read here is untrusted data: names it holds go through registries (see models/registry.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bdaudit.core.errors import CheckpointError, missing_model
from bdaudit.core.picklescan import printable

FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_PREFIX = "hf-hub:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Where checkpoint containers keep the model's weights, in the order trainers nest them.
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema_model", "ema")


@dataclass
class ModelSource:
    """The weights file to read plus what a model folder's config.json says (untrusted)."""

    weights: Path
    folder_config: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # how the user named it (path or hf-hub:...), for messages and the report


def _hf_cache_dir() -> Path:
    # Read at call time (not import time) so HF_HOME / HF_HUB_CACHE set by the caller count.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve_hf_hub(spec: str) -> Path:
    """``hf-hub:ORG/NAME[@REVISION]`` -> the snapshot folder in the local cache (offline only)."""
    repo_id, _, revision = spec[len(HF_PREFIX):].partition("@")
    revision = revision or "main"
    if not _REPO_ID.match(repo_id) or ".." in repo_id or not re.match(r"^[A-Za-z0-9._-]{1,96}$", revision):
        raise CheckpointError(f"'{printable(spec)}' is not a Hugging Face model id; write hf-hub:ORG/NAME")
    cache = _hf_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not re.match(r"^[A-Za-z0-9._-]{1,96}$", commit) or not snapshot.is_dir():
        raise CheckpointError(
            f"{spec} is not in the local Hugging Face cache ({cache}); bdaudit never downloads: fetch it "
            f"on a connected machine first (huggingface-cli download {repo_id}) or set HF_HOME")
    return snapshot


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_source(spec: str | Path) -> ModelSource:
    """Turn the MODEL argument into a weights file (and a folder config, if any)."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        folder = resolve_hf_hub(text)
        return _folder_source(folder, text)
    path = Path(spec)
    if path.is_dir():
        if is_model_folder(path):
            return _folder_source(path, text)
        raise CheckpointError(
            f"{path} is a directory, not a model file or a model folder; give a weights file "
            f"(.safetensors, .pt, .pth, .bin, .ckpt) or a folder with config.json and {' or '.join(FOLDER_WEIGHTS)}")
    if not path.exists():
        raise missing_model(path)
    if not path.is_file():
        raise CheckpointError(f"model path {path} is not a regular file; give a weights file or a model folder")
    return ModelSource(weights=path, origin=text)


def _folder_source(folder: Path, origin: str) -> ModelSource:
    weights = next((folder / name for name in FOLDER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"model folder {origin} has config.json but no weights; expected "
                              f"{' or '.join(FOLDER_WEIGHTS)} in it")
    return ModelSource(weights=weights, folder_config=read_folder_config(folder / "config.json"), origin=origin)


def read_folder_config(path: Path) -> dict[str, Any]:
    """timm's config.json (architecture, num_classes, label_names, model_args, pretrained_cfg) as
    model-config fields. It is untrusted: the caller resolves its architecture through registries."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {printable(str(exc), 120)}; it must be JSON") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must be a JSON object like timm's config.json")
    arch = raw.get("architecture")
    if not isinstance(arch, str):
        hint = " (a transformers config: export the model with timm or pass `arch`)" if "architectures" in raw else ""
        raise CheckpointError(f"{path} names no timm 'architecture'{hint}; pass `arch`")
    out: dict[str, Any] = {"arch": arch}
    if raw.get("num_classes") is not None:
        out["num_classes"] = raw["num_classes"]
    cfg = raw.get("pretrained_cfg") if isinstance(raw.get("pretrained_cfg"), dict) else {}
    size = cfg.get("input_size")
    if isinstance(size, list) and len(size) == 3:
        out["input_size"] = size  # timm's (C, H, W): the config code takes in_chans from it
    for key in ("mean", "std"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    labels = raw.get("label_names")
    if isinstance(labels, dict):
        labels = [labels[k] for k in sorted(labels, key=lambda k: int(k) if str(k).isdigit() else 0)]
    if isinstance(labels, list) and labels:
        out["class_names"] = labels
    model_args = raw.get("model_args")
    if isinstance(model_args, dict):
        # num_classes / in_chans are config fields of their own; img_size and the like go to the builder.
        out["arch_kwargs"] = {k: v for k, v in model_args.items() if k not in ("num_classes", "in_chans")}
    return out


def unwrap_container(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The model weights inside whatever a trainer saved: a bare state dict, ``{"state_dict": ...}``,
    ``{"model": ...}``, a Lightning .ckpt, ... Returns the state dict and where it was found.

    EMA copies (``state_dict_ema``, ``model_ema``) are used only when they are the sole weights: the
    raw weights are what the author evaluated and shipped as the model."""
    where = "top level"
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj), where
        key = next((k for k in WEIGHT_KEYS if isinstance(obj.get(k), dict)), None)
        key = key or next((k for k in EMA_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj, where = obj[key], (f"'{key}'" if where == "top level" else f"{where}/'{key}'")
    keys = ", ".join(printable(str(k), 30) for k in list(obj)[:6]) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{source} holds no state dict of tensors (found {keys}); save model.state_dict() "
                          "with torch.save or safetensors")


def has_ema_copy(obj: Any) -> bool:
    return isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in EMA_KEYS) and any(
        isinstance(obj.get(k), dict) for k in WEIGHT_KEYS)


def align_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DataParallel/DDP ``module.``, Lightning ``model.``, torch.compile
    ``_orig_mod.``) that every key carries but the architecture's own keys do not."""
    for prefix in ("module.", "model.", "_orig_mod.", "net.", "network."):
        if (state and all(k.startswith(prefix) for k in state)
                and not all(k.startswith(prefix) for k in expected)):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def infer_from_weights(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """in_chans from the first convolution, num_classes from the last linear layer's outputs."""
    inferred: dict[str, int] = {}
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    if convs:
        inferred["in_chans"] = int(convs[0].shape[1])
    linears = [(k, v) for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if linears:
        inferred["num_classes"] = int(linears[-1][1].shape[0])
    return inferred


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} has NaN or infinite weights in {len(bad)} tensor(s) (first: "
                              f"{printable(bad[0], 60)}); the checkpoint is corrupt, export it again")


def check_data_channels(data_dir: str | Path, in_chans: int, sample: int = 20) -> None:
    """A 1-channel model given colour photos means the model or the data is the wrong one (often a
    wrong ``in_chans``); images merely stored as RGB with equal channels (scanned digits) are fine.
    A few images per class are looked at, not all."""
    if in_chans != 1:
        return
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from bdaudit.core.data import IMAGE_SUFFIXES

    root = Path(data_dir)
    if not root.is_dir():
        return  # the data loader names that problem
    looked = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:2]:
            try:
                with Image.open(path) as img:
                    if img.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                        continue
                    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
            except (UnidentifiedImageError, OSError, ValueError):
                continue  # the data loader lists unreadable files
            if float((rgb.max(axis=2) - rgb.min(axis=2)).mean()) > 8:
                raise CheckpointError(
                    f"{path} is a colour image but the model takes 1 input channel (grayscale); give "
                    "grayscale images, or check the model (`in_chans`, or its first convolution)")
            looked += 1
            if looked >= sample:
                return
