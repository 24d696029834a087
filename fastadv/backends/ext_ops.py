"""C++/CUDA backend: the ops of :mod:`fastadv.backends` as ``torch.ops.fastadv.*`` kernels from ``csrc/``.

Importing this module loads the extension (see :mod:`fastadv.ext`), compiling it on first use; when that is impossible
(no compiler, no ninja, a failed build) the import raises ImportError with the reason, so the registry reports ``ext``
as unavailable and ``backend="auto"`` falls back to torch, with one warning per process. CUDA kernels are loaded when
a GPU is visible; without them ``supports(cuda)`` is False.

Each op the library registers is one call over the whole list of tensors, through the dispatcher
(:func:`fastadv.backends._library.calls`); the contract's other ops are the torch backend's.
The fake kernels (:func:`fastadv.backends._library.register_fakes`) are registered here, so the ops trace under
``torch.compile``. See :class:`fastadv.backends.contract.Backend` for the contract of each op.
"""

from __future__ import annotations

import torch

from fastadv import ext as _ext
from fastadv.backends import _library, contract

#: What the kernels read and write: fp32 accumulation of these, gradients of the parameter's dtype.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    _LIBRARIES = _ext.load(cuda=torch.cuda.is_available())
except ImportError as _err:
    _ext.warn_unavailable(_err, "backend='auto' uses the torch backend instead")
    raise

# The ops of the contract that the extension registers, as module functions (the others are the torch backend's:
# fastadv.backends.resolve_backend).
_OPS = _library.calls("fastadv", [op for op in contract.OPS if hasattr(torch.ops.fastadv, op)])
_library.register_fakes("fastadv", _OPS)
globals().update(_OPS)
__all__ = [*_OPS, "supports"]


def supports(device: torch.device, dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None) -> bool:
    """CPU tensors always (this module imported means the CPU kernels loaded); CUDA ones when the CUDA library did.
    Parameters of :data:`DTYPES` (not float64) with gradients of the same dtype."""
    dtype_ok = dtype is None or (dtype in DTYPES and grad_dtype in (None, dtype))
    return torch.device(device).type in _LIBRARIES and dtype_ok
