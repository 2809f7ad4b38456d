"""SIG: a clean-label attack (Barni et al. 2019, arXiv:1902.11237).

Only target-class images carry the sinusoid and labels are untouched, so the model learns the
signal as evidence for the target; ``poison_rate`` is the share of target-class images.
"""

from __future__ import annotations

from bdaudit.attacks.base import Attack, register_attack


@register_attack
class SIGAttack(Attack):
    name = "sig"
    paper = "Barni et al. 2019, A new backdoor attack in CNNs ... without label poisoning"
    trigger_family = "sig"
    clean_label = True
