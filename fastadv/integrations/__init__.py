"""Integrations of fastadv with training frameworks; each submodule imports its framework only when imported itself.

- :mod:`fastadv.integrations.transformers`: :class:`~fastadv.integrations.transformers.AdversarialTrainer`, a
  ``transformers.Trainer`` that trains with FGM, PGD, AWP, FreeLB, SMART or R3F (``pip install fastadv[transformers]``).
- :mod:`fastadv.integrations.lightning`: :class:`~fastadv.integrations.lightning.AdversarialTraining`, a Lightning
  callback that adds FGM, PGD, AWP, FreeLB, SMART or R3F to automatic optimization (``pip install
  fastadv[lightning]``).

accelerate needs no integration: ``attacker.run`` with a pass that calls ``accelerator.backward`` (README); DeepSpeed
engines are taken by the attack classes themselves (:mod:`fastadv._deepspeed`).
"""

__all__: list[str] = []
