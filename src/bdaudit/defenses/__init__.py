"""Backdoor defenses for ``bdaudit clean --method``: one module per defense, registered by name."""

from bdaudit.defenses import (  # noqa: F401  (each import registers a defense)
    anp,
    fine_pruning,
    finetune,
    fst,
    ftsam,
    ibau,
    nad,
    neural_cleanse,
    sft,
)
from bdaudit.defenses.base import (
    DEFENSES,
    SCOPES,
    Defense,
    DefenseContext,
    DefenseResult,
    create_defense,
    register_defense,
)

__all__ = ["DEFENSES", "SCOPES", "Defense", "DefenseContext", "DefenseResult", "create_defense", "register_defense"]
