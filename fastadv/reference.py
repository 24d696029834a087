"""The seed's FGM and PGD classes, written out unchanged, and the widely used AWP class: the oracles of the tests.

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

import torch
from torch import nn

__all__ = ["FGM", "PGD", "AWP", "fgm_step", "pgd_step", "awp_step"]


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
