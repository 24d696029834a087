"""Per-parameter row state: which rows of a weight an attack has perturbed since the last restore, and their
original values."""

from __future__ import annotations

import torch
from torch import Tensor


def as_rows(tensor: Tensor) -> Tensor:
    """``tensor`` as ``[rows, cols]`` sharing its storage (a 1-D or 0-D tensor is one row)."""
    return tensor.view(tensor.shape[0] if tensor.dim() > 1 else 1, -1)


class RowState:
    """The rows of one parameter perturbed since the last restore, and their original values.

    Rows found by an attack step are first *pending* (``n_backed <= i < n_rows``); they count for ``restore()`` only
    once their backups are written (``backed_up()``), so an attack interrupted at any point never restores a backup
    that was not written. Buffers of some of the rows keep their capacity across restores, so steady-state training
    allocates nothing; a backup of every row (a tied embedding, whose LM head gives every row a gradient; AWP's dense
    weights) is inherently a copy of the whole weight, and is freed at ``clear()`` rather than held between steps
    (1 GiB for a 128256x4096 bf16 embedding), at the cost of allocating it again at the next attack.
    """

    def __init__(self, param: Tensor) -> None:
        n_rows, n_cols = param.shape
        self.param = param  # the [rows, cols] view of the storage the attack writes
        self.touched = torch.zeros(n_rows, dtype=torch.bool, device=param.device)
        self.fresh = torch.empty(n_rows, dtype=torch.bool, device=param.device)
        self._rows = torch.empty(0, dtype=torch.long, device=param.device)
        self._backup = param.new_empty((0, n_cols))
        self.n_rows = 0
        self.n_backed = 0
        self._in_order = True  # rows[:n_rows] ascending: true after one scan, which finds rows in order
        self._in_order_backed = True

    def fits(self, param: Tensor) -> bool:
        return param.shape == self.param.shape and param.device == self.param.device and param.dtype == self.param.dtype

    def attach(self, param: Tensor) -> None:
        """Write into ``param`` from this attack on: the view the driver takes at each attack, of the same storage
        while rows are perturbed (the driver refuses a rebound one then), else of any tensor this state :meth:`fits`."""
        self.param = param

    def writes_into(self, param: Tensor) -> bool:
        """Whether ``param`` is the storage this state's rows were written into (not rebound or converted since)."""
        return self.fits(param) and param.data_ptr() == self.param.data_ptr()

    @property
    def rows(self) -> Tensor:
        return self._rows[: self.n_rows]

    @property
    def backup(self) -> Tensor:
        return self._backup[: self.n_rows]

    def mark_all_fresh(self) -> int:
        torch.logical_not(self.touched, out=self.fresh)
        return self.touched.numel() - self.n_rows

    def add_fresh(self, count: int) -> None:
        """Append the ``count`` rows flagged in ``fresh`` to the perturbed rows, pending until ``backed_up()``."""
        if count == 0:
            return
        new_rows = torch.nonzero_static(self.fresh, size=count).view(-1)
        needed = self.n_rows + count
        if needed > len(self._rows):
            capacity = min(len(self.touched), max(needed, 2 * len(self._rows)))
            rows = self._rows.new_empty(capacity)
            rows[: self.n_rows] = self.rows
            backup = self._backup.new_empty((capacity, self._backup.shape[1]))
            backup[: self.n_backed] = self._backup[: self.n_backed]
            self._rows, self._backup = rows, backup
        self._rows[self.n_rows : needed] = new_rows
        self.touched.index_fill_(0, new_rows, True)
        self._in_order_backed = self._in_order
        self._in_order = self.n_rows == 0
        self.n_rows = needed

    def drop_pending(self) -> None:
        """Forget the rows added since the last ``backed_up()`` (their backups may be unwritten)."""
        if self.n_rows > self.n_backed:
            self.touched.index_fill_(0, self._rows[self.n_backed : self.n_rows], False)
            self.n_rows = self.n_backed
            self._in_order = self._in_order_backed

    def backed_up(self) -> None:
        """Every row has its backup now: commit them. A complete row list is put in order first (backends use slices
        for it), swapping in sorted copies in one assignment so that an interrupt never leaves rows and backups
        out of step."""
        if not self._in_order and self.n_rows == len(self.touched):
            order = torch.argsort(self.rows)
            self._rows, self._backup = self.rows[order], self.backup[order]
            self._in_order = True
        self.n_backed = self.n_rows
        self._in_order_backed = self._in_order

    def clear(self) -> None:
        self.touched.index_fill_(0, self.rows, False)
        self.n_rows = self.n_backed = 0
        self._in_order = self._in_order_backed = True
        if len(self._rows) == len(self.touched):  # room for every row: a whole copy of the weight, not kept
            self._rows = self._rows.new_empty(0)
            self._backup = self._backup.new_empty((0, self._backup.shape[1]))
