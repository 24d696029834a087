"""Backends: the stateless ops every implementation provides, and the choice between implementations.

A backend is a module of functions over lists of tensors: ``scan``, ``row_sumsq``, ``backup``, ``perturb``,
``measure``, ``project``, ``restore``, ``input_step`` (over one input perturbation) and
``supports(device, dtype=None, grad_dtype=None)``. Their signatures, types
and meaning are written once, as :class:`fastadv.backends.contract.Backend` (a ``typing.Protocol``; also importable
from here); ``tests/test_contract.py`` checks every backend module against it. No op syncs with the host.

Backends, each op at the same name: ``torch`` (:mod:`fastadv.backends.torch_ops`, pure PyTorch, any device and
dtype), ``triton`` (:mod:`fastadv.backends.triton_ops` over the kernels in ``fastadv/kernels/``, CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``ext`` (:mod:`fastadv.backends.ext_ops` over the C++/CUDA extension in ``csrc/``). A
compiled backend (``triton``, ``ext``) is used on a (device, dtype) only after it passed the runtime self-check
(:mod:`fastadv.selfcheck`) there; otherwise, and for what it does not support (float64, a gradient of another dtype
on ``ext``), the torch backend is used. The compiled backends' ops are also ``torch.library`` operators
(``torch.ops.fastadv.*``, ``torch.ops.fastadv_triton.*``) with fake kernels, so ``torch.compile`` traces them
(:mod:`fastadv.backends._library`).

Adding an op, in this order:

1. ``contract.py``: the method on :class:`~fastadv.backends.contract.Backend` (typed signature, docstring: the
   contract), its name in ``OPS`` and, for an op of the compiled backends, the lists it writes in ``WRITES``.
2. ``torch_ops.py``: the reference implementation, at the same name with the same signature.
3. ``_library.py``: a field of ``LibraryOps``, the op's fake kernel in ``_FAKES`` and its entry point in ``calls()``
   (and a ``_TYPES`` entry for a new argument type); ``schema(op)`` derives its schema from the contract.
4. ``csrc/``: that schema in ``registration.cpp`` and the CPU/CUDA kernels (``ext_ops.py`` takes the op from
   ``calls()``); ``fastadv/kernels/``: the launcher, with the contract's signature, passed to ``define()`` in
   ``triton_ops.py``.
5. Tests: ``tests/test_contract.py`` (signatures and schemas; the Triton op's opcheck and compile cases),
   ``tests/test_ext.py`` (the extension's) and ``tests/test_ops.py`` (every backend against the oracles);
   ``fastadv/selfcheck.py`` when the compiled backends should be checked at run time.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from types import ModuleType

import torch

from fastadv.backends.contract import Backend

__all__ = ["BACKENDS", "Backend", "available_backends", "resolve_backend", "backend_for"]

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


def _requested(name: str) -> tuple[str, str]:
    """The backend name ``"auto"`` stands for (``FASTADV_BACKEND`` when set), and how the user asked for it (for
    errors: the environment variable or the argument)."""
    if name == "auto" and os.environ.get("FASTADV_BACKEND"):
        return os.environ["FASTADV_BACKEND"], f"FASTADV_BACKEND={os.environ['FASTADV_BACKEND']!r}"
    return name, f"backend={name!r}"


def resolve_backend(name: str, device: torch.device | None) -> ModuleType | None:
    """The backend module for ``name`` (``"auto"`` or one of :data:`BACKENDS`) on ``device``.

    ``"auto"`` honours the ``FASTADV_BACKEND`` environment variable, then takes the first backend of its list for the
    device type that runs there. With ``device=None`` it only checks that the name is valid and loads (returns None
    for ``"auto"``).
    """
    name, asked = _requested(name)
    if name == "auto":
        if device is None:
            return None
        return _load(next(n for n in _AUTO.get(device.type, ("torch",)) if _usable(n, device)))
    try:
        backend = _load(name)
    except (ValueError, RuntimeError) as err:
        raise type(err)(f"{asked}: {err}") from err
    if device is not None and not backend.supports(device):
        hint = (" (Triton runs CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before importing"
                " triton, for tests)" if name == "triton" and device.type == "cpu" else "")
        where = "unset FASTADV_BACKEND" if asked.startswith("FASTADV_BACKEND") else "use backend='auto' or 'torch'"
        raise RuntimeError(f"{asked}: the {name!r} backend does not run on {device} tensors{hint}; {where}")
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
    name = _requested(name)[0]
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
