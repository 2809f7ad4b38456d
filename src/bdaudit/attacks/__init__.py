"""Backdoor attacks for ``bdaudit plant``: one module per attack, registered by name."""

from bdaudit.attacks import input_aware, poisoning, sig, wanet  # noqa: F401  (each import registers attacks)
from bdaudit.attacks.base import ATTACKS, Attack, register_attack

__all__ = ["ATTACKS", "Attack", "register_attack"]
