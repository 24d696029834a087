"""Backends: the three stateless ops every implementation provides, and the choice between implementations.

A backend is a module with three functions over lists of tensors. ``params``/``grads`` are 2-D views
``[rows, cols]`` of each target parameter and its gradient (1-D tensors are one row); ``rows[i]`` is an int64 list
of the rows perturbed so far (when it holds every row they are in order ``0..rows-1``, so a backend may use slices);
``backups[i]`` holds the original values of the same rows, ``len(rows[i])`` of them. Sums of squares are accumulated
in fp32 whatever the dtype, and each written element is rounded once per op.

``scan(grads, touched, fresh) -> stats``
    One read of each gradient. ``stats`` is a float64 ``[n, 2]`` tensor: the fp32-accumulated sum of squares of
    ``grads[i]`` and the number of rows that are non-zero in ``grads[i]`` and not yet in ``touched[i]``; those rows
    are flagged in the bool buffer ``fresh[i]`` (every element of ``fresh[i]`` is written).
``perturb(params, grads, rows, backups, n_backed, sumsq, coef, project_eps) -> None``
    For every row ``r = rows[i][j]``: if ``j >= n_backed[i]`` first save ``backups[i][j] = params[i][r]``; then
    ``params[i][r] += coef / sqrt(sumsq[i]) * grads[i][r]``. With ``project_eps`` (PGD) the update is then projected
    onto the ball of that radius around the backup: ``W = B + min(1, eps / ||W - B||) * (W - B)`` with the norm over
    all of ``rows[i]`` taken on the unrounded fp32 ``W``, so each element is rounded once (this needs a reduction
    over the rows before the write: two passes over the touched rows, decided on the device). A tensor whose
    ``sumsq[i]`` is zero or not finite is left alone (its backups are still written).
``restore(params, rows, backups) -> None``
    ``params[i][rows[i]] = backups[i]``, bit-exact, in place.

No op syncs with the host; the caller reads ``stats`` once per attack (it needs the row counts).
Every backend module also has ``supports(device) -> bool``: whether its ops run on tensors of that device.

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
