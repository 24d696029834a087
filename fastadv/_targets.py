"""The targets of an attack: the parameters it perturbs, validated before anything is modified
(:func:`validated_targets`); as the ops of one attack step see them (:class:`StepTargets`); and how many target
attacks were skipped for a norm that is inf or NaN (:class:`NonfiniteSkips`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor, nn

from fastadv._deepspeed import ZeroPlacement, refuse_zero_model
from fastadv._rows import RowState
from fastadv._sharding import Placement, Sharding, local
from fastadv._util import matching_parameters, user_stacklevel
from fastadv.rules import Rule

Targets = list[tuple[str, nn.Parameter]]


def validated_targets(
    model: nn.Module, name_part: str, *, rule: Rule, placement: Placement, states: dict[str, RowState]
) -> Targets:
    """The parameters of ``model`` whose names contain ``name_part``, each checked before anything is modified;
    zero-size ones are left out (nothing to perturb), and unless the rule ``needs_grad`` so are those without a
    gradient. ``states``: the row states of the attack so far, which a continued attack must write into."""
    targets = _matching(model, name_part, rule=rule, placement=placement)
    _refuse_rebound(targets, placement=placement, states=states)
    return targets


def _matching(model: nn.Module, name_part: str, *, rule: Rule, placement: Placement) -> Targets:
    shape = placement.shape
    named = matching_parameters(model, name_part, rule.arg)
    if not isinstance(placement, ZeroPlacement):  # before the size filter: ZeRO-3 leaves them empty
        refuse_zero_model(named, "FusedFGM/FusedPGD/FusedAWP")
    named = [(n, p) for n, p in named if shape(p).numel()]
    if not rule.needs_grad:
        named = [(n, p) for n, p in named if p.grad is not None]
        if not named:
            raise RuntimeError(
                f"no parameter matching {rule.arg}={name_part!r} has a .grad: call loss.backward() before attack()"
            )
    for name, param in named:
        grad = param.grad
        if grad is None:
            raise RuntimeError(
                f"parameter {name!r} matches {rule.arg}={name_part!r} but has no .grad: call loss.backward() before"
                " attack()"
            )
        if grad.layout != torch.strided:
            raise RuntimeError(
                f"parameter {name!r} has a {grad.layout} gradient (e.g. nn.Embedding(sparse=True)); fastadv needs"
                " dense gradients: build the embedding with sparse=False"
            )
        if grad.shape != shape(param):
            raise RuntimeError(f"parameter {name!r} has shape {tuple(shape(param))} but its grad {tuple(grad.shape)}")
        if not local(param.data).is_contiguous():
            raise RuntimeError(
                f"parameter {name!r} is not contiguous (strides {tuple(local(param.data).stride())}); fastadv"
                " writes whole rows in place: make it contiguous once before training (param.data ="
                " param.data.contiguous(), then build the optimizer)"
            )
        if param.device != named[0][1].device:
            raise RuntimeError(
                f"parameters matching {rule.arg}={name_part!r} are on several devices; attack them with one object"
                " per device"
            )
    return named


def _refuse_rebound(targets: Targets, *, placement: Placement, states: dict[str, RowState]) -> None:
    """A continued attack must write where the first one did: refuse (nothing modified) if a target was rebound
    or converted since, instead of perturbing a tensor whose originals are backed up elsewhere."""
    for name, param in targets:
        state = states.get(name)
        if state is not None and state.n_rows and not state.writes_into(placement.weights(param)):
            raise RuntimeError(
                f"parameter {name!r} was rebound or converted (model.to(), .half(), param.data = ...) during the"
                " active attack: call restore() first (it writes the originals into the live tensor)"
            )


@dataclass(frozen=True, kw_only=True)
class StepTargets:
    """The targets of one attack step side by side, as its ops take them: their names, the ``[rows, cols]`` weights
    this process writes (:meth:`Placement.weights`), the gradients matching them row for row, their row states; the
    backend whose ops run on them, and how they are split across processes."""

    names: list[str]
    weights: list[Tensor]
    grads: list[Tensor]
    states: list[RowState]
    backend: ModuleType
    sharding: Sharding


class NonfiniteSkips:
    """How many parameter attacks were skipped because a norm was inf or NaN, with one warning. A scan's decisions are
    counted at once (:meth:`skip`); the row hints' stay on the device (:meth:`defer`) until a host sync reads them:
    the next hinted attack's (:meth:`deferred`, then :meth:`read`), or :attr:`count`'s."""

    def __init__(self) -> None:
        self._count = 0
        self._deferred: list[tuple[list[str], Tensor]] = []  # skip flags not read yet, by target names
        self._warned = False

    @property
    def count(self) -> int:
        if self._deferred:
            self.read(torch.cat(self.deferred()).tolist())
        return self._count

    def defer(self, names: list[str], flags: Tensor) -> None:
        """Skip flags of ``names`` (bool, on the device), counted when a host sync reads them."""
        self._deferred.append((names, flags))

    def deferred(self) -> list[Tensor]:
        """The flags not read yet, for the caller's host sync; :meth:`read` takes what it read."""
        return [flags for _, flags in self._deferred]

    def read(self, flags: list[float]) -> None:
        """Count the flags of :meth:`deferred`, as read by a host sync."""
        names = [name for group, _ in self._deferred for name in group]
        self._deferred = []
        for name, flag in zip(names, flags):
            if flag:
                self.skip(name)

    def skip(self, name: str) -> None:
        self._count += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"the gradient norm of {name!r} (or its weights' norm) is inf or NaN: its attack is skipped"
                " (counted in .nonfinite_skips; warned once)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
