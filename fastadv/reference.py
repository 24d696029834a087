"""The seed's FGM and PGD classes, written out unchanged, the widely used AWP class, and FreeLB, SMART, R3F, VAT and the
gradient penalty as their public code does them: the oracles of the tests.

Same operations in the same order as the original code (FGM: Goodfellow-style fast gradient method on the word
embeddings; PGD: projected gradient descent with ``alpha`` steps inside an ``eps`` ball). Their known defects are kept
on purpose (dense passes, cloned gradients, ``param.data`` rebinding on restore, NaN written for an inf norm), because
this module defines what "same results" means. Use :class:`fastadv.FusedFGM` / :class:`fastadv.FusedPGD` /
:class:`fastadv.FusedAWP` in training.

Example::

    fgm = FGM(model, eps=1.0)
    loss = model(**batch)[0]; loss.backward()
    fgm.attack()
    model(**batch)[0].backward()
    fgm.restore()
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "FGM",
    "PGD",
    "AWP",
    "fgm_step",
    "pgd_step",
    "awp_step",
    "freelb_step",
    "smart_step",
    "r3f_step",
    "vat_step",
    "gradient_penalty_step",
]


class FGM:
    def __init__(self, model: nn.Module, eps: float = 1.0) -> None:
        self.model = model.module if hasattr(model, "module") else model
        self.eps = eps
        self.backup: dict[str, torch.Tensor] = {}

    # only attack word embedding
    def attack(self, emb_name: str = "word_embeddings") -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm and not torch.isnan(norm):
                    r_at = self.eps * param.grad / norm
                    param.data.add_(r_at)

    def restore(self, emb_name: str = "word_embeddings") -> None:
        for name, para in self.model.named_parameters():
            if para.requires_grad and emb_name in name:
                assert name in self.backup
                para.data = self.backup[name]
        self.backup = {}


class PGD:
    def __init__(self, model: nn.Module, eps: float = 1.0, alpha: float = 0.3) -> None:
        self.model = model.module if hasattr(model, "module") else model
        self.eps = eps
        self.alpha = alpha
        self.emb_backup: dict[str, torch.Tensor] = {}
        self.grad_backup: dict[str, torch.Tensor] = {}

    def attack(self, emb_name: str = "word_embeddings", is_first_attack: bool = False) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                if is_first_attack:
                    self.emb_backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    r_at = self.alpha * param.grad / norm
                    param.data.add_(r_at)
                    param.data = self.project(name, param.data)

    def restore(self, emb_name: str = "word_embeddings") -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and emb_name in name:
                assert name in self.emb_backup
                param.data = self.emb_backup[name]
        self.emb_backup = {}

    def project(self, param_name: str, param_data: torch.Tensor) -> torch.Tensor:
        r = param_data - self.emb_backup[param_name]
        if torch.norm(r) > self.eps:
            r = self.eps * r / torch.norm(r)
        return self.emb_backup[param_name] + r

    def backup_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                self.grad_backup[name] = param.grad.clone()

    def restore_grad(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                param.grad = self.grad_backup[name]


class AWP:
    """Adversarial weight perturbation as the widely used (Kaggle) AWP class does it, without its optimizer, scaler
    and epoch plumbing: ``attack()`` is its ``_save()`` + ``_attack_step()``, ``restore()`` its ``_restore()``."""

    def __init__(self, model: nn.Module, adv_param: str = "weight", adv_lr: float = 1.0, adv_eps: float = 0.01) -> None:
        self.model = model.module if hasattr(model, "module") else model
        self.adv_param = adv_param
        self.adv_lr = adv_lr
        self.adv_eps = adv_eps
        self.backup: dict[str, torch.Tensor] = {}
        self.backup_eps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def attack(self) -> None:
        self._save()
        self._attack_step()

    def restore(self) -> None:
        self._restore()

    def _attack_step(self) -> None:
        e = 1e-6
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                norm1 = torch.norm(param.grad)
                norm2 = torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    r_at = self.adv_lr * param.grad / (norm1 + e) * (norm2 + e)
                    param.data.add_(r_at)
                    param.data = torch.min(torch.max(param.data, self.backup_eps[name][0]), self.backup_eps[name][1])

    def _save(self) -> None:
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                if name not in self.backup:
                    self.backup[name] = param.data.clone()
                    grad_eps = self.adv_eps * param.abs().detach()
                    self.backup_eps[name] = (self.backup[name] - grad_eps, self.backup[name] + grad_eps)

    def _restore(self) -> None:
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup = {}
        self.backup_eps = {}


def fgm_step(fgm: FGM, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The seed's FGM usage code: clean backward, attack, adversarial backward, restore. Returns the clean loss.

    ``fgm`` may be any object with the seed's methods (a :class:`fastadv.FusedFGM` too).
    """
    loss = closure()
    loss.backward()
    fgm.attack()
    loss_adv = closure()
    loss_adv.backward()
    fgm.restore()
    return loss


def pgd_step(pgd: PGD, model: nn.Module, closure: Callable[[], torch.Tensor], k: int = 3) -> torch.Tensor:
    """The seed's PGD usage code with ``pgd_k = k``. Returns the clean loss.

    ``pgd`` may be any object with the seed's methods (a :class:`fastadv.FusedPGD` too).
    """
    loss = closure()
    loss.backward()
    pgd.backup_grad()
    for _t in range(k):
        pgd.attack(is_first_attack=(_t == 0))
        if _t != k - 1:
            model.zero_grad()
        else:
            pgd.restore_grad()
        loss_adv = closure()
        loss_adv.backward()
    pgd.restore()
    return loss


def awp_step(awp: AWP, model: nn.Module, closure: Callable[[], torch.Tensor], k: int = 1) -> torch.Tensor:
    """The AWP class's usage (``loss.backward()`` then its ``attack_backward``) with ``adv_step = k``: the adversarial
    passes replace the clean gradient, so the optimizer steps on the last one's. Returns the clean loss.

    ``awp`` may be any object with ``attack``/``restore`` (a :class:`fastadv.FusedAWP` too).
    """
    loss = closure()
    loss.backward()
    for _ in range(k):
        awp.attack()
        model.zero_grad()
        closure().backward()
    awp.restore()
    return loss


# ---- the input-space family: a perturbation of the embedding module's output ----


class _OutputPerturbation:
    """A forward hook that adds ``delta`` to the output of an embedding module (the official code's
    ``inputs_embeds = embeds_init + delta``, for any model). ``init(output)`` creates ``delta`` at the first call,
    when the output's shape is known; ``detach`` adds it to the output cut from the graph (fairseq's R3F)."""

    def __init__(self, embedding: nn.Module, init: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.init, self.delta, self.detach, self.output = init, None, False, None
        self.handle = embedding.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        self.output = output
        if self.delta is None and self.init is not None:
            self.delta = self.init(output.detach())
        if self.delta is None:
            return None
        return (output.detach() if self.detach else output) + self.delta


def _loss_and_logits(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return (out[0], out[1]) if isinstance(out, tuple) else (out.loss, out.logits)


def _masked(tensor: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return tensor if attention_mask is None else torch.where(attention_mask.bool().unsqueeze(-1), tensor, 0.0)


def freelb_step(
    embedding: nn.Module,
    closure: Callable[[], torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    adv_lr: float = 0.1,
    adv_steps: int = 3,
    adv_init_mag: float = 0.0,
    adv_max_norm: float = 0.0,
    norm: str = "l2",
    backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
) -> torch.Tensor:
    """FreeLB as its official Hugging Face code (``run_glue_freelb.py``) does it, on the output of ``embedding``.

    ``closure()`` runs the forward pass and returns the loss; each of the ``adv_steps`` passes backpropagates
    ``loss / adv_steps`` with ``backward`` (e.g. a GradScaler's). Returns the sum of those. As the issue specifies,
    where the official code differs: norms in fp32, the gradient masked by ``attention_mask``, each step computed in
    fp32 and rounded once to the delta's dtype, and an example whose gradient norm is not finite keeps its delta (the
    official code writes NaN).
    """

    def init(embeds_init: torch.Tensor) -> torch.Tensor:
        input_mask = (
            torch.ones(embeds_init.shape[:2], device=embeds_init.device) if attention_mask is None else attention_mask
        ).to(embeds_init)
        if adv_init_mag > 0:
            if norm == "l2":
                input_lengths = torch.sum(input_mask, 1)
                delta = torch.zeros_like(embeds_init).uniform_(-1, 1) * input_mask.unsqueeze(2)
                dims = input_lengths * embeds_init.size(-1)
                mag = adv_init_mag / torch.sqrt(dims)
                delta = (delta * mag.view(-1, 1, 1)).detach()
            else:
                delta = torch.zeros_like(embeds_init).uniform_(-adv_init_mag, adv_init_mag) * input_mask.unsqueeze(2)
        else:
            delta = torch.zeros_like(embeds_init)
        return delta.requires_grad_()

    hook = _OutputPerturbation(embedding, init)
    try:
        total = 0.0
        for astep in range(adv_steps):
            loss = closure() / adv_steps
            total = total + loss.detach()
            backward(loss)
            if astep == adv_steps - 1:
                break
            delta = hook.delta
            delta_grad = _masked(delta.grad.clone().detach().float(), attention_mask)
            batch = delta_grad.size(0)
            if norm == "l2":
                denorm = torch.norm(delta_grad.view(batch, -1), dim=1).view(-1, 1, 1)
                denorm = torch.clamp(denorm, min=1e-8)
                new = delta.detach().float() + adv_lr * delta_grad / denorm
                if adv_max_norm > 0:
                    delta_norm = torch.norm(new.view(batch, -1), p=2, dim=1).detach()
                    exceed_mask = (delta_norm > adv_max_norm).to(new)
                    reweights = (adv_max_norm / delta_norm * exceed_mask + (1 - exceed_mask)).view(-1, 1, 1)
                    new = new * reweights
            else:
                denorm = torch.norm(delta_grad.view(batch, -1), dim=1, p=float("inf")).view(-1, 1, 1)
                denorm = torch.clamp(denorm, min=1e-8)
                new = delta.detach().float() + adv_lr * delta_grad / denorm
                if adv_max_norm > 0:
                    new = torch.clamp(new, -adv_max_norm, adv_max_norm)
            new = torch.where(denorm.isfinite(), new, delta.detach().float())
            hook.delta = new.to(delta.dtype).detach().requires_grad_()
        return total
    finally:
        hook.handle.remove()


def _logit_rows(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Token-level logits ``[B, T, V]`` count the tokens of the attention mask (as the task loss does: padding is no
    prediction), other logits every row."""
    if attention_mask is None or logits.dim() != 3 or logits.shape[:2] != attention_mask.shape:
        return None
    return attention_mask.bool().reshape(-1)


def _kl(
    logits: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None, reduction: str = "batchmean"
) -> torch.Tensor:
    """KL(softmax(logits) || softmax(target)) in fp32 over the rows (the counted ones), averaged (batchmean) or
    summed."""
    logits, target = logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1, target.size(-1)).float()
    if rows is not None:
        logits, target = logits[rows], target[rows]
    return F.kl_div(F.log_softmax(target, dim=-1), F.log_softmax(logits, dim=-1), reduction=reduction, log_target=True)


def _mse(
    prediction: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None, reduction: str = "mean"
) -> torch.Tensor:
    width = prediction.size(-1) if prediction.dim() > 1 else 1
    prediction, target = prediction.reshape(-1, width).float(), target.reshape(-1, width).float()
    if rows is not None:
        prediction, target = prediction[rows], target[rows]
    return F.mse_loss(prediction, target, reduction=reduction)


def smart_step(
    embedding: nn.Module,
    closure: Callable[[], Any],
    attention_mask: torch.Tensor | None = None,
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
    backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
) -> torch.Tensor:
    """SMART's smoothness-inducing adversarial regulariser (Jiang et al. 2020, Algorithm 1), on the output of
    ``embedding``; one backward of the total, which is returned.

    ``closure()`` returns ``(loss, logits)`` or an object with ``.loss`` and ``.logits``. Noise ``N(0, 1) * noise_var``
    (masked); ``steps`` ascent steps on ``KL(adv || clean)`` (``divergence="mse"``: the summed squared error, for
    regression), per token (``per_token=False``: per example), with ``N`` the normalisation by the inf-norm
    (``norm="inf"``), the l2 norm (``"l2"``) or the sign (``"sign"``): ``update="mtdnn"`` as mt-dnn's
    ``SmartPerturbation`` does it, ``noise = N(noise + step_size * g)``; ``update="paper"`` as Algorithm 1,
    ``noise = noise + step_size * N(g)``; each projected onto the ``adv_eps`` inf-ball when ``adv_eps`` is given (the
    ascent's divergence summed over the rows, as mt-dnn's ``stable_kl(reduce=False)``); then
    ``loss + alpha * (KL(adv.detach() || clean) + KL(clean.detach() || adv))`` (MSE between the two for regression). A
    non-finite gradient norm drops the adversarial term, as mt-dnn does. As fastadv specifies, where mt-dnn differs:
    plain KL (not ``stable_kl``), norms in fp32, the gradient masked by ``attention_mask``, and token-level logits
    counting the tokens of ``attention_mask`` only.
    """
    hook = _OutputPerturbation(embedding)
    try:
        loss, logits = _loss_and_logits(closure())
        rows = _logit_rows(logits, attention_mask)
        embed = hook.output
        noise = _masked(embed.new_empty(embed.size()).normal_(0, 1) * noise_var, attention_mask).detach()
        dims = (-1,) if per_token else (-2, -1)

        def normalised(x: torch.Tensor) -> torch.Tensor:
            if norm == "l2":
                return x / (torch.norm(x, dim=dims, keepdim=True) + epsilon)
            if norm == "sign":
                return x.sign()
            return x / (x.abs().amax(dim=dims, keepdim=True) + epsilon)

        finite = True
        for _ in range(steps):
            noise.requires_grad_()
            hook.delta = noise
            _, adv_logits = _loss_and_logits(closure())
            if divergence == "mse":
                adv_loss = _mse(adv_logits, logits.detach(), rows, reduction="sum")
            else:
                adv_loss = _kl(adv_logits, logits.detach(), rows, reduction="sum")
            (delta_grad,) = torch.autograd.grad(adv_loss, noise, only_inputs=True, retain_graph=False)
            delta_grad = _masked(delta_grad.float(), attention_mask)
            if not torch.isfinite(delta_grad.norm()):
                finite = False
                break
            if update == "mtdnn":
                new = normalised(noise.detach().float() + step_size * delta_grad)
            else:
                new = noise.detach().float() + step_size * normalised(delta_grad)
            if adv_eps is not None:
                new = torch.clamp(new, -adv_eps, adv_eps)
            noise = new.to(noise.dtype).detach()
        if not finite:
            total = loss
        else:
            hook.delta = noise.detach()
            _, adv_logits = _loss_and_logits(closure())
            if divergence == "mse":
                adv_term = _mse(adv_logits, logits, rows)
            else:
                adv_term = _kl(adv_logits.detach(), logits, rows) + _kl(logits.detach(), adv_logits, rows)
            total = loss + alpha * adv_term
        backward(total)
        return total.detach()
    finally:
        hook.handle.remove()


def r3f_step(
    embedding: nn.Module,
    closure: Callable[[], Any],
    attention_mask: torch.Tensor | None = None,
    r3f_lambda: float = 1.0,
    eps: float = 1e-5,
    noise_type: str = "uniform",
    divergence: str = "kl",
    backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
) -> torch.Tensor:
    """R3F (Aghajanyan et al. 2021) as fairseq's ``sentence_prediction_r3f`` does it, on the output of
    ``embedding``: a clean pass and a pass on the embeddings (cut from the graph) plus noise ``U(-eps, eps)``
    (``noise_type="normal"``: ``N(0, eps)``), masked; ``loss + r3f_lambda * symmetric KL`` (fp32, per example, both
    sides with gradients; ``divergence="mse"``: their mean squared error), one backward. Returns the total."""
    hook = _OutputPerturbation(embedding)
    try:
        loss, logits = _loss_and_logits(closure())
        embed = hook.output
        if noise_type == "normal":
            noise = torch.normal(torch.zeros_like(embed, dtype=torch.float32), eps)
        else:
            noise = torch.rand(embed.shape, device=embed.device) * (2 * eps) - eps
        hook.delta = _masked(noise, attention_mask).to(embed.dtype)
        hook.detach = True
        _, noised_logits = _loss_and_logits(closure())
        rows = _logit_rows(logits, attention_mask)
        if divergence == "mse":
            symm = _mse(noised_logits, logits, rows)
        else:
            noised = noised_logits.reshape(-1, noised_logits.size(-1)).float()
            clean = logits.reshape(-1, logits.size(-1)).float()
            if rows is not None:
                noised, clean = noised[rows], clean[rows]
            symm = F.kl_div(F.log_softmax(noised, dim=-1), F.softmax(clean, dim=-1), reduction="sum")
            symm = symm + F.kl_div(F.log_softmax(clean, dim=-1), F.softmax(noised, dim=-1), reduction="sum")
            symm = symm / noised.size(0)
        total = loss + r3f_lambda * symm
        backward(total)
        return total.detach()
    finally:
        hook.handle.remove()


def _scale_l2(x: torch.Tensor, norm_length: float, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Miyato's ``_scale_l2`` (``research/adversarial_text/adversarial_losses.py``) in fp32 (fp64 for float64): each
    example scaled to l2 norm ``norm_length`` over its tokens, divided by its largest value first "for a numerically
    stable L2 norm"; the tokens outside ``attention_mask`` zeroed (its ``_mask_by_length``), and, as fastadv
    specifies, an example that is not finite left at zero (the official code: NaN)."""
    x = _masked(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), attention_mask)
    alpha = torch.amax(torch.abs(x), (1, 2), keepdim=True) + 1e-12
    l2_norm = alpha * torch.sqrt(torch.sum(torch.pow(x / alpha, 2), (1, 2), keepdim=True) + 1e-6)
    return torch.where(l2_norm.isfinite(), norm_length * (x / l2_norm), 0.0)


def vat_step(
    embedding: nn.Module,
    closure: Callable[[], Any],
    attention_mask: torch.Tensor | None = None,
    eps: float = 5.0,
    xi: float = 0.1,
    alpha: float = 1.0,
    power_iters: int = 1,
    backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
) -> torch.Tensor:
    """Virtual adversarial training (Miyato et al. 2018) as their text code's ``virtual_adversarial_loss`` does it,
    on the output of ``embedding``; one backward of ``loss + alpha * vadv_loss``, which is returned.

    ``closure()`` returns ``(loss, logits)`` or an object with ``.loss`` and ``.logits``. ``d ~ N(0, I)`` (drawn like
    the embedding output); ``power_iters`` times ``d = grad KL(clean || p(x + _scale_l2(d, xi)))``; then
    ``KL(clean || p(x + _scale_l2(d, eps)))``, the clean logits under ``stop_gradient`` throughout, the KL the mean over
    the rows of the logits (``_kl_divergence_with_logits``'s weighted mean, its weights the rows that count:
    token-level logits count the tokens of ``attention_mask``), in fp32."""
    hook = _OutputPerturbation(embedding)
    try:
        loss, logits = _loss_and_logits(closure())
        logits_clean = logits.detach()  # "Stop gradient of logits. See https://arxiv.org/abs/1507.00677"
        rows = _logit_rows(logits, attention_mask)
        embedded = hook.output
        d = torch.randn_like(embedded)
        for _ in range(power_iters):
            d = _scale_l2(d, xi, attention_mask).to(embedded.dtype).requires_grad_()
            hook.delta = d
            _, d_logits = _loss_and_logits(closure())
            kl = _kl(logits_clean, d_logits, rows)
            (d,) = torch.autograd.grad(kl, d)
            d = d.detach()
        hook.delta = _scale_l2(d, eps, attention_mask).to(embedded.dtype)
        _, vadv_logits = _loss_and_logits(closure())
        total = loss + alpha * _kl(logits_clean, vadv_logits, rows)
        backward(total)
        return total.detach()
    finally:
        hook.handle.remove()


def gradient_penalty_step(
    embedding: nn.Module,
    closure: Callable[[], Any],
    attention_mask: torch.Tensor | None = None,
    epsilon: float = 1.0,
    backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
) -> torch.Tensor:
    """The gradient penalty of Su Jianlin's "对抗训练浅谈" (bert4keras's ``loss_with_gradient_penalty``), on the output
    of ``embedding``: ``loss + 0.5 * epsilon * gp`` with ``gp`` the sum of the squares of the loss's gradient with
    respect to the embedding output (bert4keras: ``K.sum(K.gradients(loss, [embeddings])[0].values**2)``, the lookup's
    rows), over the tokens of ``attention_mask`` and in fp32 as fastadv specifies; the gradient taken with
    ``create_graph=True`` so that the one backward of the total carries the penalty's gradient (attention on SDPA's
    math kernel, the twice-differentiable one). ``closure()`` returns the loss (or ``(loss, logits)``). Returns the
    total."""
    hook = _OutputPerturbation(embedding)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            out = closure()
            loss = out if isinstance(out, torch.Tensor) else _loss_and_logits(out)[0]
            (gradients,) = torch.autograd.grad(loss, hook.output, create_graph=True)
            gp = torch.sum(_masked(gradients.float(), attention_mask) ** 2)
            total = loss + 0.5 * epsilon * gp
            backward(total)
        return total.detach()
    finally:
        hook.handle.remove()
