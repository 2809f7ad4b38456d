"""Checkpoint IO: the one entry point every command uses to load or save a model.

Loading never executes code from the file: safetensors is data only, and PyTorch files go
through ``torch.load(weights_only=True)``; a file that needs more is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import bdaudit.models  # noqa: F401  (registers the small-image family with timm)
from bdaudit.core.config import (
    ModelConfig,
    read_metadata,
    read_sidecar,
    resolve_model_config,
    write_metadata,
)
from bdaudit.core.errors import BdauditError, CheckpointError
from bdaudit.core.outputs import atomic_output  # noqa: F401  (re-exported: output safety lives in outputs.py)
from bdaudit.core.picklescan import printable, scan_pickle_file
from bdaudit.models.intake import (
    align_prefixes,
    check_finite,
    has_ema_copy,
    infer_from_weights,
    resolve_source,
    unwrap_container,
)
from bdaudit.models.registry import build_architecture, file_arch_kwargs, is_import_path

AUX_PREFIX = "bdaudit_aux."  # tensors that ride along (e.g. an Input-aware trigger generator)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoadedModel:
    """A classifier rebuilt from a checkpoint, with its resolved config and identity."""

    net: nn.Module
    config: ModelConfig
    path: Path | None = None
    sha256: str | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    channels_last: bool = True  # False when the forward breaks in channels_last (e.g. ``.view``)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def classifier(self) -> NormalizedClassifier:
        """The net behind its normalisation: takes images in [0, 1]."""
        return NormalizedClassifier(self.net, self.config, channels_last=self.channels_last)


class NormalizedClassifier(nn.Module):
    """Applies the model's mean/std so callers (and triggers) work in [0, 1] pixel space.

    With ``channels_last=False`` (a forward that flattens with ``.view``) it keeps the net and its
    inputs in the standard layout whatever memory format callers ask for, so every training and
    prediction loop can keep asking for channels_last, which speeds up the models that allow it."""

    def __init__(self, net: nn.Module, config: ModelConfig, channels_last: bool = True) -> None:
        super().__init__()
        self.net = net
        self.channels_last = channels_last
        mean, std = config.channel_stats()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if not self.channels_last:
            x = x.clone(memory_format=torch.contiguous_format)
        return self.net(x)

    def _apply(self, fn: Any, recurse: bool = True) -> NormalizedClassifier:
        super()._apply(fn, recurse)
        if not self.channels_last:  # undo a memory-format conversion the model cannot run in
            with torch.no_grad():
                for tensor in [*self.net.parameters(), *self.net.buffers()]:
                    # A 1-input-channel kernel in channels_last still passes is_contiguous(), yet
                    # steers convolutions into channels_last: compare the strides themselves.
                    if tensor.dim() == 4 and tensor.stride() != _standard_strides(tensor.shape):
                        tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
        return self


def _standard_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(config: ModelConfig, *, user_arch: bool = False) -> nn.Module:
    """Instantiate the architecture through the registries (models/registry.py).

    ``user_arch`` says ``config.arch`` and ``config.arch_kwargs`` are the user's own (flag or
    --model-config): only then may the arch be a ``module:callable`` and the kwargs go through
    unfiltered. Otherwise both come from a model file and are held to the registry rules."""
    if user_arch:
        kwargs = dict(config.arch_kwargs)
    elif is_import_path(config.arch):
        kwargs = {}  # refused below, before a file's arguments are even looked at
    else:
        kwargs = file_arch_kwargs(config.arch_kwargs, "model config")
    return build_architecture(config.arch, config.num_classes, config.in_chans, kwargs,
                              input_size=config.input_size, user_supplied=user_arch)


def _read_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        findings = scan_pickle_file(path)
        raise CheckpointError(
            f"{path} needs arbitrary unpickling, which could run code, so it was refused: "
            f"{findings.explain()}") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {printable(first, 160)}") from None
    state, where = unwrap_container(obj, str(path))
    if has_ema_copy(obj):
        where += " (an EMA copy is also in the file and was not used)"
    return state, where


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {printable(str(exc), 160)}") from None


def load_state_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with one error that names the offending keys and shapes."""
    expected = net.state_dict()
    state = align_prefixes(state, set(expected))
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
        problems.append(f"unexpected keys {[printable(k, 60) for k in unexpected[:3]]}"
                        + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
    if problems:
        raise CheckpointError(f"{source} does not fit the architecture: {'; '.join(problems)}; "
                              "check `arch`/`num_classes`/`in_chans`")
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    if path.suffix == ".safetensors":
        state, raw_meta = _read_safetensors(path)
        return state, read_metadata(raw_meta), "safetensors"
    if path.suffix in TORCH_SUFFIXES:
        state, where = _read_torch_file(path)
        return state, {}, where
    raise CheckpointError(f"unsupported model file type '{printable(path.suffix, 20)}': use .safetensors, "
                          f"a PyTorch state dict ({', '.join(TORCH_SUFFIXES)}) or a model folder")


@torch.no_grad()
def probe_model(net: nn.Module, config: ModelConfig, source: str) -> bool:
    """Run one tiny batch: the model must take the configured inputs and give one logit per class.
    Returns whether it also runs in channels_last (a ``forward`` that flattens with ``.view`` does not),
    so callers never force a memory format the model was not built for."""
    # A private generator: loading must not move the global random stream the seeded run relies on.
    x = torch.rand(2, config.in_chans, *config.input_size, generator=torch.Generator().manual_seed(0))
    try:
        out = net(x)
    except Exception as exc:  # noqa: BLE001 - third-party forward code may raise anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{source}: the model fails on {config.in_chans}x{config.input_size[0]}x{config.input_size[1]} "
            f"inputs ({type(exc).__name__}: {printable(first, 120)}); check `input_size`/`in_chans`") from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, config.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(f"{source}: the model returns {shape} for a batch of 2, not (2, {config.num_classes}) "
                              "class logits; bdaudit audits classifiers (check `num_classes`)")
    if not any(p.dim() == 4 for p in net.parameters()):
        return True
    try:
        net.to(memory_format=torch.channels_last)
        net(x.contiguous(memory_format=torch.channels_last))
        return True
    except RuntimeError:
        return False
    finally:
        for tensor in [*net.parameters(), *net.buffers()]:
            if tensor.dim() == 4:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


def load_model(path: str | Path, flags: dict[str, Any] | None = None,
               config_file: str | Path | None = None) -> LoadedModel:
    """Load a model safely and rebuild it (in eval mode, on CPU, fp32).

    ``path`` is a weights file, a timm/Hugging Face model folder or ``hf-hub:ORG/NAME`` (local cache).
    Nothing inside the model is trusted to choose code: see models/registry.py."""
    source = resolve_source(path)
    path = source.weights
    state, metadata, container = _read_weights(path)
    metadata = {**_folder_fields(source.folder_config), **metadata}
    sidecar_path = Path(config_file) if config_file else path.with_suffix(".yaml")
    if config_file and not sidecar_path.is_file():
        raise CheckpointError(f"model config {sidecar_path} does not exist")
    sidecar = read_sidecar(sidecar_path) if sidecar_path.is_file() else {}
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    # Only the command line and a config file the user named may pick code (module:callable);
    # a MODEL.yaml found beside a downloaded checkpoint may have come with it.
    trusted = {**(sidecar if config_file else {}), **flags}
    aux = {k[len(AUX_PREFIX):]: v for k, v in state.items() if k.startswith(AUX_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}
    check_finite(state, source.origin)
    inferred = infer_from_weights(state)
    defaults = {k: v for k, v in inferred.items()
                if not any(k in layer for layer in (metadata, sidecar, flags))
                and not (k == "num_classes" and any("class_names" in layer for layer in (metadata, sidecar, flags)))}
    config = resolve_model_config({**defaults, **metadata}, sidecar, flags, source.origin)
    user_arch = "arch" in trusted and trusted["arch"] == config.arch
    if user_arch:
        # The user's arch gets the user's arch_kwargs only; a model file's are filtered (registry
        # archs) or dropped (user callables), so a file cannot pass arguments to the user's code.
        user_kwargs = trusted.get("arch_kwargs")
        if user_kwargs is None:
            user_kwargs = {} if is_import_path(config.arch) else file_arch_kwargs(config.arch_kwargs, source.origin)
        config = dataclasses.replace(config, arch_kwargs=dict(user_kwargs))
    if is_import_path(config.arch) and user_arch:
        config = config.with_provenance(arch_source="user-supplied callable (" + (
            "command line" if "arch" in flags else f"model config {sidecar_path.name}") + ")")
    net = build_model(config, user_arch=user_arch)
    load_state_strict(net, state, source.origin)
    net.eval()
    channels_last = probe_model(net, config, source.origin)
    if config.head is None:
        config = with_head_from_model(config, net)
    if container not in ("safetensors", "top level"):
        config = config.with_provenance(weights_from=container)
    if source.origin != str(path):
        config = config.with_provenance(model_source=source.origin)
    return LoadedModel(net=net, config=config, path=path, sha256=file_sha256(path), aux=aux,
                       channels_last=channels_last)


def _folder_fields(folder_config: dict[str, Any]) -> dict[str, Any]:
    if not folder_config:
        return {}
    from bdaudit.core.config import _normalize_fields

    return _normalize_fields(folder_config, "model folder config.json")


def with_head_from_model(config: ModelConfig, net: nn.Module) -> ModelConfig:
    """Fill the head boundary from timm's pretrained_cfg (e.g. ``fc`` or ``head``); for other models,
    the last ``nn.Linear`` that outputs one logit per class (a tutorial net's ``fc2``)."""
    modules = dict(net.named_modules())
    head = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(head, str) and head in modules:
        return dataclasses.replace(config, head=head)
    linears = [name for name, m in modules.items()
               if isinstance(m, nn.Linear) and m.out_features == config.num_classes and name]
    if linears:
        return dataclasses.replace(config, head=linears[-1])
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
                               "its input, choose another `out`")
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    for name, tensor in (aux or {}).items():
        state[AUX_PREFIX + name] = tensor.detach().to("cpu").contiguous()
    with atomic_output(path, force=force) as tmp:
        save_file(state, str(tmp), metadata=write_metadata(config))
    return path
