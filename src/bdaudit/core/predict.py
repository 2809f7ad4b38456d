"""The one batched predictor: every evaluation pass (probing, training-time accuracy, inversion's
success check, membership logits) runs through here.

Forward passes run on an evaluation copy of the classifier (the caller's model is never moved,
switched to eval mode or modified), with BatchNorm folded into the convolution or linear layer
before it where that is exact, under ``torch.inference_mode``; results stay on the device until
the end (one copy back, no per-batch synchronisation). Without a batch size, the first batches of
a run are timed at a few sizes and the fastest per image is kept for that model and device."""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bdaudit.core.data import to_float
from bdaudit.core.runtime import eval_autocast

Transform = Callable[[torch.Tensor], torch.Tensor]

# Tried in this order on the first batches of a run whose batch size was not given: the first is
# an untimed warm-up (kernel selection, allocator), then one timed batch per candidate.
BATCH_LADDER = (64, 64, 256, 1024)
CPU_BATCH = 256
MEASURE_CPU = False  # tests turn measurement on for the CPU
ACTIVATION_BUDGET = 2**24  # largest batch x input values tried (3x64x64 RGB: 1024; 3x224x224: 111)
_MEASURED: dict[tuple[str, int, tuple[int, ...], str], int] = {}


def _unwrap(classifier: nn.Module) -> nn.Module:
    # A normalising wrapper (models.checkpoint.NormalizedClassifier) keeps its own memory-format
    # rules in ``_apply``: fold inside it, keep the wrapper.
    inner = getattr(classifier, "net", None)
    return inner if isinstance(inner, nn.Module) else classifier


def _fold_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """Fold eval-mode ``bn`` into ``conv``'s weight and bias in place; False if not exact."""
    if bn.running_mean is None or bn.running_var is None or conv.weight is None:
        return False
    if conv.weight.shape[0] != bn.num_features:
        return False
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(shape).to(conv.weight.dtype))
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return True


_FOLDABLE = {nn.BatchNorm1d: (nn.Linear, nn.Conv1d), nn.BatchNorm2d: (nn.Conv2d,), nn.BatchNorm3d: (nn.Conv3d,)}


def _pairs_from_graph(net: nn.Module) -> list[tuple[str, str]] | None:
    """(conv, bn) module names where the traced forward feeds the conv's output only to the BN,
    each called exactly once; None when the forward cannot be traced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(net).graph
    except Exception:  # noqa: BLE001 - any untraceable forward falls back to the Sequential rule
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(net.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in _FOLDABLE or len(node.args) != 1:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules[src.target], _FOLDABLE[type(modules[node.target])])
                and calls[node.target] == 1 and calls[src.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_from_sequentials(net: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in net.named_modules():
        if type(module) is not nn.Sequential:  # a subclass may have its own forward
            continue
        children = list(module.named_children())
        for (a, first), (b, second) in zip(children, children[1:], strict=False):
            if type(second) in _FOLDABLE and isinstance(first, _FOLDABLE[type(second)]):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def fold_batchnorm(net: nn.Module) -> int:
    """Fold eval-mode BatchNorm into the preceding conv/linear of ``net`` in place (the BN becomes
    an identity); only where the conv's output feeds nothing else. Returns the number folded."""
    if not any(type(m) in _FOLDABLE for m in net.modules()):
        return 0  # nothing to fold: skip tracing (0.3-0.5 s on a ViT)
    pairs = _pairs_from_graph(net)
    if pairs is None:
        pairs = _pairs_from_sequentials(net)
    modules = dict(net.named_modules())
    seen: dict[int, int] = {}
    for _, module in net.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
    shared = {key for key, count in seen.items() if count > 1}  # one module under two names
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        if id(conv) in shared or id(bn) in shared or bn.training or not _fold_pair(conv, bn):
            continue
        net.set_submodule(bn_name, nn.Identity())
        folded += 1
    return folded


def evaluation_copy(classifier: nn.Module, device: torch.device, fold: bool = True) -> nn.Module:
    """A detached eval-mode copy on ``device`` (channels_last), BatchNorm folded where exact."""
    twin = copy.deepcopy(classifier).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    if fold:
        with contextlib.suppress(Exception):  # folding is an optimisation: never a reason to fail
            fold_batchnorm(_unwrap(twin))
    return twin.to(device, memory_format=torch.channels_last)


SEARCH_POSITIONS = 100_000  # CPU: most image positions (H x W) per forward pass of a trigger search


class _InPieces(nn.Module):
    """Runs a batch in equal pieces of at most ``most`` images. A trigger search's batch (every
    candidate class x its images) falls out of the CPU's cache: Neural Cleanse over every class on
    the MNIST badnets sample took 20-24 s whole and 14.4 s in pieces, with the same triggers."""

    def __init__(self, model: nn.Module, most: int) -> None:
        super().__init__()
        self.model, self.most = model, most

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) <= self.most:
            return self.model(x)
        size = -(-len(x) // -(-len(x) // self.most))  # equal pieces: 160 -> 2 x 80, not 128 + 32
        return torch.cat([self.model(x[i:i + size]) for i in range(0, len(x), size)])


def search_copy(classifier: nn.Module, device: torch.device, image_size: Sequence[int]) -> nn.Module:
    """The frozen evaluation copy a trigger search differentiates through (input gradients only;
    the caller's model is never touched), run in cache-sized pieces on the CPU."""
    model = evaluation_copy(classifier, device)
    if device.type != "cpu":
        return model
    height, width = image_size[-2:]
    return _InPieces(model, max(8, SEARCH_POSITIONS // max(1, height * width)))


def _model_key(classifier: nn.Module, sample: torch.Tensor, device: torch.device) -> tuple:
    net = _unwrap(classifier)
    return (type(net).__qualname__, sum(p.numel() for p in net.parameters()), tuple(sample.shape[1:]),
            str(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Predictor:
    """Batched predictions of one classifier on one device; build once, call for many chunks."""

    def __init__(self, classifier: nn.Module, device: torch.device, batch_size: int | None = None,
                 fold: bool = True) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, not {batch_size}")
        self.device = device
        self.batch_size = batch_size
        self.model = evaluation_copy(classifier, device, fold)
        self._source = classifier
        self._trials: list[tuple[int, float]] = []  # (batch size, seconds per image) while measuring
        self.forwards = 0  # images passed through the model (one per image and transform)

    def _next_size(self, images: torch.Tensor, remaining: int) -> tuple[int, bool]:
        """The next batch size and whether to time it."""
        if self.batch_size is not None:
            return self.batch_size, False
        if self.device.type == "cpu" and not MEASURE_CPU:
            # A size picked by timing would make CPU results depend on the machine's load (batched
            # kernels may round differently); CPU numbers must be reproducible, so the size is fixed.
            return CPU_BATCH, False
        key = _model_key(self._source, images, self.device)
        if key in _MEASURED:
            return _MEASURED[key], False
        cap = max(16, ACTIVATION_BUDGET // max(1, images[0].numel()))
        ladder = [min(b, cap) for b in BATCH_LADDER]
        step = len(self._trials)
        if step < len(ladder) and ladder[step] <= remaining:
            return ladder[step], True
        if step >= 2:  # a warm-up and at least one timed size: keep the fastest per image
            best = min(self._trials[1:], key=lambda t: t[1])[0]
            _MEASURED[key] = best
            return best, False
        return min(ladder[min(step, len(ladder) - 1)], remaining), False  # too few images to measure

    def labels(self, images: torch.Tensor, transforms: Sequence[Transform | None] = (None,),
               advance: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """Predicted labels (on the CPU) of uint8 ``images`` under each transform (None: as is),
        converting each batch to float once."""
        return self._run(images, transforms, advance, lambda out: out.argmax(1))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits (on the CPU) of uint8 ``images``."""
        # fp32 throughout (no autocast): membership scores read the logits themselves, not an argmax.
        return self._run(images, [None], None, lambda out: out.float(), autocast=False)[0]

    def _run(self, images: torch.Tensor, transforms: Sequence[Transform | None],
             advance: Callable[[int], None] | None, head: Callable[[torch.Tensor], torch.Tensor],
             autocast: bool = True) -> list[torch.Tensor]:
        outputs: list[list[torch.Tensor]] = [[] for _ in transforms]
        start = 0
        while start < len(images):
            size, timed = self._next_size(images, len(images) - start)
            if timed:
                _sync(self.device)
                began = time.perf_counter()
            x = to_float(images[start:start + size], self.device)
            for slot, transform in enumerate(transforms):
                with torch.no_grad():  # triggers run outside inference mode: they may cache tensors
                    stamped = x if transform is None else transform(x)
                cast = eval_autocast(self.device) if autocast else contextlib.nullcontext()
                with torch.inference_mode(), cast:
                    outputs[slot].append(head(self.model(stamped)))
            n = len(x)
            self.forwards += n * len(transforms)
            if timed:
                _sync(self.device)
                self._trials.append((size, (time.perf_counter() - began) / n))
            start += n
            if advance is not None:
                advance(n)
        return [torch.cat(chunks).cpu() if chunks else torch.empty(0, dtype=torch.long) for chunks in outputs]


def predict(classifier: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int | None = None,
            transform: Transform | None = None) -> torch.Tensor:
    """Predicted labels for uint8 images, optionally transformed (e.g. triggered) first."""
    return Predictor(classifier, device, batch_size).labels(images, [transform])[0]
