"""The methods as rules: what one attack step of FGM, PGD or AWP does, as data the driver follows.

Every method steps ``W += scale * G`` on the rows the gradient touches and then bounds the result; a rule says how:
its step size per tensor from the ``[n, 3]`` stats ``(sum G^2, fresh rows, sum W^2)`` that the scan returns, its
bound (none, the ``eps`` ball around the original rows, or the ``eps`` box around them relative to ``|W0|``), whether
it needs the weights' norms, and whether matching parameters without a gradient are skipped or refused. As with
``torch.optim`` (the optimizer holds the state, a functional holds the math), the attack classes hold the state and
build their rule from their hyperparameters at each attack; the driver (:mod:`fastadv._driver`) runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Rule", "fgm_rule", "pgd_rule", "awp_rule"]

#: AWP's guard against zero norms, as in the AWP class: ``W += lr * G / (||G|| + e) * (||W|| + e)``.
AWP_E = 1e-6


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One attack step of a method.

    Attributes:
        arg: the argument that names the targets (``"emb_name"``, ``"adv_param"``), for error messages.
        step_size: ``stats -> float64 [n]``, the step size of each tensor (rounded once to the weights' precision by
            the driver); a tensor whose gradient norm is zero, inf or NaN, or whose step size is not finite, is
            not stepped.
        ball: project each tensor's total perturbation onto the ball of this radius (PGD), or ``None``.
        box: clamp each element into ``[W0 - box * |W0|, W0 + box * |W0|]`` (AWP), or ``None``.
        reads_weights: the step size needs ``sum W^2`` (the scan reads the weights too).
        needs_grad: every matching parameter must have a gradient; else those without one are left out.
    """

    arg: str
    step_size: Callable[[Tensor], Tensor]
    ball: float | None = None
    box: float | None = None
    reads_weights: bool = False
    needs_grad: bool = True


def fgm_rule(eps: float) -> Rule:
    """FGM: ``W += eps * G / ||G||``, unbounded."""
    return Rule(arg="emb_name", step_size=lambda stats: eps / stats[:, 0].sqrt())


def pgd_rule(*, alpha: float, eps: float) -> Rule:
    """One PGD step: ``W += alpha * G / ||G||``, then the total perturbation projected onto the ``eps`` ball."""
    return Rule(arg="emb_name", step_size=lambda stats: alpha / stats[:, 0].sqrt(), ball=eps)


def awp_rule(*, adv_lr: float, adv_eps: float) -> Rule:
    """One AWP step: ``W += adv_lr * G / (||G|| + e) * (||W|| + e)``, clamped into the ``adv_eps`` box around ``W0``;
    parameters without a gradient are left out."""
    return Rule(
        arg="adv_param",
        step_size=lambda stats: adv_lr * (stats[:, 2].sqrt() + AWP_E) / (stats[:, 0].sqrt() + AWP_E),
        box=adv_eps,
        reads_weights=True,
        needs_grad=False,
    )
