"""Backends: the four stateless ops every implementation provides, and the choice between implementations.

A backend is a module with four functions over lists of tensors. ``params``/``grads`` are 2-D views
``[rows, cols]`` of each target parameter and its gradient (1-D tensors are one row); ``rows[i]`` is an int64 list
of the rows perturbed so far, ``backups[i]`` a buffer of the same rows' original values (``len(rows[i])`` rows used).
Sums of squares are accumulated in fp32 whatever the dtype, and each written element is rounded once per op.

``scan(grads, touched, fresh) -> stats``
    One read of each gradient. ``stats`` is a float64 ``[n, 2]`` tensor: the fp32-accumulated sum of squares of ``grads[i]`` and the
    number of rows that are non-zero in ``grads[i]`` and not yet in ``touched[i]``; those rows are flagged in the bool
    buffer ``fresh[i]`` (every element of ``fresh[i]`` is written).
``perturb(params, grads, rows, backups, n_backed, sumsq, coef, track_delta) -> delta_sumsq | None``
    For every row ``r = rows[i][j]``: if ``j >= n_backed[i]`` first save ``backups[i][j] = params[i][r]``; then
    ``params[i][r] += coef / sqrt(sumsq[i]) * grads[i][r]``. A tensor whose ``sumsq[i]`` is zero or not finite is left
    alone (its backups are still written). With ``track_delta`` it returns the fp32 ``||params[i][rows] -
    backups[i]||^2`` of the updated rows (``[n]``), else None.
``project(params, rows, backups, delta_sumsq, eps) -> None``
    Where ``sqrt(delta_sumsq[i]) > eps``: ``params[i][rows] = backups + eps / sqrt(delta_sumsq[i]) * (params[i][rows]
    - backups)``; elsewhere nothing is written. Decided on the device.
``restore(params, rows, backups) -> None``
    ``params[i][rows[i]] = backups[i]``, bit-exact, in place.

No op syncs with the host; the caller reads ``stats`` once per attack (it needs the row counts).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

__all__ = ["BACKENDS", "available_backends", "resolve_backend"]

#: Every backend name, in order of preference for ``backend="auto"``.
BACKENDS = ("torch",)


def _load(name: str) -> ModuleType:
    if name == "torch":
        from fastadv.backends import torch_ops

        return torch_ops
    raise ValueError(f"unknown backend {name!r}: expected 'auto' or one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """Names of the backends that work on this machine, e.g. ``['torch']``.

    >>> "torch" in available_backends()
    True
    """
    return [name for name in BACKENDS if _is_available(name)]


def _is_available(name: str) -> bool:
    try:
        _load(name)
    except (ImportError, RuntimeError):
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` (``"auto"`` or one of :data:`BACKENDS`) on ``device``.

    ``"auto"`` honours the ``FASTADV_BACKEND`` environment variable, then picks the first available backend.
    """
    if name == "auto":
        name = os.environ.get("FASTADV_BACKEND", "auto") or "auto"
    if name == "auto":
        name = next(n for n in BACKENDS if _is_available(n))
    return _load(name)
