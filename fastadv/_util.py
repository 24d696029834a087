"""Small helpers shared by the attack classes, the driver and the integrations: argument checks, names, warnings."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, ClassVar, cast

from torch import nn


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside fastadv (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _wrapper_types() -> tuple[type, ...]:
    """The classes that hold the model as ``.module``: DDP, DataParallel and FSDP (1) (DeepSpeed engines are found by
    :func:`fastadv._deepspeed.is_engine`, without importing deepspeed)."""
    types: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    with contextlib.suppress(ImportError):  # a torch without distributed support
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    return tuple(types)


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is what ``torch.compile(module)`` returns (no such module exists before dynamo is loaded)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under its wrappers: DDP, DataParallel, FSDP (1) and DeepSpeed engines (``.module``), and what
    ``torch.compile(module)`` returns (the module). Recognised by type, so a model whose own submodule is called
    ``module`` is a model."""
    from fastadv._deepspeed import is_engine

    while True:
        if isinstance(model, _wrapper_types()) or is_engine(model):
            model = cast(nn.Module, model.module)
        elif _is_compiled(model):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


#: What ``emb_name`` is when the model has no ``get_input_embeddings()``: the seed's default.
DEFAULT_EMB_NAME = "word_embeddings"


def input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The name and module of ``model.get_input_embeddings()`` (Hugging Face models, PEFT wrappers), or ``None``."""
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        module = get()
    except (NotImplementedError, AttributeError):  # a PreTrainedModel that does not say
        return None
    return next(((name, m) for name, m in model.named_modules() if m is module and name), None)


def embedding_weights_name(model: nn.Module, emb_name: str | None) -> str:
    """``emb_name`` for the weight attacks: as given, or for ``None`` the input embedding's parameters (its module's
    name with a trailing dot, a substring of theirs alone), else the seed's ``"word_embeddings"``."""
    if emb_name is not None:
        return emb_name
    found = input_embedding(model)
    return DEFAULT_EMB_NAME if found is None else found[0] + "."


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_steps(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_choice(*choices: str) -> Check:
    """The check that a value is one of ``choices``."""

    def check(name: str, value: object) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return check


def optional(check: Check) -> Check:
    """``check``, letting ``None`` through."""
    return lambda name, value: None if value is None else check(name, value)


def as_bool(name: str, value: object) -> bool:
    return bool(value)


#: A hyperparameter's check: ``check(name, value)`` returns the value to keep or raises a ValueError naming it.
Check = Callable[[str, Any], Any]


class Hyperparameters:
    """The hyperparameters of an attack class, checked without a model (so that an integration can refuse a bad one
    before it has the model): :attr:`CHECKS` names each one's check; ``vars(self).update(self.checked({...}))`` in the
    constructor sets them."""

    CHECKS: ClassVar[dict[str, Check]] = {}

    @classmethod
    def checked(cls, options: Mapping[str, Any], names: Mapping[str, str] | None = None) -> dict[str, Any]:
        """``options`` with each hyperparameter through its check (others as given); ``names``: what the caller
        calls them, for the errors."""
        names = names or {}
        return {
            name: cls.CHECKS[name](names.get(name, name), value) if name in cls.CHECKS else value
            for name, value in options.items()
        }


_INPUT_SPACE = (
    "an input-space method: FusedFreeLB, FusedSMART, FusedR3F, FusedVAT or FusedGradientPenalty (they"
    " perturb the embedding's output: no trainable weight needed)"
)


def _adapter(name: str) -> bool:
    """Whether ``name`` is one of PEFT's LoRA weights (``lora_A``, ``lora_embedding_B``, ...), not one they adapt."""
    return "lora_" in name


def matching_parameters(model: nn.Module, name_part: str, what: str = "emb_name") -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters whose names contain ``name_part``; a clear error if none does, listing candidates
    (``what`` names the argument the user passed it as). For ``emb_name`` (an embedding to attack) adapter weights
    (PEFT's LoRA matrices of a frozen embedding) are refused: perturbing them is not perturbing the embedding."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and name_part in n]
    if named and what == "emb_name" and all(_adapter(n) for n, _ in named):
        raise ValueError(
            f"{what}={name_part!r} matches only adapter weights ({', '.join(n for n, _ in named[:4])}) of a frozen"
            " embedding (PEFT/LoRA on the embedding): FGM/PGD would perturb the adapter, not the embedding, and"
            f" move its output far more than eps says. Use {_INPUT_SPACE}, or train the embedding itself (PEFT:"
            f" modules_to_save=[{name_part.split('.')[-1]!r}])"
        )
    if named:
        return named
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and name_part in n]
    if frozen:
        advice = (
            f"use {_INPUT_SPACE}, or make it trainable (PEFT: modules_to_save=[{name_part.split('.')[-1]!r}])"
            if what == "emb_name"
            else f"pass {what}= the name of trainable weights"
        )
        raise ValueError(
            f"the parameters matching {what}={name_part!r} ({', '.join(frozen[:4])}) are frozen (requires_grad=False,"
            f" as PEFT/LoRA leaves the base model), so they have no gradient to attack along: {advice}"
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad and not (what == "emb_name" and _adapter(n))]
    hints = ([n for n in names if "emb" in n.lower()] if what == "emb_name" else []) or names[:10]
    raise ValueError(
        f"no trainable parameter name contains {what}={name_part!r}; candidates: {', '.join(hints) or 'none'}."
        f" Pass {what}= (a substring of the names of the parameters to attack)"
    )
