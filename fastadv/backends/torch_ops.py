"""Pure-PyTorch backend: one read of each gradient in ``scan``, everything else on the touched rows only.

It runs wherever PyTorch runs and is the fallback of every other backend. See :mod:`fastadv.backends` for the
contract of each op. Where a tensor's every row is perturbed (a tied embedding, AWP's dense weights) the rows are in
order, so the ops use slices of cache-sized row chunks instead of gathers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["scan", "row_sumsq", "perturb", "measure", "project", "restore", "supports"]

# Whole-matrix work on the CPU goes through row chunks of about this many fp32 bytes: temporaries that stay in cache
# (vector_norm(..., dtype=float32) of a whole bf16 matrix is ten times slower than chunk by chunk).
_CHUNK_BYTES = 4 << 20


def _row_chunks(tensor: Tensor) -> list[slice]:
    """Row slices covering ``tensor``: cache-sized on the CPU, the whole tensor elsewhere."""
    if tensor.device.type != "cpu":
        return [slice(None)]
    step = max(1, _CHUNK_BYTES // (4 * max(1, tensor.shape[1])))
    return [slice(start, start + step) for start in range(0, tensor.shape[0], step)]


def _row_norms(tensor: Tensor) -> Tensor:
    """fp32 L2 norm of each row, accumulated in fp32, in one read of ``tensor``."""
    if tensor.dtype == torch.float32 or tensor.device.type != "cpu":
        return torch.linalg.vector_norm(tensor, dim=-1, dtype=torch.float32)
    out = torch.empty(tensor.shape[0], dtype=torch.float32, device=tensor.device)
    for rows in _row_chunks(tensor):
        torch.linalg.vector_norm(tensor[rows].float(), dim=-1, out=out[rows])
    return out


def scan(grads: list[Tensor], touched: list[Tensor], fresh: list[Tensor], params: list[Tensor] | None = None) -> Tensor:
    stats = torch.zeros(len(grads), 3, dtype=torch.float64, device=grads[0].device)
    for i, (grad, seen, new) in enumerate(zip(grads, touched, fresh)):
        norms = _row_norms(grad)
        torch.ne(norms, 0, out=new)
        new &= ~seen
        stats[i, 0] = norms.square().sum()
        stats[i, 1] = new.sum()
        if params is not None:
            stats[i, 2] = _row_norms(params[i]).square().sum()
    return stats


def row_sumsq(tensors: list[Tensor], rows: list[Tensor]) -> Tensor:
    sums = [_row_norms(_gather(tensor, idx)).square().sum() for tensor, idx in zip(tensors, rows)]
    return torch.stack(sums).double() if sums else torch.zeros(0, dtype=torch.float64)


def _back_up(param: Tensor, idx: Tensor, backup: Tensor, done: int) -> None:
    """``backup[done:] = param[idx[done:]]``: the rows not yet backed up."""
    if _every_row(param, idx):
        backup[done:] = param[done:]
    elif done < len(idx):
        torch.index_select(param, 0, idx[done:], out=backup[done:])


def _every_row(param: Tensor, idx: Tensor) -> bool:
    return len(idx) == param.shape[0]  # then rows 0..n-1 in order (the contract): slices, not gathers


def _pieces(param: Tensor, idx: Tensor) -> list[slice | Tensor]:
    """How to address the perturbed rows: cache-sized slices when they are every row, else the index list once."""
    return _row_chunks(param) if _every_row(param, idx) else [idx]


def _rows_of(tensor: Tensor, piece: slice | Tensor) -> Tensor:
    return tensor[piece] if isinstance(piece, slice) else _gather(tensor, piece)


def _current(param: Tensor, idx: Tensor, backup: Tensor, done: int, piece: slice | Tensor) -> Tensor:
    """The rows ``piece`` of W; those backed up by this call are in ``backup`` already, so only the others are
    gathered."""
    if isinstance(piece, slice) or done == len(idx):
        return _rows_of(param, piece)
    return backup if done == 0 else torch.cat([_gather(param, idx[:done]), backup[done : len(idx)]])


def _steps(
    param: Tensor, grad: Tensor, idx: Tensor, backup: Tensor, done: int, scale: Tensor
) -> Iterator[tuple[slice | Tensor, Tensor, Tensor]]:
    """For each piece of the perturbed rows: the piece, a new fp32 tensor ``W + scale * G`` of its rows, and their
    backup rows ``B`` (in the parameter's dtype)."""
    for piece in _pieces(param, idx):
        weights = _current(param, idx, backup, done, piece).float()
        origin = backup[piece] if isinstance(piece, slice) else backup[: len(idx)]
        if isinstance(piece, slice):  # views of the gradient: never write into them
            yield piece, torch.addcmul(weights, grad[piece].float(), scale), origin
        else:
            gathered = _gather(grad, piece).float()
            yield piece, torch.addcmul(weights, gathered, scale, out=gathered), origin


def _store(param: Tensor, piece: slice | Tensor, new: Tensor, keep: Tensor) -> None:
    """Round ``new`` once into the rows ``piece``; on a GPU the write is masked by ``keep`` instead of a host sync."""
    if param.device.type != "cpu":
        new = torch.where(keep, new, _rows_of(param, piece).float())
    if isinstance(piece, slice):
        param[piece] = new
    else:
        param.index_copy_(0, piece, new.to(param.dtype))


def perturb(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    n_backed: list[int],
    scales: Tensor,
    box_eps: float | None = None,
) -> None:
    for i, (param, grad, idx, backup) in enumerate(zip(params, grads, rows, backups)):
        _back_up(param, idx, backup, n_backed[i])
        keep = scales[i] != 0
        if param.device.type == "cpu" and not keep:
            continue  # free to check on the CPU; elsewhere the writes are masked instead of synced
        if box_eps is None and param.dtype == torch.float32 and param.device.type == "cpu" and _every_row(param, idx):
            param.addcmul_(grad, scales[i])  # in place, already rounded once
            continue
        for piece, new, origin in _steps(param, grad, idx, backup, n_backed[i], scales[i]):
            if box_eps is not None:
                origin = origin.float()
                reach = origin.abs().mul_(box_eps)  # fp32(box_eps) * |B|, as the seed computes it in fp32
                new = torch.minimum(torch.maximum(new, origin - reach), origin + reach)
            _store(param, piece, new, keep)


def measure(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    n_backed: list[int],
    scales: Tensor,
) -> Tensor:
    out = torch.zeros(len(params), dtype=torch.float32, device=scales.device)
    for i, (param, grad, idx, backup) in enumerate(zip(params, grads, rows, backups)):
        _back_up(param, idx, backup, n_backed[i])
        if param.device.type == "cpu" and scales[i] == 0:
            continue
        total = torch.zeros((), dtype=torch.float32, device=param.device)
        for _, new, origin in _steps(param, grad, idx, backup, n_backed[i], scales[i]):
            delta = new.sub_(origin.float()).view(-1)
            total += torch.dot(delta, delta)
        out[i] = torch.where(scales[i] != 0, total, 0.0)
    return out


def project(
    params: list[Tensor],
    grads: list[Tensor],
    rows: list[Tensor],
    backups: list[Tensor],
    scales: Tensor,
    delta_sumsq: Tensor,
    eps: float,
) -> None:
    norms = delta_sumsq.float().sqrt()
    for i, (param, grad, idx, backup) in enumerate(zip(params, grads, rows, backups)):
        keep = scales[i] != 0
        on_cpu = param.device.type == "cpu"
        if on_cpu and not keep:
            continue
        outside, factor = norms[i] > eps, eps / norms[i]
        for piece, new, origin in _steps(param, grad, idx, backup, len(idx), scales[i]):  # all backed up
            if not on_cpu:
                new = torch.where(outside, torch.lerp(origin.float(), new, factor), new)
            elif outside:  # the check is free on the CPU, and the ball is rarely left
                new = torch.lerp(origin.float(), new, factor)
            _store(param, piece, new, keep)


def _gather(source: Tensor, idx: Tensor) -> Tensor:
    """``source[idx]``; into a preallocated output, which index_select fills several times faster on the CPU."""
    return torch.index_select(source, 0, idx, out=source.new_empty((len(idx), source.shape[1])))


def restore(params: list[Tensor], rows: list[Tensor], backups: list[Tensor]) -> None:
    for param, idx, backup in zip(params, rows, backups):
        if _every_row(param, idx):
            param.copy_(backup)
        else:
            param.index_copy_(0, idx, backup)


def supports(device: torch.device) -> bool:
    return True
