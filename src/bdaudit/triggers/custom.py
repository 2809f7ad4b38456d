"""User-supplied trigger images, and ``--triggers FILE.yaml`` trigger lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bdaudit.core.errors import TriggerError
from bdaudit.triggers.badnets import POSITIONS
from bdaudit.triggers.base import Trigger, create_trigger, register_trigger, seeded_pattern
from bdaudit.triggers.blended import has_alpha, load_image, pil_mode, probe_image
from bdaudit.triggers.trojannn import shuffle_pixels, square_origin, stamp

NULL_SEED = 6007
CPU = torch.device("cpu")
PATH_KEYS = ("image", "mask")


@register_trigger
@dataclass(frozen=True)
class Custom(Trigger):
    """A user's trigger image blended in through a mask.

    image: path to the trigger picture (required). mask: optional grayscale image, white =
    trigger, grey = partial; without one the image's alpha channel is used if it has one, else
    the whole image. alpha: opacity in (0, 1]. size: 0 stretches the trigger over the whole
    image; otherwise it is resized to size x size and placed at ``position`` (br, bl, tr, tl,
    center) ``margin`` pixels from the border.
    Null: the mask's pixels scattered by a seeded permutation inside the same box and filled
    with seeded random values at the same alpha.
    """

    name = "custom"
    paper = "user-supplied trigger"
    summary = "a user image (with optional mask) blended or stamped onto the image"
    in_default_library = False

    image: str = ""
    mask: str = ""
    alpha: float = 1.0
    size: int = 0
    position: str = "br"
    margin: int = 1

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("image is required, e.g. custom:image=trigger.png")
        probe_image(self.image, "image")
        if self.mask:
            probe_image(self.mask, "mask")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], not {self.alpha}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, not {self.position!r}")
        if self.size < 0 or self.margin < 0:
            raise ValueError("size and margin must be >= 0")

    def _box(self, height: int, width: int) -> tuple[int, int, int, int]:
        if self.size == 0:
            return 0, 0, height, width
        top, left = square_origin(height, width, self.size, self.position, self.margin)
        return top, left, self.size, self.size

    def _mask(self, height: int, width: int) -> torch.Tensor:
        if self.mask:
            return load_image(self.mask, "L", height, width)[0]
        if has_alpha(self.image):
            return load_image(self.image, "A", height, width)[0]
        return torch.ones(height, width)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self._box(x.shape[-2], x.shape[-1])
        values = load_image(self.image, pil_mode(x.shape[1]), height, width)
        return stamp(x, top, left, values, self._mask(height, width), self.alpha)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self._box(x.shape[-2], x.shape[-1])
        mask = shuffle_pixels(self._mask(height, width), NULL_SEED)
        values = seeded_pattern(NULL_SEED, (x.shape[1], height, width), CPU)
        return stamp(x, top, left, values, mask, self.alpha)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _entries(data: Any, path: Path) -> list[Any]:
    if isinstance(data, dict):
        if set(data) != {"triggers"}:
            raise TriggerError(f"{path}: a mapping must have only a 'triggers' key, "
                               f"got {sorted(map(str, data))}")
        data = data["triggers"]
    if not isinstance(data, list) or not data:
        raise TriggerError(f"{path}: expected a non-empty list of triggers, "
                           "e.g. '- {name: badnets, size: 4}'")
    return data


def _resolve(value: Any, folder: Path) -> Any:
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def _build(entry: Any, index: int, path: Path) -> Trigger:
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise TriggerError(f"{where}: expected a mapping like {{name: badnets, size: 4}}, "
                           f"got {_one_line(repr(entry))[:60]}")
    params = {str(key): value for key, value in entry.items()}
    name = params.pop("name", None)
    if not isinstance(name, str) or not name:
        raise TriggerError(f"{where}: missing 'name' (e.g. name: badnets)")
    for key in PATH_KEYS:
        if key in params:
            params[key] = _resolve(params[key], path.parent)
    try:
        return create_trigger(name, **params)
    except TriggerError as exc:
        raise TriggerError(f"{where} ({name}): {_one_line(exc)}") from None


def load_trigger_file(path: Path) -> list[Trigger]:
    """Triggers from a YAML list of ``{name: ..., param: value}`` (or ``{triggers: [...]}``);
    image and mask paths are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TriggerError(f"cannot read trigger file {path}: {_one_line(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TriggerError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    return [_build(entry, index, path) for index, entry in enumerate(_entries(data, path), 1)]
