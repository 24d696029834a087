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
        done = n_backed[i]
        every_row = len(idx) == param.shape[0]  # then the rows are 0..n-1 in order: slices replace the gathers
        if every_row:
            backup[done:] = param[done:]
            old = param
            new = torch.addcmul(param.float(), grad.float(), scales[i])
        else:
            if done < len(idx):
                torch.index_select(param, 0, idx[done:], out=backup[done:])
            # rows backed up just now still hold their original values: take them from the backup, not gather again
            old = backup if done == 0 else torch.cat([_gather(param, idx[:done]), backup[done:]])
            gathered = _gather(grad, idx).float()
            new = torch.addcmul(old.float(), gathered, scales[i], out=gathered)
        if project_eps is not None:
            origin = backup.float()
            norm = torch.dist(new, origin)
            if new.device.type != "cpu":
                new = torch.where(norm > project_eps, torch.lerp(origin, new, project_eps / norm), new)
            elif norm > project_eps:  # the check is free on the CPU, and the ball is rarely left
                new = torch.lerp(origin, new, project_eps / norm)
        new = new.to(param.dtype)
        if param.device.type != "cpu":
            new = torch.where(usable[i], new, old)  # a masked write instead of a host sync
        elif not usable[i]:
            continue
        if every_row:
            param.copy_(new)
        else:
            param.index_copy_(0, idx, new)


def _gather(source: Tensor, idx: Tensor) -> Tensor:
    """``source[idx]``; into a preallocated output, which index_select fills several times faster on the CPU."""
    return torch.index_select(source, 0, idx, out=source.new_empty((len(idx), source.shape[1])))


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    for param, idx, backup in zip(params, rows, backups):
        param.index_copy_(0, idx, backup)


def supports(device: torch.device) -> bool:
    return True
