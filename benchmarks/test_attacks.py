"""pytest-benchmark suite: the seed against every available backend, one group per case.

    pytest benchmarks --benchmark-only            # full shapes (BERT-base, XLM-R, LLaMA embeddings)
    FASTADV_BENCH_SCALE=0.01 pytest benchmarks --benchmark-disable   # CI: every case once, as a smoke test

Each backend's ``extra_info`` holds its speed-up over the seed measured in the same run (``vs_seed``); the summary
table groups the seed and the backends of one case together. ``python -m fastadv.bench`` prints the same comparison
and the extra peak memory of each call (measured apart from the timings, which it would disturb on the CPU).

At full scale (no ``FASTADV_BENCH_SCALE``) and with timings on, the targets fail their cases: every backend at least
``bench.MIN_SPEEDUP`` times the seed, FGM's scan on the CPU within ``bench.SCAN_TARGET`` of one read of the gradient,
and the LLM embedding's targets (``bench.llm_measures``). Shrunk, fixed costs dominate, so only the results count.
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


def checked(benchmark) -> bool:
    """Whether this run checks the targets: full scale, timings on."""
    return bench.full_scale() and not benchmark.disabled


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
    if checked(benchmark) and "vs_seed" in benchmark.extra_info:
        assert benchmark.extra_info["vs_seed"] >= bench.MIN_SPEEDUP, f"{impl} under {bench.MIN_SPEEDUP}x the seed"


@pytest.mark.parametrize("backend", [impl for impl in IMPLS if bench.is_fastadv(impl) and "+" not in impl])
def test_scan_vs_read(benchmark, backend: str) -> None:
    """FGM attack + restore with ``rows="scan"`` (XLM-R fp32, 4000 rows) against one read of the gradient."""
    benchmark.group = "fgm-scan-vs-read"
    repeats = 1 if benchmark.disabled else 5
    ((_, seconds, read),) = benchmark.pedantic(
        lambda: bench.scan_vs_read(DEVICE, [backend], repeats), rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        ms=round(seconds * 1e3, 2), read_ms=round(read * 1e3, 2), ratio=round(seconds / read, 3)
    )
    if checked(benchmark) and DEVICE.type == "cpu":
        assert seconds / read <= bench.SCAN_TARGET


@pytest.mark.parametrize("case", bench.llm_cases(), ids=lambda case: case.group)
def test_llm_embedding(benchmark, case: bench.Case) -> None:
    """FGM with the defaults on a Llama-3-sized bf16 embedding, untied and tied, against the seed (and tied, against
    the floor of 3.5 copies of the weight), with its memory."""
    benchmark.group = case.group
    repeats = 1 if benchmark.disabled else 3

    def measure() -> dict[str, tuple[float, str, float]]:
        results = bench.time_case(case, DEVICE, [bench.DEFAULT, "seed"], repeats)
        floor = bench.tied_floor(case, DEVICE, repeats) if case.gradient == "tied" else None
        bench.measure_peaks(case, DEVICE, results)
        default, seed = results
        return bench.llm_measures(default, seed, floor)

    measures = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(measures)
    if checked(benchmark):
        missed = [name for name, measure in measures.items() if not bench.meets(*measure)]
        assert not missed, f"missed: {measures}"


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
    rows = benchmark.pedantic(
        lambda: bench.input_end_to_end(DEVICE, backends, repeats, (method,)), rounds=1, iterations=1
    )
    for row_method, impl, seconds, ratio in rows:
        benchmark.extra_info[f"{impl}:{row_method}"] = {"ms": round(seconds * 1e3, 1), "x_plain_step": round(ratio, 3)}
