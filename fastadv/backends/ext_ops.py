"""C++/CUDA backend: the ops of :mod:`fastadv.backends` as ``torch.ops.fastadv.*`` kernels from ``csrc/``.

Importing this module loads the extension (see :mod:`fastadv.ext`), compiling it on first use; when that is impossible
(no compiler, no ninja, a failed build) the import raises ImportError with the reason, so the registry reports ``ext``
as unavailable and ``backend="auto"`` falls back to torch, with one warning per process. CUDA kernels are loaded when
a GPU is visible; without them ``supports(cuda)`` is False.

Each op is one call over the whole list of tensors. Fake kernels are registered here, so the ops trace under
``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastadv import ext as _ext
from fastadv.backends.torch_ops import backup  # a gather: the same on every backend

__all__ = ["scan", "row_sumsq", "backup", "perturb", "measure", "project", "restore", "supports"]

#: What the kernels read and write: fp32 accumulation of these, gradients of the parameter's dtype.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    _LIBRARIES = _ext.load(cuda=torch.cuda.is_available())
except ImportError as _err:
    _ext.warn_unavailable(_err, "backend='auto' uses the torch backend instead")
    raise


def scan(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor], params: list[Tensor] | None = None) -> Tensor:
    return torch.ops.fastadv.scan(grads, touched, fresh, params)


def row_sumsq(tensors: list[Tensor], rows: list[Tensor]) -> Tensor:
    return torch.ops.fastadv.row_sumsq(tensors, rows)


def perturb(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    n_backed: list[int],
    scales: Tensor,
    box_eps: float | None = None,
) -> None:
    box = None if box_eps is None else float(box_eps)
    torch.ops.fastadv.perturb(params, grads, rows, backups, [int(n) for n in n_backed], scales, box)


def measure(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    n_backed: list[int],
    scales: Tensor,
) -> Tensor:
    return torch.ops.fastadv.measure(params, grads, rows, backups, [int(n) for n in n_backed], scales)


def project(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    scales: Tensor,
    delta_sumsq: Tensor,
    eps: float,
) -> None:
    torch.ops.fastadv.project(params, grads, rows, backups, scales, delta_sumsq, float(eps))


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    torch.ops.fastadv.restore(params, rows, backups)


def supports(device: torch.device, dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None) -> bool:
    """CPU tensors always (this module imported means the CPU kernels loaded); CUDA ones when the CUDA library did.
    Parameters of :data:`DTYPES` (not float64) with gradients of the same dtype."""
    dtype_ok = dtype is None or (dtype in DTYPES and grad_dtype in (None, dtype))
    return torch.device(device).type in _LIBRARIES and dtype_ok


def _register_fakes() -> None:
    """Shape-only kernels for FakeTensor/meta tracing (torch.compile); perturb, project and restore only write their
    inputs."""

    @torch.library.register_fake("fastadv::scan")
    def _(
        grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor], params: list[Tensor] | None = None
    ) -> Tensor:
        return grads[0].new_empty((len(grads), 3), dtype=torch.float64)

    @torch.library.register_fake("fastadv::row_sumsq")
    def _(tensors: list[Tensor], rows: list[Tensor]) -> Tensor:
        return tensors[0].new_empty((len(tensors),), dtype=torch.float64)

    @torch.library.register_fake("fastadv::perturb")
    def _(
        params: list[Tensor],
        grads: list[Tensor],
        rows: list[Tensor],
        backups: list[Tensor],
        n_backed: list[int],
        scales: Tensor,
        box_eps: float | None = None,
    ) -> None:
        return None

    @torch.library.register_fake("fastadv::measure")
    def _(
        params: list[Tensor],
        grads: list[Tensor],
        rows: list[Tensor],
        backups: list[Tensor],
        n_backed: list[int],
        scales: Tensor,
    ) -> Tensor:
        return scales.new_empty((len(params),), dtype=torch.float32)

    @torch.library.register_fake("fastadv::project")
    def _(
        params: list[Tensor],
        grads: list[Tensor],
        rows: list[Tensor],
        backups: list[Tensor],
        scales: Tensor,
        delta_sumsq: Tensor,
        eps: float,
    ) -> None:
        return None

    @torch.library.register_fake("fastadv::restore")
    def _(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
        return None


_register_fakes()
