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

__all__ = ["scan", "perturb", "restore", "supports"]

try:
    _LIBRARIES = _ext.load(cuda=torch.cuda.is_available())
except ImportError as _err:
    _ext.warn_unavailable(_err, "backend='auto' uses the torch backend instead")
    raise


def scan(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor]) -> Tensor:
    return torch.ops.fastadv.scan(grads, touched, fresh)


def perturb(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    n_backed: list[int],
    sumsq: Tensor,
    coef: float,
    project_eps: float | None,
) -> None:
    eps = None if project_eps is None else float(project_eps)
    torch.ops.fastadv.perturb(params, grads, rows, backups, [int(n) for n in n_backed], sumsq, float(coef), eps)


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    torch.ops.fastadv.restore(params, rows, backups)


def supports(device: torch.device) -> bool:
    """CPU tensors always (this module imported means the CPU kernels loaded); CUDA ones when the CUDA library did."""
    return torch.device(device).type in _LIBRARIES


def _register_fakes() -> None:
    """Shape-only kernels for FakeTensor/meta tracing (torch.compile); perturb and restore only write their inputs."""

    @torch.library.register_fake("fastadv::scan")
    def _(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor]) -> Tensor:
        return grads[0].new_empty((len(grads), 2), dtype=torch.float64)

    @torch.library.register_fake("fastadv::perturb")
    def _(
        params: list[Tensor],
        grads: list[Tensor],
        rows: list[Tensor],
        backups: list[Tensor],
        n_backed: list[int],
        sumsq: Tensor,
        coef: float,
        project_eps: float | None,
    ) -> None:
        return None

    @torch.library.register_fake("fastadv::restore")
    def _(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
        return None


_register_fakes()
