"""The state behind every attack class: which parameters, which of their rows are perturbed, the rows' originals.

:class:`RowPerturbation` runs one attack step through the ops of a backend (:mod:`fastadv.backends`): find the rows
the gradient touches (``scan``, or the looked-up token ids with ``rows="batch"``), read the counts once (the one host
sync), back up the new rows and step them (``perturb``, or ``measure`` + ``project`` for PGD's ball). Parameters
sharded by FSDP2 (DTensors with ``Shard(0)``) are worked on through their local shards, with the norms all-reduced.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn

from fastadv.backends import backend_for, resolve_backend, torch_ops

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


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside fastadv (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


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

    Rows found by an attack step are first *pending* (``n_backed <= i < n_rows``); they count for ``restore()`` only
    once their backups are written (``backed_up()``), so an attack interrupted at any point never restores a backup
    that was not written. The buffers keep their capacity across restores: steady-state training allocates nothing.
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
        self.in_order = True  # rows[:n_rows] ascending: true after one scan, which finds rows in order
        self._in_order_backed = True

    def fits(self, param: Tensor) -> bool:
        return param.shape == self.param.shape and param.device == self.param.device and param.dtype == self.param.dtype

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
            capacity = max(needed, 2 * len(self._rows))
            rows = self._rows.new_empty(capacity)
            rows[: self.n_rows] = self.rows
            backup = self._backup.new_empty((capacity, self._backup.shape[1]))
            backup[: self.n_backed] = self._backup[: self.n_backed]
            self._rows, self._backup = rows, backup
        self._rows[self.n_rows : needed] = new_rows
        self.touched.index_fill_(0, new_rows, True)
        self._in_order_backed = self.in_order
        self.in_order = self.n_rows == 0
        self.n_rows = needed

    def drop_pending(self) -> None:
        """Forget the rows added since the last ``backed_up()`` (their backups may be unwritten)."""
        if self.n_rows > self.n_backed:
            self.touched.index_fill_(0, self._rows[self.n_backed : self.n_rows], False)
            self.n_rows = self.n_backed
            self.in_order = self._in_order_backed

    def backed_up(self) -> None:
        """Every row has its backup now: commit them. A complete row list is put in order first (backends use slices
        for it), swapping in sorted copies in one assignment so that an interrupt never leaves rows and backups
        out of step."""
        if not self.in_order and self.n_rows == len(self.touched):
            order = torch.argsort(self.rows)
            self._rows, self._backup = self.rows[order], self.backup[order]
            self.in_order = True
        self.n_backed = self.n_rows
        self._in_order_backed = self.in_order

    def clear(self) -> None:
        self.touched.index_fill_(0, self.rows, False)
        self.n_rows = self.n_backed = 0
        self.in_order = self._in_order_backed = True


class _Lookups:
    """What the hooks of ``rows="batch"`` recorded since the last attack: a row mask per target weight, and the names
    of the targets looked up at all."""

    def __init__(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self.seen: set[str] = set()


class _LookupRecorder:
    """Forward pre-hook of one target ``nn.Embedding``: flags the looked-up ids while autograd records (evaluation
    passes add nothing). A plain class rather than a closure, so that a model carrying it still pickles."""

    def __init__(self, name: str, lookups: _Lookups) -> None:
        self.name = name
        self.lookups = lookups

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not (torch.is_grad_enabled() and args):
            return
        weight = module.weight
        mask = self.lookups.masks.get(self.name)
        if mask is None or mask.device != weight.device or len(mask) != weight.shape[0]:
            mask = self.lookups.masks[self.name] = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        mask.index_fill_(0, args[0].reshape(-1).to(device=weight.device, dtype=torch.long), True)
        self.lookups.seen.add(self.name)


class BatchRows:
    """``rows="batch"``: the rows of each target embedding looked up since the last attack, recorded by forward
    pre-hooks on its ``nn.Embedding`` (only where autograd records, so evaluation passes add nothing).

    Exact only if the weight gets gradient from that lookup alone, so a weight shared with another module (a tied LM
    head) is refused here, and the recorded rows are checked against a dense scan at the first attack and whenever a
    target was not looked up at all since the last attack (e.g. a compiled model that runs without the hooks).
    """

    def __init__(self, model: nn.Module, emb_name: str) -> None:
        self.emb_name = emb_name
        self.lookups = _Lookups()
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
            self._handles.append(module.register_forward_pre_hook(_LookupRecorder(name, self.lookups)))
        if not self._handles:
            raise ValueError(f"rows='batch': no trainable nn.Embedding weight name contains emb_name={emb_name!r}")

    def needs_check(self, names: list[str]) -> bool:
        """Whether this attack must prove the recorded rows against a scan: the first one, and any in which a target
        was not looked up at all (a forward pass that ran without the hooks would otherwise perturb nothing)."""
        return not self.verified or any(name not in self.lookups.seen for name in names)

    def take(self, name: str, state: RowState) -> None:
        """Flag in ``state.fresh`` the rows looked up since the last call and not yet perturbed; forget them."""
        mask = self.lookups.masks.get(name)
        self.lookups.seen.discard(name)
        if mask is None or mask.shape != state.touched.shape:
            state.fresh.zero_()
            return
        torch.logical_and(mask, state.touched.logical_not(), out=state.fresh)
        mask.zero_()

    def unexplained(self, names: list[str], missed: list[str], looked_up: set[str]) -> RuntimeError:
        """The error for gradients with rows that no recorded lookup explains."""
        silent = [name for name in missed if name not in looked_up]
        if silent:
            return RuntimeError(
                f"rows='batch': no lookup of {', '.join(silent)} was recorded since the last attack, but its gradient"
                " has non-zero rows: the forward pass ran without fastadv's hook. A model compiled with torch.compile"
                " and run before this attack object was built keeps running without hooks added later. Build the"
                " attack object before the first forward pass of the compiled model, or use rows='scan'"
            )
        return RuntimeError(
            f"rows='batch': the gradient of {', '.join(missed)} has non-zero rows that no recorded lookup explains"
            " (the weight is used elsewhere too, or the ranks' gradients were all-reduced by DDP); use rows='scan'"
        )

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
    """Attack/restore bookkeeping shared by every attack class: which parameters, which rows, their backups.

    An attack step runs in phases, each leaving a state that ``restore()`` puts back bit-exactly if the next one is
    interrupted (an exception, a KeyboardInterrupt, an out-of-memory error): find the rows (nothing written), back up
    the new ones (no weight written; committed when complete), then step the weights.
    """

    def __init__(self, model: nn.Module, backend: str, rows: str = "scan", emb_name: str | None = None) -> None:
        resolve_backend(backend, None)  # fail now on an unknown or unavailable backend, not at the first attack
        if rows not in ("scan", "batch"):
            raise ValueError(f"rows must be 'scan' (from the gradient) or 'batch' (the looked-up ids), got {rows!r}")
        self.model = model
        self.backend_name = backend
        self.batch_rows = BatchRows(model, emb_name) if rows == "batch" else None
        self._remove_hooks_with_self()
        self.active_name: str | None = None
        self._skips = 0
        self._pending: list[tuple[list[str], Tensor]] = []  # skip flags not read yet (rows="batch"), by target names
        self._backends: dict[tuple, ModuleType] = {}
        self._states: dict[str, RowState] = {}
        self._warned = False

    def _remove_hooks_with_self(self) -> None:
        if self.batch_rows is not None:  # the hooks go when the attack object does
            weakref.finalize(self, self.batch_rows.remove)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_backends"] = {}  # modules don't pickle; resolved again on first use
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._remove_hooks_with_self()

    @property
    def nonfinite_skips(self) -> int:
        if self._pending:
            self._count_pending(torch.cat([flags for _, flags in self._pending]).tolist())
        return self._skips

    def targets(self, name_part: str, what: str, need_grad: bool) -> list[tuple[str, nn.Parameter]]:
        """The parameters whose names contain ``name_part``, validated before anything is modified; zero-size ones
        are left out (nothing to perturb), and without ``need_grad`` so are those without a gradient."""
        named = [(n, p) for n, p in matching_parameters(self.model, name_part, what) if p.numel()]
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
                raise RuntimeError(
                    f"parameter {name!r} is not contiguous (strides {tuple(local(param.data).stride())}); fastadv"
                    " writes whole rows in place: make it contiguous once before training (param.data ="
                    " param.data.contiguous(), then build the optimizer)"
                )
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
        self._check_not_rebound(targets)
        sharding = Sharding(targets)
        if sharding.groups and self.batch_rows is not None:
            raise RuntimeError("rows='batch' does not support sharded (FSDP2) parameters; use rows='scan'")
        # inference_mode(False): buffers made here must stay usable outside an inference_mode block
        with torch.inference_mode(False), torch.no_grad():
            self._step(name_part, targets, sharding, scales_of, read_params, ball_eps, box_eps)

    def _step(
        self,
        name_part: str,
        targets: list[tuple[str, nn.Parameter]],
        sharding: Sharding,
        scales_of: ScaleRule,
        read_params: bool,
        ball_eps: float | None,
        box_eps: float | None,
    ) -> None:
        names = [name for name, _ in targets]
        params = [as_rows(local(p.data)) for _, p in targets]
        grads = [as_rows(local(p.grad).contiguous()) for _, p in targets]
        if not params:  # every matched parameter is zero-size: nothing to perturb, nothing to restore
            self.active_name = name_part
            return
        backend = self._backend(params, grads)
        states = [self._state(name, param) for name, param in zip(names, params)]

        # 1. The rows: the gradient's non-zero ones (a scan), or the looked-up ones (row hints), added as pending.
        # 2. Their backups. No weight is written in either, so if they are interrupted the new rows are forgotten.
        previous = self.active_name
        try:
            stats = self._find_rows(backend, names, params, grads, states, sharding, read_params)
            self.active_name = name_part
            backend.backup(params, [s.rows for s in states], [s.backup for s in states], [s.n_backed for s in states])
        except BaseException:
            for state in states:
                state.drop_pending()
            self.active_name = previous
            raise
        for state in states:
            state.backed_up()  # from here on restore() puts these rows back
        # 3. Step the weights. If this is interrupted, restore() puts back every backed-up row.
        grad_sumsq = stats[:, 0]
        raw = scales_of(stats)
        usable = (grad_sumsq > 0) & torch.isfinite(grad_sumsq) & torch.isfinite(raw)
        wide = any(p.dtype == torch.float64 for p in params)  # float64 weights: float64 step sizes (torch backend)
        scales = torch.where(usable, raw, 0.0).to(torch.float64 if wide else torch.float32)
        rows, backups, n_backed = [s.rows for s in states], [s.backup for s in states], [s.n_backed for s in states]
        if ball_eps is None:
            backend.perturb(params, grads, rows, backups, n_backed, scales, box_eps)
        else:
            delta_sumsq = backend.measure(params, grads, rows, backups, n_backed, scales)
            sharding.all_reduce(delta_sumsq)
            backend.project(params, grads, rows, backups, scales, delta_sumsq, ball_eps)

    def _find_rows(
        self,
        backend: ModuleType,
        names: list[str],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[RowState],
        sharding: Sharding,
        read_params: bool,
    ) -> Tensor:
        """Adds each target's new rows (pending) and returns the ``[n, 3]`` stats the step sizes come from."""
        if self.batch_rows is not None:
            return self._batch_stats(backend, names, grads, states)
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
        return stats

    def _batch_stats(
        self, backend: ModuleType, names: list[str], grads: list[Tensor], states: list[RowState]
    ) -> Tensor:
        """rows="batch": the recorded rows instead of a scan, and the gradient norms over those rows only. The skip
        decisions are on the device; their count is read at the next sync (see ``nonfinite_skips``)."""
        check = self.batch_rows.needs_check(names)
        looked_up = set(self.batch_rows.lookups.seen)
        for name, state in zip(names, states):
            self.batch_rows.take(name, state)
        counts = [s.fresh.sum() for s in states]
        if check:  # prove that the recorded rows cover every non-zero gradient row
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
                raise self.batch_rows.unexplained(names, missed, looked_up)
            self.batch_rows.verified = True
        for state, count in zip(states, host[:n]):
            state.add_fresh(int(count))
        grad_sumsq = backend.row_sumsq(grads, [s.rows for s in states])
        self._pending.append((names, ~torch.isfinite(grad_sumsq)))
        stats = torch.zeros(n, 3, dtype=torch.float64, device=grad_sumsq.device)
        stats[:, 0] = grad_sumsq
        return stats

    def restore(self, name_part: str | None, what: str = "emb_name") -> None:
        """Put back every backed-up row, into the storage the attack wrote; a parameter rebound or converted since
        (``model.to(...)``, ``.half()``, ``param.data = ...``) gets its originals in its live tensor, with a warning."""
        if self.active_name is None:
            raise RuntimeError("restore() called without an active attack: call attack() first")
        if name_part is not None and name_part != self.active_name:
            raise ValueError(
                f"restore({what}={name_part!r}) but the active attack is on {what}={self.active_name!r}"
            )
        live = dict(self.model.named_parameters())
        with torch.inference_mode(False), torch.no_grad():
            in_place, moved, lost = [], [], []
            for name, state in self._states.items():
                state.drop_pending()
                if not state.n_rows:
                    continue
                current = as_rows(local(live[name].data)) if name in live else None
                if current is not None and state.writes_into(current):
                    in_place.append(state)
                elif current is not None and current.shape == state.param.shape:
                    moved.append(name)
                    torch_ops.restore([current], [state.rows.to(current.device)],
                                      [state.backup.to(current.device, current.dtype)])
                else:
                    lost.append(name)
            if in_place:  # all on one device: targets() checked that
                self._backend([s.param for s in in_place], [s.param for s in in_place]).restore(
                    [s.param for s in in_place], [s.rows for s in in_place], [s.backup for s in in_place]
                )
            for state in self._states.values():
                state.clear()
        self.active_name = None
        if moved:
            warnings.warn(
                f"{', '.join(moved)} was rebound or converted (model.to(), .half(), param.data = ...) between attack()"
                " and restore(): its original rows were written into the live tensor (converted to its dtype)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        if lost:
            raise RuntimeError(
                f"cannot restore {', '.join(lost)}: the parameter was removed or changed shape between attack() and"
                " restore(), so its original rows have nowhere to go (the other parameters were restored); call"
                " restore() before reshaping or replacing parameters"
            )

    def _check_not_rebound(self, targets: list[tuple[str, nn.Parameter]]) -> None:
        """A continued attack must write where the first one did: refuse (nothing modified) if a target was rebound
        or converted since, instead of perturbing a tensor whose originals are backed up elsewhere."""
        for name, param in targets:
            state = self._states.get(name)
            if state is not None and state.n_rows and not state.writes_into(as_rows(local(param.data))):
                raise RuntimeError(
                    f"parameter {name!r} was rebound or converted (model.to(), .half(), param.data = ...) during the"
                    " active attack: call restore() first (it writes the originals into the live tensor)"
                )

    def _state(self, name: str, param: Tensor) -> RowState:
        state = self._states.get(name)
        if state is None or not state.fits(param):
            state = self._states[name] = RowState(param)
        state.param = param
        return state

    def _backend(self, params: list[Tensor], grads: list[Tensor]) -> ModuleType:
        key = (params[0].device, *sorted({(str(p.dtype), str(g.dtype)) for p, g in zip(params, grads)}))
        if key not in self._backends:
            self._backends[key] = backend_for(self.backend_name, params, grads)
        return self._backends[key]

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
                stacklevel=user_stacklevel(),
            )
