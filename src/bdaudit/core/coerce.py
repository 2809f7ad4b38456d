"""One strict string-to-value rule for settings typed as text (``--set``, trigger parameters, YAML)."""

from __future__ import annotations

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """``true``/``false`` and their usual synonyms; anything else (a typo such as ``flase``) is an
    error, never a silent False."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true/false, yes/no, on/off or 1/0)")
