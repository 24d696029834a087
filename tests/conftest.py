"""Shared fixtures: tiny models with seed-style parameter names, fresh random seeds, and ulp comparisons."""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under the interpreter; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from fastadv import available_backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """Each test's own fixed seed (from its id), so CI draws the same inputs every run; ``FASTADV_TEST_SEED=fresh``
    draws new ones for local fuzzing, and ``FASTADV_TEST_SEED=<n>`` replays a draw printed by a failure."""
    chosen = os.environ.get("FASTADV_TEST_SEED", "")
    if chosen == "fresh":
        value = torch.seed() % 2**31
    elif chosen:
        value = int(chosen)
    else:
        value = zlib.crc32(request.node.nodeid.encode()) % 2**31
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value


class TinyEncoder(nn.Module):
    """A BERT-shaped toy: word/position embeddings, an embedding LayerNorm, a head; optionally tied to an LM head."""

    def __init__(
        self,
        vocab: int = 64,
        dim: int = 16,
        tied: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = DEVICE,
    ):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, dim)
        self.embeddings.position_embeddings = nn.Embedding(32, dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embeddings.word_embeddings.weight
        self.to(device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(pos)
        h = torch.tanh(self.hidden(self.embeddings.LayerNorm(h)))
        logits = self.lm_head(h).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def batch(vocab: int = 64, size: tuple[int, int] = (4, 6), low: int = 0) -> torch.Tensor:
    return torch.randint(low, vocab, size, device=DEVICE)


def ordinal(t: torch.Tensor) -> torch.Tensor:
    """Floats mapped to integers that are consecutive for consecutive representable values."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    i = t.contiguous().view(bits).long()
    sign_bit = 1 << (torch.finfo(t.dtype).bits - 1)
    return torch.where(i < 0, -(i + sign_bit), i)


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per-element distance in units in the last place of ``actual.dtype``; ``expected`` is rounded to it first."""
    return (ordinal(actual) - ordinal(expected.to(actual.dtype))).abs()


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1) -> None:
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.to(actual.dtype).isnan()), "NaN pattern differs"
    finite = ~actual.isnan()
    worst = int(ulp_distance(actual[finite], expected[finite]).max()) if finite.any() else 0
    assert worst <= ulps, f"{worst} ulps apart (allowed {ulps})"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32: tight tolerance; bf16/fp16: one ulp of the output (``expected`` may be a wider-precision oracle)."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-6)
    else:
        assert_ulps(actual, expected, 1)
