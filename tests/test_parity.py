"""FusedFGM / FusedPGD against the seed's classes (fastadv.reference): single steps, PGD loops, training loops.

fp32 is compared with a tight tolerance. For bf16/fp16 the oracle is the reference run in fp32 on the same
(half-precision) inputs, and fastadv's result must be within one ulp of it: fastadv rounds each output once, the seed
rounds after every operation, so the seed run in half precision is not the yardstick.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    HALF,
    TinyEncoder,
    assert_matches,
    assert_same_grads,
    assert_same_params,
    assert_step_matches_the_seed,
    batch,
    make_attacker,
    train,
    twins,
    twins_with_grads,
    widened,
)
from torch import nn

from fastadv import FusedFGM, FusedPGD
from fastadv.reference import FGM, PGD


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("emb_name", ["word_embeddings", "embeddings"], ids=["one-tensor", "several-tensors"])
def test_fgm_attack_and_restore(backend, seed, tied, emb_name):
    fused, ref, _ = twins_with_grads(tied=tied)
    original = {n: p.detach().clone() for n, p in fused.named_parameters()}
    fgm, oracle = FusedFGM(fused, eps=0.8, backend=backend), FGM(ref, eps=0.8)
    fgm.attack(emb_name)
    oracle.attack(emb_name)
    assert_same_params(fused, ref)
    assert any(not torch.equal(p, original[n]) for n, p in fused.named_parameters())
    fgm.restore(emb_name)
    for n, p in fused.named_parameters():
        assert torch.equal(p, original[n]), n


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fgm_half_precision_within_one_ulp(backend, seed, dtype, tied):
    fused = TinyEncoder(dtype=dtype, tied=tied)
    fused(batch()).backward()
    wide = widened(fused)
    FusedFGM(fused, eps=2.0, emb_name="embeddings", backend=backend).attack()
    FGM(wide, eps=2.0).attack("embeddings")
    assert_same_params(fused, wide)


def pgd_loop(model, attacker, ids, k: int, fused: bool) -> list[dict[str, torch.Tensor]]:
    """The seed's PGD usage loop; returns the attacked embeddings after each step."""
    snapshots = []
    model(ids).backward()
    attacker.backup_grad()
    for t in range(k):
        attacker.attack(is_first_attack=(t == 0)) if fused else attacker.attack("embeddings", is_first_attack=(t == 0))
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if "embeddings" in n})
        if t != k - 1:
            model.zero_grad()
        else:
            attacker.restore_grad()
        model(ids).backward()
    attacker.restore() if fused else attacker.restore("embeddings")
    return snapshots


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("eps", [0.05, 50.0], ids=["projection-hit", "projection-not-hit"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pgd_loop_matches_reference(backend, seed, k, eps, tied):
    fused, ref = twins(tied=tied)
    ids = batch()
    original = {n: p.detach().clone() for n, p in fused.named_parameters()}
    got = pgd_loop(fused, FusedPGD(fused, eps=eps, alpha=0.3, emb_name="embeddings", backend=backend), ids, k, True)
    want = pgd_loop(ref, PGD(ref, eps=eps, alpha=0.3), ids, k, False)
    for step, (a, b) in enumerate(zip(got, want)):
        for name in a:
            assert_matches(a[name], b[name])
        if eps < 1 and step > 0:
            delta = torch.cat([(a[n] - original[n]).flatten() for n in a if "word" in n])
            assert delta.norm() <= eps * (1 + 1e-5)
    assert_same_grads(fused, ref)
    for n, p in fused.named_parameters():
        assert torch.equal(p, original[n]), n


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("eps", [0.05, 50.0], ids=["projection-hit", "projection-not-hit"])
def test_pgd_half_precision_each_step_within_one_ulp(backend, seed, dtype, eps):
    """Each PGD step of fastadv against one fp32 reference step taken from fastadv's own previous state."""
    model = TinyEncoder(dtype=dtype)
    ids = batch()
    pgd = FusedPGD(model, eps=eps, alpha=0.3, emb_name="embeddings", backend=backend)
    origin = {n: p.detach().float().clone() for n, p in model.named_parameters() if "embeddings" in n}
    model(ids).backward()
    for t in range(3):
        wide = widened(model)
        oracle = PGD(wide, eps=eps, alpha=0.3)
        oracle.emb_backup = {n: w.clone() for n, w in origin.items()}
        oracle.attack("embeddings", is_first_attack=False)
        pgd.attack(is_first_attack=t == 0)
        assert_same_params(model, wide)
        model.zero_grad()
        model(ids).backward()
    pgd.restore()
    for n, p in model.named_parameters():
        if n in origin:
            assert torch.equal(p.float(), origin[n]), n


def test_pgd_step_and_restore_grad_with_unused_parameter(backend, seed):
    """Deviation: a parameter with a clean gradient but none in the last adversarial pass keeps its clean gradient."""
    fused, ref = twins()
    ids = batch()
    for model, attacker in ((fused, FusedPGD(fused, backend=backend)), (ref, PGD(ref))):
        model(ids).backward()
        attacker.backup_grad()
        for t in range(2):  # the seed's loop with k=2, where the adversarial passes never reach the head
            attacker.attack(is_first_attack=t == 0)
            if t == 0:
                model.zero_grad()
            else:
                attacker.restore_grad()
            model.embeddings.word_embeddings(ids).sum().backward()
        attacker.restore()
    assert fused.lm_head.weight.grad is not None
    assert ref.lm_head.weight.grad is None  # the seed drops it
    torch.testing.assert_close(fused.embeddings.word_embeddings.weight.grad, ref.embeddings.word_embeddings.weight.grad)


def training_loop(model, kind: str, backend: str | None, use_step: bool = False) -> list[float]:
    """The seed's usage code (fastadv.reference.fgm_step / pgd_step), or fastadv's ``step`` with ``use_step``, with
    fastadv's classes on ``backend`` or (None) the seed's; both unwrap ``.module``."""
    attacker = make_attacker(kind, nn.DataParallel(model), backend)
    return train(model, attacker, kind, momentum=0.9, use_step=use_step)


@pytest.mark.parametrize("use_step", [False, True], ids=["usage-code", "step"])
@pytest.mark.parametrize("kind", ["fgm", "pgd"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_training_loop_fp32(backend, seed, kind, tied, use_step):
    fused, ref = twins(tied=tied)
    got = training_loop(fused, kind, backend, use_step)
    want = training_loop(ref, kind, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(fused, ref)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_training_loop_half_precision(backend, seed, dtype, kind):
    """Whole loops in half precision, fastadv against the seed in the same dtype. The seed rounds after every op and
    fastadv once, and the optimizer compounds the differences, so parameters may differ by a few ulps of their
    magnitude (seen: up to 2); the bound is 4 ulps, with a floor at magnitude 0.05 for values near zero."""
    fused, ref = twins(dtype=dtype)
    got = training_loop(fused, kind, backend)
    want = training_loop(ref, kind, None)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=4 * ulp, atol=0.0)
    for a, b in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=4 * ulp, atol=4 * ulp * 0.05)


@pytest.mark.parametrize(
    ("kind", "k", "options"),
    [("fgm", None, {"eps": 1.0}), ("pgd", 1, {"eps": 0.1, "alpha": 0.3}), ("pgd", 3, {"eps": 0.1, "alpha": 0.3})],
    ids=["fgm", "pgd-k1", "pgd-k3"],
)
def test_step_matches_the_seeds_loop(backend, seed, kind, k, options):
    assert_step_matches_the_seed(kind, backend, k, **options)


def test_step_restores_weights_when_closure_raises(backend, seed):
    model = TinyEncoder()
    ids = batch()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return model(ids)

    with pytest.raises(KeyboardInterrupt):
        FusedPGD(model, backend=backend).step(closure, k=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n


def test_emb_name_passed_to_attack_and_restore(backend, seed):
    """Seed-style calls: the constructor's default name matches nothing, the calls name the parameter."""
    fused, ref, _ = twins_with_grads()
    fgm, oracle = FusedFGM(fused, backend=backend), FGM(ref)
    fgm.attack(emb_name="position_embeddings")
    oracle.attack(emb_name="position_embeddings")
    assert_same_params(fused, ref)
    fgm.restore(emb_name="position_embeddings")
    oracle.restore(emb_name="position_embeddings")
    assert_same_params(fused, ref)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_zero_and_nan_gradient_skip_like_the_seed(backend, seed, kind):
    def zero_and_nan(m, ids):
        m.embeddings.position_embeddings.weight.grad.zero_()
        m.embeddings.LayerNorm.weight.grad[3] = float("nan")

    fused, ref, _ = twins_with_grads(zero_and_nan)
    defaults = {"eps": 1.0} if kind == "fgm" else {"eps": 1.0, "alpha": 0.3}  # the classes' defaults
    for attacker in (
        make_attacker(kind, fused, backend, emb_name="embeddings", **defaults),
        make_attacker(kind, ref, emb_name="embeddings", **defaults),
    ):
        attacker.attack() if kind == "fgm" else attacker.attack(is_first_attack=True)
    assert_same_params(fused, ref)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_inf_gradient_is_skipped_and_counted(backend, seed, kind):
    """Deviation: the seed writes NaN into the embedding for an inf norm; fastadv skips that tensor and counts it."""

    def inf(m, ids):
        m.embeddings.word_embeddings.weight.grad[ids[0, 0], 0] = float("inf")

    fused, ref, _ = twins_with_grads(inf)
    before = fused.embeddings.word_embeddings.weight.detach().clone()
    attacker = (FusedFGM if kind == "fgm" else FusedPGD)(fused, emb_name="embeddings", backend=backend)
    with pytest.warns(RuntimeWarning, match="skipped"):
        attacker.attack() if kind == "fgm" else attacker.attack(is_first_attack=True)
    assert attacker.nonfinite_skips == 1
    assert torch.equal(fused.embeddings.word_embeddings.weight, before)
    assert not torch.equal(fused.embeddings.position_embeddings.weight, ref.embeddings.position_embeddings.weight)
    (FGM(ref) if kind == "fgm" else PGD(ref)).attack(
        "embeddings", **({} if kind == "fgm" else {"is_first_attack": True})
    )
    assert ref.embeddings.word_embeddings.weight.isnan().any()
    torch.testing.assert_close(fused.embeddings.position_embeddings.weight, ref.embeddings.position_embeddings.weight)


def test_tiny_gradients_whose_squares_underflow_are_still_applied(backend, seed):
    """Rows whose squares underflow in fp32 look all-zero to the scan; with a tiny total norm they still matter."""
    fused, ref = twins()
    for m in (fused, ref):
        grad = torch.zeros_like(m.embeddings.word_embeddings.weight)
        grad[3] = 1e-20
        grad[7] = 1e-24  # squares underflow to 0
        m.embeddings.word_embeddings.weight.grad = grad
    row = fused.embeddings.word_embeddings.weight[7].detach().clone()
    FusedFGM(fused, backend=backend).attack()
    FGM(ref).attack()
    assert not torch.equal(fused.embeddings.word_embeddings.weight[7], row)
    assert_same_params(fused, ref)


def test_restore_keeps_storage_and_is_bit_exact(backend, seed):
    model = TinyEncoder(tied=True)
    weight = model.embeddings.word_embeddings.weight
    ptr, original = weight.data_ptr(), weight.detach().clone()
    pgd = FusedPGD(model, eps=0.01, backend=backend)
    model(batch()).backward()
    for t in range(3):
        pgd.attack(is_first_attack=t == 0)
    assert not torch.equal(weight, original)
    pgd.restore()
    assert weight.data_ptr() == ptr
    assert model.embeddings.word_embeddings.weight is weight
    assert torch.equal(weight, original)


def test_backup_buffers_are_reused_across_steps(backend, seed):
    model = TinyEncoder()
    fgm = FusedFGM(model, backend=backend)
    ids = batch()
    model(ids).backward()
    fgm.attack()
    state = next(iter(fgm._rows._states.values()))
    buffers = (state._rows.data_ptr(), state._backup.data_ptr())
    fgm.restore()
    fgm.attack()
    fgm.restore()
    assert (state._rows.data_ptr(), state._backup.data_ptr()) == buffers
    assert not state.touched.any()
