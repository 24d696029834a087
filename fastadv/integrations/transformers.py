"""``AdversarialTrainer``: a ``transformers.Trainer`` that trains with any method of :mod:`fastadv.methods` (FGM, PGD,
AWP, FreeLB, SMART, R3F); ``AdversarialTrainingMixin`` adds the same to another ``Trainer`` subclass.

Every forward pass of a method's step goes through the Trainer's ``compute_loss`` (its own copy of the batch: a label
smoother or ``compute_loss_func`` pops the labels) and every backward through ``Trainer.training_step``, so the
Trainer's autocast (``bf16``/``fp16``), its loss scaling (``accelerator.backward``, the fp16 ``GradScaler``), the
division of the loss for gradient accumulation and ``num_items_in_batch`` apply to each pass unchanged. The
weight-space attacks normalise the gradient (``G / ||G||``), so a loss scale does not change them; an overflowed (inf)
gradient skips the attack (counted in ``trainer.attacker.nonfinite_skips``) and the scaler then skips the optimizer
step as usual.

Requires ``transformers`` and ``accelerate``: ``pip install -e ".[transformers]"`` in a fastadv checkout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        'fastadv.integrations.transformers needs transformers and accelerate: pip install -e ".[transformers]" in'
        " a fastadv checkout (or pip install transformers accelerate)"
    ) from exc

from fastadv._deepspeed import is_engine
from fastadv._util import unwrap
from fastadv.methods import METHODS as _REGISTRY
from fastadv.methods import Attacker, Method, method

__all__ = ["AdversarialTrainer", "AdversarialTrainingMixin", "METHODS"]

if TYPE_CHECKING:  # the mixin's methods are a Trainer's (it is always put before one): typed as one
    _TrainerBase = Trainer
else:
    _TrainerBase = object

#: The names ``adversarial=`` takes.
METHODS = tuple(_REGISTRY)
#: The Trainer's shorthand arguments; ``adv_X`` sets the method's option ``X`` where it has one, else ``adv_X``.
_SHORTHANDS = ("adv_eps", "adv_alpha", "adv_lr", "emb_name", "adv_param")


def _options(m: Method, given: dict[str, Any], adv_options: dict[str, Any]) -> dict[str, Any]:
    """The constructor options of ``m`` from the shorthand arguments and ``adv_options``, checked."""
    options, names = {}, {}
    for name, value in given.items():
        if value is None:
            continue
        option = name.removeprefix("adv_") if name.removeprefix("adv_") in m.options else name
        if option not in m.options:
            raise ValueError(
                f"{name} does not apply to {m.name!r} (its options: {', '.join(m.options)}); pass"
                f" the method's own arguments in adv_options= (see fastadv.{m.cls.__name__})"
            )
        options[option], names[option] = value, name
    clash = sorted(set(options) & set(adv_options))
    if clash:
        raise ValueError(f"{', '.join(clash)} given both as an argument and in adv_options")
    options.update(adv_options)
    m.check(options, names)
    return options


class AdversarialTrainingMixin(_TrainerBase):
    """Adds a fastadv method to the training step of a ``transformers.Trainer`` subclass (put it first:
    ``class MyTrainer(AdversarialTrainingMixin, Trainer)``); see :class:`AdversarialTrainer` for the arguments."""

    def __init__(
        self,
        *args: Any,
        adversarial: str | None = "fgm",
        adv_eps: float | None = None,
        adv_alpha: float | None = None,
        adv_k: int | None = None,
        emb_name: str | None = None,
        adv_param: str | None = None,
        adv_lr: float | None = None,
        adv_start_epoch: float = 0.0,
        awp_start_epoch: float | None = None,
        adv_backend: str = "auto",
        adv_options: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        self._method: Method | None = None if adversarial is None else method(adversarial)
        self.adversarial: str | None = None if self._method is None else self._method.name
        start_name = "adv_start_epoch" if awp_start_epoch is None else "awp_start_epoch"  # its 0.3 name
        adv_start_epoch = adv_start_epoch if awp_start_epoch is None else awp_start_epoch
        if not (isinstance(adv_start_epoch, int | float) and math.isfinite(adv_start_epoch) and adv_start_epoch >= 0):
            raise ValueError(f"{start_name} must be a finite number >= 0, got {adv_start_epoch!r}")
        self.adv_start_epoch = float(adv_start_epoch)
        self.adv_backend = adv_backend
        self.adv_k: int | None = None
        self.adv_options: dict[str, Any] = {}
        if self._method is not None:
            given = dict(zip(_SHORTHANDS, (adv_eps, adv_alpha, adv_lr, emb_name, adv_param)))
            self.adv_options = _options(self._method, given, dict(adv_options or {}))
            if adv_k is not None:
                self._method.check({"k": adv_k}, {"k": "adv_k"})
                self.adv_k = adv_k
        elif adv_options:
            raise ValueError("adv_options configures a method: pass adversarial= too")
        self._attacker: Attacker | None = None
        self._attacker_done = False  # its train() ended: its hooks are off the model
        self._adv_loss_sum: Tensor | None = None
        self._adv_steps = 0
        self._adv_last_step = -1
        self._loss_to_backpropagate: Tensor | None = None

        super().__init__(*args, **trainer_kwargs)

        if self._method is not None:
            if getattr(self, "is_deepspeed_enabled", False) and self.args.gradient_accumulation_steps != 1:
                raise NotImplementedError(
                    "AdversarialTrainer with DeepSpeed supports gradient_accumulation_steps=1 only, got"
                    f" {self.args.gradient_accumulation_steps}: use a larger per-device batch size instead"
                )
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            if optim in ("lomo", "adalomo"):
                raise NotImplementedError(f"AdversarialTrainer does not support optim={optim!r}: its backward updates")
            if self.model is not None:  # fail now on a bad option, name or backend, not at the first step
                attacker = self._build_attacker(unwrap(self.model))
                # under DeepSpeed the attack object is built on the engine, which train() creates
                self._attacker = None if getattr(self, "is_deepspeed_enabled", False) else attacker

    @property
    def attacker(self) -> Attacker | None:
        """The fastadv attack object of the model being trained (built on first use), or ``None``."""
        return self._attacker

    def _build_attacker(self, model: nn.Module) -> Attacker:
        assert self._method is not None  # built only where a method is set
        try:
            return self._method.build(model, backend=self.adv_backend, **self.adv_options)
        except ValueError as err:
            raise ValueError(f"adversarial={self.adversarial!r}: {err}") from err

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; afterwards (also when it raises) nothing of fastadv is left on the model: the attack
        object's hooks are removed, and the next ``train()`` builds a new one."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._attacker is not None:
                self._attacker.remove_hooks()
                self._attacker_done = True

    def _attacker_for(self, model: nn.Module) -> Attacker:
        target = unwrap(model)
        # a new model from model_init, or a new train()
        if self._attacker is None or self._attacker.model is not target or self._attacker_done:
            self._attacker_done = False
            # a DeepSpeed engine itself (the attack needs it), other wrappers unwrapped
            self._attacker = self._build_attacker(model if is_engine(model) else target)
        return self._attacker

    def adversarial_now(self) -> bool:
        """Whether the current step attacks (a method is set and ``state.epoch >= adv_start_epoch``)."""
        return self._method is not None and (self.state.epoch or 0.0) >= self.adv_start_epoch

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` leaves the loss undivided by the accumulation steps (it is normalised by
        ``num_items_in_batch`` over the accumulated batch), decided as transformers decides it."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return (accepts and num_items_in_batch is not None) or getattr(self, "compute_loss_func", None) is not None

    def _divisor(self, num_items_in_batch: Any) -> int:
        """What ``training_step`` divides a loss by before its backward."""
        if self._loss_scaled_for_ga(num_items_in_batch):
            return 1
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _logit_counts(self, inputs: dict[str, Any], num_items_in_batch: Any) -> dict[str, Any]:
        """SMART/R3F, where the loss is normalised by ``num_items_in_batch``: the divergence counts the positions the
        loss counts (labels not -100; shifted for a causal LM) and is divided by the same count, so that the update
        does not change with how a batch is split into micro-batches. Elsewhere the divergence is the micro-batch's
        mean, divided for accumulation by ``training_step`` as the loss is."""
        assert self._method is not None  # called from a method's step
        labels = inputs.get("shift_labels", inputs.get("labels"))
        if not (self._method.needs_logits and self._loss_scaled_for_ga(num_items_in_batch)) or labels is None:
            return {}
        if "shift_labels" not in inputs and getattr(self, "_loss_shifts_labels", False):
            labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
        scale = 1
        if self.args.average_tokens_across_devices:  # compute_loss multiplies its loss by this
            scale = self.accelerator.num_processes // getattr(self, "get_tp_size", lambda: 1)()
        return {"logit_rows": labels != -100, "logit_total": num_items_in_batch / scale}

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The method's step on this micro-batch (the plain step before ``adv_start_epoch``); returns the clean loss
        as ``Trainer.training_step`` returns a loss (divided for accumulation where it divides)."""
        if not self.adversarial_now():
            return super().training_step(model, inputs, num_items_in_batch)
        attacker = self._attacker_for(model)
        m = self._method
        assert m is not None  # adversarial_now(): a method is set
        # what training_step does before its forward pass, in its order (schedule-free optimizers switch to their
        # training weights in train())
        model.train()
        optimizer_train = getattr(self.optimizer, "train", None)
        if callable(optimizer_train):
            optimizer_train()
        inputs = self._prepare_inputs(inputs)
        kwargs: dict[str, Any] = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        passes = 0

        def forward() -> Any:
            nonlocal passes
            passes += 1
            batch = dict(inputs)  # compute_loss may pop the labels (label smoothing, compute_loss_func)
            with self.compute_loss_context_manager(), self._pass_counted(passes == 1):
                if m.needs_logits:
                    return self._loss_and_logits(model, batch, kwargs, counted=passes == 1)
                return self.compute_loss(model, batch, **kwargs)

        def backward(loss: Tensor) -> None:
            self._loss_to_backpropagate = loss
            try:
                self._backward_step(model, inputs, num_items_in_batch)
            finally:
                self._loss_to_backpropagate = None

        with self._engine_step(attacker):
            loss, adversarial = m.step(
                attacker,
                forward,
                backward,
                attention_mask=inputs.get("attention_mask"),
                k=self.adv_k,
                **self._logit_counts(inputs, num_items_in_batch),
            )
        divisor = self._divisor(num_items_in_batch)
        self._record_adv_loss(adversarial.mean() / divisor)
        return loss.mean().detach() / divisor

    def _backward_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> None:
        """The backward of one pass: the parent's ``training_step``, which takes the loss from :meth:`compute_loss`."""
        step = super().training_step
        step(model, inputs) if num_items_in_batch is None else step(model, inputs, num_items_in_batch)  # < 4.46: none

    def _loss_and_logits(
        self, model: nn.Module, inputs: dict[str, Any], kwargs: dict[str, Any], counted: bool
    ) -> tuple[Tensor, Tensor]:
        """A forward pass of a method that compares logits: the loss, and the logits with their graph (``counted``:
        the step's first pass, see :meth:`_pass_counted`)."""
        loss, outputs = self.compute_loss(model, inputs, return_outputs=True, **kwargs)
        return loss, outputs["logits"]

    def _pass_counted(self, first: bool) -> contextlib.AbstractContextManager[None]:
        """Where a Trainer subclass accounts for what a forward pass saw (TRL's token counts and metrics): the first
        pass of a step counts, the method's other passes of the same batch do not."""
        return contextlib.nullcontext()

    # The Trainer's other arguments pass through by keyword, as the Trainer gives them (num_items_in_batch exists from
    # transformers 4.46 only), so this signature is not the installed Trainer's
    def compute_loss(  # type: ignore[override]
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        """The Trainer's, except inside a method's backward: the loss given to backpropagate."""
        loss = self._loss_to_backpropagate
        if loss is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        self._loss_to_backpropagate = None
        return (loss, None) if return_outputs else loss

    @contextlib.contextmanager
    def _engine_step(self, attacker: Attacker) -> Iterator[None]:
        """Under DeepSpeed, ``accelerator.backward`` would also run ``engine.step()`` after every pass: the passes run
        with that off, inside one ``coalesce_grad_reduction`` block, and the engine steps once after it."""
        if attacker.engine is None:
            yield
            return
        state = self.accelerator.gradient_state
        sync = state.sync_gradients
        state._set_sync_gradients(False)  # accelerate's DeepSpeed backward steps the engine where this is True
        try:
            with attacker.engine.window():
                yield
        finally:
            state._set_sync_gradients(sync)
        engine = attacker.engine.engine
        engine.set_gradient_accumulation_boundary(sync)
        if sync:
            engine.step()

    def _record_adv_loss(self, adv_loss: Tensor) -> None:
        adv_loss = adv_loss.detach()
        self._adv_loss_sum = adv_loss if self._adv_loss_sum is None else self._adv_loss_sum + adv_loss
        if self.state.global_step != self._adv_last_step:  # micro-batches of one optimizer step count once
            self._adv_last_step = self.state.global_step
            self._adv_steps += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``adv_loss`` (the adversarial part of the step, per optimizer step) to the training logs."""
        if "loss" in logs and self._adv_loss_sum is not None:
            total = self._adv_loss_sum
            gather = getattr(self, "_nested_gather", None)  # transformers < 5
            if gather is not None:
                total = gather(total)
            else:
                from transformers.trainer_pt_utils import nested_gather

                total = nested_gather(total, self.args.parallel_mode)
            logs["adv_loss"] = total.float().mean().item() / self._adv_steps
            self._adv_loss_sum, self._adv_steps, self._adv_last_step = None, 0, -1
        super().log(logs, *args, **kwargs)


class AdversarialTrainer(AdversarialTrainingMixin, Trainer):
    """A ``transformers.Trainer`` whose training step is a fastadv method's (:mod:`fastadv.methods`).

    Args:
        *args: passed to ``transformers.Trainer`` unchanged.
        adversarial: a name of :data:`fastadv.methods.METHODS` (``"fgm"``, ``"pgd"``, ``"awp"``, ``"freelb"``,
            ``"smart"``, ``"r3f"``, ``"vat"``, ``"gradient_penalty"``), or ``None`` for the plain Trainer step.
        adv_eps: a shorthand for one of the method's options: ``adv_X`` sets its option ``X`` where it has one
            (``adv_eps``: FGM's/PGD's/R3F's ``eps``), else ``adv_X`` (AWP's and SMART's ``adv_eps``); one it has
            neither of is an error. Left ``None``: the class's default. So are the next four.
        adv_alpha: PGD's (and SMART's, VAT's) ``alpha``.
        adv_lr: AWP's and FreeLB's ``adv_lr``.
        emb_name: the embedding the method attacks (default: the model's input embedding).
        adv_param: AWP's ``adv_param``.
        adv_k: FGM/PGD/AWP: the number of attack steps (PGD 3, the others 1 by default).
        adv_start_epoch: plain steps while ``state.epoch`` (fractional) is below this (``awp_start_epoch``, its 0.3
            name, is the same).
        adv_backend: the fastadv backend (``"auto"`` or a name from :func:`fastadv.available_backends`).
        adv_options: any keyword arguments of the method's class (:class:`fastadv.FusedSMART`'s ``steps``, ...).
        **trainer_kwargs: passed to ``transformers.Trainer`` unchanged.

    One call of ``training_step`` (one micro-batch) runs the method's step (:meth:`fastadv.methods.Method.step`):
    FGM and PGD as in the seed (``.grad`` gets the clean and the last adversarial gradient; with accumulation the
    first attack uses ``.grad`` as it stands, earlier micro-batches included, exactly as the seed's code in an
    accumulation loop); AWP on this micro-batch's clean gradient, the last adversarial gradient replacing it (earlier
    micro-batches' kept); FreeLB, SMART and R3F with the perturbation of the embedding output masked by the batch's
    ``attention_mask``. SMART and R3F take the logits from ``compute_loss``; where the loss is normalised by
    ``num_items_in_batch`` (causal LMs), their divergence counts the loss's positions and is normalised alike, so the
    update is the same however the batch is split into micro-batches. Weights (and PGD's clean gradients) are
    restored even when a pass raises. The step returns (and the Trainer logs as ``loss``) the clean loss; the
    adversarial part (the method's, see :meth:`~fastadv.methods.Method.step`) is logged as ``adv_loss``, averaged
    over the same optimizer steps. Under DeepSpeed (ZeRO 1-3, ``gradient_accumulation_steps=1``), where
    ``accelerator.backward`` also steps the engine, the passes run without that step inside one
    ``engine.coalesce_grad_reduction()`` block and the engine steps once after them. The LOMO optimizers are refused.

    Example::

        from fastadv.integrations.transformers import AdversarialTrainer

        trainer = AdversarialTrainer(
            model=model, args=TrainingArguments("out", bf16=True), train_dataset=train_set,
            adversarial="pgd", adv_eps=1.0, adv_alpha=0.3, adv_k=3, emb_name="word_embeddings",
        )
        trainer.train()   # log_history entries carry "loss" (clean) and "adv_loss"
    """
