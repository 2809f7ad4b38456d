"""The paper's other two planting paradigms (Sha et al. 2022, arXiv:2212.09067, Sec. 3).

``standalone`` (``bdaudit.planting.plant``) trains a backdoored model from scratch; here:

- ``transfer``: a victim fine-tunes a backdoored upstream model on its own clean data (whole
  model or head only) and the backdoor may survive (``plant_transfer``);
- ``encoder``: a self-supervised encoder is backdoored BadEncoder-style and a victim trains a
  linear head on it with clean labels (``plant_encoder``).
"""

from bdaudit.planting.common import PlantRun
from bdaudit.planting.encoder import EncoderBackdoor, EncoderSettings, plant_encoder
from bdaudit.planting.plant import AttackChoice, TrainSettings
from bdaudit.planting.transfer import TRANSFER_MODES, TRANSFER_SETTINGS, plant_transfer

__all__ = ["TRANSFER_MODES", "TRANSFER_SETTINGS", "AttackChoice", "EncoderBackdoor", "EncoderSettings",
           "PlantRun", "TrainSettings", "plant_encoder", "plant_transfer"]
