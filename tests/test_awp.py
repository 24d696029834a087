"""FusedAWP against fastadv.reference.AWP (the widely used AWP class): single attacks, several steps, the step helper,
whole training loops, half precision, skips and bad input, on every backend."""

from __future__ import annotations

import copy

import _helpers
import pytest
import torch
from _helpers import (
    HALF,
    TinyEncoder,
    assert_matches,
    assert_same_params,
    assert_step_matches_the_seed,
    batch,
    make_attacker,
    train,
    twins,
    widened,
)
from torch import nn

from fastadv import FusedAWP
from fastadv.reference import AWP, awp_step


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("adv_eps", [0.001, 0.01, 10.0], ids=["box-hit", "box-mostly-hit", "box-not-hit"])
@pytest.mark.parametrize("steps", [1, 3])
def test_attacks_match_reference(backend, seed, tied, adv_eps, steps):
    """Several attacks in a row, each from a fresh adversarial gradient, then restore. (A step moves the weights by
    ``adv_lr`` of their norm; 0.1 keeps the chained steps well-conditioned enough for a tight fp32 comparison.)"""
    fused, ref = twins(tied=tied)
    ids = batch()
    original = {n: p.detach().clone() for n, p in fused.named_parameters()}
    awp, oracle = FusedAWP(fused, adv_lr=0.1, adv_eps=adv_eps, backend=backend), AWP(ref, adv_lr=0.1, adv_eps=adv_eps)
    for m in (fused, ref):
        m(ids).backward()
    for _ in range(steps):
        awp.attack()
        oracle.attack()
        assert_same_params(fused, ref)
        for m in (fused, ref):
            m.zero_grad()
            m(ids).backward()
    assert any(not torch.equal(p, original[n]) for n, p in fused.named_parameters())
    awp.restore()
    for n, p in fused.named_parameters():
        assert torch.equal(p, original[n]), n


def test_only_parameters_with_a_gradient_and_a_matching_name(backend, seed):
    def no_grad(m, ids):
        m.hidden.weight.grad = None  # the AWP class skips parameters without a gradient

    fused, ref, _ = _helpers.twins_with_grads(no_grad)
    biases = {n: p.detach().clone() for n, p in fused.named_parameters() if "bias" in n}
    FusedAWP(fused, adv_eps=0.05, backend=backend).attack()
    AWP(ref, adv_eps=0.05).attack()
    assert_same_params(fused, ref)
    assert torch.equal(fused.hidden.weight, ref.hidden.weight)
    for n, p in fused.named_parameters():
        if "bias" in n:
            assert torch.equal(p, biases[n]), n


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_within_one_ulp(backend, seed, dtype):
    fused = TinyEncoder(dtype=dtype)
    fused(batch()).backward()
    wide = widened(fused)
    FusedAWP(fused, adv_lr=0.5, adv_eps=0.01, backend=backend).attack()
    AWP(wide, adv_lr=0.5, adv_eps=0.01).attack()
    assert_same_params(fused, wide)


@pytest.mark.parametrize("k", [1, 2])
def test_step_matches_the_awp_loop(backend, seed, k):
    assert_step_matches_the_seed("awp", backend, k, adv_lr=1.0, adv_eps=0.02)


def test_step_keeps_gradients_of_earlier_micro_batches(backend, seed):
    """Gradient accumulation: what ``.grad`` held before step() is added to the adversarial gradient."""
    fused, ref = twins()
    first, second = batch(), batch()
    fused(first).backward()
    earlier = {n: p.grad.clone() for n, p in fused.named_parameters()}
    FusedAWP(fused, adv_eps=0.02, backend=backend).step(lambda: fused(second))
    awp_step(AWP(ref, adv_eps=0.02), ref, lambda: ref(second))
    for (n, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert_matches(a.grad, b.grad + earlier[n])


def training_loop(model, backend: str | None) -> list[float]:
    """The AWP class's usage code (awp_step) with fastadv's class on ``backend`` or (None) the AWP class."""
    awp = make_attacker("awp", nn.DataParallel(model), backend, adv_lr=0.5, adv_eps=0.01)
    return train(model, awp, "awp", momentum=0.9, seed=99)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_training_loop_fp32(backend, seed, tied):
    fused, ref = twins(tied=tied)
    got = training_loop(fused, backend)
    want = training_loop(ref, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(fused, ref)


def test_restore_keeps_storage(backend, seed):
    model = TinyEncoder()
    weights = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    awp = FusedAWP(model, backend=backend)
    model(batch()).backward()
    awp.attack()
    awp.restore()
    for n, p in model.named_parameters():
        param, ptr, value = weights[n]
        assert p is param and p.data_ptr() == ptr and torch.equal(p, value), n


def test_inf_gradient_is_skipped_and_counted(backend, seed):
    """Deviation: the AWP class writes NaN for an inf gradient norm; fastadv skips that tensor and counts it."""

    def inf(m, ids):
        m.hidden.weight.grad[0, 0] = float("inf")

    fused, ref, _ = _helpers.twins_with_grads(inf)
    before = fused.hidden.weight.detach().clone()
    awp = FusedAWP(fused, backend=backend)
    with pytest.warns(RuntimeWarning, match="skipped"):
        awp.attack()
    assert awp.nonfinite_skips == 1
    assert torch.equal(fused.hidden.weight, before)
    AWP(ref).attack()
    assert ref.hidden.weight.isnan().any()
    torch.testing.assert_close(fused.lm_head.weight, ref.lm_head.weight)


@pytest.mark.parametrize(("name", "value"), [("adv_lr", 0.0), ("adv_eps", -0.1), ("adv_eps", float("nan"))])
def test_bad_hyperparameters(name, value):
    with pytest.raises(ValueError, match=name):
        FusedAWP(TinyEncoder(), **{name: value})


def test_errors_leave_weights_alone(seed):
    """Raised before any backend op runs: checked once, not per backend."""
    model = TinyEncoder()
    original = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="adv_param='nothing'"):
        FusedAWP(model, adv_param="nothing").attack()
    with pytest.raises(RuntimeError, match="backward"):
        FusedAWP(model).attack()  # no gradient yet
    with pytest.raises(RuntimeError, match="without an active attack"):
        FusedAWP(model).restore()
    for n, p in model.state_dict().items():
        assert torch.equal(p, original[n]), n
