"""``AdversarialTraining``: a Lightning callback that trains with FGM, PGD, AWP, FreeLB, SMART or R3F from
:mod:`fastadv`.

Lightning's automatic optimization runs the clean forward and backward pass itself; the callback adds the adversarial
passes in ``on_after_backward``, inside the optimizer's closure, through the method's loop of :mod:`fastadv.loops`
(whose first pass stands for the clean one already run). Each adversarial pass goes through
``trainer.strategy.training_step`` and ``trainer.strategy.backward``, as Lightning's own pass does, so the DDP forward,
autocast (``bf16-mixed``, ``16-mixed``), the fp16 ``GradScaler``, the division of the loss for gradient accumulation and
``no_sync`` on the micro-batches before the last apply to each pass unchanged; gradient clipping runs after the
closure, on the clean and adversarial gradients together. Manual optimization calls ``attacker.run`` itself: see the
README's Lightning section.

FreeLB's first pass is Lightning's own (the perturbation's hook is installed when the batch starts), its gradient
divided by ``adv_steps`` afterwards, and the other passes run as above. SMART and R3F backpropagate once: the callback
wraps ``training_step`` (which must return the ``logits`` beside the ``loss``, in a dict) so that the step returns the
task loss plus the regulariser, after their extra forward passes, and Lightning backpropagates that.

Requires ``lightning``: ``pip install fastadv[lightning]``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import Tensor, nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("fastadv.integrations.lightning needs lightning: pip install fastadv[lightning]") from exc

from fastadv._util import check_positive, check_steps, matching_parameters
from fastadv.attacks import FusedAWP, FusedFGM, FusedPGD
from fastadv.input_attacks import FusedFreeLB, FusedR3F, FusedSMART
from fastadv.loops import add_grads, replayed_pass, set_grads_aside

__all__ = ["AdversarialTraining", "METHODS"]

#: The input-space methods, configured by ``adv_options`` (their classes' keyword arguments).
INPUT_METHODS = {"freelb": FusedFreeLB, "smart": FusedSMART, "r3f": FusedR3F}
METHODS = ("fgm", "pgd", "awp", *INPUT_METHODS)
#: Per method: its class, the constructor options that apply to it, and the option naming the weights it perturbs.
_METHOD = {
    "fgm": (FusedFGM, ("eps", "emb_name"), "emb_name"),
    "pgd": (FusedPGD, ("eps", "alpha", "emb_name", "k"), "emb_name"),
    "awp": (FusedAWP, ("adv_param", "adv_lr", "adv_eps", "k"), "adv_param"),
    **{name: (cls, ("emb_name",), None) for name, cls in INPUT_METHODS.items()},
}
_DEFAULT_K = {"fgm": 1, "pgd": 3, "awp": 1}

Attacker = FusedFGM | FusedPGD | FusedAWP | FusedFreeLB | FusedSMART | FusedR3F


class AdversarialTraining(pl.Callback):
    """Adds FGM, PGD or AWP passes to every training step of Lightning's automatic optimization.

    Args:
        method: ``"fgm"``, ``"pgd"``, ``"awp"``, ``"freelb"``, ``"smart"`` or ``"r3f"``.
        eps: FGM's perturbation size / PGD's ball radius (default 1.0).
        alpha: PGD's step size (default 0.3).
        k: PGD's number of attack steps (default 3), or AWP's (default 1).
        emb_name: FGM/PGD: substring of the names of the embedding weights to perturb (default ``"word_embeddings"``).
        adv_param: AWP: substring of the names of the weights to perturb (default ``"weight"``).
        adv_lr: AWP: step size relative to the weights' norm (default 1.0).
        adv_eps: AWP: half-width of the box relative to ``|W|`` (default 0.01).
        start_epoch: plain steps while ``trainer.current_epoch`` is below this, adversarial from then on.
        backend: the fastadv backend (``"auto"`` or a name from :func:`fastadv.available_backends`).
        adv_options: FreeLB/SMART/R3F: keyword arguments of :class:`fastadv.FusedFreeLB`, :class:`fastadv.FusedSMART`
            or :class:`fastadv.FusedR3F`; ``emb_name`` names the embedding module whose output they perturb.
        attention_mask: FreeLB/SMART/R3F: the batch's key holding the attention mask (a dict batch), a function of
            the batch returning it, or ``None`` (every token).

    Options left ``None`` take the attack class's defaults; one that does not apply to ``method`` is an error.
    Per micro-batch, after Lightning's clean pass: FGM and PGD as in the seed (``.grad`` gets the clean and the last
    adversarial gradient; with accumulation the first attack uses ``.grad`` as it stands, earlier micro-batches
    included); AWP on this micro-batch's clean gradient alone, the last adversarial gradient replacing it (earlier
    micro-batches' gradients kept). ``training_step`` runs once per pass (its ``self.log`` calls count in the clean
    pass only); ``adv_loss``, the loss of the last adversarial pass, is logged. Weights are restored even when a pass
    raises.

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
        name = method.lower() if isinstance(method, str) else method
        if name not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        if adv_options and name not in INPUT_METHODS:
            raise ValueError(f"adv_options configures 'freelb', 'smart' and 'r3f', not {name!r}")
        self._adv_options = dict(adv_options or {})
        self._mask_of = attention_mask
        cls, applies, target = _METHOD[name]
        given = {"eps": eps, "alpha": alpha, "k": k, "emb_name": emb_name, "adv_param": adv_param, "adv_lr": adv_lr,
                 "adv_eps": adv_eps}
        wrong = [option for option, value in given.items() if value is not None and option not in applies]
        if wrong:
            what = "not an option" if len(wrong) == 1 else "not options"
            raise ValueError(f"{', '.join(wrong)}: {what} of {name!r} (its options: {', '.join(applies)})")
        for option in ("eps", "alpha", "adv_lr", "adv_eps"):
            if given[option] is not None:
                check_positive(option, given[option])
        self.k = check_steps("k", _DEFAULT_K.get(name, 1) if k is None else k)
        if not (isinstance(start_epoch, int | float) and math.isfinite(start_epoch) and start_epoch >= 0):
            raise ValueError(f"start_epoch must be a finite number >= 0, got {start_epoch!r}")
        self.method = name
        self.start_epoch = start_epoch
        self._cls = cls
        self._options = {option: value for option, value in given.items() if value is not None and option != "k"}
        self._options["backend"] = backend
        if target is not None:
            default = inspect.signature(cls).parameters[target].default
            self._target: tuple[str, str] | None = (target, self._options.get(target, default))
        else:
            self._target = None
        self._attacker: Attacker | None = None
        self._step_args: tuple[Any, ...] = ()
        self._clean_loss: Tensor | None = None
        self._earlier: list[Tensor | None] = []
        self._in_pass = False  # our own strategy.backward calls on_before/after_backward again
        self._perturbing = contextlib.ExitStack()  # FreeLB: the hook, from the batch's start to its passes' end
        self._batch: Any = None

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
        if self._target is not None:
            matching_parameters(pl_module, self._target[1], self._target[0])  # fail before the first step
        self._attacker = self._cls(pl_module, **self._options, **self._adv_options)
        if isinstance(self._attacker, FusedSMART | FusedR3F):
            pl_module.training_step = self._regularised(trainer, pl_module, pl_module.training_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._perturbing.close()
        if getattr(pl_module.__dict__.get("training_step"), "fastadv_wrapped", False):
            del pl_module.training_step  # the class's again

    def _regularised(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     training_step: Callable[..., Any]) -> Callable[..., Any]:
        """``training_step`` through :meth:`_regularised_step`, taking ``batch_idx`` where it does (Lightning reads
        the signature)."""
        run = functools.partial(self._regularised_step, trainer, pl_module, training_step)
        if is_param_in_hook_signature(training_step, "batch_idx", min_args=2):
            def step(batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
                return run(batch, batch_idx, *args, **kwargs)
        else:
            def step(batch: Any) -> Any:
                return run(batch)
        step.fastadv_wrapped = True  # type: ignore[attr-defined]
        return step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._perturbing.close()

    def _attention_mask(self, batch: Any) -> Tensor | None:
        if self._mask_of is None:
            return None
        if callable(self._mask_of):
            return self._mask_of(batch)
        return batch.get(self._mask_of) if isinstance(batch, Mapping) else None

    def _regularised_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, training_step: Callable[..., Any],
                          batch: Any, *args: Any, **kwargs: Any) -> Any:
        """SMART/R3F: ``training_step``'s output with the loss plus the regulariser; their extra forward passes run
        ``training_step`` again (its ``self.log`` calls dropped), inside this one."""
        if not self._active(trainer):
            return training_step(batch, *args, **kwargs)
        outputs: list[Any] = []

        def forward() -> tuple[Tensor, Tensor]:
            with _log_calls_dropped(pl_module) if outputs else contextlib.nullcontext():
                outputs.append(training_step(batch, *args, **kwargs))
            out = outputs[-1]
            if not (isinstance(out, Mapping) and "loss" in out and "logits" in out):
                raise RuntimeError(
                    f"training_step returned {type(out).__name__}; with {self.method!r} it must return a dict with "
                    "'loss' and 'logits' (the regulariser compares the logits of the clean and perturbed passes)"
                )
            return out["loss"], out["logits"]

        total: list[Tensor] = []
        adversarial = self._attacker.run(forward, total.append, self._attention_mask(batch))[1]
        pl_module.log("adv_loss", adversarial)
        return {**outputs[0], "loss": total[0]}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        # the arguments Lightning passes to training_step
        with_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        self._step_args = (batch, batch_idx) if with_idx else (batch,)
        self._perturbing.close()  # a batch that raised before its backward
        if isinstance(self._attacker, FusedFreeLB) and self._active(trainer):
            hook = self._perturbing.enter_context(self._attacker._embedding.installed(self._attention_mask(batch)))
            self._attacker._prepare(hook)

    def _active(self, trainer: pl.Trainer) -> bool:
        return not self._in_pass and self._attacker is not None and trainer.current_epoch >= self.start_epoch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if not self._active(trainer) or isinstance(self._attacker, FusedSMART | FusedR3F):  # in training_step
            return
        self._clean_loss = loss.detach()  # as backpropagated (divided, maybe scaled): the loop only returns it
        if self.method == "awp" or (self.method == "freelb" and self._attacker.adv_steps > 1):
            # this micro-batch's gradient alone (AWP's attack; FreeLB's division by adv_steps): earlier ones aside
            self._earlier = set_grads_aside(_trainable(pl_module))

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer) or self._clean_loss is None:
            return
        if isinstance(self._attacker, FusedFreeLB):
            self._freelb_passes(trainer, pl_module)
            return
        replay = None
        if self.method == "awp":  # .grad: earlier micro-batches' again, as awp_loop expects; the clean pass replays
            params = _trainable(pl_module)
            clean = set_grads_aside(params)
            add_grads(params, self._earlier)
            replay = functools.partial(add_grads, params, clean)
        self._in_pass = True
        try:
            run_pass = replayed_pass(self._clean_loss, functools.partial(self._pass, trainer), replay)
            adv_loss = self._attacker.run(run_pass, self.k)[1]
        finally:
            self._in_pass, self._clean_loss, self._earlier = False, None, []
        pl_module.log("adv_loss", adv_loss)

    def _freelb_passes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FreeLB's passes after Lightning's (its first): that one's gradient divided by ``adv_steps``, the earlier
        micro-batches' gradients put back before the last backward (which all-reduces them under DDP)."""
        params, steps = _trainable(pl_module), self._attacker.adv_steps
        for p in params:
            if p.grad is not None:
                p.grad.div_(steps)
        backwards = 0

        def backward(loss: Tensor) -> None:
            nonlocal backwards
            backwards += 1
            if backwards == 1:  # Lightning's own, done
                return
            if backwards == steps:
                add_grads(params, self._earlier)
                self._earlier = []
            trainer.strategy.backward(loss / trainer.accumulate_grad_batches, None)

        self._in_pass = True
        try:
            forward = replayed_pass(self._clean_loss, functools.partial(self._forward, trainer))
            adv_loss = self._attacker.run(forward, backward)[1]
        finally:
            add_grads(params, self._earlier)
            self._in_pass, self._clean_loss, self._earlier = False, None, []
            self._perturbing.close()
        pl_module.log("adv_loss", adv_loss)

    def _forward(self, trainer: pl.Trainer) -> Tensor:
        """The loss of the strategy's training_step (DDP forward, autocast), logs dropped."""
        with _log_calls_dropped(trainer.lightning_module):
            output = trainer.strategy.training_step(*self._step_args)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if not isinstance(loss, Tensor):
            raise RuntimeError(
                f"training_step returned {type(output).__name__} in an adversarial pass; AdversarialTraining needs"
                " the loss (a Tensor, or a dict with 'loss') from every pass"
            )
        return loss

    def _pass(self, trainer: pl.Trainer) -> Tensor:
        """One adversarial pass as Lightning runs the clean one: :meth:`_forward`, then the strategy's backward (loss
        scaling), the loss divided for gradient accumulation. Returns the undivided loss."""
        loss = self._forward(trainer)
        trainer.strategy.backward(loss / trainer.accumulate_grad_batches, None)
        return loss.detach()


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@contextlib.contextmanager
def _log_calls_dropped(module: pl.LightningModule) -> Iterator[None]:
    """``module.log`` (and so ``log_dict``) does nothing in the block: logged metrics stay the clean pass's."""
    module.log = _no_log
    try:
        yield
    finally:
        del module.log


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
