"""pytest-benchmark suite: the seed against every available backend, one group per case.

    pytest benchmarks --benchmark-only            # full shapes (BERT-base, XLM-R, LLaMA embeddings)
    FASTADV_BENCH_SCALE=0.01 pytest benchmarks --benchmark-disable   # CI: every case once, as a smoke test

Each backend's ``extra_info`` holds its speed-up over the seed measured in the same run (``vs_seed``); the summary
table groups the seed and the backends of one case together. ``python -m fastadv.bench`` prints the same comparison
and the extra peak memory of each call (measured apart from the timings, which it would disturb on the CPU).
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastadv import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = bench.implementations(DEVICE)
SEED_SECONDS: dict[str, float] = {}


@functools.lru_cache(maxsize=1)  # one case's tensors alive at a time: the XLM-R ones take 1.5 GB
def model_for(case: bench.Case) -> torch.nn.Module:
    return bench.build_model(case, DEVICE)


@pytest.mark.parametrize(
    ("case", "impl"),
    [(case, impl) for case in bench.cases() for impl in IMPLS if bench.runs(case, impl)],  # the seed first
    ids=lambda v: v.group if isinstance(v, bench.Case) else v,
)
def test_attack(benchmark, case: bench.Case, impl: str) -> None:
    model = model_for(case)
    param = model.word_embeddings.weight
    weight, grad = param.detach().clone(), param.grad
    call = bench.attack_call(impl, case.method, model)
    benchmark.group = case.group
    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:
        mean = benchmark.stats.stats.mean
        if impl == "seed":
            SEED_SECONDS[case.group] = mean
        elif case.group in SEED_SECONDS:
            benchmark.extra_info["vs_seed"] = round(SEED_SECONDS[case.group] / mean, 2)
    assert torch.equal(param, weight), "weights not restored"
    param.grad = grad


@pytest.mark.parametrize("method", ["fgm", "pgd3", "awp"])
def test_end_to_end(benchmark, method: str) -> None:
    """Whole training steps of a transformers BERT with a 250002-token vocabulary (scaled), seed vs backends."""
    pytest.importorskip("transformers")
    benchmark.group = f"e2e-{method}"
    repeats = 1 if benchmark.disabled else 3
    rows = benchmark.pedantic(lambda: bench.end_to_end(DEVICE, IMPLS, repeats, (method,)), rounds=1, iterations=1)
    for row_method, impl, seconds, ratio in rows:
        benchmark.extra_info[f"{impl}:{row_method}"] = {"ms": round(seconds * 1e3, 1), "x_no_attack": round(ratio, 3)}


@pytest.mark.parametrize("method", list(bench.INPUT_METHODS))
def test_input_space_end_to_end(benchmark, method: str) -> None:
    """FreeLB, SMART and R3F training steps of the same BERT (padded batch): the reference step and the fused class on
    each backend, each against a plain training step."""
    pytest.importorskip("transformers")
    benchmark.group = f"e2e-{method}"
    repeats = 1 if benchmark.disabled else 3
    backends = [impl for impl in IMPLS if impl != "seed" and "+" not in impl]
    rows = benchmark.pedantic(lambda: bench.input_end_to_end(DEVICE, backends, repeats, (method,)), rounds=1,
                              iterations=1)
    for row_method, impl, seconds, ratio in rows:
        benchmark.extra_info[f"{impl}:{row_method}"] = {"ms": round(seconds * 1e3, 1), "x_plain_step": round(ratio, 3)}
