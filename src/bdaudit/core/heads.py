"""The classifier head (the encoder/head boundary) and training only it: scope ``head`` in
cleaning, linear probing in the transfer and encoder paradigms."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bdaudit.core.config import ModelConfig
from bdaudit.core.errors import BdauditError

SCOPES = ("full", "head")


def head_of(net: nn.Module, config: ModelConfig, *, infer: bool = False) -> nn.Module:
    """The head named by ``config.head``. With ``infer`` (a model bdaudit builds itself), a config
    without one falls back to timm's ``get_classifier``; otherwise the head must be recorded."""
    if config.head:
        try:
            return net.get_submodule(config.head)
        except AttributeError:
            raise BdauditError(f"the model has no module '{config.head}' (its recorded `head`); "
                               "fix `head` in the model config or use scope full") from None
    if infer and hasattr(net, "get_classifier"):
        return net.get_classifier()
    if infer:
        raise BdauditError(f"cannot tell the classifier head of architecture '{config.arch}'; "
                           "set `head` in its model config")
    raise BdauditError("`scope` head needs a recorded head: this model's metadata names none; "
                       "add 'head: <module name>' to its YAML config or use scope full")


def freeze_body(net: nn.Module, head: nn.Module) -> list[nn.Parameter]:
    """Only ``head``'s parameters keep gradients; returns them (what an optimizer should move)."""
    keep = {id(p) for p in head.parameters()}
    for param in net.parameters():
        param.requires_grad_(id(param) in keep)
    return list(head.parameters())


def unfreeze(net: nn.Module) -> None:
    for param in net.parameters():
        param.requires_grad_(True)


def body_eval(net: nn.Module, head: nn.Module) -> None:
    """Train mode for the head only: the frozen body's BatchNorm statistics must not drift (a
    frozen body stays bit-for-bit unchanged)."""
    net.eval()
    head.train()


@contextmanager
def frozen_except(net: nn.Module, head: nn.Module) -> Iterator[list[nn.Parameter]]:
    """``freeze_body`` inside the block; parameters that had gradients get them back after it."""
    keep = {id(p) for p in head.parameters()}
    frozen = [p for p in net.parameters() if id(p) not in keep and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield list(head.parameters())
    finally:
        for p in frozen:
            p.requires_grad_(True)


class HeadOnly(nn.Module):
    """``classifier`` whose ``train()`` only reaches ``head`` (see ``body_eval``)."""

    def __init__(self, classifier: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.head = head

    def train(self, mode: bool = True) -> HeadOnly:
        super().train(False)
        self.head.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)
