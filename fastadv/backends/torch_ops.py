"""Pure-PyTorch backend: one read of each gradient in ``scan``, everything else on the touched rows only.

It runs wherever PyTorch runs and is the fallback of every other backend. See :mod:`fastadv.backends` for the
contract of each op.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scan", "perturb", "restore", "supports"]

# Rows per chunk when a half-precision gradient is widened to fp32 on the CPU: ~4 MiB stays in cache, and
# vector_norm(..., dtype=float32) on the whole matrix would be ten times slower there.
_CHUNK_BYTES = 4 << 20


def _row_norms(grad: Tensor) -> Tensor:
    """fp32 L2 norm of each row, accumulated in fp32, in one read of ``grad``."""
    if grad.dtype == torch.float32 or grad.device.type != "cpu":
        return torch.linalg.vector_norm(grad, dim=-1, dtype=torch.float32)
    out = torch.empty(grad.shape[0], dtype=torch.float32, device=grad.device)
    step = max(1, _CHUNK_BYTES // (4 * max(1, grad.shape[1])))
    for start in range(0, grad.shape[0], step):
        rows = slice(start, start + step)
        torch.linalg.vector_norm(grad[rows].float(), dim=-1, out=out[rows])
    return out


def scan(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor]) -> Tensor:
    stats = torch.empty(len(grads), 2, dtype=torch.float64, device=grads[0].device)
    for i, (grad, seen, new) in enumerate(zip(grads, touched, fresh)):
        norms = _row_norms(grad)
        torch.ne(norms, 0, out=new)
        new &= ~seen
        stats[i, 0] = norms.square().sum()
        stats[i, 1] = new.sum()
    return stats


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
    usable = torch.isfinite(sumsq) & (sumsq > 0)
    scales = torch.where(usable, coef * sumsq.rsqrt(), 0.0)
    for i, (param, grad, idx, backup) in enumerate(zip(params, grads, rows, backups)):
        if param.device.type == "cpu" and not usable[i]:
            # free on the CPU; elsewhere the write is masked below instead of synced
            backup[n_backed[i] :] = param.index_select(0, idx[n_backed[i] :])
            continue
        if len(idx) == param.shape[0]:
            _perturb_every_row(param, grad, backup, n_backed[i], scales[i], usable[i], project_eps)
            continue
        if n_backed[i] < len(idx):
            torch.index_select(param, 0, idx[n_backed[i] :], out=backup[n_backed[i] :])
        old = param.index_select(0, idx).float()
        new = torch.addcmul(old, grad.index_select(0, idx).float(), scales[i])
        if project_eps is not None:
            new = _projected(new, backup.float(), project_eps)
        param.index_copy_(0, idx, torch.where(usable[i], new, old).to(param.dtype))


def _projected(new: Tensor, origin: Tensor, eps: float) -> Tensor:
    norm = torch.linalg.vector_norm(new - origin)
    return torch.where(norm > eps, torch.lerp(origin, new, eps / norm), new)


def _perturb_every_row(
    param: Tensor, grad: Tensor, backup: Tensor, n_backed: int, scale: Tensor, usable: Tensor, eps: float | None
) -> None:
    """A dense gradient (e.g. a tied LM head): the rows are 0..n-1 in order, so plain slices replace the gathers."""
    backup[n_backed:] = param[n_backed:]
    if eps is None and param.dtype == torch.float32 and param.device.type == "cpu":
        param.addcmul_(grad, scale)  # usable was checked by the caller
        return
    new = torch.addcmul(param.float(), grad.float(), scale)
    if eps is not None:
        new = _projected(new, backup.float(), eps)
    param.copy_(new if param.device.type == "cpu" else torch.where(usable, new, param.float()))


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    for param, idx, backup in zip(params, rows, backups):
        param.index_copy_(0, idx, backup)


def supports(device: torch.device) -> bool:
    return True
