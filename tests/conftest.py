"""The fixtures (every available backend, each test's own seed) and the environment the tests run in (Triton's
interpreter without a GPU). What the tests share besides is in ``_helpers.py``."""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only under the interpreter; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _helpers import BACKENDS  # noqa: E402


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


#: The test modules of the framework integrations (they need the extras; CI runs them in its second step).
_INTEGRATION = {"test_transformers", "test_trl", "test_peft", "test_lightning", "test_accelerate", "test_deepspeed"}
#: The modules and test names that start processes (gloo process groups).
_DISTRIBUTED_MODULES = {"test_distributed", "test_deepspeed"}
_DISTRIBUTED_NAMES = ("ddp", "two_processes", "two_ddp")
#: Others that take seconds each: property search, compilers (torch.compile, nvcc, g++ in a fresh directory).
_SLOW_MODULES = {"test_properties"}
_SLOW_NAMES = ("compile", "cuda", "split", "grids_take", "box_radius", "no_compiler", "setup_records")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers by what a test needs, so that ``pytest -m "not slow"`` is the quick subset: ``integration`` (a
    framework), ``distributed`` (starts processes), ``triton`` (Triton's kernels, interpreted without a GPU), and
    ``slow``: any of those three, or a test that takes seconds of its own (property search, compilers)."""
    for item in items:
        module = item.module.__name__ if item.module is not None else ""
        marks = set()
        if module in _INTEGRATION:
            marks.add("integration")
        if module in _DISTRIBUTED_MODULES or any(name in item.name for name in _DISTRIBUTED_NAMES):
            marks.add("distributed")
        if module == "test_triton" or "triton" in item.name:  # the test, or its parameters' ids
            marks.add("triton")
        if marks or module in _SLOW_MODULES or any(name in item.name for name in _SLOW_NAMES):
            marks.add("slow")
        for mark in sorted(marks):
            item.add_marker(mark)
