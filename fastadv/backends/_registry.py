"""The backends by name, and what a backend is once loaded: what :mod:`fastadv.backends` (``backend_for``) and the
self-check (:mod:`fastadv.selfcheck`) both need, here so that neither imports the other.

A loaded backend (:func:`complete`) has every op of the contract: its module's own where the module has one
(``native``), else the torch backend's, so that an op can land in the torch backend before the compiled ones have it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import overload

import torch

from fastadv.backends import contract, torch_ops

__all__ = ["BACKENDS", "complete", "load", "available_backends", "requested", "resolve_backend"]

#: Every backend name.
BACKENDS = ("torch", "triton", "ext")
_MODULES = {name: f"fastadv.backends.{name}_ops" for name in BACKENDS}
#: What ``backend="auto"`` tries, in order, per device type.
AUTO = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}


def complete(module: ModuleType) -> ModuleType:
    """Backend module ``module`` as the attacks call it: a module (named as ``module``) whose attribute for each op of
    the contract is ``module``'s own function where it has one and the torch backend's where it has none; ``native``,
    the ops ``module`` implements itself (the self-check checks these, the others are the torch backend's); and
    ``supports``, ``module``'s. A plain module, not a subclass: CPython looks up a module's attributes fastest."""
    backend = ModuleType(module.__name__, module.__doc__)
    native = frozenset(op for op in contract.OPS if hasattr(module, op))

    def supports(device: torch.device, dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None) -> bool:
        """``module.supports``, looked up at each call."""
        return module.supports(device, dtype, grad_dtype)

    vars(backend).update(
        {op: getattr(module if op in native else torch_ops, op) for op in contract.OPS},
        supports=supports,
        native=native,
        module=module,
    )
    return backend


# name -> its loaded backend, made once per process: every call gets the same object.
_LOADED: dict[str, ModuleType] = {}


def load(name: str) -> ModuleType:
    """Backend ``name`` (one of :data:`BACKENDS`), its module imported on the first call; RuntimeError if it can't
    be (the reason in the message)."""
    loaded = _LOADED.get(name)
    if loaded is not None:
        return loaded
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: expected 'auto' or one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(_MODULES[name])
    except (ImportError, RuntimeError, OSError) as err:
        raise RuntimeError(f"backend {name!r} is not available here: {err}") from err
    return _LOADED.setdefault(name, complete(module))


def usable(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` loads and runs on ``device``."""
    try:
        return load(name).supports(device)
    except RuntimeError:
        return False


def available_backends() -> list[str]:
    """Names of the backends that run on this machine (on its CPU or its GPU), e.g. ``['torch']``.

    >>> "torch" in available_backends()
    True
    """
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS if any(usable(name, device) for device in devices)]


def requested(name: str) -> tuple[str, str]:
    """The backend name ``"auto"`` stands for (``FASTADV_BACKEND`` when set), and how the user asked for it (for
    errors: the environment variable or the argument)."""
    if name == "auto" and os.environ.get("FASTADV_BACKEND"):
        return os.environ["FASTADV_BACKEND"], f"FASTADV_BACKEND={os.environ['FASTADV_BACKEND']!r}"
    return name, f"backend={name!r}"


@overload
def resolve_backend(name: str, device: torch.device) -> ModuleType: ...
@overload
def resolve_backend(name: str, device: torch.device | None) -> ModuleType | None: ...
def resolve_backend(name: str, device: torch.device | None) -> ModuleType | None:
    """The backend ``name`` (``"auto"`` or one of :data:`BACKENDS`) on ``device``.

    ``"auto"`` honours the ``FASTADV_BACKEND`` environment variable, then takes the first backend of its list for the
    device type that runs there. With ``device=None`` it only checks that the name is valid and loads (returns None
    for ``"auto"``).
    """
    name, asked = requested(name)
    if name == "auto":
        if device is None:
            return None
        return load(next(n for n in AUTO.get(device.type, ("torch",)) if usable(n, device)))
    try:
        backend = load(name)
    except (ValueError, RuntimeError) as err:
        raise type(err)(f"{asked}: {err}") from err
    if device is not None and not backend.supports(device):
        hint = (
            " (Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing"
            " triton, for tests)"
            if name == "triton" and device.type == "cpu"
            else ""
        )
        where = "unset FASTADV_BACKEND" if asked.startswith("FASTADV_BACKEND") else "use backend='auto' or 'torch'"
        raise RuntimeError(f"{asked}: the {name!r} backend does not run on {device} tensors{hint}; {where}")
    return backend
