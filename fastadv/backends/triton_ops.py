"""Triton backend: the ops as multi-tensor Triton kernels (``fastadv/kernels/``).

Each op is one launch per (dtype, vector width) group over the whole list (one in practice): ``scan`` reads whole
tensors; ``row_sumsq``, ``perturb``, ``measure`` and ``project`` are stages of one kernel over the listed rows
(``fastadv/kernels/perturb.py``), ``restore`` a copy of their bits; ``input_step`` is a launch per phase over its one
tensor, a program per slice of a group (``fastadv/kernels/input_step.py``). The reductions (``scan``, ``row_sumsq``,
``measure``) add a small per-tensor sum launch. No op syncs with the host. Runs on CUDA tensors, and on
CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it). See :class:`fastadv.backends.contract.Backend` for the
contract of each op.

The ops are also ``torch.ops.fastadv_triton.*`` custom ops with fake kernels (:func:`fastadv.backends._library.define`):
``torch.compile`` traces a call into that op, while an eager call runs the launcher directly, without the dispatcher's
cost (see ``fastadv/kernels/README.md``).
"""

from __future__ import annotations

import torch

try:
    from fastadv.backends import _library
    from fastadv.kernels import input_step as _input_step
    from fastadv.kernels import perturb as _rows
    from fastadv.kernels import restore as _restore
    from fastadv.kernels import scan as _scan
    from fastadv.kernels._common import INTERPRETED
except ImportError as err:  # no triton, or a broken install: the registry reports the backend as not available
    raise ImportError(f"the triton backend needs a working triton: {err}") from err

#: What the kernels read and write (gradients may be of another of them): fp32 math, not float64's.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The ops of the contract that Triton kernels implement, as module functions (the others are the torch backend's:
# fastadv.backends.resolve_backend).
_OPS = _library.define(
    "fastadv_triton",
    {
        "scan": _scan.scan,
        "row_sumsq": _rows.row_sumsq,
        "perturb": _rows.perturb,
        "measure": _rows.measure,
        "project": _rows.project,
        "restore": _restore.restore,
        "input_step": _input_step.input_step,
    },
)
globals().update(_OPS)
__all__ = [*_OPS, "supports"]


def supports(device: torch.device, dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None) -> bool:
    """Compiled kernels run on CUDA tensors, interpreted ones (``TRITON_INTERPRET=1``) on CPU tensors only: the
    interpreter copies each tensor argument to the host, while the kernels reach most tensors through addresses in a
    table. Parameters and gradients of :data:`DTYPES`."""
    device = torch.device(device)
    if not (dtype is None or (dtype in DTYPES and grad_dtype in (None, *DTYPES))):
        return False
    if INTERPRETED:
        return device.type == "cpu"
    return device.type == "cuda" and torch.cuda.is_available()
