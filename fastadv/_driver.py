"""The driver behind every attack class: one attack step of a :class:`fastadv.rules.Rule` through a backend's ops.

An attack step runs in four phases, each a method below, each leaving a state that ``restore()`` puts back
bit-exactly if the next one is interrupted (an exception, a KeyboardInterrupt, an out-of-memory error):

1. ``targets``: the matching parameters, validated before anything is modified;
2. ``_find_rows``: the rows to perturb, added as pending: the gradient's non-zero rows (a scan) or the looked-up ones
   (row hints, :mod:`fastadv._hints`), read with the one host sync of the step;
3. ``_plan``: the new rows backed up and committed (from here on ``restore()`` puts them back), the step sizes;
4. ``_apply``: the weights stepped (``perturb``, or ``measure`` + ``project`` for a ball).

Where each target's weights and gradient are read and written is a :class:`fastadv._sharding.Placement`: the tensors
themselves, FSDP2's local shards (DTensors with ``Shard(0)``, the sums of squares all-reduced), or DeepSpeed ZeRO's
(:mod:`fastadv._deepspeed`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from types import ModuleType

import torch
from torch import Tensor, nn

from fastadv._deepspeed import ZeroPlacement, refuse_zero_model
from fastadv._hints import BatchRows, batch_rows
from fastadv._rows import RowState
from fastadv._sharding import Placement, Sharding, distributed, local
from fastadv._util import matching_parameters, user_stacklevel
from fastadv.backends import backend_for, resolve_backend, torch_ops
from fastadv.rules import Rule

# Below this gradient sum of squares, a row whose squares all underflow to zero in fp32 (|g| < 4e-23) could still get
# a perturbation above 1e-12 * eps, so the attack covers every row instead of the rows the scan found non-zero.
_UNDERFLOW_SUMSQ = 1e-20

ROWS = ("auto", "scan", "batch")


class RowPerturbation:
    """Attack/restore bookkeeping shared by every attack class: which parameters, which rows, their backups, how the
    rows are found (``rows``: ``"scan"``, ``"batch"`` hints, or ``"auto"``: hints where they are exact, kept checked
    at every attack (:mod:`fastadv._hints`), falling back to scans with one warning when they are not)."""

    def __init__(
        self, model: nn.Module, backend: str, rows: str = "scan", emb_name: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        resolve_backend(backend, None)  # fail now on an unknown or unavailable backend, not at the first attack
        if rows not in ROWS:
            raise ValueError(
                f"rows must be 'auto' (row hints where exact, else a scan), 'scan' (from the gradient) or 'batch'"
                f" (the looked-up ids), got {rows!r}"
            )
        self.model = model
        self.placement = placement or Placement()
        self.backend_name = backend
        hinted = rows != "scan" and emb_name is not None
        self.batch_rows = batch_rows(model, emb_name, required=rows == "batch") if hinted else None
        # rows="auto" scans where hints would not be exact (not an embedding's weight, a tied head)
        self.rows = rows if self.batch_rows is not None else "scan"
        self._remove_hooks_with_self()
        self.active_name: str | None = None
        self._skips = 0
        self._pending: list[tuple[list[str], Tensor]] = []  # skip flags not read yet (row hints), by target names
        self._backends: dict[tuple, ModuleType] = {}
        self._states: dict[str, RowState] = {}
        self._warned = False
        self._built_late = False  # rows="auto": the first attack found no lookup recorded at all

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

    def attack(self, name_part: str, first: bool, rule: Rule) -> None:
        """One attack step of ``rule`` on the parameters whose names contain ``name_part``; ``first`` starts a new
        attack, else it continues the active one."""
        self._check_continuation(name_part, first, rule.arg)
        self.placement.ready()
        targets = self.targets(name_part, rule)
        self._check_not_rebound(targets)
        self.placement.prepare(targets)
        sharding = self.placement.sharding(targets)
        hints = self._hints_for(name_part, sharding)
        # inference_mode(False): buffers made here must stay usable outside an inference_mode block
        with torch.inference_mode(False), torch.no_grad():
            self._step(name_part, targets, sharding, hints, rule)
        self.placement.written(targets)

    def _check_continuation(self, name_part: str, first: bool, arg: str) -> None:
        if first and self.active_name is not None:
            raise RuntimeError(
                f"attack on {self.active_name!r} is already active: call restore() before the next first attack (the"
                " seed would back up the perturbed weights here and lose the originals)"
            )
        if not first:
            if self.active_name is None:
                raise RuntimeError("no active attack: call attack(is_first_attack=True) first")
            if name_part != self.active_name:
                raise ValueError(f"attack({arg}={name_part!r}) continues an attack on {arg}={self.active_name!r}")
        if self.rows == "batch" and name_part != self.batch_rows.emb_name:
            raise ValueError(
                f"rows='batch' records lookups of emb_name={self.batch_rows.emb_name!r} (given to the constructor),"
                f" not {name_part!r}"
            )

    def _hints_for(self, name_part: str, sharding: Sharding) -> BatchRows | None:
        """The row hints for this attack, or ``None`` to scan. ``rows="auto"`` scans other targets than the
        constructor's, and from now on scans sharded (FSDP2) or all-reduced (several processes) gradients."""
        if self.batch_rows is None or name_part != self.batch_rows.emb_name:
            return None
        if sharding.groups:
            if self.rows == "batch":
                raise RuntimeError("rows='batch' does not support sharded (FSDP2) parameters; use rows='scan'")
            self._stop_hints()
            return None
        if self.rows == "auto" and distributed():
            self._stop_hints()
            return None
        return self.batch_rows

    def remove_hooks(self) -> None:
        """Take the row-hint hooks off the model; attacks scan from then on."""
        if self.batch_rows is not None:
            self._stop_hints()

    def _stop_hints(self) -> None:
        self.batch_rows.remove()
        self.batch_rows, self.rows = None, "scan"

    def targets(self, name_part: str, rule: Rule) -> list[tuple[str, nn.Parameter]]:
        """The parameters whose names contain ``name_part``, validated before anything is modified; zero-size ones
        are left out (nothing to perturb), and unless the rule ``needs_grad`` so are those without a gradient."""
        shape = self.placement.shape
        named = matching_parameters(self.model, name_part, rule.arg)
        if not isinstance(self.placement, ZeroPlacement):  # before the size filter: ZeRO-3 leaves them empty
            refuse_zero_model(named, "FusedFGM/FusedPGD/FusedAWP")
        named = [(n, p) for n, p in named if shape(p).numel()]
        if not rule.needs_grad:
            named = [(n, p) for n, p in named if p.grad is not None]
            if not named:
                raise RuntimeError(
                    f"no parameter matching {rule.arg}={name_part!r} has a .grad: call loss.backward() before attack()"
                )
        for name, param in named:
            grad = param.grad
            if grad is None:
                raise RuntimeError(
                    f"parameter {name!r} matches {rule.arg}={name_part!r} but has no .grad: call loss.backward() before"
                    " attack()"
                )
            if grad.layout != torch.strided:
                raise RuntimeError(
                    f"parameter {name!r} has a {grad.layout} gradient (e.g. nn.Embedding(sparse=True)); fastadv needs"
                    " dense gradients: build the embedding with sparse=False"
                )
            if grad.shape != shape(param):
                raise RuntimeError(
                    f"parameter {name!r} has shape {tuple(shape(param))} but its grad {tuple(grad.shape)}"
                )
            if not local(param.data).is_contiguous():
                raise RuntimeError(
                    f"parameter {name!r} is not contiguous (strides {tuple(local(param.data).stride())}); fastadv"
                    " writes whole rows in place: make it contiguous once before training (param.data ="
                    " param.data.contiguous(), then build the optimizer)"
                )
            if param.device != named[0][1].device:
                raise RuntimeError(
                    f"parameters matching {rule.arg}={name_part!r} are on several devices; attack them with one object"
                    " per device"
                )
        return named

    def _step(
        self, name_part: str, targets: list[tuple[str, nn.Parameter]], sharding: Sharding, hints: BatchRows | None,
        rule: Rule,
    ) -> None:
        names = [name for name, _ in targets]
        params = [self.placement.weights(p) for _, p in targets]
        grads = [self.placement.grad(p) for _, p in targets]
        if not params:  # every matched parameter is zero-size: nothing to perturb, nothing to restore
            self.active_name = name_part
            return
        backend = self._backend(params, grads)
        states = [self._state(name, param) for name, param in zip(names, params)]
        previous = self.active_name
        try:  # no weight is written before _plan commits: if interrupted, the new rows are forgotten
            stats = self._find_rows(backend, names, params, grads, states, sharding, hints, rule.reads_weights)
            self.active_name = name_part
            scales = self._plan(backend, params, states, stats, rule)
        except BaseException:
            for state in states:
                state.drop_pending()
            self.active_name = previous
            raise
        for state in states:
            state.backed_up()  # from here on restore() puts these rows back
        self._apply(backend, params, grads, states, scales, sharding, rule)

    def _find_rows(
        self, backend: ModuleType, names: list[str], params: list[Tensor], grads: list[Tensor],
        states: list[RowState], sharding: Sharding, hints: BatchRows | None, reads_weights: bool,
    ) -> Tensor:
        """Adds each target's new rows (pending) and returns the ``[n, 3]`` stats the step sizes come from."""
        if hints is not None:
            stats = self._hinted_rows(backend, names, grads, states, hints)
            if stats is not None:
                return stats
        stats = backend.scan(grads, [s.touched for s in states], [s.fresh for s in states],
                             params if reads_weights else None)
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

    def _hinted_rows(
        self, backend: ModuleType, names: list[str], grads: list[Tensor], states: list[RowState], hints: BatchRows
    ) -> Tensor | None:
        """The recorded rows instead of a scan, and the gradient norms over those rows only (the skip decisions stay
        on the device; their count is read at the next sync, see ``nonfinite_skips``). Proved at the same sync by a
        scan where :meth:`BatchRows.needs_check` asks for one, else by the sweep of a slice of the gradient. ``None``
        when ``rows="auto"`` found the hints inexact: the caller scans, as every later attack will."""
        check = hints.needs_check(names)
        unpaired = hints.unpaired(names)
        looked_up = set(hints.lookups.seen)
        for name, state in zip(names, states):
            hints.take(name, state)
        counts = torch.stack([s.fresh.sum() for s in states]).double()
        if check:  # every non-zero gradient row must be recorded (or perturbed already)
            scanned = [torch.empty_like(s.fresh) for s in states]
            backend.scan(grads, [s.touched for s in states], scanned)
            unexplained = torch.stack([(found & ~s.fresh).sum() for found, s in zip(scanned, states)]).double()
        else:  # the same, on this attack's slice of each gradient
            unexplained = hints.sweep(backend, names, grads, states)
        pending = [flags for _, flags in self._pending]
        host = torch.cat([counts, unexplained] + [p.double() for p in pending]).tolist()  # the one host sync
        n = len(states)
        if pending:
            self._count_pending(host[2 * n :])
        missed = [name for name, extra in zip(names, host[n : 2 * n]) if extra]
        if missed:
            reason = hints.unexplained(missed, looked_up)
            if self.rows == "batch":
                raise RuntimeError(f"rows='batch': {reason}; use rows='scan'")
            if not (hints.lookups.masks or self._built_late):
                # no lookup since the hooks were added: likely built after this batch's forward pass; scan this
                # attack and check the hints again at the next (a compiled model stays silent: warned then)
                self._built_late = True
                return None
            self._stop_hints()
            warnings.warn(
                f"rows='auto': {reason}. Row hints are not exact for this model, so this attack object scans"
                " the gradient from now on (pass rows='scan' to skip the hints and this warning)",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            return None
        if check:
            hints.verified = True
            if unpaired:  # exact although provenance could not pair the gradients: it would only cost scans
                hints.stop_tracking()
        for state, count in zip(states, host[:n]):
            state.add_fresh(int(count))
        grad_sumsq = backend.row_sumsq(grads, [s.rows for s in states])
        self._pending.append((names, ~torch.isfinite(grad_sumsq)))
        stats = torch.zeros(n, 3, dtype=torch.float64, device=grad_sumsq.device)
        stats[:, 0] = grad_sumsq
        return stats

    @staticmethod
    def _plan(
        backend: ModuleType, params: list[Tensor], states: list[RowState], stats: Tensor, rule: Rule
    ) -> Tensor:
        """Back up the new rows, and the step size of each tensor: zero where its gradient norm is zero or not
        finite, or its step size not finite; float64 for float64 weights (torch backend), else float32."""
        backend.backup(params, [s.rows for s in states], [s.backup for s in states], [s.n_backed for s in states])
        grad_sumsq = stats[:, 0]
        raw = rule.step_size(stats)
        usable = (grad_sumsq > 0) & torch.isfinite(grad_sumsq) & torch.isfinite(raw)
        wide = any(p.dtype == torch.float64 for p in params)
        return torch.where(usable, raw, 0.0).to(torch.float64 if wide else torch.float32)

    @staticmethod
    def _apply(
        backend: ModuleType, params: list[Tensor], grads: list[Tensor], states: list[RowState], scales: Tensor,
        sharding: Sharding, rule: Rule,
    ) -> None:
        """Step the weights; if this is interrupted, ``restore()`` puts back every backed-up row."""
        rows, backups, n_backed = [s.rows for s in states], [s.backup for s in states], [s.n_backed for s in states]
        if rule.ball is None:
            backend.perturb(params, grads, rows, backups, n_backed, scales, rule.box)
        else:
            delta_sumsq = backend.measure(params, grads, rows, backups, n_backed, scales)
            sharding.all_reduce(delta_sumsq)
            backend.project(params, grads, rows, backups, scales, delta_sumsq, rule.ball)

    def restore(self, name_part: str | None, arg: str = "emb_name") -> None:
        """Put back every backed-up row, into the storage the attack wrote; a parameter rebound or converted since
        (``model.to(...)``, ``.half()``, ``param.data = ...``) gets its originals in its live tensor, with a warning."""
        if self.active_name is None:
            raise RuntimeError("restore() called without an active attack: call attack() first")
        if name_part is not None and name_part != self.active_name:
            raise ValueError(
                f"restore({arg}={name_part!r}) but the active attack is on {arg}={self.active_name!r}"
            )
        live = dict(self.model.named_parameters())
        with torch.inference_mode(False), torch.no_grad():
            in_place, moved, lost = [], [], []
            for name, state in self._states.items():
                state.drop_pending()
                if not state.n_rows:
                    continue
                current = self.placement.weights(live[name]) if name in live else None
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
        self.placement.written([(name, live[name]) for name in self._states if name in live])
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
            if state is not None and state.n_rows and not state.writes_into(self.placement.weights(param)):
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
