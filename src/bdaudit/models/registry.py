"""Architecture names -> constructors, with the trust rule that keeps a model file from choosing code.

Names resolve through registries only: timm (``resnet18``, ``timm:resnet18``; bdaudit's own small
models are registered there too) and torchvision (``torchvision:resnet18``). A ``module:callable``
import path is honoured only when the *user* gave it (command line or their own config file):
bdaudit never imports a module because a checkpoint, its metadata or a model folder names it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from bdaudit.core.errors import CheckpointError
from bdaudit.core.picklescan import printable

REGISTRY_PREFIXES = ("timm:", "torchvision:")
# Keyword arguments that make a builder read files, download weights or take code; never taken
# from a model file (a timm ``checkpoint_path`` would even torch.load another file).
_UNSAFE_KWARG = re.compile(r"path|file|dir$|dir_|url|pretrained|weights|cache|hub|progress|checkpoint|"
                           r"_layer$|_fn$|_cls$|^block|module|factory|builder|callable", re.IGNORECASE)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def is_import_path(arch: str) -> bool:
    """``module:callable`` (as opposed to a registry name such as ``torchvision:resnet18``)."""
    return ":" in arch and not arch.startswith(REGISTRY_PREFIXES)


def file_arch_kwargs(kwargs: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The ``arch_kwargs`` a model file may pass to a registry builder: plain numbers, booleans and
    short words under ordinary names; anything that could name a file, a URL or code is refused."""
    safe: dict[str, Any] = {}
    for key, value in kwargs.items():
        scalars = value if isinstance(value, list | tuple) else [value]
        plain = all(isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= 32
                                                          and _IDENTIFIER.match(v)) for v in scalars)
        if not isinstance(key, str) or not _IDENTIFIER.match(key) or _UNSAFE_KWARG.search(key) or not plain:
            raise CheckpointError(
                f"{source}: arch_kwargs entry '{printable(str(key), 40)}' is not a plain setting a model file "
                "may choose; give architecture arguments in your own `model_config` instead")
        safe[key] = list(value) if isinstance(value, list | tuple) else value
    return safe


def _timm_factory(name: str, input_size: tuple[int, int]) -> Callable[..., nn.Module] | None:
    import timm

    import bdaudit.models  # noqa: F401  (registers the small-image family with timm)

    if not timm.is_model(name):
        return None

    def build(**kwargs: Any) -> nn.Module:
        # Models built for one image size (ViTs) take it as img_size; give them the configured one.
        cfg = timm.get_pretrained_cfg(name)
        if cfg is not None and getattr(cfg, "fixed_input_size", False) and "img_size" not in kwargs:
            kwargs["img_size"] = list(input_size)
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _torchvision_factory(name: str) -> Callable[..., nn.Module] | None:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None

    def build(num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
        if in_chans != 3:
            raise CheckpointError(f"torchvision:{name} takes 3-channel images, not {in_chans}; "
                                  "use a timm architecture for other channel counts")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return build


def _import_factory(path: str) -> Callable[..., Any]:
    import importlib

    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # noqa: BLE001 - importing user code can fail in any way
        raise CheckpointError(f"cannot import architecture '{printable(path)}': {type(exc).__name__}: "
                              f"{printable(str(exc), 120)}; check the module path and PYTHONPATH") from None
    if not callable(target):
        raise CheckpointError(f"architecture '{printable(path)}' is not callable; name a class or a function")
    return target


def accepted_kwargs(factory: Callable[..., Any], offered: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``offered`` that ``factory``'s signature takes (all of it if it has **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return dict(offered)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    names = {n for n, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in names}


def _missing_required(factory: Callable[..., Any], given: Mapping[str, Any]) -> list[str]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in given
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def describe(arch: str) -> str:
    """Which registry (or the user) supplies ``arch``: recorded in the report."""
    if arch.startswith("torchvision:"):
        return "torchvision"
    if is_import_path(arch):
        return "user-supplied callable"
    return "timm"


def build_architecture(arch: str, num_classes: int, in_chans: int, arch_kwargs: Mapping[str, Any],
                       *, input_size: tuple[int, int] = (224, 224), user_supplied: bool) -> nn.Module:
    """Instantiate ``arch``. ``user_supplied`` says the name came from the user's flag or config file:
    only then may it be an import path, and only then do its ``arch_kwargs`` go to user code."""
    base = {"num_classes": num_classes, "in_chans": in_chans}
    if is_import_path(arch):
        if not user_supplied:
            raise CheckpointError(
                f"the model (its metadata, config.json or a YAML found beside it) names architecture "
                f"'{printable(arch)}', an import path; bdaudit never imports code named by a model file; "
                f"if you trust that code pass `arch` {printable(arch)} (or `model_config` FILE)")
        factory = _import_factory(arch)
        kwargs = accepted_kwargs(factory, {**base, **arch_kwargs})
        missing = _missing_required(factory, kwargs)
        if missing:
            raise CheckpointError(f"architecture '{printable(arch)}' needs argument(s) {', '.join(missing)}; "
                                  "give them under arch_kwargs in `model_config` FILE.yaml")
        try:
            net = factory(**kwargs)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            raise CheckpointError(f"architecture '{printable(arch)}' raised {type(exc).__name__}: "
                                  f"{printable(str(exc), 120)}; check its arguments (`num_classes`, "
                                  "`in_chans`, arch_kwargs in `model_config`)") from None
        if not isinstance(net, nn.Module):
            raise CheckpointError(f"architecture '{printable(arch)}' returned {type(net).__name__}, not a "
                                  "torch nn.Module; point `arch` at the model class or a function returning one")
        return net
    registry, _, name = arch.partition(":") if arch.startswith(REGISTRY_PREFIXES) else ("timm", "", arch)
    factory_or_none = _torchvision_factory(name) if registry == "torchvision" else _timm_factory(name, input_size)
    if factory_or_none is None:
        raise CheckpointError(
            f"unknown architecture '{printable(arch)}': use a timm model name (timm.list_models()), "
            "torchvision:NAME (torchvision.models.list_models()), or your own module:callable via `arch`")
    try:
        return factory_or_none(**base, **arch_kwargs)
    except CheckpointError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise CheckpointError(f"architecture '{printable(arch)}' rejects its arguments: "
                              f"{printable(str(exc), 160)}") from None
