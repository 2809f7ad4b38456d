"""Backdoor defenses for ``bdaudit clean --method``: one module per defense, registered by name."""

from bdaudit.defenses import finetune, sft  # noqa: F401  (each import registers a defense)
from bdaudit.defenses.base import (
    DEFENSES,
    SCOPES,
    Defense,
    DefenseContext,
    create_defense,
    register_defense,
)

__all__ = ["DEFENSES", "SCOPES", "Defense", "DefenseContext", "create_defense", "register_defense"]
