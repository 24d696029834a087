"""``AdversarialSFTTrainer``: TRL's ``SFTTrainer`` that trains with any method of :mod:`fastadv.methods`.

:class:`~fastadv.integrations.transformers.AdversarialTrainingMixin` on ``trl.SFTTrainer``, with what TRL's
training step needs:

- SFTTrainer's loss runs a fused LM head that never builds the logits (and with ``return_outputs=True`` recomputes
  them without a graph, deprecated). Methods that need no logits (FGM, PGD, AWP, FreeLB) take the loss alone, through
  SFTTrainer's own ``compute_loss``; those that compare logits (SMART, R3F) take the model's own loss and logits
  (``Trainer.compute_loss``: the same negative log-likelihood over the labels, normalised by ``num_items_in_batch``),
  so their divergence has its graph; that needs ``loss_type="nll"`` and no MoE auxiliary loss, else it is refused.
- SFTTrainer counts ``num_tokens`` and its token accuracy and entropy metrics in ``compute_loss``: they count for
  the first (clean) pass of a step only, as for the plain SFTTrainer, not once per pass (0.3 logged 2x under FGM and
  4x under PGD).

Requires ``trl``: ``pip install -e ".[trl]"`` in a fastadv checkout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

try:
    from transformers import Trainer
    from trl import SFTTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        'fastadv.integrations.trl needs trl: pip install -e ".[trl]" in a fastadv checkout (or pip install trl)'
    ) from exc

from fastadv.integrations.transformers import AdversarialTrainingMixin

__all__ = ["AdversarialSFTTrainer"]


# compute_loss: the mixin's takes the Trainer's other arguments by keyword only (see its definition)
class AdversarialSFTTrainer(AdversarialTrainingMixin, SFTTrainer):  # type: ignore[misc]
    """TRL's ``SFTTrainer`` whose training step is a fastadv method's; the arguments are
    :class:`~fastadv.integrations.transformers.AdversarialTrainer`'s (``adversarial=``, ``adv_options=``, ...) and
    SFTTrainer's.

    Example::

        from fastadv.integrations.trl import AdversarialSFTTrainer

        trainer = AdversarialSFTTrainer(model=model, args=SFTConfig("out", bf16=True), train_dataset=dataset,
                                        processing_class=tokenizer, adversarial="freelb",
                                        adv_options={"adv_lr": 0.05, "adv_steps": 2})
        trainer.train()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._method is not None and self._method.needs_logits:
            if getattr(self.args, "loss_type", "nll") != "nll" or getattr(self, "aux_loss_enabled", False):
                raise NotImplementedError(
                    f"adversarial={self.adversarial!r} compares logits, which SFTTrainer's fused loss does not build;"
                    " it takes the model's own loss instead, which is SFTTrainer's only with loss_type='nll' and no"
                    " MoE auxiliary loss: use those, or a method that needs no logits (FGM, PGD, AWP, FreeLB)"
                )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """SFTTrainer's activation-offloading context around the whole step (entered once: the passes' backward go
        through ``Trainer.training_step``)."""
        if not self.adversarial_now():
            return super().training_step(model, inputs, num_items_in_batch)
        with self.maybe_activation_offload_context:
            return super().training_step(model, inputs, num_items_in_batch)

    def _backward_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> None:
        Trainer.training_step(self, model, inputs, num_items_in_batch)

    def _loss_and_logits(
        self, model: nn.Module, inputs: dict[str, Any], kwargs: dict[str, Any], counted: bool
    ) -> tuple[Tensor, Tensor]:
        loss, outputs = Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs=True, **kwargs)
        if counted:
            self._count_tokens(inputs)
        return loss, outputs["logits"]

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """SFTTrainer's ``num_tokens`` for a pass that does not run its ``compute_loss`` (counted as it counts)."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = inputs["position_ids"].new_tensor(inputs["position_ids"].size(1))
        self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    @contextlib.contextmanager
    def _pass_counted(self, first: bool) -> Iterator[None]:
        if first:
            yield
            return
        tokens = self._total_train_tokens
        sizes = {key: len(values) for key, values in self._metrics["train"].items()}
        try:
            yield
        finally:  # this pass's token count and metrics are undone: they are the first pass's
            self._total_train_tokens = tokens
            for key in list(self._metrics["train"]):
                if key not in sizes:
                    del self._metrics["train"][key]
                elif key != "num_tokens":
                    del self._metrics["train"][key][sizes[key] :]
            self._metrics["train"]["num_tokens"] = [tokens]
