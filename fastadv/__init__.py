"""fastadv: fused embedding-space adversarial training (FGM, PGD, AWP; FreeLB, SMART, R3F, VAT, gradient penalty) for
PyTorch.

>>> from fastadv import FusedPGD  # doctest: +SKIP
>>> pgd = FusedPGD(model, eps=1.0, alpha=0.3)  # doctest: +SKIP
>>> loss = pgd.step(lambda: model(**batch).loss, k=3)  # doctest: +SKIP
"""

from fastadv.attacks import FusedAWP, FusedFGM, FusedPGD
from fastadv.backends import available_backends
from fastadv.input_attacks import FusedFreeLB, FusedGradientPenalty, FusedR3F, FusedSMART, FusedVAT

__all__ = [
    "FusedFGM",
    "FusedPGD",
    "FusedAWP",
    "FusedFreeLB",
    "FusedSMART",
    "FusedR3F",
    "FusedVAT",
    "FusedGradientPenalty",
    "available_backends",
    "__version__",
]
__version__ = "0.3.0"
