"""Default gates and cleaning choices: a module without heavy imports, so the CLI can show them in
``--help`` without loading torch. ``scan`` and ``clean`` take their defaults from here."""

from __future__ import annotations

DEFAULT_FAIL_ASR = 0.3
DEFAULT_NULL_MARGIN = 0.1
# Above the strongest family response of the clean references measured (an under-trained tiny CNN
# sends alpha-0.2 noise blends to one class at 83 %, the clean sample at 41 %) and below the
# family-level backdoors' (blended, WaNet, low-frequency samples: 97-100 %); benchmarks/README.md.
DEFAULT_FAMILY_ASR = 0.9

# Chosen on `make bench` (benchmarks/README.md, "Defenses compared"): with 5 % clean data FT-SAM is
# the method with the lowest worst-case ASR among those within clean's 2-point accuracy gate on
# every model. SFT removes more (mean residual ASR 19 % vs 30 %) but costs 2.5 points on average.
DEFAULT_METHOD = "ftsam"
# Share of each tuning batch that carries a flagged trigger (defenses.unlearning). Chosen on `make
# bench`: with FT-SAM it takes every sample to <= 0.2 % ASR within 2 points at 400 clean images and
# resists retuning; 0.15 keeps no more accuracy and lets a retuned Blended backdoor back to 15 %.
DEFAULT_UNLEARN_FRACTION = 0.3
