"""Triton backend: the ops as multi-tensor Triton kernels (``kernels/``, installed as ``fastadv.kernels``).

Each op is one launch per (dtype, vector width) group over the whole list (one in practice): ``scan`` reads whole
tensors; ``row_sumsq``, ``perturb``, ``measure`` and ``project`` are stages of one kernel over the listed rows
(``kernels/perturb.py``), ``restore`` a copy of their bits. The reductions (``scan``, ``row_sumsq``, ``measure``) add
a small per-tensor sum launch. No op syncs with the host. Runs on CUDA tensors, and on
CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it). See :mod:`fastadv.backends` for the contract of each op.
"""

from __future__ import annotations

import torch

try:
    from fastadv.backends.torch_ops import backup  # a gather: the same on every backend
    from fastadv.kernels._common import INTERPRETED
    from fastadv.kernels.perturb import measure, perturb, project, row_sumsq
    from fastadv.kernels.restore import restore
    from fastadv.kernels.scan import scan
except ImportError as err:  # no triton, or a broken install: the registry reports the backend as not available
    raise ImportError(f"the triton backend needs a working triton: {err}") from err

__all__ = ["scan", "row_sumsq", "backup", "perturb", "measure", "project", "restore", "supports"]

#: What the kernels read and write (gradients may be of another of them): fp32 math, not float64's.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
