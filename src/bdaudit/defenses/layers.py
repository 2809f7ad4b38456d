"""Where defenses look inside a network: its convolutions, its linear head, and the activations
flowing through chosen modules. Architecture-agnostic (timm models and the small CNNs alike)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bdaudit.core.config import ModelConfig
from bdaudit.core.errors import BdauditError


def conv_layers(net: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every 2-D convolution, in registration (roughly forward) order."""
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]


def norm_layers(net: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every affine BatchNorm2d (the per-channel scales ANP-style defenses perturb)."""
    return [(name, m) for name, m in net.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.affine]


def linear_head(net: nn.Module, config: ModelConfig) -> nn.Linear:
    """The final linear classifier: the recorded head, else timm's ``get_classifier()``."""
    head: nn.Module | None = None
    if config.head:
        try:
            head = net.get_submodule(config.head)
        except AttributeError:
            head = None
    if head is None and hasattr(net, "get_classifier"):
        head = net.get_classifier()  # type: ignore[operator]
    if isinstance(head, nn.Sequential):
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if not isinstance(head, nn.Linear):
        raise BdauditError("this defense needs a linear classifier head; the model records none "
                           "(set 'head: <module name>' in its YAML config) or its head is not nn.Linear")
    return head


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, ``outputs[i]`` holds module ``i``'s latest output (with its graph)."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(i: int):  # noqa: ANN202
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            outputs[i] = output
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_head_inputs(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, the features entering ``head`` (penultimate activations) are appended."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append(inputs[0])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
