"""``AdversarialTraining``: a Lightning callback that trains with any method of :mod:`fastadv.methods` (FGM, PGD, AWP,
FreeLB, SMART, R3F).

Lightning's automatic optimization runs ``training_step`` and then the backward of the loss it returned, inside the
optimizer's closure. For a batch the callback attacks, it stands in for the strategy's ``training_step`` for that one
call (an attribute of ``trainer.strategy``, put there when the batch starts and taken away when its step ends, or the
batch, the fit or the validation that follows ends, whichever comes first; nothing is put on the user's module): the
method's whole step runs there (:meth:`fastadv.methods.Method.step`), every forward pass through the strategy's own
``training_step`` and every backward through ``trainer.strategy.backward``, as Lightning's own pass does, so the DDP
forward, autocast (``bf16-mixed``, ``16-mixed``), the fp16 ``GradScaler``, the division of the loss for gradient
accumulation and ``no_sync`` on the micro-batches before the last apply to each pass unchanged; gradient clipping runs
after the closure, on the whole step's gradients. Lightning's own backward then gets a loss without a graph (the
step's gradients are already in ``.grad``). ``training_step``'s ``self.log`` calls count in its first (clean) pass
only; returning ``None`` from it skips the batch, as in Lightning. Manual optimization calls ``attacker.run`` itself:
see the README's Lightning section.

Requires ``lightning``: ``pip install -e ".[lightning]"`` in a fastadv checkout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        'fastadv.integrations.lightning needs lightning: pip install -e ".[lightning]" in a fastadv checkout (or pip'
        " install lightning)"
    ) from exc

from fastadv.loops import add_grads, set_grads_aside
from fastadv.methods import METHODS as _REGISTRY
from fastadv.methods import Attacker
from fastadv.methods import method as find_method

__all__ = ["AdversarialTraining", "METHODS"]

#: The names ``method=`` takes.
METHODS = tuple(_REGISTRY)


class _Skipped(Exception):
    """``training_step`` returned ``None`` in the clean pass: Lightning's way to skip the batch."""


class AdversarialTraining(pl.Callback):
    """Adds a fastadv method to every training step of Lightning's automatic optimization.

    Args:
        method: ``"fgm"``, ``"pgd"``, ``"awp"``, ``"freelb"``, ``"smart"`` or ``"r3f"``.
        eps: an option of the method's class (:class:`fastadv.FusedFGM`, ...), as the next five are; one the method
            does not have is an error. Left ``None``: the class's default.
        alpha: PGD's (SMART's, VAT's) ``alpha``.
        emb_name: the embedding the method attacks (default: the model's input embedding).
        adv_param: AWP's ``adv_param``.
        adv_lr: AWP's and FreeLB's ``adv_lr``.
        adv_eps: AWP's and SMART's ``adv_eps``.
        k: FGM/PGD/AWP: the number of attack steps (PGD 3, the others 1 by default).
        start_epoch: plain steps while ``trainer.current_epoch`` is below this, adversarial from then on.
        backend: the fastadv backend (``"auto"`` or a name from :func:`fastadv.available_backends`).
        adv_options: any other keyword arguments of the method's class (FreeLB's ``adv_steps``, SMART's ``steps``,
            ...).
        attention_mask: FreeLB/SMART/R3F: the batch's key holding the attention mask (a dict batch), a function of
            the batch returning it, or ``None`` (every token).

    Per micro-batch, the method's step: FGM and PGD as in the seed (``.grad`` gets the clean and the last adversarial
    gradient; with accumulation the first attack uses ``.grad`` as it stands, earlier micro-batches included); AWP on
    this micro-batch's clean gradient alone, the last adversarial gradient replacing it (earlier micro-batches'
    gradients kept); FreeLB, SMART and R3F on the embedding output, masked by the batch's attention mask. SMART and R3F
    need the logits: ``training_step`` returns a dict with ``"loss"`` and ``"logits"``. ``adv_loss``, the adversarial
    part of the step (:meth:`fastadv.methods.Method.step`), is logged. Weights are restored even when a pass raises.

    Example::

        from fastadv.integrations.lightning import AdversarialTraining

        trainer = L.Trainer(precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=1.0,
                            callbacks=[AdversarialTraining("pgd", eps=1.0, alpha=0.3, k=3)])
        trainer.fit(module, train_loader)
    """

    def __init__(
        self,
        method: str = "fgm",
        *,
        eps: float | None = None,
        alpha: float | None = None,
        k: int | None = None,
        emb_name: str | None = None,
        adv_param: str | None = None,
        adv_lr: float | None = None,
        adv_eps: float | None = None,
        start_epoch: float = 0,
        backend: str = "auto",
        adv_options: Mapping[str, Any] | None = None,
        attention_mask: str | Callable[[Any], Tensor | None] | None = "attention_mask",
    ) -> None:
        self._method = find_method(method)
        given = {
            "eps": eps,
            "alpha": alpha,
            "emb_name": emb_name,
            "adv_param": adv_param,
            "adv_lr": adv_lr,
            "adv_eps": adv_eps,
        }
        options = {option: value for option, value in given.items() if value is not None}
        clash = sorted(set(options) & set(adv_options or {}))
        if clash:
            raise ValueError(f"{', '.join(clash)} given both as an argument and in adv_options")
        options.update(adv_options or {})
        self._method.check({**options, **({} if k is None else {"k": k})})
        if not (isinstance(start_epoch, int | float) and math.isfinite(start_epoch) and start_epoch >= 0):
            raise ValueError(f"start_epoch must be a finite number >= 0, got {start_epoch!r}")
        self.method = self._method.name
        self.k = k
        self.start_epoch = start_epoch
        self._options: dict[str, Any] = {**options, "backend": backend}
        self._mask_of = attention_mask
        self._attacker: Attacker | None = None
        self._installed: pl.Trainer | None = None
        self._aside: tuple[list[nn.Parameter], list[Tensor | None]] | None = None  # the step's gradients, while zeroed

    @property
    def attacker(self) -> Attacker | None:
        """The fastadv attack object of the module being trained (built when fitting starts), or ``None``."""
        return self._attacker

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "AdversarialTraining needs automatic optimization; with automatic_optimization = False call"
                " attacker.run(run_pass, k) in training_step, run_pass calling self.manual_backward (README, Lightning)"
            )
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise NotImplementedError(
                "AdversarialTraining does not support Lightning's DeepSpeedStrategy: its backward runs in the engine"
                " and ZeRO keeps gradients outside .grad"
            )
        self._attacker = self._method.build(pl_module, **self._options)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._uninstall()
        if self._attacker is not None and trainer.current_epoch >= self.start_epoch:
            strategy = trainer.strategy
            original = strategy.training_step
            window_starts = batch_idx % trainer.accumulate_grad_batches == 0  # where Lightning zeroes the gradients
            # an instance attribute over the method, for this batch's call (_uninstall takes it off)
            strategy.training_step = lambda *args, **kwargs: self._step(  # type: ignore[method-assign]
                trainer, original, window_starts, args, kwargs
            )
            self._installed = trainer

    def _uninstall(self) -> None:
        if self._installed is not None:
            self._installed.strategy.__dict__.pop("training_step", None)
            self._installed = None

    def _put_back(self) -> None:
        if self._aside is not None:
            add_grads(*self._aside)
            self._aside = None

    def on_before_backward(self, *args: Any, **kwargs: Any) -> None:
        self._put_back()

    # every way a batch's step can end without its call: the stand-in goes (and set-aside gradients come back)
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._put_back()
        self._uninstall()

    def on_validation_start(self, *args: Any, **kwargs: Any) -> None:
        self._uninstall()

    def on_exception(self, *args: Any, **kwargs: Any) -> None:
        self._aside = None
        self.teardown()

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        self._uninstall()
        if self._attacker is not None:  # nothing of fastadv stays on the module: its hooks go, a fit builds anew
            self._attacker.remove_hooks()

    def _attention_mask(self, batch: Any) -> Tensor | None:
        if self._mask_of is None or not self._method.input_space:
            return None
        if callable(self._mask_of):
            return self._mask_of(batch)
        return batch.get(self._mask_of) if isinstance(batch, Mapping) else None

    def _step(
        self, trainer: pl.Trainer, training_step: Callable[..., Any], window_starts: bool, args: tuple, kwargs: dict
    ) -> Any:
        """The method's step in place of the strategy's ``training_step`` (once: the batch's call)."""
        self._uninstall()
        params = [p for p in trainer.lightning_module.parameters() if p.requires_grad]
        if window_starts:  # Lightning zeroes the gradients after training_step: the step must not see the last window's
            set_grads_aside(params)
        outputs: list[Any] = []

        def forward() -> Any:
            with _logs_dropped(trainer) if outputs else contextlib.nullcontext():
                out = training_step(*args, **kwargs)
            if out is None and not outputs:
                raise _Skipped
            outputs.append(out)
            return self._loss_of(out)

        def backward(loss: Tensor) -> None:
            trainer.strategy.backward(loss / trainer.accumulate_grad_batches, None)

        mask = self._attention_mask(args[0] if args else kwargs.get("batch"))
        attacker = self._attacker
        assert attacker is not None  # the step is installed only with an attack object
        try:
            loss, adversarial = self._method.step(attacker, forward, backward, attention_mask=mask, k=self.k)
        except _Skipped:
            return None
        trainer.lightning_module.log("adv_loss", adversarial)
        # Lightning zeroes the gradients between training_step and its backward at the start of an accumulation
        # window: the step's are set aside meanwhile and put back when that backward starts; the loss it then
        # backpropagates has no graph and adds nothing
        self._aside = (params, set_grads_aside(params))
        done = loss.detach().requires_grad_()
        return {**outputs[0], "loss": done} if isinstance(outputs[0], Mapping) else done

    def _loss_of(self, out: Any) -> Any:
        """The loss (and for SMART/R3F the logits) of a ``training_step`` output."""
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor):
            raise RuntimeError(
                f"training_step returned {type(out).__name__} in an adversarial pass; AdversarialTraining needs the"
                " loss (a Tensor, or a dict with 'loss') from every pass"
            )
        if not self._method.needs_logits:
            return loss
        if not (isinstance(out, Mapping) and "logits" in out):
            raise RuntimeError(
                f"training_step returned {type(out).__name__}; with {self.method!r} it must return a dict with 'loss'"
                " and 'logits' (the regulariser compares the logits of the clean and perturbed passes)"
            )
        return loss, out["logits"]


@contextlib.contextmanager
def _logs_dropped(trainer: pl.Trainer) -> Iterator[None]:
    """``self.log`` calls in the block go to a collection that is thrown away: the logged metrics stay the clean
    pass's."""
    loop = trainer.fit_loop.epoch_loop
    kept = loop._results
    loop._results = _ResultCollection(training=True)
    try:
        yield
    finally:
        loop._results = kept
