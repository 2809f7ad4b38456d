"""The unknown-trigger detector's families, registered in the order they run and are reported.

Adding one: a module with a ``DetectorFamily`` subclass (``InvertingFamily`` for one that reverses a
trigger per candidate class and is judged by its size), and one ``register_family`` line below.
"""

from bdaudit.detect.families import patch, perturbation, square, transform
from bdaudit.detect.families.base import (
    DETECTOR_FAMILIES,
    DetectorFamily,
    FamilyJob,
    FamilyResult,
    InvertingFamily,
    family_names,
    register_family,
    score_inverted,
)

register_family(patch.PatchFamily())
register_family(perturbation.PerturbationFamily())
register_family(transform.TransformFamily())
register_family(square.SquareFamily())

__all__ = ["DETECTOR_FAMILIES", "DetectorFamily", "FamilyJob", "FamilyResult", "InvertingFamily", "family_names",
           "register_family", "score_inverted"]
