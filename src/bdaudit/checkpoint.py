"""Checkpoint IO: the one entry point every command uses to load or save a model.

Loading never executes code from the file: safetensors is data only, and PyTorch files go
through ``torch.load(weights_only=True)``; a file that needs more is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import bdaudit.models  # noqa: F401  (registers the small-image family with timm)
from bdaudit.config import (
    ModelConfig,
    read_metadata,
    read_sidecar,
    resolve_model_config,
    write_metadata,
)
from bdaudit.errors import BdauditError, CheckpointError
from bdaudit.outputs import atomic_output  # noqa: F401  (re-exported: output safety lives in outputs.py)

AUX_PREFIX = "bdaudit_aux."  # tensors that ride along (e.g. an Input-aware trigger generator)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class LoadedModel:
    """A classifier rebuilt from a checkpoint, with its resolved config and identity."""

    net: nn.Module
    config: ModelConfig
    path: Path | None = None
    sha256: str | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def classifier(self) -> NormalizedClassifier:
        """The net behind its normalisation: takes images in [0, 1]."""
        return NormalizedClassifier(self.net, self.config)


class NormalizedClassifier(nn.Module):
    """Applies the model's mean/std so callers (and triggers) work in [0, 1] pixel space."""

    def __init__(self, net: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.net = net
        mean, std = config.channel_stats()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(config: ModelConfig) -> nn.Module:
    """Instantiate the architecture: a timm name or a ``module:callable`` import path."""
    kwargs = {"num_classes": config.num_classes, "in_chans": config.in_chans, **config.arch_kwargs}
    if ":" in config.arch:
        module_name, _, attr = config.arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise CheckpointError(f"cannot import architecture '{config.arch}': {exc}") from None
        return factory(**kwargs)
    if not timm.is_model(config.arch):
        raise CheckpointError(f"unknown architecture '{config.arch}': use a timm model name "
                              "(see timm.list_models()) or a module:callable path")
    try:
        return timm.create_model(config.arch, pretrained=False, **kwargs)
    except TypeError as exc:
        raise CheckpointError(f"architecture '{config.arch}' rejects its arguments: {exc}") from None


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise CheckpointError(
            f"{path} needs arbitrary unpickling, which could run code, so it was refused "
            f"({first_line[:160]}); re-save it as a plain state dict or .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with one error that names the offending keys and shapes."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if mismatched:
        problems.append("shape mismatch " + "; ".join(mismatched[:3])
                        + (f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""))
    if missing:
        problems.append(f"missing keys {missing[:3]}" + (f" (+{len(missing) - 3} more)"
                                                          if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]}" + (f" (+{len(unexpected) - 3} more)"
                                                                if len(unexpected) > 3 else ""))
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture: {'; '.join(problems)}; "
                              "check --arch/--num-classes/--in-chans")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def load_model(path: str | Path, flags: dict[str, Any] | None = None,
               config_file: str | Path | None = None) -> LoadedModel:
    """Load a checkpoint safely and rebuild its model (in eval mode, on CPU, fp32)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    if path.suffix == ".safetensors":
        state, raw_meta = _read_safetensors(path)
        metadata = read_metadata(raw_meta)
    elif path.suffix in TORCH_SUFFIXES:
        state, metadata = _read_torch_file(path), {}
    else:
        raise CheckpointError(f"unsupported model file type '{path.suffix}': use .safetensors "
                              f"or a PyTorch state dict ({', '.join(TORCH_SUFFIXES)})")
    sidecar_path = Path(config_file) if config_file else path.with_suffix(".yaml")
    if config_file and not sidecar_path.is_file():
        raise CheckpointError(f"model config {sidecar_path} does not exist")
    sidecar = read_sidecar(sidecar_path) if sidecar_path.is_file() else {}
    config = resolve_model_config(metadata, sidecar, flags or {}, str(path))
    aux = {k[len(AUX_PREFIX):]: v for k, v in state.items() if k.startswith(AUX_PREFIX)}
    state = _strip_prefixes({k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)})
    net = build_model(config)
    load_state_strict(net, state, str(path))
    net.eval()
    if config.head is None:
        config = with_head_from_model(config, net)
    return LoadedModel(net=net, config=config, path=path, sha256=file_sha256(path), aux=aux)


def with_head_from_model(config: ModelConfig, net: nn.Module) -> ModelConfig:
    """Fill the head boundary from timm's pretrained_cfg (e.g. ``fc`` or ``head``)."""
    head = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(head, str) and head in dict(net.named_modules()):
        return dataclasses.replace(config, head=head)
    return config


def save_model(net: nn.Module, config: ModelConfig, path: str | Path, force: bool = False,
               aux: dict[str, torch.Tensor] | None = None, inputs: tuple[Path, ...] = (),
               half: bool = False) -> Path:
    """Write a self-describing .safetensors checkpoint atomically; never over an input."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BdauditError(f"output {path} must end in .safetensors")
    for source in inputs:
        if source.exists() and path.exists() and path.resolve() == source.resolve():
            raise BdauditError(f"output {path} is the input model; bdaudit never overwrites "
                               "its input, choose another --out")
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    for name, tensor in (aux or {}).items():
        state[AUX_PREFIX + name] = tensor.detach().to("cpu").contiguous()
    with atomic_output(path, force=force) as tmp:
        save_file(state, str(tmp), metadata=write_metadata(config))
    return path
