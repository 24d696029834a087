"""FusedFreeLB, FusedSMART, FusedR3F, FusedVAT and FusedGradientPenalty: the input-space family, on the output of the
embedding module.

The public implementations of these methods feed ``inputs_embeds`` (FreeLB, SMART) or need a model that takes
``token_embeddings`` (R3F), or their own embedding layer (VAT, the gradient penalty). Here the perturbation is added
to the output of the embedding module (found by name, like ``emb_name``) by a forward hook that exists only while a
step runs: a global module hook (``torch.nn.modules.module.register_module_forward_hook``) that acts on that module
alone, installed by the step and removed on every way out of it, so nothing of fastadv is ever on the user's model (a
``copy.deepcopy`` or ``torch.save`` taken inside a step carries nothing away) and any model works unchanged.
FreeLB's and SMART's ascent step (masked per-example or per-token norm of the gradient, step, bound) is one op of the
backend contract, :meth:`~fastadv.backends.contract.Backend.input_step`, and so is VAT's normalisation. The oracles are
:func:`fastadv.reference.freelb_step`, :func:`~fastadv.reference.smart_step`, :func:`~fastadv.reference.r3f_step`,
:func:`~fastadv.reference.vat_step` and :func:`~fastadv.reference.gradient_penalty_step`.

Each class has ``step(closure, attention_mask=None)`` (``closure()`` runs the forward pass; the step runs every
backward itself) and ``run(forward, backward, attention_mask=None)``, the same step with your own backward (a
GradScaler's ``scaler.scale(loss).backward()``, ``accelerator.backward``): the one implementation the Trainer and the
Lightning callback use too. SMART, R3F and VAT need the logits: ``forward()`` returns ``(loss, logits)`` or an object
with ``.loss`` and ``.logits`` (a Hugging Face model output).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastadv._deepspeed import EngineSupport, is_engine, refuse_zero_model
from fastadv._util import (
    DEFAULT_EMB_NAME,
    Hyperparameters,
    as_bool,
    check_choice,
    check_nonnegative,
    check_positive,
    check_steps,
    input_embedding,
    optional,
    unwrap,
)
from fastadv.backends import backend_for, resolve_backend

__all__ = ["FusedFreeLB", "FusedSMART", "FusedR3F", "FusedVAT", "FusedGradientPenalty"]

#: A forward pass: returns the loss (FreeLB), or ``(loss, logits)`` / an output with ``.loss`` and ``.logits``.
Forward = Callable[[], Any]
#: Backpropagates a loss (``loss.backward()``, ``scaler.scale(loss).backward()``, ``accelerator.backward(loss)``).
Backward = Callable[[Tensor], None]
#: What a summed divergence is divided by (``None``: how many rows count; see :func:`_reduced`).
_Total: TypeAlias = "Tensor | float | None"


class _Ascent(NamedTuple):
    """The step and the bound of an ascent: the arguments of :meth:`~fastadv.backends.contract.Backend.input_step`
    after ``delta``, ``grad`` and ``mask``, in its order."""

    lr: float
    norm: str
    per_token: bool
    denom_eps: float
    denom_floor: float
    bound: str
    radius: float


def _loss_of(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else _loss_and_logits(out)[0]


def _loss_and_logits(out: Any) -> tuple[Tensor, Tensor]:
    if isinstance(out, tuple) and len(out) == 2:
        return out
    if hasattr(out, "loss") and hasattr(out, "logits"):
        return out.loss, out.logits
    raise TypeError(
        f"forward() must return (loss, logits) or an object with .loss and .logits (a Hugging Face output), got "
        f"{type(out).__name__}: SMART, R3F and VAT compare the logits of the clean and perturbed passes"
    )


def embedding_module(model: nn.Module, emb_name: str | None) -> tuple[str, nn.Module]:
    """The module whose output the input-space methods perturb: for ``emb_name=None`` the model's input embedding
    (``model.get_input_embeddings()``: Hugging Face models, PEFT wrappers; else the module named like
    ``"word_embeddings"``); else the one whose name ends with ``emb_name`` as a dotted suffix
    (``"encoder.embed_tokens"`` picks one of an encoder-decoder's two), or, for a name without a dot, whose last name
    part contains it. A clear error unless exactly one matches."""
    if emb_name is None:
        embedding = input_embedding(model)
        if embedding is not None:
            return embedding
        emb_name = DEFAULT_EMB_NAME
    if "." in emb_name:
        found = [(n, m) for n, m in model.named_modules() if n == emb_name or n.endswith("." + emb_name)]
    else:
        found = [(n, m) for n, m in model.named_modules() if n and emb_name in n.split(".")[-1]]
    if len(found) == 1:
        return found[0]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    what = "no module" if not found else f"{len(found)} modules ({', '.join(n for n, _ in found)})"
    raise ValueError(
        f"{what} of the model is named like emb_name={emb_name!r}; the embedding modules are: "
        f"{', '.join(names) or 'none'}. Pass emb_name= the last part of the name of the one whose output to perturb "
        "(the word embeddings), or a dotted suffix of its name (e.g. 'encoder.embed_tokens') to pick one of several"
    )


def _neftune_hooks(module: nn.Module) -> list[int]:
    """The keys of transformers' NEFTune hooks on ``module`` (``Trainer(neftune_noise_alpha=...)``)."""
    return [
        key
        for key, hook in module._forward_hooks.items()
        if getattr(hook, "__name__", "") == "neftune_post_forward_hook"
    ]


def _sequence_mark() -> int:
    """The autograd sequence number the next node created on this thread gets: passes are told apart by it, since a
    node's number says which pass created it."""
    with torch.inference_mode(False), torch.enable_grad():
        node = torch.empty((), requires_grad=True).view(()).grad_fn
        assert node is not None  # a view of a tensor that requires grad, under enable_grad
        return node._sequence_nr()


class _EmbeddingOutput:
    """The perturbation of the output of one embedding module during a step (:meth:`installed`).

    ``perturb(delta, detach)`` sets what the following passes add (``detach``: added to the output cut from the graph,
    as R3F's noised embeddings are); ``init(output, mask)``, when given, creates the delta at the first call, when the
    output's shape is known; ``replay_rng`` puts the random state of the first call back at every later one, so that
    every pass draws the same dropout masks. A call inside a backward (activation checkpointing recomputing the
    forward) is not a pass: it gets the perturbation of the pass whose graph it recomputes.
    """

    def __init__(self, model: nn.Module, emb_name: str | None) -> None:
        self.name, self.module = embedding_module(model, emb_name)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._clear()

    def _clear(self) -> None:
        self.init: Callable[[Tensor, Tensor | None], Tensor] | None = None
        self.delta: Tensor | None = None
        self.detach = self.replay_rng = False
        self.output: Tensor | None = None
        self.mask: Tensor | None = None
        self.calls = 0
        self._rng: tuple[Tensor, Tensor | None] | None = None
        self._attention_mask: Tensor | None = None
        self._passes: list[tuple[int, Tensor | None, bool]] = []  # (first sequence number, delta, detach) per pass
        self._shared_noise: Tensor | None = None
        self._neftune: list[Callable[..., Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}  # a copy is not installed

    @contextlib.contextmanager
    def installed(
        self,
        attention_mask: Tensor | None,
        *,
        init: Callable[[Tensor, Tensor | None], Tensor] | None = None,
        replay_rng: bool = False,
        share_noise: bool = False,
    ) -> Iterator[_EmbeddingOutput]:
        """The hook, from a clean state, for the block, removed (and the state dropped) on every way out of it.

        ``init`` and ``replay_rng``: see the class. ``share_noise``: the passes compare each other's outputs (SMART,
        R3F), so noise that a hook of the model adds to the embedding output (transformers' NEFTune) is drawn once,
        by its own hook at the first pass, and the same noise is added in every pass of the step; its hook is taken
        off the module for the step and put back after.
        """
        if self._handle is not None:
            raise RuntimeError(f"a step on {self.name} is already running: steps of one attack object do not nest")
        self._clear()
        self._attention_mask, self.init, self.replay_rng = attention_mask, init, replay_rng
        hooks = self.module._forward_hooks
        before = list(hooks.items())
        self._neftune = [hooks.pop(key) for key in (_neftune_hooks(self.module) if share_noise else [])]
        # torch types a forward hook as returning None; one may return the output to use instead
        self._handle = nn.modules.module.register_module_forward_hook(self._hook)  # type: ignore[arg-type]
        try:
            yield self
        finally:
            self._handle.remove()
            self._handle = None
            if self._neftune:  # back in their place, beside hooks added or removed meanwhile
                added = [(key, hook) for key, hook in hooks.items() if key not in dict(before)]
                kept = [(key, hook) for key, hook in before if key in hooks or hook in self._neftune]
                hooks.clear()
                hooks.update(kept + added)
            self._clear()

    @property
    def seen(self) -> Tensor:
        """The output of the module's last call in the step (an error if the forward pass did not call it)."""
        if self.output is None:
            raise RuntimeError(f"the forward pass did not call {self.name}: nothing to perturb")
        return self.output

    def perturb(self, delta: Tensor | None, detach: bool = False) -> None:
        """What the next passes add to the output (``None``: nothing)."""
        self.delta, self.detach = delta, detach

    def start_pass(self) -> None:
        """Before each forward pass: remember where its autograd nodes start (for recomputations, see the class)."""
        self._passes.append((_sequence_mark(), None, False))

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        # a global hook sees every module's call: this test is all the others cost (and compiled code traces it away)
        if module is not self.module or self._handle is None:
            return None
        return self._perturbed(module, args, output)

    @torch.compiler.disable
    def _perturbed(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        """The hook proper, always eager: inside a compiled model a graph break, so that every pass reads the
        perturbation of its step, not one traced into the graph."""
        if torch._C._current_graph_task_id() != -1:  # inside a backward: a checkpointed forward recomputed
            return self._added(output, *self._recomputed())
        self.calls += 1
        if not isinstance(output, Tensor) or output.dim() != 3:
            raise TypeError(
                f"the output of {self.name} is not a [batch, tokens, hidden] tensor "
                f"({type(output).__name__} {getattr(output, 'shape', '')}): pick the word embeddings"
            )
        if self.mask is None:
            self.mask = self._mask_for(output)
        self.output = output
        if self._neftune and self._shared_noise is None:
            noised = output
            for neftune in self._neftune:
                noised = neftune(module, args, noised)
            self._shared_noise = (noised - output).detach()
        if self.delta is None and self.init is not None:
            self.delta = self.init(output.detach(), self.mask)
        if self.replay_rng:  # after the initial delta's draw: the state the first pass's dropout starts from
            self._replay(output.device)
        if self.delta is not None and self.delta.shape != output.shape:
            raise RuntimeError(
                f"the output of {self.name} changed shape within a step ({tuple(self.delta.shape)} "
                f"to {tuple(output.shape)}): every pass of a step must run on the same batch"
            )
        if self._passes:
            self._passes[-1] = (self._passes[-1][0], self.delta, self.detach)
        return self._added(output, self.delta, self.detach)

    def _added(self, output: Tensor, delta: Tensor | None, detach: bool) -> Tensor | None:
        if delta is None and self._shared_noise is None:
            return None
        out = output.detach() if detach else output
        if self._shared_noise is not None:
            out = out + self._shared_noise
        return out if delta is None else out + delta

    def _recomputed(self) -> tuple[Tensor | None, bool]:
        """The perturbation of the pass whose nodes the backward is evaluating (the current one if unknown)."""
        node = torch._C._current_autograd_node()
        if node is not None:
            number = node._sequence_nr()
            for start, delta, detach in reversed(self._passes):
                if start <= number:
                    return delta, detach
        return self.delta, self.detach

    def _mask_for(self, output: Tensor) -> Tensor | None:
        mask = self._attention_mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(output.shape[:2]):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}, but the output of {self.name} is "
                f"{tuple(output.shape)}: pass the batch's [batch, tokens] attention mask"
            )
        return mask.to(device=output.device, dtype=torch.bool)

    def _replay(self, device: torch.device) -> None:
        if self._rng is None:
            self._rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            return
        cpu, cuda = self._rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    def pass_done(self) -> None:
        """After each forward pass: the embedding module ran exactly once."""
        calls, self.calls = self.calls, 0
        if calls == 0:
            raise RuntimeError(
                f"{self.name} did not run in the forward pass, so nothing was perturbed: the forward does not use it"
                " (pick the embedding the model looks the tokens up in), or the model was compiled with"
                " torch.compile, whose compiled code runs without hooks added later (pass the uncompiled model, or"
                " compile its layers only)"
            )
        if calls != 1:
            raise RuntimeError(
                f"{self.name} ran {calls} times in one forward pass; the perturbation needs exactly one call per pass"
                " (a module shared by an encoder and a decoder: pass emb_name= a dotted suffix of the encoder's own,"
                " e.g. 'encoder.embed_tokens')"
            )

    def masked(self, tensor: Tensor) -> Tensor:
        return tensor if self.mask is None else torch.where(self.mask.unsqueeze(-1), tensor, 0.0)


class _InputAttack(Hyperparameters, abc.ABC):
    """What the three share: the model, the perturbation of its embedding module's output, the backend of the ascent
    op, and under a DeepSpeed engine the engine's backward inside one ``coalesce_grad_reduction`` block."""

    #: Whether the passes of a step compare each other's logits (noise a model hook adds is then shared in a step).
    compares_passes = False

    def __init__(self, model: nn.Module, emb_name: str | None, backend: str) -> None:
        self.engine = EngineSupport(model) if is_engine(model) else None
        self.model = unwrap(model)
        self.emb_name = emb_name
        self._embedding = _EmbeddingOutput(self.model, emb_name)
        weight = next(self._embedding.module.parameters(), None)
        resolve_backend(backend, None if weight is None else weight.device)  # a clear error now, not at a step
        self.backend = backend

    def remove_hooks(self) -> None:
        """Nothing to remove: the hook of a step exists only while it runs."""

    def _perturbation(
        self, attention_mask: Tensor | None, **options: Any
    ) -> contextlib.AbstractContextManager[_EmbeddingOutput]:
        """The perturbation of one step (:meth:`_EmbeddingOutput.installed`); under an engine, inside its window."""
        if self.engine is not None:
            self.engine.placement.ready()
        else:  # a ZeRO model's backwards must go through its engine (at the step: the Trainer builds one to check)
            refuse_zero_model(self.model.named_parameters(), type(self).__name__)
        return self._embedding.installed(attention_mask, share_noise=self.compares_passes, **options)

    def _forward(self, forward: Forward, hook: _EmbeddingOutput) -> Any:
        hook.start_pass()
        out = forward()
        hook.pass_done()
        return out

    def _ascend(self, delta: Tensor, grad: Tensor, mask: Tensor | None, ascent: _Ascent) -> Tensor:
        """``ascent``'s step of ``delta`` in place (``input_step``); returns the gradient norms."""
        backend = backend_for(self.backend, [delta], [grad])
        return backend.input_step(delta.detach(), grad.contiguous(), mask, *ascent)

    @abc.abstractmethod
    def run(self, forward: Forward, backward: Backward, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The method's training step with ``forward()`` as its forward passes and ``backward(loss)`` as its
        backward; returns ``(loss, adversarial part)`` (see each class), detached. Under a DeepSpeed engine it runs
        inside the caller's ``with engine.coalesce_grad_reduction():`` block, ``backward`` calling
        ``engine.backward``."""

    def step(self, closure: Forward, attention_mask: Tensor | None = None) -> Tensor:
        """The method's training step with ``closure()`` as the forward pass and ``loss.backward()`` (under a
        DeepSpeed engine ``engine.backward(loss)``, inside one ``coalesce_grad_reduction`` block: call
        ``engine.step()`` after it); gradients accumulate into ``.grad``, ready for ``optimizer.step()``. Returns the
        loss it backpropagated (summed over its backward passes), detached."""
        backpropagated: list[Tensor] = []
        engine = self.engine

        def backward(loss: Tensor) -> None:
            backpropagated.append(loss.detach())
            if engine is None:
                loss.backward()
            else:
                engine.engine.backward(loss)

        with contextlib.nullcontext() if engine is None else engine.window():
            self.run(closure, backward, attention_mask)
        return torch.stack(backpropagated).sum()


class FusedFreeLB(_InputAttack):
    """FreeLB (Zhu et al., ICLR 2020), as its official Hugging Face code does it, on any model.

    A perturbation ``delta`` of the word-embedding output ``[B, T, D]`` is trained by ``adv_steps`` ascent steps,
    one per pass; each pass backpropagates ``loss / adv_steps``, so the parameters' gradients are the average over
    the passes. The first pass uses the initial ``delta``: zero, or with ``adv_init_mag > 0`` uniform noise scaled to
    ``adv_init_mag / sqrt(tokens * D)`` per example (``norm="l2"``) or in ``[-adv_init_mag, adv_init_mag]``
    (``"linf"``), on the tokens of ``attention_mask``. Each step: ``delta += adv_lr * g / max(||g||, 1e-8)`` with the
    norm of each example's masked gradient (Frobenius, or its max for ``"linf"``), then, when ``adv_max_norm > 0``,
    examples whose ``||delta||`` exceeds it rescaled onto it (``"linf"``: clamped to ``[-adv_max_norm,
    adv_max_norm]``). Norms in fp32 whatever the dtype; an example whose gradient norm is not finite (a GradScaler
    overflow) keeps its delta.

    Args:
        model: the model (DDP, FSDP, DataParallel are unwrapped; a DeepSpeed engine is used through its backward).
        adv_lr: ascent step size, > 0 (GLUE settings: 0.04-0.1).
        adv_steps: passes per step, K >= 1 (GLUE: 2-3).
        adv_init_mag: initial perturbation size, >= 0 (GLUE: 0.08-0.6).
        adv_max_norm: bound of ``delta``, >= 0; 0: none.
        norm: ``"l2"`` or ``"linf"``.
        emb_name: the embedding module whose output is perturbed: ``None`` (default) the model's input embedding
            (``get_input_embeddings()``, else the one named like ``"word_embeddings"``), the last part of its name, or
            a dotted suffix of it.
        shared_dropout: every pass of a step draws the dropout masks of the first, as FreeLB's paper results did
            (with a patched model); done by putting the random state back at the embedding, no model change.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.

    Example::

        freelb = FusedFreeLB(model, adv_lr=0.1, adv_steps=3, adv_init_mag=0.6)
        loss = freelb.step(lambda: model(**batch).loss, batch["attention_mask"])
        optimizer.step(); optimizer.zero_grad()
    """

    CHECKS = {
        "adv_lr": check_positive,
        "adv_steps": check_steps,
        "adv_init_mag": check_nonnegative,
        "adv_max_norm": check_nonnegative,
        "norm": check_choice("l2", "linf"),
        "shared_dropout": as_bool,
    }
    adv_lr: float
    adv_steps: int
    adv_init_mag: float
    adv_max_norm: float
    norm: str
    shared_dropout: bool

    def __init__(
        self,
        model: nn.Module,
        adv_lr: float = 0.1,
        adv_steps: int = 3,
        adv_init_mag: float = 0.0,
        adv_max_norm: float = 0.0,
        norm: str = "l2",
        emb_name: str | None = None,
        shared_dropout: bool = False,
        backend: str = "auto",
    ) -> None:
        vars(self).update(
            self.checked(
                {
                    "adv_lr": adv_lr,
                    "adv_steps": adv_steps,
                    "adv_init_mag": adv_init_mag,
                    "adv_max_norm": adv_max_norm,
                    "norm": norm,
                    "shared_dropout": shared_dropout,
                }
            )
        )
        super().__init__(model, emb_name, backend)

    def _init(self, embeds: Tensor, mask: Tensor | None) -> Tensor:
        """The initial delta of the official code, from the embedding output's first call."""
        if self.adv_init_mag == 0:
            return torch.zeros_like(embeds).requires_grad_()
        mask = (torch.ones(embeds.shape[:2], device=embeds.device) if mask is None else mask).to(embeds).unsqueeze(2)
        if self.norm == "linf":
            delta = torch.zeros_like(embeds).uniform_(-self.adv_init_mag, self.adv_init_mag) * mask
        else:
            magnitude = self.adv_init_mag / torch.sqrt(mask.sum((1, 2)) * embeds.size(-1))
            delta = torch.zeros_like(embeds).uniform_(-1, 1) * mask * magnitude.view(-1, 1, 1)
        return delta.requires_grad_()

    def run(self, forward: Forward, backward: Backward, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the losses of the first and the last pass (each before the division by ``adv_steps``)."""
        bound = ("l2" if self.norm == "l2" else "inf") if self.adv_max_norm > 0 else "none"
        norm = "inf" if self.norm == "linf" else "l2"
        ascent = _Ascent(self.adv_lr, norm, False, 0.0, 1e-8, bound, self.adv_max_norm)
        with self._perturbation(attention_mask, init=self._init, replay_rng=self.shared_dropout) as hook:
            losses = []
            for t in range(self.adv_steps):
                loss = _loss_of(self._forward(forward, hook))
                losses.append(loss.detach())
                backward(loss / self.adv_steps)
                if t == self.adv_steps - 1:
                    break
                delta = hook.delta
                if delta is None or delta.grad is None:
                    raise RuntimeError(f"the loss does not depend on the output of {hook.name}: nothing to ascend")
                self._ascend(delta, delta.grad, hook.mask, ascent)
                delta.grad = None
        return losses[0], losses[-1]


def _reduced(per_row: Tensor, rows: Tensor | None, total: _Total) -> Tensor:
    """The mean of ``per_row`` over the rows flagged in ``rows`` (every row without it), or their sum divided by
    ``total`` when given (the Trainer's count of the whole accumulated batch)."""
    if rows is None and total is None:
        return per_row.mean()
    if rows is not None:
        per_row = torch.where(rows, per_row, 0.0)
    count = (per_row.numel() if rows is None else rows.sum()) if total is None else total
    return per_row.sum() / torch.as_tensor(count, dtype=per_row.dtype, device=per_row.device).clamp_min(1)


def _kl(logits: Tensor, target: Tensor, rows: Tensor | None = None, total: _Total = None) -> Tensor:
    """KL(softmax(logits) || softmax(target)) of each row of the logits, in fp32, reduced by :func:`_reduced` (the
    mean over the rows: ``batchmean``)."""
    with torch.autocast(logits.device.type, enabled=False):
        p, q = (F.log_softmax(x.reshape(-1, x.size(-1)).float(), dim=-1) for x in (logits, target))
        return _reduced(F.kl_div(q, p, reduction="none", log_target=True).sum(-1), rows, total)


def _squared_error(
    prediction: Tensor, target: Tensor, rows: Tensor | None = None, total: _Total = None, mean: bool = True
) -> Tensor:
    """The squared error of two regression heads' outputs in fp32: its mean over the elements of the counted rows
    (``mean=False``: its sum over them)."""
    with torch.autocast(prediction.device.type, enabled=False):
        width = prediction.size(-1) if prediction.dim() > 1 else 1
        error = (prediction.float() - target.float()).square().reshape(-1, width).sum(-1)
        if not mean:
            return (error if rows is None else torch.where(rows, error, 0.0)).sum()
        return _reduced(error, rows, total) / width


class _ComparingAttack(_InputAttack):
    """SMART, R3F and VAT: a divergence between the logits of a clean and a perturbed pass, over the rows of the logits
    that count (token-level logits ``[B, T, V]``: the tokens of the attention mask, as a task loss counts them)."""

    compares_passes = True

    def _rows(self, logits: Tensor, hook: _EmbeddingOutput, logit_rows: Tensor | None) -> Tensor | None:
        if logit_rows is not None:
            if tuple(logit_rows.shape) != tuple(logits.shape[:-1]):
                raise ValueError(
                    f"logit_rows has shape {tuple(logit_rows.shape)}, but the logits are "
                    f"{tuple(logits.shape)}: pass a bool mask of logits.shape[:-1]"
                )
            return logit_rows.reshape(-1).to(device=logits.device, dtype=torch.bool)
        if hook.mask is not None and logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(hook.mask.shape):
            return hook.mask.reshape(-1)
        return None

    def run(
        self,
        forward: Forward,
        backward: Backward,
        attention_mask: Tensor | None = None,
        *,
        logit_rows: Tensor | None = None,
        logit_total: Tensor | float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns the task loss and the adversarial term (before its weight in the loss: ``alpha``, R3F's
        ``r3f_lambda``), after one backward of ``loss + weight * term``.

        ``logit_rows`` (bool, ``logits.shape[:-1]``): the rows of the logits the divergences count (default: every
        row; for token-level logits the tokens of ``attention_mask``); ``logit_total``: what their summed divergence
        is divided by (default: how many rows count). The Trainer passes the positions of the labels and the
        accumulated batch's item count, so that the term is reduced as its loss is.
        """
        with self._perturbation(attention_mask) as hook:
            loss, logits = _loss_and_logits(self._forward(forward, hook))
            rows = self._rows(logits, hook, logit_rows)
            term, weight = self._term(forward, hook, logits, rows, logit_total)
            backward(loss + weight * term)
        return loss.detach(), term.detach()

    @abc.abstractmethod
    def _term(
        self, forward: Forward, hook: _EmbeddingOutput, logits: Tensor, rows: Tensor | None, total: _Total
    ) -> tuple[Tensor, float]:
        """The adversarial term, from the perturbed passes it runs after the clean one (``logits``), and its weight;
        ``rows`` and ``total`` reduce its divergence (:func:`_reduced`)."""


class FusedSMART(_ComparingAttack):
    """SMART's smoothness-inducing adversarial regulariser (Jiang et al., ACL 2020, Algorithm 1), on any model.

    Noise ``N(0, 1) * noise_var`` on the word-embedding output (masked by ``attention_mask``) is trained by ``steps``
    ascent steps on ``KL(softmax(adv) || softmax(clean))`` (fp32, summed over the rows as mt-dnn does;
    ``divergence="mse"`` for regression heads: the summed squared error), each projected onto the ``adv_eps`` inf-ball
    when ``adv_eps`` is given. Then one backward of ``loss + alpha * (KL(adv || clean) + KL(clean || adv))`` (each the
    mean over the rows), each KL's target side detached (``"mse"``: the mean squared error of the two). A non-finite
    gradient drops the adversarial term for the batch, without a host sync. Token-level logits (``[B, T, V]``, a
    causal LM's) count the tokens of ``attention_mask`` only.

    The ascent step, per token (``per_token=False``: per example), with ``g`` the gradient and ``N(x)`` the
    normalisation ``x / (max|x| + epsilon)`` (``norm="inf"``), ``x / (||x||_2 + epsilon)`` (``"l2"``) or ``sign(x)``
    (``"sign"``):

    - ``update="mtdnn"`` (default): ``noise = N(noise + step_size * g)``, as mt-dnn's ``SmartPerturbation`` (and the
      smart-pytorch package) do: a perturbation of size about 1 per token, for which the defaults (mt-dnn's) were
      chosen;
    - ``update="paper"``: ``noise = noise + step_size * N(g)``, Algorithm 1's normalised ascent step, of size
      ``step_size``.

    Defaults as mt-dnn: ``alpha=1``, ``steps=1``, ``step_size=1e-3``, ``noise_var=1e-5``, ``epsilon=1e-6``,
    ``norm="inf"``, per token, ``update="mtdnn"``.

    Example::

        smart = FusedSMART(model, alpha=1.0)
        loss = smart.step(lambda: model(**batch), batch["attention_mask"])   # the output has .loss and .logits
    """

    CHECKS = {
        "alpha": check_nonnegative,
        "steps": check_steps,
        "step_size": check_positive,
        "noise_var": check_nonnegative,
        "epsilon": check_positive,
        "adv_eps": optional(check_positive),
        "norm": check_choice("inf", "l2", "sign"),
        "per_token": as_bool,
        "divergence": check_choice("kl", "mse"),
        "update": check_choice("mtdnn", "paper"),
    }
    alpha: float
    steps: int
    step_size: float
    noise_var: float
    epsilon: float
    adv_eps: float | None
    norm: str
    per_token: bool
    divergence: str
    update: str

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 1.0,
        steps: int = 1,
        step_size: float = 1e-3,
        noise_var: float = 1e-5,
        epsilon: float = 1e-6,
        adv_eps: float | None = None,
        norm: str = "inf",
        per_token: bool = True,
        divergence: str = "kl",
        update: str = "mtdnn",
        emb_name: str | None = None,
        backend: str = "auto",
    ) -> None:
        vars(self).update(
            self.checked(
                {
                    "alpha": alpha,
                    "steps": steps,
                    "step_size": step_size,
                    "noise_var": noise_var,
                    "epsilon": epsilon,
                    "adv_eps": adv_eps,
                    "norm": norm,
                    "per_token": per_token,
                    "divergence": divergence,
                    "update": update,
                }
            )
        )
        super().__init__(model, emb_name, backend)

    def _step_noise(self, noise: Tensor, grad: Tensor, mask: Tensor | None) -> Tensor:
        """One ascent step of ``noise`` in place (see the class); returns the gradient norms (their finiteness)."""
        bound, radius = ("inf", self.adv_eps) if self.adv_eps is not None else ("none", 0.0)
        ascent = _Ascent(self.step_size, self.norm, self.per_token, self.epsilon, 0.0, bound, radius)
        if self.update == "paper":
            return self._ascend(noise, grad, mask, ascent)
        # N(noise + step_size * g): input_step's normalised step of that sum, from zero, in the math dtype (the noise
        # rounded once)
        wide = torch.float64 if noise.dtype == torch.float64 else torch.float32
        summed = torch.add(noise.detach().to(wide), grad.to(wide), alpha=self.step_size)
        step = torch.zeros_like(summed)
        norms = self._ascend(step, summed, mask, ascent._replace(lr=1.0))
        noise.detach().copy_(step)
        return norms

    def _term(
        self, forward: Forward, hook: _EmbeddingOutput, logits: Tensor, rows: Tensor | None, total: _Total
    ) -> tuple[Tensor, float]:
        """The symmetric divergence of the noise trained by the ascent (``alpha``)."""
        embed = hook.seen
        noise = hook.masked(embed.new_empty(embed.size()).normal_(0, 1) * self.noise_var).detach()
        finite = torch.ones((), dtype=torch.bool, device=embed.device)
        for _ in range(self.steps):
            hook.perturb(noise.requires_grad_())
            _, adv_logits = _loss_and_logits(self._forward(forward, hook))
            # summed over the rows, as mt-dnn's stable_kl(reduce=False): a token's gradient does not depend on how
            # many share its batch (only epsilon would see that)
            if self.divergence == "mse":
                divergence = _squared_error(adv_logits, logits.detach(), rows, mean=False)
            else:
                divergence = _kl(adv_logits, logits.detach(), rows, total=1)
            (grad,) = torch.autograd.grad(divergence, noise)
            norms = self._step_noise(noise, grad, hook.mask)
            finite = finite & norms.isfinite().all()
            noise = noise.detach()
        hook.perturb(noise)
        _, adv_logits = _loss_and_logits(self._forward(forward, hook))
        if self.divergence == "mse":
            term = _squared_error(adv_logits, logits, rows, total)
        else:
            term = _kl(adv_logits.detach(), logits, rows, total) + _kl(logits.detach(), adv_logits, rows, total)
        return torch.where(finite, term, 0.0), self.alpha


class FusedR3F(_ComparingAttack):
    """R3F (Aghajanyan et al., ICLR 2021), as fairseq's ``sentence_prediction_r3f`` does it, on any model.

    A clean pass, and a pass whose word-embedding output (cut from the graph, as fairseq's noised embeddings are) gets
    noise ``U(-eps, eps)`` (``noise_type="normal"``: ``N(0, eps)``) on the tokens of ``attention_mask``; then one
    backward of ``loss + r3f_lambda * (KL(clean || noised) + KL(noised || clean))`` (fp32, per example, both sides
    with gradients; ``divergence="mse"``: their mean squared error). Two forwards, one backward, no ascent.
    Token-level logits (``[B, T, V]``) count the tokens of ``attention_mask`` only.

    Example::

        r3f = FusedR3F(model, r3f_lambda=1.0, eps=1e-5)
        loss = r3f.step(lambda: model(**batch), batch["attention_mask"])
    """

    CHECKS = {
        "r3f_lambda": check_nonnegative,
        "eps": check_positive,
        "noise_type": check_choice("uniform", "normal"),
        "divergence": check_choice("kl", "mse"),
    }
    r3f_lambda: float
    eps: float
    noise_type: str
    divergence: str

    def __init__(
        self,
        model: nn.Module,
        r3f_lambda: float = 1.0,
        eps: float = 1e-5,
        noise_type: str = "uniform",
        divergence: str = "kl",
        emb_name: str | None = None,
        backend: str = "auto",
    ) -> None:
        vars(self).update(
            self.checked({"r3f_lambda": r3f_lambda, "eps": eps, "noise_type": noise_type, "divergence": divergence})
        )
        super().__init__(model, emb_name, backend)

    def _term(
        self, forward: Forward, hook: _EmbeddingOutput, logits: Tensor, rows: Tensor | None, total: _Total
    ) -> tuple[Tensor, float]:
        """The symmetric divergence of the noised pass (``r3f_lambda``)."""
        embed = hook.seen
        if self.noise_type == "normal":
            noise = torch.normal(torch.zeros_like(embed, dtype=torch.float32), self.eps)
        else:
            noise = torch.rand(embed.shape, device=embed.device) * (2 * self.eps) - self.eps
        hook.perturb(hook.masked(noise).to(embed.dtype), detach=True)
        _, noised_logits = _loss_and_logits(self._forward(forward, hook))
        if self.divergence == "mse":
            return _squared_error(noised_logits, logits, rows, total), self.r3f_lambda
        return _kl(logits, noised_logits, rows, total) + _kl(noised_logits, logits, rows, total), self.r3f_lambda


#: input_step's denominator floor for an exact l2 normalisation (``denom_eps=0``): the smallest normal fp32, below
#: which a sum of fp32 squares is 0, so ``g / max(||g||, floor)`` is ``g / ||g||`` and 0 for a zero ``g``.
_EXACT_FLOOR = torch.finfo(torch.float32).tiny


class FusedVAT(_ComparingAttack):
    """Virtual adversarial training (Miyato et al., TPAMI 2018; for text Miyato, Dai and Goodfellow, ICLR 2017), as
    their text code does it (tensorflow/models ``research/adversarial_text``, ``virtual_adversarial_loss``), on any
    model.

    From a random direction ``d ~ N(0, I)`` on the word-embedding output, ``power_iters`` power iterations find the
    direction the prediction is most sensitive to: ``r = xi * N(d)``, then ``d = grad_r KL(p(x) || p(x + r))``, with
    ``N`` the l2 normalisation of each example over the tokens of ``attention_mask`` (the other tokens get no
    perturbation). Then one backward of ``loss + alpha * KL(p(x) || p(x + eps * N(d)))``. The clean distribution
    ``p(x)`` is detached in every KL, as Miyato's ``stop_gradient`` (the term pulls the perturbed prediction towards
    the clean one, not the clean one towards it); the KL is taken in fp32 over the last dimension of the logits, its
    mean over their rows (token-level logits ``[B, T, V]``: the tokens of ``attention_mask``). Cost: ``power_iters +
    2`` forwards, ``power_iters`` input-only backwards, one backward.

    ``N`` is :meth:`~fastadv.backends.contract.Backend.input_step` from zero with ``denom_eps=0`` and the smallest
    normal fp32 as floor: ``d / ||d||`` exactly, 0 for a zero ``d``. That is Miyato's ``_scale_l2`` (``d / (a *
    sqrt(sum((d / a)^2) + 1e-6))``, ``a = max|d| + 1e-12``: scale-invariant, to within 5e-7), not the PyTorch ports'
    ``d / (||d|| + 1e-8)``, which shrinks the perturbation when the gradient of the KL at ``xi`` is of that size. An
    example whose gradient is not finite gets no perturbation (the official code: NaN).

    Defaults as the text code: ``eps=5.0`` (its ``perturb_norm_length``, "optimal on IMDB with virtual adversarial
    training", on word embeddings it normalises to zero mean and unit variance per dimension: scale it with the size
    of yours), ``xi=0.1`` (its ``small_constant_for_finite_diff``; the image paper's 1e-6 puts the finite difference
    at fp32 rounding level, and below bf16's), ``alpha=1`` (``adv_reg_coeff``), ``power_iters=1``
    (``num_power_iteration``). Both lengths are the l2 norm of a whole example's perturbation.

    (bert4torch's ``VAT`` class is another algorithm despite its name: mt-dnn's ALUM step, ``adv_masked_lm.py``,
    close to :class:`FusedSMART` with ``norm="l2"``.)

    Example::

        vat = FusedVAT(model, eps=1.0)
        loss = vat.step(lambda: model(**batch), batch["attention_mask"])   # the output has .loss and .logits
    """

    CHECKS = {"eps": check_positive, "xi": check_positive, "alpha": check_nonnegative, "power_iters": check_steps}
    eps: float
    xi: float
    alpha: float
    power_iters: int

    def __init__(
        self,
        model: nn.Module,
        eps: float = 5.0,
        xi: float = 0.1,
        alpha: float = 1.0,
        power_iters: int = 1,
        emb_name: str | None = None,
        backend: str = "auto",
    ) -> None:
        vars(self).update(self.checked({"eps": eps, "xi": xi, "alpha": alpha, "power_iters": power_iters}))
        super().__init__(model, emb_name, backend)

    def _scaled(self, direction: Tensor, mask: Tensor | None, length: float) -> Tensor:
        """``length * N(direction)`` (see the class), a new contiguous tensor of its dtype."""
        r = torch.zeros(direction.shape, dtype=direction.dtype, device=direction.device)
        self._ascend(r, direction, mask, _Ascent(length, "l2", False, 0.0, _EXACT_FLOOR, "none", 0.0))
        return r

    def _rows(self, logits: Tensor, hook: _EmbeddingOutput, logit_rows: Tensor | None) -> Tensor | None:
        if logits.size(-1) < 2:  # the logits themselves first, then the rows that count in them
            raise ValueError(
                f"VAT compares softmax distributions over the last dimension of the logits, which "
                f"has size {logits.size(-1)} here: give a classifier's logits (two for a binary task)"
            )
        return super()._rows(logits, hook, logit_rows)

    def _term(
        self, forward: Forward, hook: _EmbeddingOutput, logits: Tensor, rows: Tensor | None, total: _Total
    ) -> tuple[Tensor, float]:
        """The virtual adversarial KL (``alpha``)."""
        clean = logits.detach()
        direction = torch.randn_like(hook.seen, memory_format=torch.contiguous_format)
        for _ in range(self.power_iters):
            r = self._scaled(direction, hook.mask, self.xi).requires_grad_()
            hook.perturb(r)
            _, adv_logits = _loss_and_logits(self._forward(forward, hook))
            # its mean or sum: the same direction once normalised per example
            (direction,) = torch.autograd.grad(_kl(clean, adv_logits, rows), r)
        hook.perturb(self._scaled(direction, hook.mask, self.eps))
        _, adv_logits = _loss_and_logits(self._forward(forward, hook))
        return _kl(clean, adv_logits, rows, total), self.alpha


def _zero_delta(embeds: Tensor, mask: Tensor | None) -> Tensor:
    return torch.zeros(embeds.shape, dtype=embeds.dtype, device=embeds.device, requires_grad=True)


class FusedGradientPenalty(_InputAttack):
    """The gradient penalty of Su Jianlin's "对抗训练浅谈" (bert4keras's and bert4torch's ``gradient_penalty``), done
    right, on any model: one backward of ``loss + epsilon / 2 * ||d loss / d e||^2``, with ``e`` the word-embedding
    output and the squared norm summed over the tokens of ``attention_mask`` (in fp32).

    The gradient ``d loss / d e`` is taken with ``create_graph=True`` (a zero perturbation of ``e`` is what it is
    taken with respect to), so the one backward of the total carries the penalty's gradient: one forward, one double
    backward. The model's ops must be twice differentiable: during the step ``scaled_dot_product_attention`` runs its
    math kernel (its flash and memory-efficient ones have no double backward; the math one keeps the attention
    matrix), and ``torch.compile`` fails (AOTAutograd has no double backward). bert4torch
    (``AdversarialTraining("gradient_penalty")``) instead squares the ``.grad`` of the first backward, which has no
    graph, and backpropagates ``loss + penalty`` again: the parameters get the clean gradient twice and none of the
    penalty's.

    The gradient is the embedding *output*'s: it needs no gradient of the embedding weights, so frozen and
    LoRA-adapted embeddings work, and it is the loss's sensitivity to each position's input. (bert4keras squares
    ``K.gradients(loss, embeddings)[0].values``, the lookup's rows, one per position: the same, padding included;
    bert4torch the embedding matrix's ``.grad``, in which a token that repeats in the batch has its positions'
    gradients summed. The two differ only there.) Padding positions are not penalised.

    ``epsilon`` (default 1, as bert4keras's examples) weighs the penalty of the loss ``forward()`` returns, the mean
    over its batch: with gradient accumulation by division that is each micro-batch's; under data parallelism (DDP,
    DeepSpeed) each process squares the gradient of its own mean loss, so on N processes the penalty is the whole
    batch's with N times ``epsilon``. Not under DeepSpeed ZeRO-3 (its double backward reads released weights).

    Example::

        gp = FusedGradientPenalty(model, epsilon=1.0)
        loss = gp.step(lambda: model(**batch).loss, batch["attention_mask"])
    """

    CHECKS = {"epsilon": check_nonnegative}
    epsilon: float

    def __init__(
        self, model: nn.Module, epsilon: float = 1.0, emb_name: str | None = None, backend: str = "auto"
    ) -> None:
        vars(self).update(self.checked({"epsilon": epsilon}))
        super().__init__(model, emb_name, backend)
        if self.engine is not None and self.engine.placement.stage == 3:
            raise NotImplementedError(
                "FusedGradientPenalty does not run under DeepSpeed ZeRO stage 3: its double backward reads weights"
                " that ZeRO-3 has released after the first; use stage 1 or 2, or another input-space method"
            )

    def run(self, forward: Forward, backward: Backward, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the task loss and the squared gradient norm (before ``epsilon / 2``)."""
        with sdpa_kernel(SDPBackend.MATH), self._perturbation(attention_mask, init=_zero_delta) as hook:
            loss = _loss_of(self._forward(forward, hook))
            if hook.delta is None:  # made at the module's first call
                raise RuntimeError(f"the forward pass did not call {hook.name}: nothing to penalise")
            (grad,) = torch.autograd.grad(loss, hook.delta, create_graph=True, allow_unused=True)
            if grad is None:
                raise RuntimeError(f"the loss does not depend on the output of {hook.name}: nothing to penalise")
            penalty = hook.masked(grad.float()).square().sum()
            backward(loss + self.epsilon / 2 * penalty)
        return loss.detach(), penalty.detach()
