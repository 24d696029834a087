"""Integrations of fastadv with training frameworks; each submodule imports its framework only when imported itself.

- :mod:`fastadv.integrations.transformers`: :class:`~fastadv.integrations.transformers.AdversarialTrainer`, a
  ``transformers.Trainer`` that trains with FGM, PGD or AWP (``pip install fastadv[transformers]``).
"""

__all__: list[str] = []
