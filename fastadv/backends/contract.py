"""The backend contract, written once: :class:`Backend`, the ops every backend provides, with their types, and
:data:`OPS`, what else the contract says of each op. Every other list of the ops derives from these two.

A backend is a module (:mod:`~fastadv.backends.torch_ops`, :mod:`~fastadv.backends.triton_ops`,
:mod:`~fastadv.backends.ext_ops`) whose functions have the signatures of :class:`Backend`'s methods (without ``self``):
the same parameter names, in the same order, with the same defaults and type hints. The torch backend has every op; a
compiled backend (``triton``, ``ext``) has every op marked ``required`` and may lack the others, which it then runs on
the torch backend's (:func:`fastadv.backends.resolve_backend`): so an op can land in the torch backend first.
:func:`mismatches` lists where a module departs from the contract (``tests/test_contract.py`` runs it on every
backend); a type checker sees the same thing in ``backend: Backend = torch_ops``. The schemas of the ``torch.library``
ops (``torch.ops.fastadv.*`` of the extension, ``torch.ops.fastadv_triton.*``) are inferred from these signatures
(:mod:`fastadv.backends._library`), and the test checks that ``csrc/registration.cpp`` declares the same ones.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple, Protocol, TypeAlias, TypeVar

import torch
from torch import Tensor

__all__ = ["Backend", "Op", "OPS", "Tensors", "signature", "mismatch", "mismatches"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: What the ops take a list of tensors as (one per target parameter): ``Tensor[]`` in a schema.
Tensors: TypeAlias = list[Tensor]


class Op(NamedTuple):
    """What the contract says of an op besides its signature."""

    #: The list arguments it writes into, in place (``mutates_args`` to ``torch.library``, ``(a!)`` in a schema); the
    #: other arguments are only read.
    writes: tuple[str, ...]
    #: Whether every compiled backend implements it (``tests/test_contract.py`` checks); a compiled backend that lacks
    #: an op that is not required runs the torch backend's.
    required: bool


#: Every op of the contract, in the order of :class:`Backend` (filled by its methods' decorators); ``supports`` is not
#: an op: it says where the ops run.
OPS: dict[str, Op] = {}


def _op(*writes: str, required: bool = False) -> Callable[[_F], _F]:
    """Marks a method of :class:`Backend` as an op (see :class:`Op`): the list arguments it writes, and whether every
    compiled backend must implement it."""

    def mark(method: _F) -> _F:
        OPS[method.__name__] = Op(writes, required)
        return method

    return mark


class Backend(Protocol):
    """The stateless ops of a backend, over lists of tensors.

    ``params``/``grads`` are 2-D views ``[rows, cols]`` of each target parameter and its gradient (1-D tensors are one
    row); ``rows[i]`` is an int64 list of the rows perturbed so far, without repeats; a list holding every row is in
    order ``0..rows-1`` (so a backend may use slices) unless some but not all of its rows are backed up
    (``0 < n_backed[i] < len(rows[i])``). ``backups[i]`` holds the original values of the same rows, ``len(rows[i])``
    of them. ``scales`` is a float32 vector (float64 when a parameter is float64), one step size per tensor; a zero
    scale means "leave this tensor's weights alone". Sums of squares are accumulated in fp32 (fp64 for float64 tensors)
    whatever the dtype, and each written element is rounded once per op. All math below is in that precision on the
    widened values (``W``, ``G``, ``B`` are the current weights, gradient and backup of a row).

    No op syncs with the host; the caller reads ``stats`` once per attack (it needs the row counts).
    """

    @_op("fresh", required=True)
    def scan(self, grads: Tensors, touched: Tensors, fresh: Tensors, params: Tensors | None = None) -> Tensor:
        """One read of each gradient (and of each parameter when ``params`` is given). ``stats`` is a float64
        ``[n, 3]`` tensor: the sum of squares of ``grads[i]``; the number of rows that are non-zero in ``grads[i]``
        (any element non-zero, NaN included, even when its square underflows) and not yet in ``touched[i]``; the sum
        of squares of ``params[i]`` (0 without ``params``). Those rows are flagged in the bool buffer ``fresh[i]``
        (every element of ``fresh[i]`` is written)."""
        ...

    @_op(required=True)
    def row_sumsq(self, tensors: Tensors, rows: Tensors) -> Tensor:
        """float64 ``[n]``: the sum of squares of the rows ``rows[i]`` of ``tensors[i]``, reading only those rows."""
        ...

    @_op("backups")
    def backup(self, params: Tensors, rows: Tensors, backups: Tensors, n_backed: list[int]) -> None:
        """``backups[i][j] = params[i][rows[i][j]]`` (the bits) for ``j >= n_backed[i]``; no weight is written. A
        gather: the compiled backends run the torch backend's (:func:`fastadv.backends.torch_ops.backup`). The attack
        classes back up the new rows with it before any weight is written, so an interrupted step never leaves a row
        without its original."""
        ...

    @_op("params", "backups", required=True)
    def perturb(
        self,
        params: Tensors,
        grads: Tensors,
        rows: Tensors,
        backups: Tensors,
        n_backed: list[int],
        scales: Tensor,
        box_eps: float | None = None,
    ) -> None:
        """For every row ``r = rows[i][j]``: if ``j >= n_backed[i]`` first save ``backups[i][j] = params[i][r]``
        (the bits); then, where ``scales[i] != 0``, ``W = W + scales[i] * G``, and with ``box_eps`` (AWP) clamped
        elementwise into ``[B - d, B + d]`` with ``d = float32(box_eps) * |B|``; stored rounded once."""
        ...

    @_op("backups", required=True)
    def measure(
        self, params: Tensors, grads: Tensors, rows: Tensors, backups: Tensors, n_backed: list[int], scales: Tensor
    ) -> Tensor:
        """PGD's first pass: the backups as in ``perturb``, and a float32 (float64 for float64 parameters) ``[n]``
        vector of ``||W + scales[i] * G - B||^2`` over ``rows[i]`` (0 where the scale is 0); the weights are not
        written."""
        ...

    @_op("params", required=True)
    def project(
        self,
        params: Tensors,
        grads: Tensors,
        rows: Tensors,
        backups: Tensors,
        scales: Tensor,
        delta_sumsq: Tensor,
        eps: float,
    ) -> None:
        """PGD's second pass, where ``scales[i] != 0``: ``new = W + scales[i] * G`` as in ``measure``; with
        ``norm = sqrt(float32(delta_sumsq[i]))``, where ``norm > eps`` ``new = lerp(B, new, eps / norm)``
        (``torch.lerp``'s formula); stored rounded once. Between the two passes a caller may all-reduce
        ``delta_sumsq`` (sharded weights)."""
        ...

    @_op("params", required=True)
    def restore(self, params: Tensors, rows: Tensors, backups: Tensors) -> None:
        """``params[i][rows[i]] = backups[i]``, bit-exact, in place."""
        ...

    @_op("delta", required=True)
    def input_step(
        self,
        delta: Tensor,
        grad: Tensor,
        mask: Tensor | None,
        lr: float,
        norm: str,
        per_token: bool,
        denom_eps: float,
        denom_floor: float,
        bound: str,
        radius: float,
    ) -> Tensor:
        """One ascent step of an input perturbation (FreeLB, SMART), in place, one pass over ``[B, T, D]``.

        ``delta`` and ``grad`` (its gradient, same shape and dtype) are contiguous ``[B, T, D]``; ``mask`` is a bool
        ``[B, T]`` (``None``: every token). A *group* is an example ``delta[b]`` (``[T, D]``) or, with ``per_token``,
        a token ``delta[b, t]`` (``[D]``). With ``g`` the gradient where the mask is set and 0 elsewhere, ``n`` is
        each group's ``||g||_2`` (``norm="l2"`` and ``"sign"``) or ``max |g|`` (``"inf"``), and the step is
        ``lr * g / max(n + denom_eps, denom_floor)`` (``"l2"``, ``"inf"``) or ``lr * sign(g)`` (``"sign"``).
        ``new = delta + step``, then ``bound="l2"``: ``new *= radius / ||new||_2`` in groups where
        ``||new||_2 > radius``; ``"inf"``: ``new = clamp(new, -radius, radius)``; ``"none"``: as is. Groups whose
        ``n`` is not finite take no step (``new = delta``, then bounded). Written rounded once; masked-out tokens keep
        their values (the ``"l2"`` bound scales them with their group). Returns ``n``, float32 ``[B]`` (``[B, T]`` with
        ``per_token``)."""
        ...

    def supports(
        self, device: torch.device, dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None
    ) -> bool:
        """Whether the ops run on tensors of ``device`` (and, when given, on parameters of ``dtype`` with gradients
        of ``grad_dtype``)."""
        ...


def signature(name: str) -> inspect.Signature:
    """The signature of op (or ``supports``) ``name`` as a backend module's function has it (:class:`Backend`'s
    method without ``self``), its annotations the type-hint strings."""
    method = inspect.signature(getattr(Backend, name))
    return method.replace(parameters=list(method.parameters.values())[1:])


def _hints(function: object) -> dict[str, object]:
    hints = typing.get_type_hints(function)
    hints.pop("self", None)
    return hints


def mismatch(module: ModuleType, name: str, *, compiled: bool = False) -> str | None:
    """How ``module``'s function ``name`` (an op or ``supports``) departs from :class:`Backend`: missing (with
    ``compiled``, a compiled backend's module, only a required op or ``supports`` must be there), or its parameters
    (names, order, kinds, defaults), return type or type hints differ. None where it conforms."""
    function = getattr(module, name, None)
    if function is None and compiled and name in OPS and not OPS[name].required:
        return None  # the torch backend's runs instead
    if not callable(function):
        return f"{module.__name__} has no {name}()"
    want, have = signature(name), inspect.signature(function)
    shape = [(p.name, p.kind, p.default) for p in want.parameters.values()]
    if [(p.name, p.kind, p.default) for p in have.parameters.values()] != shape:
        return f"{module.__name__}.{name}{have} does not take the parameters of {name}{want}"
    if _hints(function) != _hints(getattr(Backend, name)):
        return f"{module.__name__}.{name}{have} is not typed as {name}{want}"
    return None


def mismatches(module: ModuleType, *, compiled: bool = False) -> list[str]:
    """Where ``module`` departs from :class:`Backend` (:func:`mismatch` of every op and ``supports``). Empty for a
    conforming backend."""
    found = (mismatch(module, name, compiled=compiled) for name in (*OPS, "supports"))
    return [problem for problem in found if problem is not None]
