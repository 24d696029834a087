"""The training steps of FGM, PGD and AWP, written once, parameterised by the pass that runs them.

A *pass* runs one forward and backward pass and returns the loss: ``closure().backward()`` for
:meth:`fastadv.FusedFGM.step`; ``Trainer.training_step`` (autocast, loss scaling and the division for gradient
accumulation included) in :class:`fastadv.integrations.transformers.AdversarialTrainer`; a framework's own backward
elsewhere. Each loop returns ``(clean loss, loss of the last adversarial pass)`` and, if any pass or attack raises,
puts the weights (and PGD's clean gradients) back before the error propagates. A loop takes any attack object with
the calls it makes (:class:`Attack`, :class:`PGDAttack`: those of :mod:`fastadv.attacks` have them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

from torch import Tensor, nn

from fastadv._sharding import Placement
from fastadv._util import check_steps

__all__ = [
    "Pass",
    "Attack",
    "PGDAttack",
    "backward_pass",
    "fgm_loop",
    "pgd_loop",
    "awp_loop",
    "earlier_grads_set_aside",
    "set_grads_aside",
    "add_grads",
    "replayed_pass",
]

#: One forward and backward pass; returns the loss.
Pass = Callable[[], Tensor]


class _Restorable(Protocol):
    model: nn.Module

    def restore(self) -> None:
        """Put the original weights back."""

    def cleanup(self) -> None:
        """After a failed pass: put back whatever an attack left changed."""


class Attack(_Restorable, Protocol):
    """What :func:`fgm_loop` and :func:`awp_loop` call (:class:`fastadv.FusedFGM`, :class:`fastadv.FusedAWP`)."""

    def attack(self) -> None:
        """One attack step (AWP's first after a restore saves the original weights)."""


class PGDAttack(_Restorable, Protocol):
    """What :func:`pgd_loop` calls (:class:`fastadv.FusedPGD`)."""

    def attack(self, *, is_first_attack: bool) -> None:
        """One PGD step; the first backs up the rows it touches."""

    def backup_grad(self) -> None:
        """Remember the clean gradients."""

    def restore_grad(self) -> None:
        """Put the clean gradients back."""


def backward_pass(closure: Callable[[], Tensor]) -> Pass:
    """The pass of a ``closure()`` that runs the forward pass and returns the loss: ``closure().backward()``."""

    def run() -> Tensor:
        loss = closure()
        loss.backward()
        return loss

    return run


def replayed_pass(loss: Tensor, run_pass: Pass, replay: Callable[[], None] | None = None) -> Pass:
    """A pass whose first call stands for a clean pass that has already run (a framework ran it, as Lightning's
    automatic optimization does before ``on_after_backward``): it calls ``replay()`` if given (to put back that pass's
    gradients where they were set aside meanwhile) and returns ``loss``; later calls are ``run_pass()``."""
    pending = True

    def run() -> Tensor:
        nonlocal pending
        if not pending:
            return run_pass()
        pending = False
        if replay is not None:
            replay()
        return loss

    return run


@contextlib.contextmanager
def _undone_on_error(attack: _Restorable) -> Iterator[None]:
    try:
        yield
    except BaseException:
        attack.cleanup()
        raise


def fgm_loop(fgm: Attack, run_pass: Pass) -> tuple[Tensor, Tensor]:
    """The seed's FGM step: clean pass, attack, adversarial pass, restore. ``.grad`` gets both gradients."""
    loss = run_pass()
    with _undone_on_error(fgm):
        fgm.attack()
        adv_loss = run_pass()
        fgm.restore()
    return loss, adv_loss


def pgd_loop(pgd: PGDAttack, run_pass: Pass, k: int = 3) -> tuple[Tensor, Tensor]:
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


def awp_loop(awp: Attack, run_pass: Pass, k: int = 1, *, placement: Placement | None = None) -> tuple[Tensor, Tensor]:
    """The AWP class's step with ``adv_step = k``: clean pass, then ``k`` times (attack, ``zero_grad``, adversarial
    pass), restore. The adversarial passes replace the clean gradient; gradients already in ``.grad`` (earlier
    micro-batches of gradient accumulation) are set aside for the step, so the attack sees this batch's alone, and
    put back before the last adversarial pass, whose backward adds to them (under DDP, the backward that all-reduces
    them: put back after it, each rank would keep its own), through ``placement`` (see
    :func:`earlier_grads_set_aside`)."""
    check_steps("k", k)
    with earlier_grads_set_aside(awp.model, placement) as put_back:
        loss = run_pass()
        with _undone_on_error(awp):
            for t in range(k):
                awp.attack()
                awp.model.zero_grad()
                if t == k - 1:
                    put_back()
                adv_loss = run_pass()
            awp.restore()
    return loss, adv_loss


def set_grads_aside(params: list[nn.Parameter]) -> list[Tensor | None]:
    """Take the ``.grad`` of ``params`` out (each set to ``None``) and return them, for :func:`add_grads`."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def add_grads(params: list[nn.Parameter], grads: list[Tensor | None], placement: Placement | None = None) -> None:
    """Add ``grads`` (from :func:`set_grads_aside`) to the ``.grad`` of ``params``, in place where there is one
    (through ``placement`` where there is none: a released DeepSpeed ZeRO-3 parameter needs its help to take one)."""
    set_grad = (placement or Placement()).set_grad
    for p, grad in zip(params, grads):
        if grad is None:
            continue
        if p.grad is None:
            set_grad(p, grad)
        else:
            p.grad.add_(grad)


@contextlib.contextmanager
def earlier_grads_set_aside(model: nn.Module, placement: Placement | None = None) -> Iterator[Callable[[], None]]:
    """Gradients already in ``.grad`` are set aside for the block and added back (through ``placement``) when it
    calls the function it gets (once; later calls do nothing), or at its end."""
    params = [p for p in model.parameters() if p.requires_grad]
    earlier: list[Tensor | None] | None = set_grads_aside(params)

    def put_back() -> None:
        nonlocal earlier
        if earlier is not None:
            add_grads(params, earlier, placement)
            earlier = None

    try:
        yield put_back
    finally:
        put_back()
