"""FusedFGM, FusedPGD and FusedAWP: the seed's FGM/PGD classes and the widely used AWP class, with the same calls,
on touched rows only.

As in ``torch.optim`` (the optimizer owns the state, a functional owns the math), one base class owns the state (the
model, which rows are perturbed and their originals, the skip count) and each method supplies its rule
(:mod:`fastadv.rules`), which the driver (:mod:`fastadv._driver`) runs through a backend's ops
(:mod:`fastadv.backends`). Their training steps (``step``, ``run``) are the loops of :mod:`fastadv.loops`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from fastadv._deepspeed import EngineSupport, is_engine
from fastadv._driver import RowPerturbation
from fastadv._sharding import Placement
from fastadv._util import (
    Hyperparameters,
    check_positive,
    check_steps,
    embedding_weights_name,
    matching_parameters,
    unwrap,
)
from fastadv.backends import resolve_backend
from fastadv.loops import Pass, awp_loop, backward_pass, fgm_loop, pgd_loop
from fastadv.rules import awp_rule, fgm_rule, pgd_rule

__all__ = ["FusedFGM", "FusedPGD", "FusedAWP"]


class _Attack(Hyperparameters, abc.ABC):
    """What every attack class shares: the model (unwrapped from DDP, FSDP and DataParallel wrappers and DeepSpeed
    engines, see :func:`fastadv._util.unwrap`), the perturbed rows and their originals, ``nonfinite_skips``,
    ``restore``, ``cleanup`` and the passes of ``step``."""

    def __init__(self, model: nn.Module, *, backend: str, rows: str, target: str, arg: str) -> None:
        self.engine = EngineSupport(model) if is_engine(model) else None
        self.model = unwrap(model)
        named = matching_parameters(self.model, target, arg)  # what can fail before the first pass fails here
        resolve_backend(backend, named[0][1].device)
        placement = None if self.engine is None else self.engine.placement
        self._rows = RowPerturbation(self.model, backend=backend, rows=rows, target=target, placement=placement)
        self._placement = self._rows.placement  # where the loops and the gradient backup put gradients back

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter attacks were skipped because the gradient (or, for AWP, weight) norm was inf or NaN."""
        return self._rows.skips.count

    @abc.abstractmethod
    def restore(self) -> None:
        """Put the original rows back, bit-exact and in place."""

    def cleanup(self) -> None:
        """After a failed pass: put back whatever an attack left changed (a no-op when nothing is)."""
        if self._rows.active_name is not None:
            self.restore()

    def remove_hooks(self) -> None:
        """Take this object's hooks off the model (the row hints' lookup recorders; they also go when the object
        is garbage-collected): nothing of fastadv is left on it. Attacks scan the gradient from then on."""
        self._rows.row_source.remove_hooks()

    @contextlib.contextmanager
    def _passes(self, closure: Callable[[], Tensor]) -> Iterator[Pass]:
        """The pass of ``step(closure)``: ``closure().backward()``, or under a DeepSpeed engine its ``backward`` inside
        a ``coalesce_grad_reduction`` block (the caller's if one is open)."""
        if self.engine is None:
            yield backward_pass(closure)
        else:
            with self.engine.window():
                yield self.engine.backward_pass(closure)

    @staticmethod
    def check_k(k: object, name: str = "k") -> int:
        """``k``, the number of attack steps of a step, checked."""
        return check_steps(name, k)

    @abc.abstractmethod
    def run(self, run_pass: Pass, k: int = 1) -> tuple[Tensor, Tensor]:
        """This method's training step with ``run_pass`` (one forward+backward pass returning the loss) as its
        passes; returns the clean loss and that of the last adversarial pass. See :mod:`fastadv.loops`."""

    def step(self, closure: Callable[[], Tensor], k: int | None = None) -> Tensor:
        """The method's training step (:meth:`run`, ``k`` attack steps: its default without one) with
        ``closure().backward()`` as the pass, ``closure()`` running the forward pass and returning the loss (under a
        DeepSpeed engine, ``engine.backward`` inside one ``coalesce_grad_reduction`` block); returns the clean loss.
        Afterwards ``.grad`` holds what the method leaves for ``optimizer.step()`` (see :meth:`run`)."""
        with self._passes(closure) as run_pass:
            return (self.run(run_pass) if k is None else self.run(run_pass, k))[0].detach()


class _EmbeddingAttack(_Attack):
    """FGM and PGD: attacks on the embedding weights that ``emb_name`` names (``None``: the model's input
    embedding's), with their other hyperparameters checked."""

    emb_name: str

    def __init__(
        self, model: nn.Module, emb_name: str | None, hyperparameters: dict[str, float], *, backend: str, rows: str
    ) -> None:
        emb_name = embedding_weights_name(unwrap(model), emb_name)
        vars(self).update(self.checked({**hyperparameters, "emb_name": emb_name}))
        super().__init__(model, backend=backend, rows=rows, target=emb_name, arg="emb_name")

    def restore(self, emb_name: str | None = None) -> None:
        """Put the original rows back, bit-exact and in place."""
        self._rows.restore(emb_name)


class _GradStash:
    """PGD's gradient backup: references to the clean ``.grad`` tensors, guarded by ``_version``, not copies.

    A gradient is copied instead where a reference would be rewritten under us: always with ``copy=True``, and for a
    gradient that is a view into a larger buffer (DDP's ``gradient_as_bucket_view=True`` buckets, which the next
    backward writes into in place).
    """

    def __init__(self, *, copy: bool) -> None:
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

    def restore(self, model: nn.Module, placement: Placement) -> None:
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
                placement.set_grad(param, None if stashed is None else stashed[0])
        self._grads = None


class FusedFGM(_EmbeddingAttack):
    """Drop-in for the seed's ``FGM``: ``W += eps * G / ||G||`` on the embedding rows the batch touched.

    Args:
        model: the model (DDP, FSDP, DataParallel and DeepSpeed engines are unwrapped).
        eps: perturbation size, > 0.
        emb_name: substring of the names of the parameters to attack; ``None`` (default): the parameters of the
            model's input embedding (``model.get_input_embeddings()``: Hugging Face models, PEFT wrappers), else
            ``"word_embeddings"`` as in the seed. ``attack``/``restore`` may override it.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.
        rows: how the rows the batch touched are found. ``"auto"`` (default): from the token ids of the
            ``nn.Embedding`` lookups since the last attack (row hints, forward hooks) wherever they are exact: an
            embedding weight used by its lookup alone, in a single process; checked against a scan of the gradient
            at the first attack and kept checked after it (see the README), and on a mismatch (another use of the
            weight, switched on at any step; a compiled model that skipped the hooks) one warning and scans from
            then on. ``"scan"``: the gradient's non-zero rows (one read of it).
            ``"batch"``: row hints always, an error where they are not exact.

    Example::

        fgm = FusedFGM(model, eps=1.0)
        loss = fgm.step(lambda: model(**batch).loss)   # clean + adversarial backward, weights restored
        optimizer.step(); optimizer.zero_grad()
    """

    CHECKS = {"eps": check_positive}
    eps: float

    def __init__(
        self,
        model: nn.Module,
        eps: float = 1.0,
        emb_name: str | None = None,
        backend: str = "auto",
        rows: str = "auto",
    ) -> None:
        super().__init__(model, emb_name, {"eps": eps}, backend=backend, rows=rows)

    def attack(self, emb_name: str | None = None) -> None:
        """Perturb the matching embeddings along their gradient; raises if an attack is already active."""
        self._rows.attack(emb_name or self.emb_name, first=True, rule=fgm_rule(self.eps))

    @staticmethod
    def check_k(k: object, name: str = "k") -> int:
        if k != 1 or isinstance(k, bool):
            raise ValueError(f"FGM makes one attack per step, got {name}={k!r}")
        return 1

    def run(self, run_pass: Pass, k: int = 1) -> tuple[Tensor, Tensor]:
        """Clean pass, attack, adversarial pass, restore (:func:`fastadv.loops.fgm_loop`): gradients accumulate into
        ``.grad`` as in the seed's loop."""
        self.check_k(k)
        return fgm_loop(self, run_pass)


class FusedPGD(_EmbeddingAttack):
    """Drop-in for the seed's ``PGD``: ``k`` steps of ``alpha * G / ||G||`` projected onto the ``eps`` ball.

    Args:
        model: the model (DDP, FSDP, DataParallel and DeepSpeed engines are unwrapped).
        eps: radius of the perturbation ball, > 0.
        alpha: step size, > 0.
        emb_name: substring of the names of the parameters to attack; ``None`` (default): the parameters of the
            model's input embedding (``model.get_input_embeddings()``: Hugging Face models, PEFT wrappers), else
            ``"word_embeddings"`` as in the seed. ``attack``/``restore`` may override it.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.
        copy_grads: ``backup_grad`` copies the gradients as the seed does, instead of keeping references; needed only
            if gradients are zeroed in place (``zero_grad(set_to_none=False)``) between the adversarial passes.
        rows: ``"auto"`` (default), ``"scan"`` or ``"batch"``, as for :class:`FusedFGM`.

    Example::

        pgd = FusedPGD(model, eps=1.0, alpha=0.3)
        loss = pgd.step(lambda: model(**batch).loss, k=3)
        optimizer.step(); optimizer.zero_grad()
    """

    CHECKS = {"eps": check_positive, "alpha": check_positive}
    eps: float
    alpha: float

    def __init__(
        self,
        model: nn.Module,
        eps: float = 1.0,
        alpha: float = 0.3,
        emb_name: str | None = None,
        backend: str = "auto",
        copy_grads: bool = False,
        rows: str = "auto",
    ) -> None:
        super().__init__(model, emb_name, {"eps": eps, "alpha": alpha}, backend=backend, rows=rows)
        self._grads = _GradStash(copy=copy_grads)

    def attack(self, emb_name: str | None = None, is_first_attack: bool = False) -> None:
        """One PGD step; ``is_first_attack=True`` starts a new attack (backs up the rows it touches)."""
        self._rows.attack(
            emb_name or self.emb_name, first=is_first_attack, rule=pgd_rule(alpha=self.alpha, eps=self.eps)
        )

    def backup_grad(self) -> None:
        """Remember the clean gradients (by reference unless ``copy_grads``)."""
        self._grads.save(self.model)

    def restore_grad(self) -> None:
        """Put the clean gradients back; a parameter without a clean gradient gets ``None``."""
        self._grads.restore(self.model, self._placement)

    def cleanup(self) -> None:
        """After a failed pass: put back the weights and the clean gradients, where an attack left them changed."""
        super().cleanup()
        if self._grads.pending:
            self.restore_grad()

    def run(self, run_pass: Pass, k: int = 3) -> tuple[Tensor, Tensor]:
        """The seed's PGD loop (:func:`fastadv.loops.pgd_loop`): afterwards ``.grad`` holds the clean gradient plus
        that of the last adversarial pass."""
        return pgd_loop(self, run_pass, k)


class FusedAWP(_Attack):
    """Adversarial weight perturbation, as the widely used AWP class does it, on every weight in multi-tensor launches.

    For every parameter whose name contains ``adv_param`` and that has a gradient: the first ``attack()`` after a
    restore saves ``W0`` (the rows it changes); each ``attack()`` does ``W += adv_lr * G / (||G|| + e) * (||W|| + e)``
    (``e = 1e-6``), clamped into the box ``[W0 - adv_eps * |W0|, W0 + adv_eps * |W0|]`` (derived from the backup, never
    stored); ``restore()`` puts ``W0`` back. A zero, inf or NaN gradient norm skips that tensor.

    Args:
        model: the model (DDP, FSDP, DataParallel and DeepSpeed engines are unwrapped).
        adv_param: substring of the names of the parameters to perturb.
        adv_lr: step size relative to the weights' norm, > 0.
        adv_eps: half-width of the box, relative to ``|W0|``, > 0.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.

    Example::

        awp = FusedAWP(model, adv_lr=1.0, adv_eps=0.01)
        loss = awp.step(lambda: model(**batch).loss)   # .grad: the adversarial pass's gradient
        optimizer.step(); optimizer.zero_grad()
    """

    CHECKS = {"adv_lr": check_positive, "adv_eps": check_positive}
    adv_param: str
    adv_lr: float
    adv_eps: float

    def __init__(
        self,
        model: nn.Module,
        adv_param: str = "weight",
        adv_lr: float = 1.0,
        adv_eps: float = 0.01,
        backend: str = "auto",
    ) -> None:
        vars(self).update(self.checked({"adv_param": adv_param, "adv_lr": adv_lr, "adv_eps": adv_eps}))
        super().__init__(model, backend=backend, rows="scan", target=adv_param, arg="adv_param")  # dense: every row

    def attack(self) -> None:
        """One AWP step from the current gradients; the first after a restore saves the original weights."""
        self._rows.attack(
            self.adv_param,
            first=self._rows.active_name is None,
            rule=awp_rule(adv_lr=self.adv_lr, adv_eps=self.adv_eps),
        )

    def restore(self) -> None:
        """Put the original weights back, bit-exact and in place."""
        self._rows.restore(None, arg="adv_param")

    def run(self, run_pass: Pass, k: int = 1) -> tuple[Tensor, Tensor]:
        """Clean pass, then ``k`` times: attack, ``zero_grad``, adversarial pass; restore
        (:func:`fastadv.loops.awp_loop`).

        As in the AWP class, the adversarial passes replace the clean gradient: afterwards ``.grad`` holds the last
        adversarial pass's gradient. Gradients already in ``.grad`` before the call (earlier micro-batches of
        gradient accumulation) are kept: set aside for the attack, they are put back before the last adversarial
        backward, which adds to them (and under DDP all-reduces them).
        """
        return awp_loop(self, run_pass, k, placement=self._placement)
