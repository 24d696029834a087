"""Backends: the stateless ops every implementation provides, and the choice between implementations.

A backend is a module with these functions over lists of tensors. ``params``/``grads`` are 2-D views ``[rows, cols]``
of each target parameter and its gradient (1-D tensors are one row); ``rows[i]`` is an int64 list of the rows
perturbed so far, without repeats; a list holding every row is in order ``0..rows-1`` (so a backend may use slices)
unless some but not all of its rows are backed up (``0 < n_backed[i] < len(rows[i])``). ``backups[i]`` holds the
original values of the same rows, ``len(rows[i])`` of them. ``scales`` is a float32 vector (float64 when a parameter
is float64), one step size per tensor; a zero scale means "leave this tensor's weights alone". Sums of squares are
accumulated in fp32 (fp64 for float64 tensors) whatever the dtype, and each written element is rounded once per op.
All math below is in that precision on the widened values (``W``, ``G``, ``B`` are the current weights, gradient and
backup of a row).

``scan(grads, touched, fresh, params=None) -> stats``
    One read of each gradient (and of each parameter when ``params`` is given). ``stats`` is a float64 ``[n, 3]``
    tensor: the sum of squares of ``grads[i]``; the number of rows that are non-zero in ``grads[i]`` (any element
    non-zero, NaN included, even when its square underflows) and not yet in ``touched[i]``; the sum of squares of
    ``params[i]`` (0 without ``params``). Those rows are flagged in the bool buffer ``fresh[i]`` (every element of
    ``fresh[i]`` is written).
``row_sumsq(tensors, rows) -> sumsq``
    float64 ``[n]``: the sum of squares of the rows ``rows[i]`` of ``tensors[i]``, reading only those rows.
``backup(params, rows, backups, n_backed) -> None``
    ``backups[i][j] = params[i][rows[i][j]]`` (the bits) for ``j >= n_backed[i]``; no weight is written. A gather,
    the same code on every backend (:func:`fastadv.backends.torch_ops.backup`). The attack classes back up the new
    rows with it before any weight is written, so an interrupted step never leaves a row without its original.
``perturb(params, grads, rows, backups, n_backed, scales, box_eps=None) -> None``
    For every row ``r = rows[i][j]``: if ``j >= n_backed[i]`` first save ``backups[i][j] = params[i][r]`` (the
    bits); then, where ``scales[i] != 0``, ``W = W + scales[i] * G``, and with ``box_eps`` (AWP) clamped elementwise
    into ``[B - d, B + d]`` with ``d = float32(box_eps) * |B|``; stored rounded once.
``measure(params, grads, rows, backups, n_backed, scales) -> delta_sumsq``
    PGD's first pass: the backups as in ``perturb``, and a float32 (float64 for float64 parameters) ``[n]`` vector
    of ``||W + scales[i] * G - B||^2`` over ``rows[i]`` (0 where the scale is 0); the weights are not written.
``project(params, grads, rows, backups, scales, delta_sumsq, eps) -> None``
    PGD's second pass, where ``scales[i] != 0``: ``new = W + scales[i] * G`` as in ``measure``; with
    ``norm = sqrt(float32(delta_sumsq[i]))``, where ``norm > eps`` ``new = lerp(B, new, eps / norm)`` (``torch.lerp``'s
    formula); stored rounded once. Between the two passes a caller may all-reduce ``delta_sumsq`` (sharded weights).
``restore(params, rows, backups) -> None``
    ``params[i][rows[i]] = backups[i]``, bit-exact, in place.

No op syncs with the host; the caller reads ``stats`` once per attack (it needs the row counts). Every backend module
also has ``supports(device, dtype=None, grad_dtype=None) -> bool``: whether its ops run on tensors of that device
(and, when given, on parameters of ``dtype`` with gradients of ``grad_dtype``).

Backends, each op at the same name: ``torch`` (:mod:`fastadv.backends.torch_ops`, pure PyTorch, any device and
dtype), ``triton`` (:mod:`fastadv.backends.triton_ops` over the kernels in ``kernels/``, CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``ext`` (:mod:`fastadv.backends.ext_ops` over the C++/CUDA extension in ``csrc/``). A
compiled backend (``triton``, ``ext``) is used on a (device, dtype) only after it passed the runtime self-check
(:mod:`fastadv.selfcheck`) there; otherwise, and for what it does not support (float64, a gradient of another dtype
on ``ext``), the torch backend is used.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "backend_for"]

#: Every backend name.
BACKENDS = ("torch", "triton", "ext")
_MODULES = {name: f"fastadv.backends.{name}_ops" for name in BACKENDS}
#: What ``backend="auto"`` tries, in order, per device type.
_AUTO = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}


def _load(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: expected 'auto' or one of {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(_MODULES[name])
    except (ImportError, RuntimeError, OSError) as err:
        raise RuntimeError(f"backend {name!r} is not available here: {err}") from err


def _usable(name: str, device: torch.device) -> bool:
    try:
        return _load(name).supports(device)
    except RuntimeError:
        return False


def available_backends() -> list[str]:
    """Names of the backends that run on this machine (on its CPU or its GPU), e.g. ``['torch']``.

    >>> "torch" in available_backends()
    True
    """
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS if any(_usable(name, device) for device in devices)]


def resolve_backend(name: str, device: torch.device | None) -> ModuleType | None:
    """The backend module for ``name`` (``"auto"`` or one of :data:`BACKENDS`) on ``device``.

    ``"auto"`` honours the ``FASTADV_BACKEND`` environment variable, then takes the first backend of its list for the
    device type that runs there. With ``device=None`` it only checks that the name is valid and loads (returns None
    for ``"auto"``).
    """
    if name == "auto":
        name = os.environ.get("FASTADV_BACKEND") or "auto"
    if name == "auto":
        if device is None:
            return None
        return _load(next(n for n in _AUTO.get(device.type, ("torch",)) if _usable(n, device)))
    backend = _load(name)
    if device is not None and not backend.supports(device):
        raise RuntimeError(f"backend {name!r} does not run on {device} tensors; use backend='auto' or 'torch'")
    return backend


def _supports(name: str, device: torch.device, pairs: set[tuple[torch.dtype, torch.dtype]]) -> bool:
    """Whether backend ``name`` runs every (parameter, gradient) dtype pair on ``device``."""
    backend = _load(name)
    return all(backend.supports(device, p, g) for p, g in pairs)


def _checked(name: str, device: torch.device, pairs: set[tuple[torch.dtype, torch.dtype]]) -> bool:
    """Whether backend ``name`` passed the runtime self-check on ``device`` for each parameter dtype (a failure warns
    once, there)."""
    from fastadv import selfcheck

    return all(selfcheck.passed(name, device, p) for p, _ in pairs)


_fallback_warned: set[tuple[str, str]] = set()


def backend_for(name: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> ModuleType:
    """The backend module that runs the ops on these parameters and gradients (one device).

    ``"auto"`` (or ``FASTADV_BACKEND``) takes the first backend of its list for the device type that supports every
    (parameter, gradient) dtype pair and passed the self-check; a named backend that can't run some of them (float64
    on ``ext``/``triton``, gradients of another dtype on ``ext``: with one warning) or failed the self-check gives way
    to the torch backend.
    """
    from fastadv._util import user_stacklevel

    device = params[0].device
    pairs = {(p.dtype, g.dtype) for p, g in zip(params, grads)}
    if name == "auto":
        name = os.environ.get("FASTADV_BACKEND") or "auto"
    if name == "auto":
        usable = [n for n in _AUTO.get(device.type, ("torch",)) if _usable(n, device)]
        return _load(next(n for n in usable if _supports(n, device, pairs) and _checked(n, device, pairs)))
    backend = resolve_backend(name, device)
    if not _supports(name, device, pairs):
        what = ", ".join(sorted(f"{str(p).removeprefix('torch.')} weights with {str(g).removeprefix('torch.')} grads"
                                for p, g in pairs))
        if (name, what) not in _fallback_warned:
            _fallback_warned.add((name, what))
            warnings.warn(f"backend {name!r} can't run {what} on {device}; the torch backend does these",
                          RuntimeWarning, stacklevel=user_stacklevel())
        return _load("torch")
    return backend if _checked(name, device, pairs) else _load("torch")
