"""The compiled backends' ops as ``torch.library`` operators, so that ``torch.compile`` traces them: schemas, fake
kernels and Python entry points, written once for every namespace.

``torch.ops.fastadv.*`` (the C++/CUDA extension, schemas in ``csrc/registration.cpp``) and
``torch.ops.fastadv_triton.*`` (the Triton kernels, defined here from :class:`~fastadv.backends.contract.Backend`'s
signatures and :data:`~fastadv.backends.contract.WRITES`) share the fake kernels of :func:`register_fakes` and the
entry points of :func:`calls`.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from fastadv.backends.contract import WRITES, Backend, signature

__all__ = ["LibraryOps", "schema", "register_fakes", "calls", "define"]

_F = TypeVar("_F", bound=Callable[..., Any])


class LibraryOps(NamedTuple):
    """One function per op of a namespace, with the contract's signature."""

    scan: Callable[..., Tensor]
    row_sumsq: Callable[..., Tensor]
    perturb: Callable[..., None]
    measure: Callable[..., Tensor]
    project: Callable[..., None]
    restore: Callable[..., None]
    input_step: Callable[..., Tensor]


#: Schema types of the contract's type hints.
_TYPES: dict[object, str] = {Tensor: "Tensor", list[Tensor]: "Tensor[]", list[int]: "int[]", float: "float",
                             list[Tensor] | None: "Tensor[]?", float | None: "float?", Tensor | None: "Tensor?",
                             str: "str", bool: "bool"}


def schema(op: str) -> str:
    """The ``torch.library`` schema of ``op`` without its name, from the contract's signature and :data:`WRITES`:
    what ``csrc/registration.cpp`` declares. (``torch.library.infer_schema`` has no ``Tensor[]?``.)"""
    hints = typing.get_type_hints(getattr(Backend, op))
    args, aliases = [], iter("abcdefgh")
    for name, parameter in signature(op).parameters.items():
        kind = _TYPES[hints[name]]
        if name in WRITES[op]:
            kind = kind.replace("Tensor", f"Tensor({next(aliases)}!)")
        default = "" if parameter.default is inspect.Parameter.empty else f"={parameter.default}"
        args.append(f"{kind} {name}{default}")
    returns = "()" if hints["return"] is type(None) else _TYPES[hints["return"]]
    return f"({', '.join(args)}) -> {returns}"


# ---- fake kernels: only shapes, for FakeTensor/meta tracing; perturb, project and restore only write their inputs ----


def _stats(grads: list[Tensor], *_: object, **__: object) -> Tensor:
    return grads[0].new_empty((len(grads), 3), dtype=torch.float64)


def _sums(tensors: list[Tensor], *_: object, **__: object) -> Tensor:
    return tensors[0].new_empty((len(tensors),), dtype=torch.float64)


def _delta_sumsq(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor],
                 n_backed: list[int], scales: Tensor) -> Tensor:
    return scales.new_empty((len(params),), dtype=torch.float32)


def _nothing(*_: object, **__: object) -> None:
    return None


def _group_norms(delta: Tensor, grad: Tensor, mask: Tensor | None, lr: float, norm: str, per_token: bool,
                 *_: object) -> Tensor:
    return delta.new_empty(delta.shape[:2] if per_token else delta.shape[:1], dtype=torch.float32)


_FAKES = LibraryOps(scan=_stats, row_sumsq=_sums, perturb=_nothing, measure=_delta_sumsq, project=_nothing,
                    restore=_nothing, input_step=_group_norms)


def register_fakes(namespace: str) -> None:
    """Register the fake kernels of every op of ``torch.ops.<namespace>``."""
    for op, fake in zip(LibraryOps._fields, _FAKES):
        torch.library.register_fake(f"{namespace}::{op}", fake)


# ---- entry points ----


def calls(namespace: str) -> LibraryOps:
    """Functions with the contract's signatures that call the ops of ``torch.ops.<namespace>`` (ints and floats
    converted to what their schemas take)."""
    ops = getattr(torch.ops, namespace)

    def scan(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor],
             params: list[Tensor] | None = None) -> Tensor:
        return ops.scan(grads, touched, fresh, params)

    def row_sumsq(tensors: list[Tensor], rows: list[Tensor]) -> Tensor:
        return ops.row_sumsq(tensors, rows)

    def perturb(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor],
                n_backed: list[int], scales: Tensor, box_eps: float | None = None) -> None:
        box = None if box_eps is None else float(box_eps)
        ops.perturb(params, grads, rows, backups, [int(n) for n in n_backed], scales, box)

    def measure(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor],
                n_backed: list[int], scales: Tensor) -> Tensor:
        return ops.measure(params, grads, rows, backups, [int(n) for n in n_backed], scales)

    def project(params: list[Tensor], grads: list[Tensor], rows: list[Tensor], backups: list[Tensor],
                scales: Tensor, delta_sumsq: Tensor, eps: float) -> None:
        ops.project(params, grads, rows, backups, scales, delta_sumsq, float(eps))

    def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
        ops.restore(params, rows, backups)

    def input_step(delta: Tensor, grad: Tensor, mask: Tensor | None, lr: float, norm: str, per_token: bool,
                   denom_eps: float, denom_floor: float, bound: str, radius: float) -> Tensor:
        return ops.input_step(delta, grad, mask, float(lr), norm, bool(per_token), float(denom_eps),
                              float(denom_floor), bound, float(radius))

    return LibraryOps(scan, row_sumsq, perturb, measure, project, restore, input_step)


def _eager_or_traced(eager: _F, traced: Callable[..., Any]) -> _F:
    """``eager`` itself when called eagerly; ``traced`` (the ``torch.library`` op) under ``torch.compile``."""

    @functools.wraps(eager)
    def op(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return traced(*args, **kwargs)
        return eager(*args, **kwargs)

    return op  # type: ignore[return-value]


def define(namespace: str, kernels: LibraryOps) -> LibraryOps:
    """Define the ops of ``torch.ops.<namespace>`` (``torch.library.custom_op``, the contract's schemas) over
    ``kernels``, with the fake kernels of :func:`register_fakes`.

    Returns what the backend module exports: each kernel itself when called eagerly (no dispatcher on the way: the
    same launches, errors and host cost as before), the op when ``torch.compile`` traces the call.
    """
    for op, kernel in zip(LibraryOps._fields, kernels):
        torch.library.custom_op(f"{namespace}::{op}", kernel, mutates_args=WRITES[op], schema=schema(op))
    register_fakes(namespace)
    return LibraryOps(*(_eager_or_traced(kernel, traced) for kernel, traced in zip(kernels, calls(namespace))))
