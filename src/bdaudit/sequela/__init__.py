"""Backdoor sequela (Sha et al. 2022, arXiv:2212.09067): side effects of a backdoor and of its
removal — membership leakage (``mia``) and how fast the backdoor returns when retuned
(``reinjection``)."""

from bdaudit.sequela.mia import (
    ATTACKS,
    AttackResult,
    MembershipError,
    MIAResult,
    compare,
    membership_inference,
    roc_auc,
    tpr_at_fpr,
)
from bdaudit.sequela.reinjection import (
    CurvePoint,
    ReinjectionError,
    ReinjectionResult,
    reinjection_attack,
)

__all__ = ["ATTACKS", "AttackResult", "CurvePoint", "MIAResult", "MembershipError",
           "ReinjectionError", "ReinjectionResult", "compare", "membership_inference",
           "reinjection_attack", "roc_auc", "tpr_at_fpr"]
