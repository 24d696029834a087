"""Backends: the stateless ops every implementation provides, and the choice between implementations.

A backend is a module of functions over lists of tensors, the ops of the contract (``scan``, ``backup``,
``perturb``, ...: :data:`fastadv.backends.contract.OPS`), and ``supports(device, dtype=None, grad_dtype=None)``. Their
signatures, types and meaning are written once, as :class:`fastadv.backends.contract.Backend` (a ``typing.Protocol``;
also importable from here); ``tests/test_contract.py`` checks every backend module against it. No op syncs with the
host.

Backends, each op at the same name: ``torch`` (:mod:`fastadv.backends.torch_ops`, pure PyTorch, any device and
dtype), ``triton`` (:mod:`fastadv.backends.triton_ops` over the kernels in ``fastadv/kernels/``, CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``ext`` (:mod:`fastadv.backends.ext_ops` over the C++/CUDA extension in ``csrc/``). The
torch backend has every op; a compiled backend (``triton``, ``ext``) may lack an op that the contract does not mark
``required``, which it then runs on the torch backend's: :func:`resolve_backend` and :func:`backend_for` give the
backend with every op (:func:`fastadv.backends._registry.complete`), whose ``native`` ones are its module's own. A
compiled backend is used on a (device, dtype) only after its native ops passed the runtime self-check
(:mod:`fastadv.selfcheck`) there; otherwise, and for what it does not support (float64, a gradient of another dtype
on ``ext``), the torch backend is used. The compiled backends' ops are also ``torch.library`` operators
(``torch.ops.fastadv.*``, ``torch.ops.fastadv_triton.*``) with fake kernels, so ``torch.compile`` traces them
(:mod:`fastadv.backends._library`). How to add an op: ``CONTRIBUTING.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import ModuleType

import torch

from fastadv.backends._registry import (
    AUTO,
    BACKENDS,
    available_backends,
    load,
    requested,
    resolve_backend,
    usable,
)
from fastadv.backends.contract import Backend

__all__ = ["BACKENDS", "Backend", "available_backends", "resolve_backend", "backend_for"]


def _supports(name: str, device: torch.device, pairs: set[tuple[torch.dtype, torch.dtype]]) -> bool:
    """Whether backend ``name`` runs every (parameter, gradient) dtype pair on ``device``."""
    backend = load(name)
    return all(backend.supports(device, p, g) for p, g in pairs)


def _checked(name: str, device: torch.device, pairs: set[tuple[torch.dtype, torch.dtype]]) -> bool:
    """Whether backend ``name`` passed the runtime self-check on ``device`` for each parameter dtype (a failure warns
    once, there)."""
    # Imported here, not at the top: `import fastadv` imports this module, and `python -m fastadv.selfcheck` must find
    # the self-check not imported yet (runpy would warn, and run a second copy of it).
    from fastadv import selfcheck

    return all(selfcheck.passed(name, device, p) for p, _ in pairs)


_fallback_warned: set[tuple[str, str]] = set()


def backend_for(name: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> ModuleType:
    """The backend that runs the ops on these parameters and gradients (one device).

    ``"auto"`` (or ``FASTADV_BACKEND``) takes the first backend of its list for the device type that supports every
    (parameter, gradient) dtype pair and passed the self-check; a named backend that can't run some of them (float64
    on ``ext``/``triton``, gradients of another dtype on ``ext``: with one warning) or failed the self-check gives way
    to the torch backend.
    """
    from fastadv._util import user_stacklevel

    device = params[0].device
    pairs = {(p.dtype, g.dtype) for p, g in zip(params, grads)}
    name = requested(name)[0]
    if name == "auto":
        candidates = [n for n in AUTO.get(device.type, ("torch",)) if usable(n, device)]
        return load(next(n for n in candidates if _supports(n, device, pairs) and _checked(n, device, pairs)))
    backend = resolve_backend(name, device)
    if not _supports(name, device, pairs):
        what = ", ".join(
            sorted(
                f"{str(p).removeprefix('torch.')} weights with {str(g).removeprefix('torch.')} grads" for p, g in pairs
            )
        )
        if (name, what) not in _fallback_warned:
            _fallback_warned.add((name, what))
            warnings.warn(
                f"backend {name!r} can't run {what} on {device}; the torch backend does these",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        return load("torch")
    return backend if _checked(name, device, pairs) else load("torch")
