"""Row hints (``rows="batch"``, and ``rows="auto"`` where they are exact): the rows of each target embedding looked
up since the last attack, recorded by forward pre-hooks, so an attack reads only those rows instead of scanning the
whole gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastadv._rows import RowState


class _Lookups:
    """What the hooks of ``rows="batch"`` recorded since the last attack: a row mask per target weight, and the names
    of the targets looked up at all."""

    def __init__(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self.seen: set[str] = set()


class _LookupRecorder:
    """Forward pre-hook of one target ``nn.Embedding``: flags the looked-up ids while autograd records (evaluation
    passes add nothing). A plain class rather than a closure, so that a model carrying it still pickles."""

    def __init__(self, name: str, lookups: _Lookups) -> None:
        self.name = name
        self.lookups = lookups

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not (torch.is_grad_enabled() and args):
            return
        weight = module.weight
        mask = self.lookups.masks.get(self.name)
        if mask is None or mask.device != weight.device or len(mask) != weight.shape[0]:
            mask = self.lookups.masks[self.name] = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        mask.index_fill_(0, args[0].reshape(-1).to(device=weight.device, dtype=torch.long), True)
        self.lookups.seen.add(self.name)


def _hinted_modules(model: nn.Module, emb_name: str) -> tuple[list[tuple[str, nn.Embedding]], str | None]:
    """The ``nn.Embedding`` modules whose weights match ``emb_name``, and why row hints would not be exact for them
    (``None`` when they are): a matching weight that is no embedding's, or one shared with another module (a tied LM
    head), whose gradient reaches rows no lookup explains."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module_name or "<model>")
    embeddings = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    hinted = []
    for name, param in model.named_parameters():
        if not (param.requires_grad and emb_name in name):
            continue
        module = embeddings.get(name)
        if module is None:
            return [], (
                f"{name!r} (matching emb_name={emb_name!r}) is not an nn.Embedding's weight, so no lookup gives its"
                " rows"
            )
        if len(owners[id(param)]) > 1:
            return [], (
                f"{name!r} is shared by modules {', '.join(owners[id(param)])} (a tied LM head?), whose gradient"
                " reaches every row"
            )
        hinted.append((name, module))
    if not hinted:
        return [], f"no trainable nn.Embedding weight name contains emb_name={emb_name!r}"
    return hinted, None


def batch_rows(model: nn.Module, emb_name: str, required: bool) -> BatchRows | None:
    """Row hints for the weights matching ``emb_name``, or ``None`` where they would not be exact (with ``required``,
    ``rows="batch"``, an error saying why)."""
    hinted, blocker = _hinted_modules(model, emb_name)
    if blocker is None:
        return BatchRows(emb_name, hinted)
    if required:
        raise ValueError(f"rows='batch' records the ids of nn.Embedding lookups, but {blocker}; use rows='scan'")
    return None


class BatchRows:
    """The rows of each target embedding looked up since the last attack, recorded by forward pre-hooks on its
    ``nn.Embedding`` (only where autograd records, so evaluation passes add nothing).

    Exact only if the weight gets gradient from that lookup alone (see :func:`batch_rows`, which refuses a weight
    shared with another module), so the recorded rows are checked against a dense scan at the first attack and
    whenever a target was not looked up at all since the last attack (e.g. a compiled model that runs without the
    hooks).
    """

    def __init__(self, emb_name: str, hinted: list[tuple[str, nn.Embedding]]) -> None:
        self.emb_name = emb_name
        self.lookups = _Lookups()
        self.verified = False
        self._handles = [module.register_forward_pre_hook(_LookupRecorder(name, self.lookups))
                         for name, module in hinted]

    def needs_check(self, names: list[str]) -> bool:
        """Whether this attack must prove the recorded rows against a scan: the first one, and any in which a target
        was not looked up at all (a forward pass that ran without the hooks would otherwise perturb nothing)."""
        return not self.verified or any(name not in self.lookups.seen for name in names)

    def take(self, name: str, state: RowState) -> None:
        """Flag in ``state.fresh`` the rows looked up since the last call and not yet perturbed; forget them."""
        mask = self.lookups.masks.get(name)
        self.lookups.seen.discard(name)
        if mask is None or mask.shape != state.touched.shape:
            state.fresh.zero_()
            return
        torch.logical_and(mask, state.touched.logical_not(), out=state.fresh)
        mask.zero_()

    @staticmethod
    def unexplained(missed: list[str], looked_up: set[str]) -> str:
        """Why gradients of ``missed`` have rows that no recorded lookup explains."""
        silent = [name for name in missed if name not in looked_up]
        if silent:
            return (
                f"no lookup of {', '.join(silent)} was recorded since the last attack, but its gradient has non-zero"
                " rows: the forward pass ran without fastadv's hook. A model compiled with torch.compile and run"
                " before this attack object was built keeps running without hooks added later. Build the attack"
                " object before the first forward pass of the compiled model"
            )
        return (
            f"the gradient of {', '.join(missed)} has non-zero rows that no recorded lookup explains (the weight is"
            " used elsewhere too, or the ranks' gradients were all-reduced by DDP)"
        )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
