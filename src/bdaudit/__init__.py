"""bdaudit: audit image classifiers for backdoors and remove them by fine-tuning (FT-SAM plus
trigger unlearning by default)."""

import os

# timm/huggingface_hub must never reach the network: set before either is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
