"""FusedFreeLB, FusedSMART and FusedR3F: the input-space family, on the output of the embedding module.

The public implementations of these methods feed ``inputs_embeds`` (FreeLB, SMART) or need a model that takes
``token_embeddings`` (R3F). Here a forward hook on the embedding module (found by name, like ``emb_name``) adds the
perturbation to its output during the method's passes and is removed after the step, so any model works unchanged.
FreeLB's and SMART's ascent step (masked per-example or per-token norm of the gradient, step, bound) is one op of the
backend contract, :meth:`~fastadv.backends.contract.Backend.input_step`. The oracles are
:func:`fastadv.reference.freelb_step`, :func:`~fastadv.reference.smart_step` and :func:`~fastadv.reference.r3f_step`.

Each class has ``step(closure, attention_mask=None)`` (``closure()`` runs the forward pass; the step runs every
backward itself) and ``run(forward, backward, attention_mask=None)``, the same step with your own backward (a
GradScaler's ``scaler.scale(loss).backward()``, ``accelerator.backward``): the one implementation the Trainer and the
Lightning callback use too. SMART and R3F need the logits: ``forward()`` returns ``(loss, logits)`` or an object with
``.loss`` and ``.logits`` (a Hugging Face model output).
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastadv._util import check_positive, check_steps, unwrap
from fastadv.backends import backend_for, resolve_backend

__all__ = ["FusedFreeLB", "FusedSMART", "FusedR3F"]

#: A forward pass: returns the loss (FreeLB), or ``(loss, logits)`` / an output with ``.loss`` and ``.logits``.
Forward = Callable[[], Any]
#: Backpropagates a loss (``loss.backward()``, ``scaler.scale(loss).backward()``, ``accelerator.backward(loss)``).
Backward = Callable[[Tensor], None]


def _loss_of(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else _loss_and_logits(out)[0]


def _loss_and_logits(out: Any) -> tuple[Tensor, Tensor]:
    if isinstance(out, tuple) and len(out) == 2:
        return out
    if hasattr(out, "loss") and hasattr(out, "logits"):
        return out.loss, out.logits
    raise TypeError(
        f"forward() must return (loss, logits) or an object with .loss and .logits (a Hugging Face output), got "
        f"{type(out).__name__}: SMART and R3F compare the logits of the clean and perturbed passes"
    )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


class _EmbeddingOutput:
    """The forward hook that adds a perturbation to the output of the embedding module, while installed.

    ``delta`` is added when set; ``init(output)`` creates it at the first call, when the output's shape is known;
    ``detach`` adds it to the output cut from the graph (R3F); ``replay_rng`` puts the random state of the first call
    back at every later one, so that every pass draws the same dropout masks.
    """

    def __init__(self, model: nn.Module, emb_name: str) -> None:
        found = [(n, m) for n, m in model.named_modules() if n and emb_name in n.split(".")[-1]]
        if len(found) != 1:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            what = "no module" if not found else f"{len(found)} modules ({', '.join(n for n, _ in found)})"
            raise ValueError(
                f"{what} of the model is named like emb_name={emb_name!r}; the embedding modules are: "
                f"{', '.join(names) or 'none'}. Pass emb_name= the last part of the name of the one whose output to "
                "perturb (the word embeddings)"
            )
        self.name, self.module = found[0]
        self.init: Callable[[Tensor], Tensor] | None = None
        self.delta: Tensor | None = None
        self.detach = self.replay_rng = False
        self.output: Tensor | None = None
        self.calls = 0
        self._rng: tuple[Tensor, Tensor | None] | None = None
        self.mask: Tensor | None = None
        self._attention_mask: Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}  # a copy is not installed

    @contextlib.contextmanager
    def installed(self, attention_mask: Tensor | None) -> Iterator[_EmbeddingOutput]:
        """The hook, from a clean state, for the block. Re-entrant: inside an installed block (a framework's clean
        pass ran under it, see the Lightning callback) it is the same hook, state kept."""
        if self._handle is not None:
            yield self
            return
        self.init, self.delta, self.detach, self.replay_rng, self.output, self.calls = None, None, False, False, None, 0
        self._rng, self.mask, self._attention_mask = None, None, attention_mask
        self._handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            self._handle.remove()
            self._handle = None
            self.init = self.delta = self.output = self.mask = self._attention_mask = self._rng = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        self.calls += 1
        if not isinstance(output, Tensor) or output.dim() != 3:
            raise TypeError(f"the output of {self.name} is not a [batch, tokens, hidden] tensor "
                            f"({type(output).__name__} {getattr(output, 'shape', '')}): pick the word embeddings")
        if self.mask is None:
            self.mask = self._mask_for(output)
        self.output = output
        if self.delta is None and self.init is not None:
            self.delta = self.init(output.detach())
        if self.replay_rng:  # after the initial delta's draw: the state the first pass's dropout starts from
            self._replay(output.device)
        if self.delta is None:
            return None
        if self.delta.shape != output.shape:
            raise RuntimeError(f"the output of {self.name} changed shape within a step ({tuple(self.delta.shape)} "
                               f"to {tuple(output.shape)}): every pass of a step must run on the same batch")
        return (output.detach() if self.detach else output) + self.delta

    def _mask_for(self, output: Tensor) -> Tensor | None:
        mask = self._attention_mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(output.shape[:2]):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the output of {self.name} is "
                             f"{tuple(output.shape)}: pass the batch's [batch, tokens] attention mask")
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
        if calls != 1:
            raise RuntimeError(
                f"{self.name} ran {calls} times in one forward pass; the perturbation needs exactly one call per pass"
                " (a module shared by an encoder and a decoder: pass emb_name= the encoder's own embedding)"
            )

    def masked(self, tensor: Tensor) -> Tensor:
        return tensor if self.mask is None else torch.where(self.mask.unsqueeze(-1), tensor, 0.0)


class _InputAttack(abc.ABC):
    """What the three share: the model, the hook on its embedding module's output, the backend of the ascent op."""

    def __init__(self, model: nn.Module, emb_name: str, backend: str) -> None:
        self.model = unwrap(model)
        self.emb_name = emb_name
        self._embedding = _EmbeddingOutput(self.model, emb_name)
        resolve_backend(backend, None)  # a clear error for an unknown name now, not at the first step
        self.backend = backend

    def _forward(self, forward: Forward, hook: _EmbeddingOutput) -> Any:
        out = forward()
        hook.pass_done()
        return out

    def _clean_pass(self, forward: Forward, hook: _EmbeddingOutput) -> tuple[Tensor, Tensor, Tensor]:
        """SMART's and R3F's first pass: the loss, the logits and the embedding output (whose shape the noise takes)."""
        loss, logits = _loss_and_logits(self._forward(forward, hook))
        return loss, logits, hook.output

    def _ascend(self, delta: Tensor, grad: Tensor, mask: Tensor | None, lr: float, norm: str, per_token: bool,
                denom_eps: float, denom_floor: float, bound: str, radius: float) -> Tensor:
        backend = backend_for(self.backend, [delta], [grad])
        return backend.input_step(delta.detach(), grad.contiguous(), mask, lr, norm, per_token, denom_eps,
                                  denom_floor, bound, radius)

    @abc.abstractmethod
    def run(self, forward: Forward, backward: Backward,
            attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The method's training step with ``forward()`` as its forward passes and ``backward(loss)`` as its
        backward; returns ``(loss, adversarial part)`` (see each class), detached."""

    def step(self, closure: Forward, attention_mask: Tensor | None = None) -> Tensor:
        """The method's training step with ``closure()`` as the forward pass and ``loss.backward()``; gradients
        accumulate into ``.grad``, ready for ``optimizer.step()``. Returns the loss it backpropagated (summed over
        its backward passes), detached."""
        backpropagated: list[Tensor] = []

        def backward(loss: Tensor) -> None:
            backpropagated.append(loss.detach())
            loss.backward()

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
        model: the model (a wrapper with ``.module``, e.g. DDP, is unwrapped).
        adv_lr: ascent step size, > 0 (GLUE settings: 0.04-0.1).
        adv_steps: passes per step, K >= 1 (GLUE: 2-3).
        adv_init_mag: initial perturbation size, >= 0 (GLUE: 0.08-0.6).
        adv_max_norm: bound of ``delta``, >= 0; 0: none.
        norm: ``"l2"`` or ``"linf"``.
        emb_name: the last part of the name of the embedding module whose output is perturbed.
        shared_dropout: every pass of a step draws the dropout masks of the first, as FreeLB's paper results did
            (with a patched model); done by putting the random state back at the embedding, no model change.
        backend: ``"auto"`` or a name from :func:`fastadv.available_backends`.

    Example::

        freelb = FusedFreeLB(model, adv_lr=0.1, adv_steps=3, adv_init_mag=0.6)
        loss = freelb.step(lambda: model(**batch).loss, batch["attention_mask"])
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: nn.Module, adv_lr: float = 0.1, adv_steps: int = 3, adv_init_mag: float = 0.0,
                 adv_max_norm: float = 0.0, norm: str = "l2", emb_name: str = "word_embeddings",
                 shared_dropout: bool = False, backend: str = "auto") -> None:
        super().__init__(model, emb_name, backend)
        self.adv_lr = check_positive("adv_lr", adv_lr)
        self.adv_steps = check_steps("adv_steps", adv_steps)
        self.adv_init_mag = _check_nonnegative("adv_init_mag", adv_init_mag)
        self.adv_max_norm = _check_nonnegative("adv_max_norm", adv_max_norm)
        self.norm = _check_choice("norm", norm, ("l2", "linf"))
        self.shared_dropout = bool(shared_dropout)

    def _prepare(self, hook: _EmbeddingOutput) -> None:
        """Set up an installed hook for a step: the initial delta at the first call, the random state replayed."""
        if hook.init is None:
            hook.init, hook.replay_rng = self._init(hook), self.shared_dropout

    def _init(self, hook: _EmbeddingOutput) -> Callable[[Tensor], Tensor]:
        """The initial delta of the official code, from the embedding output's first call."""

        def init(embeds: Tensor) -> Tensor:
            if self.adv_init_mag == 0:
                return torch.zeros_like(embeds)
            mask = torch.ones(embeds.shape[:2], device=embeds.device) if hook.mask is None else hook.mask
            mask = mask.to(embeds).unsqueeze(2)
            if self.norm == "linf":
                return torch.zeros_like(embeds).uniform_(-self.adv_init_mag, self.adv_init_mag) * mask
            magnitude = self.adv_init_mag / torch.sqrt(mask.sum((1, 2)) * embeds.size(-1))
            return torch.zeros_like(embeds).uniform_(-1, 1) * mask * magnitude.view(-1, 1, 1)

        return lambda embeds: init(embeds).requires_grad_()

    def run(self, forward: Forward, backward: Backward,
            attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the losses of the first and the last pass (each before the division by ``adv_steps``)."""
        bound = ("l2" if self.norm == "l2" else "inf") if self.adv_max_norm > 0 else "none"
        with self._embedding.installed(attention_mask) as hook:
            self._prepare(hook)
            losses = []
            for t in range(self.adv_steps):
                loss = _loss_of(self._forward(forward, hook))
                losses.append(loss.detach())
                backward(loss / self.adv_steps)
                if t == self.adv_steps - 1:
                    break
                delta = hook.delta
                if delta.grad is None:
                    raise RuntimeError(f"the loss does not depend on the output of {hook.name}: nothing to ascend")
                self._ascend(delta, delta.grad, hook.mask, self.adv_lr, "inf" if self.norm == "linf" else "l2",
                             False, 0.0, 1e-8, bound, self.adv_max_norm)
                delta.grad = None
        return losses[0], losses[-1]


def _kl(logits: Tensor, target: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(target)) in fp32, averaged over the rows (batchmean)."""
    with torch.autocast(logits.device.type, enabled=False):
        p, q = (F.log_softmax(x.reshape(-1, x.size(-1)).float(), dim=-1) for x in (logits, target))
        return F.kl_div(q, p, reduction="batchmean", log_target=True)


def _mse(prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """The squared error of two regression heads' outputs, in fp32."""
    with torch.autocast(prediction.device.type, enabled=False):
        return F.mse_loss(prediction.float(), target.float(), reduction=reduction)


class FusedSMART(_InputAttack):
    """SMART's smoothness-inducing adversarial regulariser (Jiang et al., ACL 2020, Algorithm 1), on any model.

    Noise ``N(0, 1) * noise_var`` on the word-embedding output (masked by ``attention_mask``) is trained by ``steps``
    ascent steps on ``KL(softmax(adv) || softmax(clean))`` (fp32, batchmean; ``divergence="mse"`` for regression
    heads: the summed squared error), each along the gradient normalised per token (``per_token=False``: per example)
    by its inf-norm ``g / (max|g| + epsilon)`` (``norm="inf"``), l2 norm (``"l2"``) or sign (``"sign"``), and
    projected onto the ``adv_eps`` inf-ball around the clean embedding when ``adv_eps`` is given. Then one backward of
    ``loss + alpha * (KL(adv || clean) + KL(clean || adv))``, each KL's target side detached (``"mse"``: the mean
    squared error of the two). A non-finite gradient drops the adversarial term for the batch, without a host sync.
    ``steps=1`` without ``adv_eps`` is mt-dnn's single-step version (one step of ``step_size`` times the normalised
    gradient from the noised embedding).

    Defaults as mt-dnn: ``alpha=1``, ``steps=1``, ``step_size=1e-3``, ``noise_var=1e-5``, ``epsilon=1e-6``,
    ``norm="inf"``, per token.

    Example::

        smart = FusedSMART(model, alpha=1.0)
        loss = smart.step(lambda: model(**batch), batch["attention_mask"])   # the output has .loss and .logits
    """

    def __init__(self, model: nn.Module, alpha: float = 1.0, steps: int = 1, step_size: float = 1e-3,
                 noise_var: float = 1e-5, epsilon: float = 1e-6, adv_eps: float | None = None, norm: str = "inf",
                 per_token: bool = True, divergence: str = "kl", emb_name: str = "word_embeddings",
                 backend: str = "auto") -> None:
        super().__init__(model, emb_name, backend)
        self.alpha = _check_nonnegative("alpha", alpha)
        self.steps = check_steps("steps", steps)
        self.step_size = check_positive("step_size", step_size)
        self.noise_var = _check_nonnegative("noise_var", noise_var)
        self.epsilon = check_positive("epsilon", epsilon)
        self.adv_eps = None if adv_eps is None else check_positive("adv_eps", adv_eps)
        self.norm = _check_choice("norm", norm, ("inf", "l2", "sign"))
        self.per_token = bool(per_token)
        self.divergence = _check_choice("divergence", divergence, ("kl", "mse"))

    def run(self, forward: Forward, backward: Backward,
            attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the task loss and the adversarial term (before ``alpha``)."""
        with self._embedding.installed(attention_mask) as hook:
            loss, logits, embed = self._clean_pass(forward, hook)
            noise = hook.masked(embed.new_empty(embed.size()).normal_(0, 1) * self.noise_var).detach()
            finite = torch.ones((), dtype=torch.bool, device=embed.device)
            bound, radius = ("inf", self.adv_eps) if self.adv_eps is not None else ("none", 0.0)
            for _ in range(self.steps):
                hook.delta = noise.requires_grad_()
                _, adv_logits = _loss_and_logits(self._forward(forward, hook))
                if self.divergence == "mse":
                    divergence = _mse(adv_logits, logits.detach(), "sum")
                else:
                    divergence = _kl(adv_logits, logits.detach())
                (grad,) = torch.autograd.grad(divergence, noise)
                norms = self._ascend(noise, grad, hook.mask, self.step_size, self.norm, self.per_token, self.epsilon,
                                     0.0, bound, radius)
                finite = finite & norms.isfinite().all()
                noise = noise.detach()
            hook.delta = noise
            _, adv_logits = _loss_and_logits(self._forward(forward, hook))
            if self.divergence == "mse":
                term = _mse(adv_logits, logits)
            else:
                term = _kl(adv_logits.detach(), logits) + _kl(logits.detach(), adv_logits)
            term = torch.where(finite, term, 0.0)
            backward(loss + self.alpha * term)
        return loss.detach(), term.detach()


class FusedR3F(_InputAttack):
    """R3F (Aghajanyan et al., ICLR 2021), as fairseq's ``sentence_prediction_r3f`` does it, on any model.

    A clean pass, and a pass whose word-embedding output (cut from the graph, as fairseq's noised embeddings are) gets
    noise ``U(-eps, eps)`` (``noise_type="normal"``: ``N(0, eps)``) on the tokens of ``attention_mask``; then one
    backward of ``loss + r3f_lambda * (KL(clean || noised) + KL(noised || clean))`` (fp32, per example, both sides
    with gradients; ``divergence="mse"``: their mean squared error). Two forwards, one backward, no ascent.

    Example::

        r3f = FusedR3F(model, r3f_lambda=1.0, eps=1e-5)
        loss = r3f.step(lambda: model(**batch), batch["attention_mask"])
    """

    def __init__(self, model: nn.Module, r3f_lambda: float = 1.0, eps: float = 1e-5, noise_type: str = "uniform",
                 divergence: str = "kl", emb_name: str = "word_embeddings", backend: str = "auto") -> None:
        super().__init__(model, emb_name, backend)
        self.r3f_lambda = _check_nonnegative("r3f_lambda", r3f_lambda)
        self.eps = check_positive("eps", eps)
        self.noise_type = _check_choice("noise_type", noise_type, ("uniform", "normal"))
        self.divergence = _check_choice("divergence", divergence, ("kl", "mse"))

    def run(self, forward: Forward, backward: Backward,
            attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the task loss and the symmetric divergence (before ``r3f_lambda``)."""
        with self._embedding.installed(attention_mask) as hook:
            loss, logits, embed = self._clean_pass(forward, hook)
            if self.noise_type == "normal":
                noise = torch.normal(torch.zeros_like(embed, dtype=torch.float32), self.eps)
            else:
                noise = torch.rand(embed.shape, device=embed.device) * (2 * self.eps) - self.eps
            hook.delta, hook.detach = hook.masked(noise).to(embed.dtype), True
            _, noised_logits = _loss_and_logits(self._forward(forward, hook))
            if self.divergence == "mse":
                term = _mse(noised_logits, logits)
            else:
                term = _kl(logits, noised_logits) + _kl(noised_logits, logits)
            backward(loss + self.r3f_lambda * term)
        return loss.detach(), term.detach()
