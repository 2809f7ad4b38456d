"""Trigger library: one module per family, registered by name (``bdaudit triggers`` lists them)."""

# Each family import registers it; the order is irrelevant (the registry sorts by name).
from bdaudit.triggers import (  # noqa: F401
    badnets,
    blended,
    custom,
    lowfreq,
    sig,
    trojannn,
    wanet,
)
from bdaudit.triggers.base import (
    TRIGGERS,
    Trigger,
    create_trigger,
    default_triggers,
    describe_triggers,
    parse_trigger,
    register_trigger,
)
from bdaudit.triggers.custom import load_trigger_file

__all__ = ["TRIGGERS", "Trigger", "create_trigger", "default_triggers", "describe_triggers",
           "load_trigger_file", "parse_trigger", "register_trigger"]
