"""The driver behind every attack class: one attack step of a :class:`fastadv.rules.Rule` through a backend's ops.

An attack step runs in four phases, each leaving a state that ``restore()`` puts back bit-exactly if the next one is
interrupted (an exception, a KeyboardInterrupt, an out-of-memory error):

1. targets: the matching parameters, validated before anything is modified (:func:`fastadv._targets.validated_targets`);
2. rows: the rows to perturb, added as pending: the gradient's non-zero rows (a scan) or the looked-up ones (row
   hints), read with the one host sync of the step (:meth:`fastadv._hints.RowSource.find`);
3. ``_plan``: the new rows backed up and committed (from here on ``restore()`` puts them back), the step sizes;
4. ``_apply``: the weights stepped (``perturb``, or ``measure`` + ``project`` for a ball).

Where each target's weights and gradient are read and written is a :class:`fastadv._sharding.Placement`: the tensors
themselves, FSDP2's local shards (DTensors with ``Shard(0)``, the sums of squares all-reduced), or DeepSpeed ZeRO's
(:mod:`fastadv._deepspeed`).
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
from torch import Tensor, nn

from fastadv._hints import BatchRows, RowSource
from fastadv._rows import RowState
from fastadv._sharding import Placement, Sharding
from fastadv._targets import NonfiniteSkips, StepTargets, Targets, validated_targets
from fastadv._util import user_stacklevel
from fastadv.backends import backend_for, resolve_backend, torch_ops
from fastadv.rules import Rule


class RowPerturbation:
    """The attack steps and restores of one attack object: which parameters (``active_name``), their rows' state and
    backups, where the rows come from (:class:`fastadv._hints.RowSource`), the skips."""

    def __init__(
        self, model: nn.Module, *, backend: str, rows: str, target: str | None, placement: Placement | None
    ) -> None:
        resolve_backend(backend, None)  # fail now on an unknown or unavailable backend, not at the first attack
        self.model = model
        self.placement = placement or Placement()
        self.backend_name = backend
        self.row_source = RowSource(model, rows=rows, emb_name=target)
        self.skips = NonfiniteSkips()
        self.active_name: str | None = None
        self._backends: dict[tuple, ModuleType] = {}
        self._states: dict[str, RowState] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_backends"] = {}  # modules don't pickle; resolved again on first use
        return state

    def attack(self, name_part: str, *, first: bool, rule: Rule) -> None:
        """One attack step of ``rule`` on the parameters whose names contain ``name_part``; ``first`` starts a new
        attack, else it continues the active one."""
        self._check_continuation(name_part, first=first, arg=rule.arg)
        self.row_source.check_target(name_part)
        self.placement.ready()
        targets = validated_targets(self.model, name_part, rule=rule, placement=self.placement, states=self._states)
        self.placement.prepare(targets)
        sharding = self.placement.sharding(targets)
        hints = self.row_source.hints_for(name_part, sharding)
        # inference_mode(False): buffers made here must stay usable outside an inference_mode block
        with torch.inference_mode(False), torch.no_grad():
            step = self._step_targets(targets, sharding)
            if step is None:  # every matched parameter is zero-size: nothing to perturb, nothing to restore
                self.active_name = name_part
            else:
                self._step(name_part, step, hints=hints, rule=rule)
        self.placement.written(targets)

    def _check_continuation(self, name_part: str, *, first: bool, arg: str) -> None:
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

    def _step_targets(self, targets: Targets, sharding: Sharding) -> StepTargets | None:
        names = [name for name, _ in targets]
        weights = [self.placement.weights(p) for _, p in targets]
        grads = [self.placement.grad(p) for _, p in targets]
        if not weights:
            return None
        backend = self._backend(weights=weights, grads=grads)
        states = [self._state(name, w) for name, w in zip(names, weights)]
        return StepTargets(names=names, weights=weights, grads=grads, states=states, backend=backend, sharding=sharding)

    def _step(self, name_part: str, step: StepTargets, *, hints: BatchRows | None, rule: Rule) -> None:
        previous = self.active_name
        try:  # no weight is written before _plan commits: if interrupted, the new rows are forgotten
            stats = self.row_source.find(step, hints=hints, reads_weights=rule.reads_weights, skips=self.skips)
            self.active_name = name_part
            scales = self._plan(step, stats=stats, rule=rule)
        except BaseException:
            for state in step.states:
                state.drop_pending()
            self.active_name = previous
            raise
        for state in step.states:
            state.backed_up()  # from here on restore() puts these rows back
        self._apply(step, scales=scales, rule=rule)

    @staticmethod
    def _plan(step: StepTargets, *, stats: Tensor, rule: Rule) -> Tensor:
        """Back up the new rows, and the step size of each tensor: zero where its gradient norm is zero or not
        finite, or its step size not finite; float64 for float64 weights (torch backend), else float32."""
        states = step.states
        step.backend.backup(
            step.weights, [s.rows for s in states], [s.backup for s in states], [s.n_backed for s in states]
        )
        grad_sumsq = stats[:, 0]
        raw = rule.step_size(stats)
        usable = (grad_sumsq > 0) & torch.isfinite(grad_sumsq) & torch.isfinite(raw)
        wide = any(w.dtype == torch.float64 for w in step.weights)
        return torch.where(usable, raw, 0.0).to(torch.float64 if wide else torch.float32)

    @staticmethod
    def _apply(step: StepTargets, *, scales: Tensor, rule: Rule) -> None:
        """Step the weights; if this is interrupted, ``restore()`` puts back every backed-up row."""
        backend, weights, grads, states = step.backend, step.weights, step.grads, step.states
        rows, backups, n_backed = [s.rows for s in states], [s.backup for s in states], [s.n_backed for s in states]
        if rule.ball is None:
            backend.perturb(weights, grads, rows, backups, n_backed, scales, rule.box)
        else:
            delta_sumsq = backend.measure(weights, grads, rows, backups, n_backed, scales)
            step.sharding.all_reduce(delta_sumsq)
            backend.project(weights, grads, rows, backups, scales, delta_sumsq, rule.ball)

    def restore(self, name_part: str | None, *, arg: str = "emb_name") -> None:
        """Put back every backed-up row, into the storage the attack wrote; a parameter rebound or converted since
        (``model.to(...)``, ``.half()``, ``param.data = ...``) gets its originals in its live tensor, with a warning."""
        if self.active_name is None:
            raise RuntimeError("restore() called without an active attack: call attack() first")
        if name_part is not None and name_part != self.active_name:
            raise ValueError(f"restore({arg}={name_part!r}) but the active attack is on {arg}={self.active_name!r}")
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
                    torch_ops.restore(
                        [current], [state.rows.to(current.device)], [state.backup.to(current.device, current.dtype)]
                    )
                else:
                    lost.append(name)
            if in_place:  # all on one device: the targets' validation checked that
                weights = [s.param for s in in_place]
                self._backend(weights=weights, grads=weights).restore(
                    weights, [s.rows for s in in_place], [s.backup for s in in_place]
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

    def _state(self, name: str, weights: Tensor) -> RowState:
        state = self._states.get(name)
        if state is None or not state.fits(weights):
            state = self._states[name] = RowState(weights)
        state.attach(weights)
        return state

    def _backend(self, *, weights: list[Tensor], grads: list[Tensor]) -> ModuleType:
        key = (weights[0].device, *sorted({(str(w.dtype), str(g.dtype)) for w, g in zip(weights, grads)}))
        if key not in self._backends:
            self._backends[key] = backend_for(self.backend_name, weights, grads)
        return self._backends[key]
