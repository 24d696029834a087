"""FusedFGM and FusedPGD: the seed's FGM/PGD classes with the same calls, on touched rows only.

The classes hold state (which parameters are perturbed, which rows, their original values, the step count) and call
the ops of a backend (:mod:`fastadv.backends`); they never touch tensors element by element.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor, nn

from fastadv.backends import resolve_backend
from fastadv.reference import fgm_step, pgd_step

__all__ = ["FusedFGM", "FusedPGD"]

# Below this gradient sum of squares, a row whose squares all underflow to zero in fp32 (|g| < 4e-23) could still get
# a perturbation above 1e-12 * eps, so the attack covers every row instead of the rows the scan found non-zero.
_UNDERFLOW_SUMSQ = 1e-20


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _as_rows(tensor: Tensor) -> Tensor:
    """``tensor`` as ``[rows, cols]`` sharing its storage (a 1-D or 0-D tensor is one row)."""
    return tensor.view(tensor.shape[0] if tensor.dim() > 1 else 1, -1)


class _RowState:
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
        """Append the ``count`` rows flagged in ``fresh`` (by the last scan) to the perturbed rows."""
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


class _RowPerturbation:
    """Attack/restore bookkeeping shared by FGM and PGD: which parameters, which rows, their backups."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        resolve_backend(backend, None)  # fail now on an unknown or unavailable backend, not at the first attack
        self.model = model
        self.backend_name = backend
        self.active_name: str | None = None
        self.nonfinite_skips = 0
        self._backends: dict[torch.device, ModuleType] = {}
        self._states: dict[str, _RowState] = {}
        self._warned = False

    def targets(self, emb_name: str) -> list[tuple[str, nn.Parameter]]:
        """The parameters the seed would attack, validated before anything is modified."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and emb_name in n]
        if not named:
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            hints = [n for n in names if "emb" in n.lower()] or names[:10]
            raise ValueError(
                f"no trainable parameter name contains emb_name={emb_name!r}; candidates: {', '.join(hints) or 'none'}."
                " Pass emb_name= (a substring of the embedding weight's name) to the constructor or to attack()."
            )
        for name, param in named:
            grad = param.grad
            if grad is None:
                raise RuntimeError(
                    f"parameter {name!r} matches emb_name={emb_name!r} but has no .grad: call loss.backward() before"
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
            if not param.data.is_contiguous():
                raise RuntimeError(f"parameter {name!r} is not contiguous; call .data = .data.contiguous() once first")
            if param.device != named[0][1].device:
                raise RuntimeError(
                    f"parameters matching emb_name={emb_name!r} are on several devices; attack them"
                    " with one object per device"
                )
        return named

    def attack(self, emb_name: str, coef: float, first: bool, project_eps: float | None = None) -> None:
        if first and self.active_name is not None:
            raise RuntimeError(
                f"attack on {self.active_name!r} is already active: call restore() before the next first attack (the"
                " seed would back up the perturbed weights here and lose the originals)"
            )
        if not first:
            if self.active_name is None:
                raise RuntimeError("no active attack: call attack(is_first_attack=True) first")
            if emb_name != self.active_name:
                raise ValueError(f"attack(emb_name={emb_name!r}) continues an attack on emb_name={self.active_name!r}")
        targets = self.targets(emb_name)
        params = [_as_rows(p.data) for _, p in targets]
        grads = [_as_rows(p.grad.contiguous()) for _, p in targets]
        backend = self._backend(params[0].device)
        states = [self._state(name, param) for (name, _), param in zip(targets, params)]
        self.active_name = emb_name

        stats = backend.scan(grads, [s.touched for s in states], [s.fresh for s in states])
        for (name, _), state, (sumsq, n_fresh) in zip(targets, states, stats.tolist()):  # the one host sync
            if not math.isfinite(sumsq):
                self._skip_nonfinite(name, sumsq)
            elif sumsq > 0:
                state.add_fresh(state.mark_all_fresh() if sumsq < _UNDERFLOW_SUMSQ else int(n_fresh))
        # every tensor goes in: perturb itself leaves alone those whose norm is zero or not finite (no rows added)
        backend.perturb(
            params,
            grads,
            [s.rows for s in states],
            [s.backup for s in states],
            [s.n_backed for s in states],
            stats[:, 0],
            coef,
            project_eps,
        )
        for state in states:
            state.backed_up()

    def restore(self, emb_name: str | None) -> None:
        if self.active_name is None:
            raise RuntimeError("restore() called without an active attack: call attack() first")
        if emb_name is not None and emb_name != self.active_name:
            raise ValueError(
                f"restore(emb_name={emb_name!r}) but the active attack is on emb_name={self.active_name!r}"
            )
        states = [s for s in self._states.values() if s.n_rows]  # all on one device: targets() checked that
        if states:
            self._backend(states[0].param.device).restore(
                [s.param for s in states], [s.rows for s in states], [s.backup for s in states]
            )
        for state in states:
            state.clear()
        self.active_name = None

    def _state(self, name: str, param: Tensor) -> _RowState:
        state = self._states.get(name)
        if state is None or not state.fits(param):
            state = self._states[name] = _RowState(param)
        state.param = param
        return state

    def _backend(self, device: torch.device) -> ModuleType:
        if device not in self._backends:
            self._backends[device] = resolve_backend(self.backend_name, device)
        return self._backends[device]

    def _skip_nonfinite(self, name: str, sumsq: float) -> None:
        self.nonfinite_skips += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"gradient norm of {name!r} is {math.sqrt(sumsq) if sumsq == sumsq else sumsq}: its attack is skipped"
                " (counted in .nonfinite_skips; warned once)",
                RuntimeWarning,
                stacklevel=4,
            )


class _GradStash:
    """PGD's gradient backup: references to the clean ``.grad`` tensors, not copies, guarded by ``_version``."""

    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self._grads: dict[str, tuple[Tensor, int]] | None = None

    def save(self, model: nn.Module) -> None:
        self._grads = {
            name: (p.grad.clone() if self.copy else p.grad, p.grad._version)
            for name, p in model.named_parameters()
            if p.requires_grad and p.grad is not None
        }

    @property
    def pending(self) -> bool:
        return self._grads is not None

    def restore(self, model: nn.Module) -> None:
        if self._grads is None:
            raise RuntimeError(
                "restore_grad() called without backup_grad(): call backup_grad() after the clean backward"
            )
        changed = [name for name, (grad, version) in self._grads.items() if grad._version != version]
        if changed:
            raise RuntimeError(
                f"the clean gradient of {', '.join(changed[:5])} was modified in place after backup_grad() (e.g. by"
                " zero_grad(set_to_none=False) or a backward without zero_grad), so it can't be restored. Use"
                " model.zero_grad() (set_to_none=True, the default) between adversarial passes, or"
                " FusedPGD(..., copy_grads=True) to back up copies as the seed does"
            )
        for name, param in model.named_parameters():
            if param.requires_grad:
                stashed = self._grads.get(name)
                param.grad = None if stashed is None else stashed[0]
        self._grads = None


class FusedFGM:
    """Drop-in for the seed's ``FGM``: ``W += eps * G / ||G||`` on the embedding rows the batch touched.

    Args:
        model: the model (a wrapper with ``.module``, e.g. DDP, is unwrapped).
        eps: perturbation size, > 0.
        emb_name: substring of the names of the parameters to attack; ``attack``/``restore`` may override it.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.

    Example::

        fgm = FusedFGM(model, eps=1.0)
        loss = fgm.step(lambda: model(**batch).loss)   # clean + adversarial backward, weights restored
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self, model: nn.Module, eps: float = 1.0, emb_name: str = "word_embeddings", backend: str = "auto"
    ) -> None:
        self.model = _unwrap(model)
        self.eps = _check_positive("eps", eps)
        self.emb_name = emb_name
        self._rows = _RowPerturbation(self.model, backend)

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter attacks were skipped because the gradient norm was inf or NaN."""
        return self._rows.nonfinite_skips

    def attack(self, emb_name: str | None = None) -> None:
        """Perturb the matching embeddings along their gradient; raises if an attack is already active."""
        self._rows.attack(emb_name or self.emb_name, self.eps, first=True)

    def restore(self, emb_name: str | None = None) -> None:
        """Put the original rows back, bit-exact and in place."""
        self._rows.restore(emb_name)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """Clean forward/backward, attack, adversarial forward/backward, restore; returns the clean loss.

        ``closure()`` runs the forward pass and returns the loss; gradients accumulate into ``.grad`` as in the seed's
        loop, ready for ``optimizer.step()``.
        """
        try:
            return fgm_step(self, closure).detach()
        finally:
            if self._rows.active_name is not None:  # the adversarial pass raised: put the weights back
                self.restore()


class FusedPGD:
    """Drop-in for the seed's ``PGD``: ``k`` steps of ``alpha * G / ||G||`` projected onto the ``eps`` ball.

    Args:
        model: the model (a wrapper with ``.module``, e.g. DDP, is unwrapped).
        eps: radius of the perturbation ball, > 0.
        alpha: step size, > 0.
        emb_name: substring of the names of the parameters to attack; ``attack``/``restore`` may override it.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.
        copy_grads: ``backup_grad`` copies the gradients as the seed does, instead of keeping references; needed only
            if gradients are zeroed in place (``zero_grad(set_to_none=False)``) between the adversarial passes.

    Example::

        pgd = FusedPGD(model, eps=1.0, alpha=0.3)
        loss = pgd.step(lambda: model(**batch).loss, k=3)
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 1.0,
        alpha: float = 0.3,
        emb_name: str = "word_embeddings",
        backend: str = "auto",
        copy_grads: bool = False,
    ) -> None:
        self.model = _unwrap(model)
        self.eps = _check_positive("eps", eps)
        self.alpha = _check_positive("alpha", alpha)
        self.emb_name = emb_name
        self._rows = _RowPerturbation(self.model, backend)
        self._grads = _GradStash(copy_grads)

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter attacks were skipped because the gradient norm was inf or NaN."""
        return self._rows.nonfinite_skips

    def attack(self, emb_name: str | None = None, is_first_attack: bool = False) -> None:
        """One PGD step; ``is_first_attack=True`` starts a new attack (backs up the rows it touches)."""
        self._rows.attack(emb_name or self.emb_name, self.alpha, first=is_first_attack, project_eps=self.eps)

    def restore(self, emb_name: str | None = None) -> None:
        """Put the original rows back, bit-exact and in place."""
        self._rows.restore(emb_name)

    def backup_grad(self) -> None:
        """Remember the clean gradients (by reference unless ``copy_grads``)."""
        self._grads.save(self.model)

    def restore_grad(self) -> None:
        """Put the clean gradients back; a parameter without a clean gradient gets ``None``."""
        self._grads.restore(self.model)

    def step(self, closure: Callable[[], Tensor], k: int = 3) -> Tensor:
        """The seed's PGD loop in one call; returns the clean loss.

        ``closure()`` runs the forward pass and returns the loss. Afterwards ``.grad`` holds the clean gradient plus
        that of the last adversarial pass, ready for ``optimizer.step()``.
        """
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        try:
            return pgd_step(self, self.model, closure, k).detach()
        finally:  # a pass raised: put the weights and the clean gradients back
            if self._rows.active_name is not None:
                self.restore()
            if self._grads.pending:
                self.restore_grad()
