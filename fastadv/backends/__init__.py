"""Backends: the stateless ops every implementation provides, and the choice between implementations.

A backend is a module with these functions over lists of tensors. ``params``/``grads`` are 2-D views ``[rows, cols]``
of each target parameter and its gradient (1-D tensors are one row); ``rows[i]`` is an int64 list of the rows
perturbed so far, without repeats (when it holds every row they are in order ``0..rows-1``, so a backend may use
slices); ``backups[i]`` holds the original values of the same rows, ``len(rows[i])`` of them. ``scales`` is a float32
vector, one step size per tensor; a zero scale means "leave this tensor's weights alone". Sums of squares are
accumulated in fp32 whatever the dtype, and each written element is rounded once per op. All math below is fp32 on
the widened values (``W``, ``G``, ``B`` are the current weights, gradient and backup of a row).

``scan(grads, touched, fresh, params=None) -> stats``
    One read of each gradient (and of each parameter when ``params`` is given). ``stats`` is a float64 ``[n, 3]``
    tensor: the sum of squares of ``grads[i]``; the number of rows that are non-zero in ``grads[i]`` (any element
    non-zero, NaN included, even when its square underflows) and not yet in ``touched[i]``; the sum of squares of
    ``params[i]`` (0 without ``params``). Those rows are flagged in the bool buffer ``fresh[i]`` (every element of
    ``fresh[i]`` is written).
``row_sumsq(tensors, rows) -> sumsq``
    float64 ``[n]``: the sum of squares of the rows ``rows[i]`` of ``tensors[i]``, reading only those rows.
``perturb(params, grads, rows, backups, n_backed, scales, box_eps=None) -> None``
    For every row ``r = rows[i][j]``: if ``j >= n_backed[i]`` first save ``backups[i][j] = params[i][r]`` (the
    bits); then, where ``scales[i] != 0``, ``W = W + scales[i] * G``, and with ``box_eps`` (AWP) clamped elementwise
    into ``[B - d, B + d]`` with ``d = float32(box_eps) * |B|``; stored rounded once.
``measure(params, grads, rows, backups, n_backed, scales) -> delta_sumsq``
    PGD's first pass: the backups as in ``perturb``, and a float32 ``[n]`` vector of ``||W + scales[i] * G - B||^2``
    over ``rows[i]`` (0 where the scale is 0); the weights are not written.
``project(params, grads, rows, backups, scales, delta_sumsq, eps) -> None``
    PGD's second pass, where ``scales[i] != 0``: ``new = W + scales[i] * G`` as in ``measure``; with
    ``norm = sqrt(float32(delta_sumsq[i]))``, where ``norm > eps`` ``new = lerp(B, new, eps / norm)`` (``torch.lerp``'s
    formula); stored rounded once. Between the two passes a caller may all-reduce ``delta_sumsq`` (sharded weights).
``restore(params, rows, backups) -> None``
    ``params[i][rows[i]] = backups[i]``, bit-exact, in place.

No op syncs with the host; the caller reads ``stats`` once per attack (it needs the row counts). Every backend module
also has ``supports(device) -> bool``: whether its ops run on tensors of that device.

Backends, each op at the same name: ``torch`` (:mod:`fastadv.backends.torch_ops`, pure PyTorch, any device),
``triton`` (:mod:`fastadv.backends.triton_ops` over the kernels in ``kernels/``, CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``ext`` (:mod:`fastadv.backends.ext_ops` over the C++/CUDA extension in ``csrc/``).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

__all__ = ["BACKENDS", "available_backends", "resolve_backend"]

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
