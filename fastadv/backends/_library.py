"""The compiled backends' ops as ``torch.library`` operators, so that ``torch.compile`` traces them: schemas, fake
kernels and Python entry points, written once for every namespace and every op of the contract.

``torch.ops.fastadv.*`` (the C++/CUDA extension, schemas in ``csrc/registration.cpp``) and
``torch.ops.fastadv_triton.*`` (the Triton kernels, defined here from :class:`~fastadv.backends.contract.Backend`'s
signatures and :data:`~fastadv.backends.contract.OPS`) share the fake kernels of :func:`register_fakes` and the
entry points of :func:`calls`. Each function takes the ops a backend implements (op name -> function, or names); the
others are the torch backend's and have no ``torch.library`` op.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from fastadv.backends import contract
from fastadv.backends.contract import Backend, Tensors, signature

__all__ = ["schema", "register_fakes", "calls", "define"]

_F = TypeVar("_F", bound=Callable[..., Any])


#: Schema types of the contract's type hints.
_TYPES: dict[object, str] = {
    Tensor: "Tensor",
    list[Tensor]: "Tensor[]",
    list[int]: "int[]",
    float: "float",
    list[Tensor] | None: "Tensor[]?",
    float | None: "float?",
    Tensor | None: "Tensor?",
    str: "str",
    bool: "bool",
}


def schema(op: str) -> str:
    """The ``torch.library`` schema of ``op`` without its name, from the contract's signature and what it writes:
    what ``csrc/registration.cpp`` declares. (``torch.library.infer_schema`` has no ``Tensor[]?``.)"""
    hints = typing.get_type_hints(getattr(Backend, op))
    args, aliases = [], iter("abcdefgh")
    for name, parameter in signature(op).parameters.items():
        kind = _TYPES[hints[name]]
        if name in contract.OPS[op].writes:
            kind = kind.replace("Tensor", f"Tensor({next(aliases)}!)")
        default = "" if parameter.default is inspect.Parameter.empty else f"={parameter.default}"
        args.append(f"{kind} {name}{default}")
    returns = "()" if hints["return"] is type(None) else _TYPES[hints["return"]]
    return f"({', '.join(args)}) -> {returns}"


# ---- fake kernels: only shapes, for FakeTensor/meta tracing; perturb, project and restore only write their inputs ----


def _stats(grads: Tensors, *_: object, **__: object) -> Tensor:
    return grads[0].new_empty((len(grads), 3), dtype=torch.float64)


def _sums(tensors: Tensors, *_: object, **__: object) -> Tensor:
    return tensors[0].new_empty((len(tensors),), dtype=torch.float64)


def _delta_sumsq(
    params: Tensors, grads: Tensors, rows: Tensors, backups: Tensors, n_backed: list[int], scales: Tensor
) -> Tensor:
    return scales.new_empty((len(params),), dtype=torch.float32)


def _nothing(*_: object, **__: object) -> None:
    return None


def _group_norms(
    delta: Tensor, grad: Tensor, mask: Tensor | None, lr: float, norm: str, per_token: bool, *_: object
) -> Tensor:
    return delta.new_empty(delta.shape[:2] if per_token else delta.shape[:1], dtype=torch.float32)


#: The fake kernel of each op that a compiled backend implements (``tests/test_contract.py`` checks that each has one).
_FAKES: dict[str, Callable[..., Any]] = {
    "scan": _stats,
    "row_sumsq": _sums,
    "perturb": _nothing,
    "measure": _delta_sumsq,
    "project": _nothing,
    "restore": _nothing,
    "input_step": _group_norms,
}


def register_fakes(namespace: str, ops: Iterable[str]) -> None:
    """Register the fake kernels of the ops ``ops`` of ``torch.ops.<namespace>``."""
    for op in ops:
        torch.library.register_fake(f"{namespace}::{op}", _FAKES[op])


# ---- entry points ----

#: How an entry point converts an argument of each type hint for the schema (ints and floats of other types, such as
#: numpy's, are not what ``int[]``, ``float`` or ``bool`` take); other arguments are passed as they are.
_CONVERSIONS: dict[object, str] = {
    list[int]: "[int(n) for n in {0}]",
    float: "float({0})",
    float | None: "None if {0} is None else float({0})",
    bool: "bool({0})",
}


def _entry_point(op: str, target: Callable[..., Any]) -> Callable[..., Any]:
    """A function with the contract's signature of ``op`` that calls ``target`` with the arguments converted. Written
    out as source and compiled (as ``dataclasses`` does): a call costs what a hand-written one does, with no binding
    of arguments to a signature."""
    hints = typing.get_type_hints(getattr(Backend, op))
    parameters = signature(op).parameters
    converted = ", ".join(_CONVERSIONS.get(hints[name], "{0}").format(name) for name in parameters)
    scope: dict[str, Any] = {"_target": target, "__name__": __name__}
    source = f"def {op}({', '.join(parameters)}):\n    return _target({converted})\n"
    exec(compile(source, f"<fastadv entry point of {op}>", "exec"), scope)
    function = scope[op]
    function.__defaults__ = tuple(p.default for p in parameters.values() if p.default is not inspect.Parameter.empty)
    function.__annotations__ = {name: hints[name] for name in parameters}
    function.__annotations__["return"] = None if hints["return"] is type(None) else hints["return"]
    function.__doc__ = getattr(Backend, op).__doc__
    return function


def calls(namespace: str, ops: Iterable[str]) -> dict[str, Callable[..., Any]]:
    """Functions with the contract's signatures that call the ops ``ops`` of ``torch.ops.<namespace>``."""
    library = getattr(torch.ops, namespace)
    return {op: _entry_point(op, getattr(library, op)) for op in ops}


def _eager_or_traced(eager: _F, traced: Callable[..., Any]) -> _F:
    """``eager`` itself when called eagerly; ``traced`` (the ``torch.library`` op) under ``torch.compile``."""

    @functools.wraps(eager)
    def op(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return traced(*args, **kwargs)
        return eager(*args, **kwargs)

    return op  # type: ignore[return-value]


def define(namespace: str, kernels: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Define the ops of ``torch.ops.<namespace>`` (``torch.library.custom_op``, the contract's schemas) over
    ``kernels`` (op name -> kernel), with the fake kernels of :func:`register_fakes`.

    Returns what the backend module exports: each kernel itself when called eagerly (no dispatcher on the way: the
    same launches, errors and host cost as before), the op when ``torch.compile`` traces the call.
    """
    for op, kernel in kernels.items():
        torch.library.custom_op(f"{namespace}::{op}", kernel, mutates_args=contract.OPS[op].writes, schema=schema(op))
    register_fakes(namespace, kernels)
    traced = calls(namespace, kernels)
    return {op: _eager_or_traced(kernel, traced[op]) for op, kernel in kernels.items()}
