"""Dirty-label poisoning attacks that differ only in their trigger family."""

from __future__ import annotations

from bdaudit.attacks.base import Attack, register_attack


@register_attack
class BadNetsAttack(Attack):
    name = "badnets"
    paper = "Gu et al. 2017, BadNets (arXiv:1708.06733)"
    trigger_family = "badnets"


@register_attack
class BlendedAttack(Attack):
    name = "blended"
    paper = "Chen et al. 2017, Targeted Backdoor Attacks ... Data Poisoning (arXiv:1712.05526)"
    trigger_family = "blended"


@register_attack
class LowFrequencyAttack(Attack):
    name = "lowfreq"
    paper = "Zeng et al. 2021, Rethinking the Backdoor Attacks' Triggers (arXiv:2104.03413)"
    trigger_family = "lowfreq"


@register_attack
class TrojanNNAttack(Attack):
    name = "trojannn"
    paper = "Liu et al. 2018, Trojaning Attack on Neural Networks (NDSS)"
    trigger_family = "trojannn"
