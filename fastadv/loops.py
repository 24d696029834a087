"""The training steps of FGM, PGD and AWP, written once, parameterised by the pass that runs them.

A *pass* runs one forward and backward pass and returns the loss: ``closure().backward()`` for
:meth:`fastadv.FusedFGM.step`; ``Trainer.training_step`` (autocast, loss scaling and the division for gradient
accumulation included) in :class:`fastadv.integrations.transformers.AdversarialTrainer`; a framework's own backward
elsewhere. Each loop returns ``(clean loss, loss of the last adversarial pass)`` and, if any pass or attack raises,
puts the weights (and PGD's clean gradients) back before the error propagates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from torch import Tensor, nn

from fastadv._sharding import Placement
from fastadv._util import check_steps

if TYPE_CHECKING:
    from fastadv.attacks import FusedAWP, FusedFGM, FusedPGD

__all__ = ["Pass", "backward_pass", "fgm_loop", "pgd_loop", "awp_loop", "earlier_grads_set_aside"]

#: One forward and backward pass; returns the loss.
Pass = Callable[[], Tensor]


def backward_pass(closure: Callable[[], Tensor]) -> Pass:
    """The pass of a ``closure()`` that runs the forward pass and returns the loss: ``closure().backward()``."""

    def run() -> Tensor:
        loss = closure()
        loss.backward()
        return loss

    return run


@contextlib.contextmanager
def _undone_on_error(attack: FusedFGM | FusedPGD | FusedAWP) -> Iterator[None]:
    try:
        yield
    except BaseException:
        attack.cleanup()
        raise


def fgm_loop(fgm: FusedFGM, run_pass: Pass) -> tuple[Tensor, Tensor]:
    """The seed's FGM step: clean pass, attack, adversarial pass, restore. ``.grad`` gets both gradients."""
    loss = run_pass()
    with _undone_on_error(fgm):
        fgm.attack()
        adv_loss = run_pass()
        fgm.restore()
    return loss, adv_loss


def pgd_loop(pgd: FusedPGD, run_pass: Pass, k: int = 3) -> tuple[Tensor, Tensor]:
    """The seed's PGD step with ``pgd_k = k``: clean pass, ``backup_grad()``, ``k`` times attack and adversarial pass
    (``zero_grad`` between them, ``restore_grad()`` before the last), restore. ``.grad``: clean + last adversarial."""
    check_steps("k", k)
    loss = run_pass()
    with _undone_on_error(pgd):
        pgd.backup_grad()
        for t in range(k):
            pgd.attack(is_first_attack=(t == 0))
            if t != k - 1:
                pgd.model.zero_grad()
            else:
                pgd.restore_grad()
            adv_loss = run_pass()
        pgd.restore()
    return loss, adv_loss


def awp_loop(awp: FusedAWP, run_pass: Pass, k: int = 1) -> tuple[Tensor, Tensor]:
    """The AWP class's step with ``adv_step = k``: clean pass, then ``k`` times (attack, ``zero_grad``, adversarial
    pass), restore. The adversarial passes replace the clean gradient; gradients already in ``.grad`` (earlier
    micro-batches of gradient accumulation) are set aside for the step, so the attack sees this batch's alone, and
    added back after it."""
    check_steps("k", k)
    with earlier_grads_set_aside(awp.model, awp._placement):
        loss = run_pass()
        with _undone_on_error(awp):
            for _ in range(k):
                awp.attack()
                awp.model.zero_grad()
                adv_loss = run_pass()
            awp.restore()
    return loss, adv_loss


@contextlib.contextmanager
def earlier_grads_set_aside(model: nn.Module, placement: Placement | None = None) -> Iterator[None]:
    """Gradients already in ``.grad`` are set aside for the block and added back after it (through ``placement``:
    a released DeepSpeed ZeRO-3 parameter needs its help to take a gradient)."""
    set_grad = (placement or Placement()).set_grad
    params = [p for p in model.parameters() if p.requires_grad]
    earlier = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, earlier):
            if grad is not None:
                if p.grad is None:
                    set_grad(p, grad)
                else:
                    p.grad.add_(grad)
