"""FusedFGM, FusedPGD and FusedAWP: the seed's FGM/PGD classes and the widely used AWP class, with the same calls,
on touched rows only.

The classes hold state (which parameters are perturbed, which rows, their original values, the step count) through
:class:`fastadv._perturbation.RowPerturbation`, which calls the ops of a backend (:mod:`fastadv.backends`); they never
touch tensors element by element.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from fastadv._perturbation import RowPerturbation, ScaleRule
from fastadv.reference import awp_step, fgm_step, pgd_step

__all__ = ["FusedFGM", "FusedPGD", "FusedAWP"]

# AWP's guard against zero norms, as in the AWP class: W += lr * G / (||G|| + e) * (||W|| + e).
_AWP_E = 1e-6


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


@contextlib.contextmanager
def earlier_grads_set_aside(model: nn.Module) -> Iterator[None]:
    """Gradients already in ``.grad`` (earlier micro-batches of gradient accumulation) are set aside for the block
    and added back after it, so that AWP's passes see this batch's gradients only."""
    params = [p for p in model.parameters() if p.requires_grad]
    earlier = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, earlier):
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad.add_(grad)


def _normalised(coef: float) -> ScaleRule:
    """FGM/PGD's step size ``coef / ||G||`` (fp64 math, rounded once to fp32 by the caller)."""
    return lambda stats: coef / stats[:, 0].sqrt()


class _GradStash:
    """PGD's gradient backup: references to the clean ``.grad`` tensors, guarded by ``_version``, not copies.

    A gradient is copied instead where a reference would be rewritten under us: always with ``copy=True``, and for a
    gradient that is a view into a larger buffer (DDP's ``gradient_as_bucket_view=True`` buckets, which the next
    backward writes into in place).
    """

    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self._grads: dict[str, tuple[Tensor, int]] | None = None

    def save(self, model: nn.Module) -> None:
        saved = {}
        with torch.inference_mode(False), torch.no_grad():  # copies must outlive an inference_mode block
            for name, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    grad = p.grad.clone() if self.copy or p.grad._base is not None else p.grad
                    saved[name] = (grad, grad._version)
        self._grads = saved

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
        rows: ``"scan"`` finds the touched rows in the gradient (one read of it); ``"batch"`` takes them from the
            token ids of the ``nn.Embedding`` lookups since the last attack (forward hooks) and reads only those
            rows. ``"batch"`` needs an embedding used by its lookup alone (not tied to an LM head, not under DDP,
            whose all-reduced gradient holds the other ranks' rows); the first attack checks it against a scan.

    Example::

        fgm = FusedFGM(model, eps=1.0)
        loss = fgm.step(lambda: model(**batch).loss)   # clean + adversarial backward, weights restored
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 1.0,
        emb_name: str = "word_embeddings",
        backend: str = "auto",
        rows: str = "scan",
    ) -> None:
        self.model = _unwrap(model)
        self.eps = _check_positive("eps", eps)
        self.emb_name = emb_name
        self._rows = RowPerturbation(self.model, backend, rows, emb_name)

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter attacks were skipped because the gradient norm was inf or NaN."""
        return self._rows.nonfinite_skips

    def attack(self, emb_name: str | None = None) -> None:
        """Perturb the matching embeddings along their gradient; raises if an attack is already active."""
        self._rows.attack(emb_name or self.emb_name, True, _normalised(self.eps))

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
        rows: ``"scan"`` or ``"batch"``, as for :class:`FusedFGM`.

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
        rows: str = "scan",
    ) -> None:
        self.model = _unwrap(model)
        self.eps = _check_positive("eps", eps)
        self.alpha = _check_positive("alpha", alpha)
        self.emb_name = emb_name
        self._rows = RowPerturbation(self.model, backend, rows, emb_name)
        self._grads = _GradStash(copy_grads)

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter attacks were skipped because the gradient norm was inf or NaN."""
        return self._rows.nonfinite_skips

    def attack(self, emb_name: str | None = None, is_first_attack: bool = False) -> None:
        """One PGD step; ``is_first_attack=True`` starts a new attack (backs up the rows it touches)."""
        self._rows.attack(emb_name or self.emb_name, is_first_attack, _normalised(self.alpha), ball_eps=self.eps)

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


class FusedAWP:
    """Adversarial weight perturbation, as the widely used AWP class does it, on every weight in multi-tensor launches.

    For every parameter whose name contains ``adv_param`` and that has a gradient: the first ``attack()`` after a
    restore saves ``W0`` (the rows it changes); each ``attack()`` does ``W += adv_lr * G / (||G|| + e) * (||W|| + e)``
    (``e = 1e-6``), clamped into the box ``[W0 - adv_eps * |W0|, W0 + adv_eps * |W0|]`` (derived from the backup, never
    stored); ``restore()`` puts ``W0`` back. A zero, inf or NaN gradient norm skips that tensor.

    Args:
        model: the model (a wrapper with ``.module``, e.g. DDP, is unwrapped).
        adv_param: substring of the names of the parameters to perturb.
        adv_lr: step size relative to the weights' norm, > 0.
        adv_eps: half-width of the box, relative to ``|W0|``, > 0.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.

    Example::

        awp = FusedAWP(model, adv_lr=1.0, adv_eps=0.01)
        loss = awp.step(lambda: model(**batch).loss)   # .grad: the adversarial pass's gradient
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        adv_param: str = "weight",
        adv_lr: float = 1.0,
        adv_eps: float = 0.01,
        backend: str = "auto",
    ) -> None:
        self.model = _unwrap(model)
        self.adv_param = adv_param
        self.adv_lr = _check_positive("adv_lr", adv_lr)
        self.adv_eps = _check_positive("adv_eps", adv_eps)
        self._rows = RowPerturbation(self.model, backend)

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter attacks were skipped because the gradient or weight norm was inf or NaN."""
        return self._rows.nonfinite_skips

    def _scales(self, stats: Tensor) -> Tensor:
        return self.adv_lr * (stats[:, 2].sqrt() + _AWP_E) / (stats[:, 0].sqrt() + _AWP_E)

    def attack(self) -> None:
        """One AWP step from the current gradients; the first after a restore saves the original weights."""
        first = self._rows.active_name is None
        self._rows.attack(
            self.adv_param, first, self._scales, what="adv_param", need_grad=False, read_params=True,
            box_eps=self.adv_eps,
        )

    def restore(self) -> None:
        """Put the original weights back, bit-exact and in place."""
        self._rows.restore(None, what="adv_param")

    def step(self, closure: Callable[[], Tensor], k: int = 1) -> Tensor:
        """Clean forward/backward, then ``k`` times: attack, ``zero_grad``, adversarial forward/backward; restore.
        Returns the clean loss.

        As in the AWP class, the adversarial passes replace the clean gradient: afterwards ``.grad`` holds the last
        adversarial pass's gradient. Gradients already in ``.grad`` before the call (earlier micro-batches of
        gradient accumulation) are kept: they are added back at the end.
        """
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        with earlier_grads_set_aside(self.model):
            try:
                return awp_step(self, self.model, closure, k).detach()
            finally:
                if self._rows.active_name is not None:  # a pass raised: put the weights back
                    self.restore()
