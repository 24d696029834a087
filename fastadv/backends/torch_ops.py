"""Pure-PyTorch backend: one read of each gradient in ``scan``, everything else on the touched rows only.

It runs wherever PyTorch runs and is the fallback of every other backend. See :mod:`fastadv.backends` for the
contract of each op.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scan", "perturb", "restore", "supports"]

# Whole-matrix work on the CPU goes through row chunks of about this many fp32 bytes: temporaries that stay in cache
# (vector_norm(..., dtype=float32) of a whole bf16 matrix is ten times slower than chunk by chunk).
_CHUNK_BYTES = 4 << 20


def _row_chunks(tensor: Tensor) -> list[slice]:
    """Row slices covering ``tensor``: cache-sized on the CPU, the whole tensor elsewhere."""
    if tensor.device.type != "cpu":
        return [slice(None)]
    step = max(1, _CHUNK_BYTES // (4 * max(1, tensor.shape[1])))
    return [slice(start, start + step) for start in range(0, tensor.shape[0], step)]


def _row_norms(grad: Tensor) -> Tensor:
    """fp32 L2 norm of each row, accumulated in fp32, in one read of ``grad``."""
    if grad.dtype == torch.float32 or grad.device.type != "cpu":
        return torch.linalg.vector_norm(grad, dim=-1, dtype=torch.float32)
    out = torch.empty(grad.shape[0], dtype=torch.float32, device=grad.device)
    for rows in _row_chunks(grad):
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
        on_cpu, done = param.device.type == "cpu", n_backed[i]
        every_row = len(idx) == param.shape[0]  # a tied embedding: rows 0..n-1 in order, so slices, not gathers
        if every_row:
            backup[done:] = param[done:]
        elif done < len(idx):
            torch.index_select(param, 0, idx[done:], out=backup[done:])
        if on_cpu and not usable[i]:
            continue  # free to check on the CPU; elsewhere the writes below are masked instead of synced
        if every_row:
            _perturb_every_row(param, grad, backup, scales[i], usable[i], project_eps)
            continue
        # rows backed up just now still hold their original values: take them from the backup, not gather again
        old = backup if done == 0 else torch.cat([_gather(param, idx[:done]), backup[done:]])
        gathered = _gather(grad, idx).float()
        new = torch.addcmul(old.float(), gathered, scales[i], out=gathered)
        if project_eps is not None:
            origin = backup.float()
            norm = torch.dist(new, origin)
            if not on_cpu:
                new = torch.where(norm > project_eps, torch.lerp(origin, new, project_eps / norm), new)
            elif norm > project_eps:  # the check is free on the CPU, and the ball is rarely left
                new = torch.lerp(origin, new, project_eps / norm)
        new = new.to(param.dtype)
        param.index_copy_(0, idx, new if on_cpu else torch.where(usable[i], new, old))  # masked: no host sync


def _perturb_every_row(
    param: Tensor, grad: Tensor, backup: Tensor, scale: Tensor, usable: Tensor, eps: float | None
) -> None:
    """perturb on every row of a dense gradient, chunk by chunk so the fp32 temporaries stay small; with a
    projection, a first pass measures the norm of the whole update and a second writes it, rounded once."""
    on_cpu = param.device.type == "cpu"
    if eps is None and on_cpu and param.dtype == torch.float32:
        param.addcmul_(grad, scale)  # the caller checked usable
        return
    chunks = _row_chunks(param)

    def updated(rows: slice) -> Tensor:
        return torch.addcmul(param[rows].float(), grad[rows].float(), scale)

    if eps is not None:
        norm = torch.stack([torch.dist(updated(rows), backup[rows].float()) for rows in chunks]).norm()
        outside, factor = norm > eps, eps / norm
    for rows in chunks:
        new = updated(rows)
        if eps is not None and (not on_cpu or outside):
            projected = torch.lerp(backup[rows].float(), new, factor)
            new = projected if on_cpu else torch.where(outside, projected, new)
        param[rows] = new if on_cpu else torch.where(usable, new, param[rows].float())


def _gather(source: Tensor, idx: Tensor) -> Tensor:
    """``source[idx]``; into a preallocated output, which index_select fills several times faster on the CPU."""
    return torch.index_select(source, 0, idx, out=source.new_empty((len(idx), source.shape[1])))


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    for param, idx, backup in zip(params, rows, backups):
        if len(idx) == param.shape[0]:  # every row, in order
            param.copy_(backup)
        else:
            param.index_copy_(0, idx, backup)


def supports(device: torch.device) -> bool:
    return True
