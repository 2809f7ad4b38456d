"""Device choice and seeding: the same inputs and seed give the same numbers on CPU."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from bdaudit.core.errors import BdauditError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device_name(name: str) -> str:
    """Check the spelling only (for devices resolved elsewhere, e.g. on Ray workers)."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise BdauditError(f"`device` must be one of {', '.join(DEVICES)} (or cuda:N), not '{name}'")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    resolve_device_name(name)
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BdauditError("`device` cuda was asked for but CUDA is not available; use `device` auto")
    if name == "mps" and not mps_ok:
        raise BdauditError("`device` mps was asked for but MPS is not available; use `device` auto")
    return torch.device(name)


def eval_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward-only evaluation on CUDA (faster, halves activation memory); off
    on CPU and MPS so CPU numbers stay bit-identical. Only predictions (argmax) come out of these
    passes, never gradients or trained weights; BDAUDIT_FP32=1 turns it off for an exact-fp32 audit."""
    if device.type != "cuda" or os.environ.get("BDAUDIT_FP32") == "1" or not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def seed_everything(seed: int) -> torch.Generator:
    """Seed every global RNG and return a CPU generator for explicit random choices."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BdauditError(f"`seed` must be a whole number from 0 to 2**63-1, not {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def environment_info(device: torch.device, seed: int) -> dict[str, object]:
    return {"device": str(device), "torch": torch.__version__, "seed": seed,
            "threads": torch.get_num_threads()}
