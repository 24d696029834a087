"""The method registry: fastadv's methods by name, each with its class, its options and one function that runs its
training step, so that every integration (the Hugging Face Trainer, the Lightning callback), the bench and the tests
treat all of them alike, without a branch per method.

A step is given a ``forward()`` (one forward pass: the loss, or ``(loss, logits)`` where the method
:attr:`~Method.needs_logits`) and a ``backward(loss)`` (one backward pass of the framework: loss scaling, the division
for gradient accumulation, DDP's reduction). The weight-space methods (FGM, PGD, AWP) run their loops of
:mod:`fastadv.loops` over passes made of the two; the input-space ones (FreeLB, SMART, R3F, VAT, the gradient
penalty) call them themselves.

>>> from fastadv.methods import method
>>> pgd = method("pgd")
>>> pgd.options["eps"], pgd.default_k
(1.0, 3)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

from fastadv.attacks import FusedAWP, FusedFGM, FusedPGD, _Attack
from fastadv.input_attacks import (
    FusedFreeLB,
    FusedGradientPenalty,
    FusedR3F,
    FusedSMART,
    FusedVAT,
    _InputAttack,
    _loss_of,
)

__all__ = ["Method", "METHODS", "method", "Attacker"]

Attacker = _Attack | _InputAttack
#: Options a constructor takes that are not the method's hyperparameters.
_NOT_OPTIONS = ("self", "model", "backend")


@dataclass(frozen=True)
class Method:
    """One method: its name, its class and what an integration needs to run its training step.

    Attributes:
        name: the name users pass (``"pgd"``).
        cls: the attack class.
    """

    name: str
    cls: type[Attacker]

    @property
    def options(self) -> dict[str, Any]:
        """The constructor's options (its hyperparameters and target) with their defaults."""
        parameters = inspect.signature(self.cls).parameters
        return {name: p.default for name, p in parameters.items() if name not in _NOT_OPTIONS}

    @property
    def input_space(self) -> bool:
        """Whether it perturbs the embedding output (FreeLB, SMART, R3F, VAT, the gradient penalty) rather than
        weights."""
        return issubclass(self.cls, _InputAttack)

    @property
    def needs_logits(self) -> bool:
        """Whether its ``forward()`` must return ``(loss, logits)`` (SMART, R3F, VAT compare passes' logits)."""
        return issubclass(self.cls, _InputAttack) and self.cls.compares_passes

    @property
    def default_k(self) -> int | None:
        """The number of attack steps of a weight-space method's step (``run(..., k)``); ``None`` for the others,
        whose number of passes is a constructor option."""
        parameter = inspect.signature(self.cls.run).parameters.get("k")
        return None if parameter is None else parameter.default

    @property
    def target(self) -> str:
        """The option that names what it perturbs: ``emb_name`` (a weight or the embedding module) or ``adv_param``."""
        return "emb_name" if "emb_name" in self.options else "adv_param"

    def check(self, options: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
        """A clear error for options that are not this method's and for bad values (``names``: what the caller calls
        them, for the message); the model-dependent ones (the target's name, the backend) are checked by
        :meth:`build`."""
        names = names or {}
        known = [*self.options, *(["k"] if self.default_k is not None else [])]
        wrong = [names.get(option, option) for option in options if option not in known]
        if wrong:
            what = "not an option" if len(wrong) == 1 else "not options"
            raise ValueError(f"{', '.join(wrong)}: {what} of {self.name!r} (its options: {', '.join(known)})")
        if "k" in options and issubclass(self.cls, _Attack):  # known only to those (default_k)
            self.cls.check_k(options["k"], names.get("k", "k"))
        self.cls.checked({name: value for name, value in options.items() if name != "k"}, names)

    def build(self, model: nn.Module, backend: str = "auto", **options: Any) -> Attacker:
        """The attack object on ``model`` with ``options`` (others than the constructor's are refused)."""
        self.check(options)
        return self.cls(model, backend=backend, **options)

    def step(
        self,
        attacker: Attacker,
        forward: Callable[[], Any],
        backward: Callable[[Tensor], Any],
        *,
        attention_mask: Tensor | None = None,
        k: int | None = None,
        logit_rows: Tensor | None = None,
        logit_total: Tensor | float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One training step of this method: returns the clean (task) loss and the adversarial part (FGM/PGD/AWP:
        the loss of the last adversarial pass; FreeLB: that of its last pass; SMART/R3F/VAT: their divergence; the
        gradient penalty: the squared gradient norm).

        Args:
            attacker: the object :meth:`build` made.
            forward: one forward pass; the loss, or ``(loss, logits)`` where :attr:`needs_logits`.
            backward: backpropagates a loss as the framework does.
            attention_mask: the input-space methods: the batch's ``[batch, tokens]`` mask (``None``: every token).
            k: FGM/PGD/AWP: the number of attack steps (default :attr:`default_k`).
            logit_rows: SMART/R3F/VAT: which rows of the logits count in the divergence (see
                :meth:`fastadv.FusedSMART.run`).
            logit_total: SMART/R3F/VAT: what their summed divergence is divided by.
        """
        if self.input_space:
            extra = {"logit_rows": logit_rows, "logit_total": logit_total} if self.needs_logits else {}
            return cast(_InputAttack, attacker).run(forward, backward, attention_mask, **extra)

        def run_pass() -> Tensor:
            loss = _loss_of(forward())
            backward(loss)
            return loss

        weights = cast(_Attack, attacker)
        return weights.run(run_pass) if k is None else weights.run(run_pass, k)  # run's default k: default_k


#: Every method, by name.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fgm", FusedFGM),
        Method("pgd", FusedPGD),
        Method("awp", FusedAWP),
        Method("freelb", FusedFreeLB),
        Method("smart", FusedSMART),
        Method("r3f", FusedR3F),
        Method("vat", FusedVAT),
        Method("gradient_penalty", FusedGradientPenalty),
    )
}


def method(name: str) -> Method:
    """The method called ``name`` (case-insensitive); a clear error listing them for another name."""
    found = METHODS.get(name.lower()) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"the method must be one of {', '.join(map(repr, METHODS))}, got {name!r}")
    return found
