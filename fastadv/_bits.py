"""Floats compared bit for bit and in units in the last place (ulps): what the runtime self-check and the tests both
judge results by, written once."""

from __future__ import annotations

import torch
from torch import Tensor

#: The integer dtype of each float dtype's width.
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


def ordinal(t: Tensor) -> Tensor:
    """Floats as int64 that are consecutive for consecutive representable values (``-0.0`` and ``0.0`` both 0)."""
    i = t.contiguous().view(BITS[t.dtype]).long()
    sign_bit = 1 << (torch.finfo(t.dtype).bits - 1)
    return torch.where(i < 0, -(i + sign_bit), i)


def ulp_distance(actual: Tensor, expected: Tensor) -> Tensor:
    """Per element, how many representable values of ``actual.dtype`` apart the two are (``expected`` rounded to that
    dtype first)."""
    return (ordinal(actual) - ordinal(expected.to(actual.dtype))).abs()


def same_bits(actual: Tensor, expected: Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and signed zeros included); bool and integer tensors by value."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False
    bits = BITS.get(actual.dtype)
    if bits is None:
        return torch.equal(actual, expected)
    return torch.equal(actual.contiguous().view(bits), expected.contiguous().view(bits))
