"""Small helpers shared by the attack classes, the driver and the integrations: argument checks, names, warnings."""

from __future__ import annotations

import math
import os
import sys

from torch import nn


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside fastadv (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a wrapper with ``.module`` (DDP, DataParallel), else the model itself."""
    return model.module if hasattr(model, "module") else model


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_steps(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def matching_parameters(model: nn.Module, name_part: str, what: str = "emb_name") -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters whose names contain ``name_part``; a clear error listing candidates if none does
    (``what`` names the argument the user passed it as)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and name_part in n]
    if not named:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        hints = ([n for n in names if "emb" in n.lower()] if what == "emb_name" else []) or names[:10]
        raise ValueError(
            f"no trainable parameter name contains {what}={name_part!r}; candidates: {', '.join(hints) or 'none'}."
            f" Pass {what}= (a substring of the names of the parameters to attack)"
        )
    return named
