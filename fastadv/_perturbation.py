"""The state behind every attack class: which parameters, which of their rows are perturbed, the rows' originals.

:class:`RowPerturbation` runs one attack step through the ops of a backend (:mod:`fastadv.backends`): find the rows
the gradient touches (``scan``, or the looked-up token ids with ``rows="batch"``), read the counts once (the one host
sync), back up the new rows and step them (``perturb``, or ``measure`` + ``project`` for PGD's ball). Parameters
sharded by FSDP2 (DTensors with ``Shard(0)``) are worked on through their local shards, with the norms all-reduced.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn

from fastadv.backends import resolve_backend

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without distributed support: nothing can be sharded
    dist, DTensor = None, None

# Below this gradient sum of squares, a row whose squares all underflow to zero in fp32 (|g| < 4e-23) could still get
# a perturbation above 1e-12 * eps, so the attack covers every row instead of the rows the scan found non-zero.
_UNDERFLOW_SUMSQ = 1e-20

#: ``scales_of(stats) -> float64 [n]``: the step size of each tensor from its ``[n, 3]`` stats (see ``scan``).
ScaleRule = Callable[[Tensor], Tensor]


def as_rows(tensor: Tensor) -> Tensor:
    """``tensor`` as ``[rows, cols]`` sharing its storage (a 1-D or 0-D tensor is one row)."""
    return tensor.view(tensor.shape[0] if tensor.dim() > 1 else 1, -1)


def is_sharded(tensor: Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The tensor this process holds: a DTensor's local shard (its own storage, written in place), else itself."""
    if is_sharded(tensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def matching_parameters(model: nn.Module, name_part: str, what: str = "emb_name") -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters whose names contain ``name_part``; a clear error listing candidates if none does
    (``what`` names the argument the user passed it as)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and name_part in n]
    if not named:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        hints = ([n for n in names if "emb" in n.lower()] if what == "emb_name" else []) or names[:10]
        raise ValueError(
            f"no trainable parameter name contains {what}={name_part!r}; candidates: {', '.join(hints) or 'none'}."
            f" Pass {what}= (a substring of the names of the parameters to attack)"
        )
    return named


class RowState:
    """The rows of one parameter perturbed since the last restore, and their original values.

    The buffers keep their capacity across restores, so steady-state training allocates nothing here.
    """

    def __init__(self, param: Tensor) -> None:
        n_rows, n_cols = param.shape
        self.param = param
        self.touched = torch.zeros(n_rows, dtype=torch.bool, device=param.device)
        self.fresh = torch.empty(n_rows, dtype=torch.bool, device=param.device)
        self._rows = torch.empty(0, dtype=torch.long, device=param.device)
        self._backup = param.new_empty((0, n_cols))
        self.n_rows = 0
        self.n_backed = 0
        self.in_order = True  # rows[:n_rows] ascending: true after one scan, which finds rows in order

    def fits(self, param: Tensor) -> bool:
        return param.shape == self.param.shape and param.device == self.param.device and param.dtype == self.param.dtype

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
        """Append the ``count`` rows flagged in ``fresh`` to the perturbed rows."""
        if count == 0:
            return
        new_rows = torch.nonzero_static(self.fresh, size=count).view(-1)
        needed = self.n_rows + count
        if needed > len(self._rows):
            capacity = max(needed, 2 * len(self._rows))
            rows = self._rows.new_empty(capacity)
            rows[: self.n_rows] = self.rows
            backup = self._backup.new_empty((capacity, self._backup.shape[1]))
            backup[: self.n_backed] = self._backup[: self.n_backed]
            self._rows, self._backup = rows, backup
        self._rows[self.n_rows : needed] = new_rows
        self.touched.index_fill_(0, new_rows, True)
        self.in_order = self.n_rows == 0
        self.n_rows = needed

    def backed_up(self) -> None:
        """Every row has its backup now; a complete row list is put in order so backends can use slices for it."""
        self.n_backed = self.n_rows
        if not self.in_order and self.n_rows == len(self.touched):
            order = torch.argsort(self.rows)
            self._rows[: self.n_rows] = self.rows[order]
            self._backup[: self.n_rows] = self.backup[order]
            self.in_order = True

    def clear(self) -> None:
        self.touched.index_fill_(0, self.rows, False)
        self.n_rows = self.n_backed = 0
        self.in_order = True


class BatchRows:
    """``rows="batch"``: the rows of each target embedding looked up since the last attack, recorded by forward
    pre-hooks on its ``nn.Embedding`` (only where autograd records, so evaluation passes add nothing).

    Exact only if the weight gets gradient from that lookup alone, so a weight shared with another module (a tied LM
    head) is refused here, and the first attack checks the recorded rows against a dense scan.
    """

    def __init__(self, model: nn.Module, emb_name: str) -> None:
        self.emb_name = emb_name
        self.masks: dict[str, Tensor] = {}
        self.verified = False
        owners: dict[int, list[str]] = {}
        for module_name, module in model.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(module_name or "<model>")
        embeddings = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
        self._handles = []
        for name, param in model.named_parameters():
            if not (param.requires_grad and emb_name in name):
                continue
            module = embeddings.get(name)
            if module is None:
                raise ValueError(
                    f"rows='batch' records the ids of nn.Embedding lookups, but {name!r} (matching emb_name="
                    f"{emb_name!r}) is not an nn.Embedding's weight; use rows='scan' or a narrower emb_name"
                )
            if len(owners[id(param)]) > 1:
                raise ValueError(
                    f"rows='batch' needs {name!r} to be used by its own lookup alone, but it is shared by modules"
                    f" {', '.join(owners[id(param)])} (a tied LM head?), whose gradient reaches every row; use"
                    " rows='scan'"
                )
            self._handles.append(module.register_forward_pre_hook(self._recorder(name, module)))
        if not self._handles:
            raise ValueError(f"rows='batch': no trainable nn.Embedding weight name contains emb_name={emb_name!r}")

    def _recorder(self, name: str, module: nn.Embedding) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and args:
                weight = module.weight
                mask = self.masks.get(name)
                if mask is None or mask.device != weight.device or len(mask) != weight.shape[0]:
                    mask = self.masks[name] = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
                mask.index_fill_(0, args[0].reshape(-1).to(device=weight.device, dtype=torch.long), True)

        return record

    def take(self, name: str, state: RowState) -> None:
        """Flag in ``state.fresh`` the rows looked up since the last call and not yet perturbed; forget them."""
        mask = self.masks.get(name)
        if mask is None or mask.shape != state.touched.shape:
            raise RuntimeError(
                f"rows='batch': no lookup of {name!r} was recorded since the last attack; run the forward pass (with"
                " autograd on) and backward before attack()"
            )
        torch.logical_and(mask, state.touched.logical_not(), out=state.fresh)
        mask.zero_()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class Sharding:
    """How the targets are split across processes: the groups whose partial sums of squares add up to the norms."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        sharded = [is_sharded(p) for _, p in named]
        self.groups: list = []
        if not any(sharded):
            return
        if not all(sharded):
            plain = [n for (n, _), s in zip(named, sharded) if not s]
            raise RuntimeError(f"some target parameters are sharded DTensors and some ({', '.join(plain)}) are not")
        first = named[0][1]
        for name, param in named:
            bad = [p for p in param.placements if not (p.is_replicate() or p.is_shard(0))]
            if bad or param.device_mesh != first.device_mesh or param.placements != first.placements:
                raise RuntimeError(
                    f"{name!r} is a DTensor with placements {param.placements} on {param.device_mesh}; fastadv needs"
                    " every target sharded the same way, with Shard(0) or Replicate (as FSDP2's fully_shard does)"
                )
        mesh = first.device_mesh
        self.groups = [mesh.get_group(d) for d, p in enumerate(first.placements) if p.is_shard(0)]

    def all_reduce(self, sums: Tensor) -> None:
        """Sum ``sums`` in place over the shards (a no-op for unsharded targets)."""
        for group in self.groups:
            dist.all_reduce(sums, group=group)


class RowPerturbation:
    """Attack/restore bookkeeping shared by every attack class: which parameters, which rows, their backups."""

    def __init__(self, model: nn.Module, backend: str, rows: str = "scan", emb_name: str | None = None) -> None:
        resolve_backend(backend, None)  # fail now on an unknown or unavailable backend, not at the first attack
        if rows not in ("scan", "batch"):
            raise ValueError(f"rows must be 'scan' (from the gradient) or 'batch' (the looked-up ids), got {rows!r}")
        self.model = model
        self.backend_name = backend
        self.batch_rows = BatchRows(model, emb_name) if rows == "batch" else None
        if self.batch_rows is not None:  # the hooks go when the attack object does
            weakref.finalize(self, self.batch_rows.remove)
        self.active_name: str | None = None
        self._skips = 0
        self._pending: list[tuple[list[str], Tensor]] = []  # skip flags not read yet (rows="batch"), by target names
        self._backends: dict[torch.device, ModuleType] = {}
        self._states: dict[str, RowState] = {}
        self._warned = False

    @property
    def nonfinite_skips(self) -> int:
        if self._pending:
            self._count_pending(torch.cat([flags for _, flags in self._pending]).tolist())
        return self._skips

    def targets(self, name_part: str, what: str, need_grad: bool) -> list[tuple[str, nn.Parameter]]:
        """The parameters whose names contain ``name_part``, validated before anything is modified; without
        ``need_grad`` those without a gradient are left out instead of refused."""
        named = matching_parameters(self.model, name_part, what)
        if not need_grad:
            named = [(n, p) for n, p in named if p.grad is not None]
            if not named:
                raise RuntimeError(
                    f"no parameter matching {what}={name_part!r} has a .grad: call loss.backward() before attack()"
                )
        for name, param in named:
            grad = param.grad
            if grad is None:
                raise RuntimeError(
                    f"parameter {name!r} matches {what}={name_part!r} but has no .grad: call loss.backward() before"
                    " attack()"
                )
            if grad.layout != torch.strided:
                raise RuntimeError(
                    f"parameter {name!r} has a {grad.layout} gradient (e.g. nn.Embedding(sparse=True)); fastadv needs"
                    " dense gradients: build the embedding with sparse=False"
                )
            if grad.shape != param.shape:
                raise RuntimeError(
                    f"parameter {name!r} has shape {tuple(param.shape)} but its grad {tuple(grad.shape)}"
                )
            if not local(param.data).is_contiguous():
                raise RuntimeError(f"parameter {name!r} is not contiguous; call .data = .data.contiguous() once first")
            if param.device != named[0][1].device:
                raise RuntimeError(
                    f"parameters matching {what}={name_part!r} are on several devices; attack them with one object"
                    " per device"
                )
        return named

    def attack(
        self,
        name_part: str,
        first: bool,
        scales_of: ScaleRule,
        *,
        what: str = "emb_name",
        need_grad: bool = True,
        read_params: bool = False,
        ball_eps: float | None = None,
        box_eps: float | None = None,
    ) -> None:
        """One attack step on the parameters whose names contain ``name_part``: ``W += scales_of(stats) * G`` on
        their touched rows, projected onto the ``ball_eps`` ball or clamped into the ``box_eps`` box around the
        originals; ``first`` starts a new attack, else it continues the active one."""
        if first and self.active_name is not None:
            raise RuntimeError(
                f"attack on {self.active_name!r} is already active: call restore() before the next first attack (the"
                " seed would back up the perturbed weights here and lose the originals)"
            )
        if not first:
            if self.active_name is None:
                raise RuntimeError("no active attack: call attack(is_first_attack=True) first")
            if name_part != self.active_name:
                raise ValueError(f"attack({what}={name_part!r}) continues an attack on {what}={self.active_name!r}")
        if self.batch_rows is not None and name_part != self.batch_rows.emb_name:
            raise ValueError(
                f"rows='batch' records lookups of emb_name={self.batch_rows.emb_name!r} (given to the constructor),"
                f" not {name_part!r}"
            )
        targets = self.targets(name_part, what, need_grad)
        sharding = Sharding(targets)
        if sharding.groups and self.batch_rows is not None:
            raise RuntimeError("rows='batch' does not support sharded (FSDP2) parameters; use rows='scan'")
        names = [name for name, _ in targets]
        params = [as_rows(local(p.data)) for _, p in targets]
        grads = [as_rows(local(p.grad).contiguous()) for _, p in targets]
        backend = self._backend(params[0].device)
        states = [self._state(name, param) for name, param in zip(names, params)]

        if self.batch_rows is None:
            stats = backend.scan(grads, [s.touched for s in states], [s.fresh for s in states],
                                 params if read_params else None)
            if sharding.groups:  # the sums of squares are global; the row counts stay local
                sums = stats[:, 0::2].contiguous()
                sharding.all_reduce(sums)
                stats[:, 0::2] = sums
            host = stats.tolist()  # the one host sync
            for name, state, (grad_sumsq, n_fresh, param_sumsq) in zip(names, states, host):
                if not (math.isfinite(grad_sumsq) and math.isfinite(param_sumsq)):
                    self._skip_nonfinite(name)
                elif grad_sumsq > 0:
                    state.add_fresh(state.mark_all_fresh() if grad_sumsq < _UNDERFLOW_SUMSQ else int(n_fresh))
        else:
            stats = self._batch_stats(backend, names, grads, states)

        self.active_name = name_part  # rows were added: restore() has something to undo from here on
        grad_sumsq = stats[:, 0]
        raw = scales_of(stats)
        usable = (grad_sumsq > 0) & torch.isfinite(grad_sumsq) & torch.isfinite(raw)
        scales = torch.where(usable, raw, 0.0).float()
        rows, backups, n_backed = [s.rows for s in states], [s.backup for s in states], [s.n_backed for s in states]
        if ball_eps is None:
            backend.perturb(params, grads, rows, backups, n_backed, scales, box_eps)
        else:
            delta_sumsq = backend.measure(params, grads, rows, backups, n_backed, scales)
            sharding.all_reduce(delta_sumsq)
            backend.project(params, grads, rows, backups, scales, delta_sumsq, ball_eps)
        for state in states:
            state.backed_up()

    def _batch_stats(
        self, backend: ModuleType, names: list[str], grads: list[Tensor], states: list[RowState]
    ) -> Tensor:
        """rows="batch": the recorded rows instead of a scan, and the gradient norms over those rows only. The skip
        decisions are on the device; their count is read at the next sync (see ``nonfinite_skips``)."""
        for name, state in zip(names, states):
            self.batch_rows.take(name, state)
        counts = [s.fresh.sum() for s in states]
        check = not self.batch_rows.verified
        if check:  # the first attack also scans, to prove the recorded rows cover every non-zero gradient row
            scanned = [torch.empty_like(s.fresh) for s in states]
            backend.scan(grads, [s.touched for s in states], scanned)
            counts += [(found & ~s.fresh).sum() for found, s in zip(scanned, states)]
        pending = [flags for _, flags in self._pending]
        host = torch.cat([torch.stack(counts).to(torch.float64)] + [p.double() for p in pending]).tolist()  # the sync
        n = len(states)
        if pending:
            self._count_pending(host[2 * n if check else n :])
        if check:
            missed = [name for name, extra in zip(names, host[n : 2 * n]) if extra]
            if missed:
                raise RuntimeError(
                    f"rows='batch': the gradient of {', '.join(missed)} has non-zero rows that no recorded lookup"
                    " explains (the weight is used elsewhere too, or the ranks' gradients were all-reduced by DDP);"
                    " use rows='scan'"
                )
            self.batch_rows.verified = True
        for state, count in zip(states, host[:n]):
            state.add_fresh(int(count))
        grad_sumsq = backend.row_sumsq(grads, [s.rows for s in states])
        self._pending.append((names, ~torch.isfinite(grad_sumsq)))
        stats = torch.zeros(n, 3, dtype=torch.float64, device=grad_sumsq.device)
        stats[:, 0] = grad_sumsq
        return stats

    def restore(self, name_part: str | None, what: str = "emb_name") -> None:
        if self.active_name is None:
            raise RuntimeError("restore() called without an active attack: call attack() first")
        if name_part is not None and name_part != self.active_name:
            raise ValueError(
                f"restore({what}={name_part!r}) but the active attack is on {what}={self.active_name!r}"
            )
        states = [s for s in self._states.values() if s.n_rows]  # all on one device: targets() checked that
        if states:
            self._backend(states[0].param.device).restore(
                [s.param for s in states], [s.rows for s in states], [s.backup for s in states]
            )
        for state in states:
            state.clear()
        self.active_name = None

    def _state(self, name: str, param: Tensor) -> RowState:
        state = self._states.get(name)
        if state is None or not state.fits(param):
            state = self._states[name] = RowState(param)
        state.param = param
        return state

    def _backend(self, device: torch.device) -> ModuleType:
        if device not in self._backends:
            self._backends[device] = resolve_backend(self.backend_name, device)
        return self._backends[device]

    def _count_pending(self, flags: list[float]) -> None:
        names = [name for group, _ in self._pending for name in group]
        self._pending = []
        for name, flag in zip(names, flags):
            if flag:
                self._skip_nonfinite(name)

    def _skip_nonfinite(self, name: str) -> None:
        self._skips += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"the gradient norm of {name!r} (or its weights' norm) is inf or NaN: its attack is skipped"
                " (counted in .nonfinite_skips; warned once)",
                RuntimeWarning,
                stacklevel=4,
            )
