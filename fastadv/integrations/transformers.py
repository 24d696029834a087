"""``AdversarialTrainer``: a ``transformers.Trainer`` that trains with FGM, PGD, AWP, FreeLB, SMART or R3F from
:mod:`fastadv`.

Every forward/backward pass (the clean one and each adversarial one) goes through ``Trainer.training_step``, so the
Trainer's autocast (``bf16``/``fp16``), its loss scaling (``accelerator.backward``, the fp16 ``GradScaler``), the
division of the loss for gradient accumulation and ``num_items_in_batch`` apply to each pass unchanged. The attacks
normalise the gradient (``G / ||G||``), so a loss scale does not change them; an overflowed (inf) gradient skips the
attack (counted in ``trainer.attacker.nonfinite_skips``) and the scaler then skips the optimizer step as usual.

Requires ``transformers`` and ``accelerate``: ``pip install fastadv[transformers]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "fastadv.integrations.transformers needs transformers and accelerate: pip install fastadv[transformers]"
    ) from exc

from fastadv._deepspeed import is_engine
from fastadv._util import check_positive, check_steps, matching_parameters, unwrap
from fastadv.attacks import FusedAWP, FusedFGM, FusedPGD
from fastadv.input_attacks import FusedFreeLB, FusedR3F, FusedSMART

__all__ = ["AdversarialTrainer", "METHODS"]

#: The input-space methods, configured by ``adv_options`` (their classes' keyword arguments).
INPUT_METHODS = {"freelb": FusedFreeLB, "smart": FusedSMART, "r3f": FusedR3F}
METHODS = ("fgm", "pgd", "awp", *INPUT_METHODS)
_DEFAULT_EPS = {"fgm": 1.0, "pgd": 1.0, "awp": 0.01}
_DEFAULT_K = {"fgm": 1, "pgd": 3, "awp": 1}

Attacker = FusedFGM | FusedPGD | FusedAWP | FusedFreeLB | FusedSMART | FusedR3F


class AdversarialTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step adds adversarial passes with FGM, PGD or AWP.

    Args:
        *args, **trainer_kwargs: passed to ``transformers.Trainer`` unchanged.
        adversarial: ``"fgm"``, ``"pgd"``, ``"awp"``, ``"freelb"``, ``"smart"``, ``"r3f"``, or ``None`` for the
            plain Trainer step.
        adv_eps: FGM's perturbation size / PGD's ball radius (default 1.0), or AWP's box half-width relative to
            ``|W|`` (default 0.01).
        adv_alpha: PGD's step size.
        adv_k: PGD's number of attack steps (default 3), or AWP's (default 1).
        emb_name: FGM/PGD: substring of the names of the embedding weights to perturb.
        adv_param: AWP: substring of the names of the weights to perturb.
        adv_lr: AWP: step size relative to the weights' norm.
        awp_start_epoch: AWP: plain steps while ``state.epoch`` (fractional) is below this, adversarial from then on.
        adv_backend: the fastadv backend (``"auto"`` or a name from :func:`fastadv.available_backends`).
        adv_options: FreeLB/SMART/R3F: keyword arguments of :class:`fastadv.FusedFreeLB`, :class:`fastadv.FusedSMART`
            or :class:`fastadv.FusedR3F` (e.g. ``{"adv_lr": 0.1, "adv_steps": 3}``); ``emb_name`` names the
            embedding module whose output they perturb.

    One call of ``training_step`` (one micro-batch) does:

    - FGM: clean pass, ``attack()``, adversarial pass, ``restore()``: ``.grad`` gets both gradients, as in the seed.
    - PGD: clean pass, ``backup_grad()``, ``k`` times ``attack()`` with ``zero_grad()`` between and
      ``restore_grad()`` before the last adversarial pass, ``restore()``: clean + last adversarial gradient.
    - AWP: gradients of earlier micro-batches set aside, clean pass, ``k`` times (``attack()``, ``zero_grad()``,
      adversarial pass, the earlier gradients put back before the last), ``restore()``: the last adversarial gradient
      replaces the clean one, as in :meth:`fastadv.FusedAWP.step`.
    - FreeLB: its passes, each through ``training_step``'s backward (``loss / adv_steps``), the perturbation of the
      embedding output masked by the batch's ``attention_mask``; SMART, R3F: their forward passes through
      ``compute_loss`` (the model's ``logits``), then one backward of the task loss plus the regulariser through
      ``training_step``'s backward. The step returns the loss it backpropagated; ``adv_loss`` logs the adversarial
      part (FreeLB: the last pass's loss; SMART, R3F: the divergence).

    With gradient accumulation FGM's and PGD's first attack uses ``.grad`` as it stands, earlier micro-batches
    included, exactly as the seed's code in an accumulation loop. Weights (and PGD's clean gradients) are restored
    even when a pass raises. The step returns (and the Trainer logs as ``loss``) the clean loss; the loss of the last
    adversarial pass is logged beside it as ``adv_loss``, averaged over the same optimizer steps. Under DeepSpeed
    (ZeRO 1-3, ``gradient_accumulation_steps=1``), where ``accelerator.backward`` also steps the engine, the passes
    run without that step inside one ``engine.coalesce_grad_reduction()`` block and the engine steps once after them
    (see :class:`fastadv.FusedFGM` on engines). The LOMO optimizers are refused.

    Example::

        from fastadv.integrations.transformers import AdversarialTrainer

        trainer = AdversarialTrainer(
            model=model, args=TrainingArguments("out", bf16=True), train_dataset=train_set,
            adversarial="pgd", adv_eps=1.0, adv_alpha=0.3, adv_k=3, emb_name="word_embeddings",
        )
        trainer.train()   # log_history entries carry "loss" (clean) and "adv_loss"
    """

    def __init__(
        self,
        *args: Any,
        adversarial: str | None = "fgm",
        adv_eps: float | None = None,
        adv_alpha: float = 0.3,
        adv_k: int | None = None,
        emb_name: str = "word_embeddings",
        adv_param: str = "weight",
        adv_lr: float = 1.0,
        awp_start_epoch: float = 0.0,
        adv_backend: str = "auto",
        adv_options: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        method = adversarial.lower() if isinstance(adversarial, str) else adversarial
        if method is not None and method not in METHODS:
            raise ValueError(f"adversarial must be one of {', '.join(map(repr, METHODS))} or None, got {adversarial!r}")
        self.adversarial: str | None = method
        self.adv_options = dict(adv_options or {})
        if method in INPUT_METHODS:
            if adv_eps is not None or adv_k is not None:
                raise ValueError(f"adv_eps and adv_k configure FGM, PGD and AWP; for {method!r} pass its own arguments"
                                 f" in adv_options= (see fastadv.{INPUT_METHODS[method].__name__})")
            method = None  # FGM/PGD/AWP's settings below take their defaults
        elif self.adv_options:
            raise ValueError(f"adv_options configures 'freelb', 'smart' and 'r3f', not {adversarial!r}")
        self.adv_eps = check_positive("adv_eps", _DEFAULT_EPS.get(method or "fgm") if adv_eps is None else adv_eps)
        self.adv_alpha = check_positive("adv_alpha", adv_alpha)
        self.adv_lr = check_positive("adv_lr", adv_lr)
        k = check_steps("adv_k", _DEFAULT_K.get(method or "fgm") if adv_k is None else adv_k)
        if method == "fgm" and k != 1:
            raise ValueError(f"adv_k applies to 'pgd' and 'awp'; FGM makes one attack, got adv_k={adv_k!r}")
        self.adv_k = k
        if not (isinstance(awp_start_epoch, int | float) and math.isfinite(awp_start_epoch) and awp_start_epoch >= 0):
            raise ValueError(f"awp_start_epoch must be a finite number >= 0, got {awp_start_epoch!r}")
        self.awp_start_epoch = float(awp_start_epoch)
        self.emb_name = emb_name
        self.adv_param = adv_param
        self.adv_backend = adv_backend
        self._attacker: Attacker | None = None
        self._adv_loss_sum: Tensor | None = None
        self._adv_steps = 0
        self._adv_last_step = -1
        self._loss_to_backpropagate: Tensor | None = None

        super().__init__(*args, **trainer_kwargs)

        if self.adversarial is not None:
            if getattr(self, "is_deepspeed_enabled", False) and self.adversarial in INPUT_METHODS:
                raise NotImplementedError(
                    f"AdversarialTrainer does not support {self.adversarial!r} under DeepSpeed (untested; FreeLB's"
                    " several backward passes would each step the engine): use 'fgm', 'pgd' or 'awp' there"
                )
            if getattr(self, "is_deepspeed_enabled", False) and self.args.gradient_accumulation_steps != 1:
                raise NotImplementedError(
                    "AdversarialTrainer with DeepSpeed supports gradient_accumulation_steps=1 only, got"
                    f" {self.args.gradient_accumulation_steps}: use a larger per-device batch size instead"
                )
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            if optim in ("lomo", "adalomo"):
                raise NotImplementedError(f"AdversarialTrainer does not support optim={optim!r}: its backward updates")
            if self.model is not None:  # fail now on a bad emb_name/adv_param/backend, not at the first step
                attacker = self._build_attacker(unwrap(self.model))
                # under DeepSpeed the attack object is built on the engine, which train() creates
                self._attacker = None if getattr(self, "is_deepspeed_enabled", False) else attacker

    @property
    def attacker(self) -> Attacker | None:
        """The fastadv attack object of the model being trained (built on first use), or ``None``."""
        return self._attacker

    def _build_attacker(self, model: nn.Module) -> Attacker:
        if self.adversarial in INPUT_METHODS:
            options = {"emb_name": self.emb_name, "backend": self.adv_backend, **self.adv_options}
            return INPUT_METHODS[self.adversarial](model, **options)
        if self.adversarial == "awp":  # fail now on a name that matches nothing, not at the first step
            matching_parameters(model, self.adv_param, "adv_param")
        else:
            matching_parameters(model, self.emb_name, "emb_name")
        if self.adversarial == "fgm":
            return FusedFGM(model, eps=self.adv_eps, emb_name=self.emb_name, backend=self.adv_backend)
        if self.adversarial == "pgd":
            return FusedPGD(
                model, eps=self.adv_eps, alpha=self.adv_alpha, emb_name=self.emb_name, backend=self.adv_backend
            )
        return FusedAWP(
            model, adv_param=self.adv_param, adv_lr=self.adv_lr, adv_eps=self.adv_eps, backend=self.adv_backend
        )

    def _attacker_for(self, model: nn.Module) -> Attacker:
        target = unwrap(model)
        if self._attacker is None or self._attacker.model is not target:  # e.g. a new model from model_init
            # a DeepSpeed engine itself (the attack needs it), other wrappers unwrapped
            self._attacker = self._build_attacker(model if is_engine(model) else target)
        return self._attacker

    def _pass(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> Tensor:
        """One forward/backward pass through the Trainer's own step (autocast, loss scaling, GA division)."""
        if num_items_in_batch is None:  # transformers < 4.46 has no such argument
            return super().training_step(model, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def awp_active(self) -> bool:
        """Whether AWP attacks at the current step (``state.epoch >= awp_start_epoch``)."""
        return self.adversarial == "awp" and (self.state.epoch or 0.0) >= self.awp_start_epoch

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The clean pass plus the adversarial passes of the chosen method; returns the clean loss."""
        if self.adversarial is None or (self.adversarial == "awp" and not self.awp_active()):
            return self._pass(model, inputs, num_items_in_batch)
        attacker = self._attacker_for(model)
        if isinstance(attacker, FusedFreeLB | FusedSMART | FusedR3F):
            return self._input_step(attacker, model, inputs, num_items_in_batch)
        with self._engine_step(attacker):
            loss, adv_loss = attacker.run(lambda: self._pass(model, inputs, num_items_in_batch), self.adv_k)
        self._record_adv_loss(adv_loss)
        return loss

    def _input_step(self, attacker: FusedFreeLB | FusedSMART | FusedR3F, model: nn.Module, inputs: dict[str, Any],
                    num_items_in_batch: Any) -> Tensor:
        """FreeLB/SMART/R3F: forward passes through ``compute_loss``, each backward through ``training_step`` (which
        then computes no loss of its own: :meth:`compute_loss` hands it the one to backpropagate)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        returned: list[Tensor] = []

        def forward() -> Any:
            with self.compute_loss_context_manager():
                loss, outputs = super(AdversarialTrainer, self).compute_loss(model, inputs, return_outputs=True,
                                                                             **kwargs)
            return loss if isinstance(attacker, FusedFreeLB) else (loss, outputs["logits"])

        def backward(loss: Tensor) -> None:
            self._loss_to_backpropagate = loss
            returned.append(self._pass(model, inputs, num_items_in_batch))

        _, adversarial = attacker.run(forward, backward, inputs.get("attention_mask"))
        self._record_adv_loss(adversarial / self.args.gradient_accumulation_steps)
        return sum(returned[1:], returned[0])

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     **kwargs: Any) -> Any:
        """The Trainer's, except inside :meth:`_input_step`'s backward: the loss given to backpropagate."""
        loss, self._loss_to_backpropagate = self._loss_to_backpropagate, None
        if loss is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
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
        """Adds ``adv_loss`` (mean loss of the last adversarial pass per optimizer step) to the training logs."""
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
