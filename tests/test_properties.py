"""Property tests: any shapes, dtypes and sparsity of the attacked tensors give the seed's result."""

from __future__ import annotations

import torch
from _helpers import BACKENDS, DEVICE, assert_matches, widened
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastadv import FusedAWP, FusedFGM, FusedPGD
from fastadv.reference import AWP, FGM, PGD

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

shapes = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 40), st.integers(1, 33)),  # matrices
        st.tuples(st.integers(1, 50)),  # 1-D, e.g. a LayerNorm weight
        st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3)),  # anything else is rows x the rest
    ),
    min_size=1,
    max_size=3,
)


def build(shape_list, dtype, density, seed):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for i, shape in enumerate(shape_list):
        weight = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        keep = torch.rand(shape[:1] + (1,) * (len(shape) - 1), generator=gen) < density
        grad = (torch.randn(shape, generator=gen) * keep).to(DEVICE, dtype)
        param = torch.nn.Parameter(weight)
        param.grad = grad
        model.register_parameter(f"word_embeddings_{i}", param)
    return model


common = dict(
    shape_list=shapes,
    dtype=st.sampled_from(DTYPES),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(BACKENDS),
)
fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(eps=st.floats(1e-3, 10.0), **common)
def test_fgm_any_shape(shape_list, dtype, density, seed, backend, eps):
    model = build(shape_list, dtype, density, seed)
    oracle = widened(model)
    original = [p.detach().clone() for p in model.parameters()]
    fgm = FusedFGM(model, eps=eps, backend=backend)
    fgm.attack()
    FGM(oracle, eps=eps).attack()
    for p, q in zip(model.parameters(), oracle.parameters()):
        assert_matches(p.detach(), q.detach())
    fgm.restore()
    for p, o in zip(model.parameters(), original):
        assert torch.equal(p, o)


def fresh_grads(model, density, gen):
    """A new gradient for every parameter, non-zero in a random subset of its rows (each row with ``density``)."""
    for p in model.parameters():
        keep = torch.rand(p.shape[:1] + (1,) * (p.dim() - 1), generator=gen) < density
        p.grad = (torch.randn(p.shape, generator=gen) * keep).to(DEVICE, p.dtype)


@fast
@given(eps=st.floats(1e-2, 3.0), alpha=st.floats(1e-2, 1.0), k=st.integers(1, 5), fresh=st.booleans(), **common)
def test_pgd_any_shape(shape_list, dtype, density, seed, backend, eps, alpha, k, fresh):
    """Each step against an fp32 reference step from fastadv's previous state, the restore bit-exact. With ``fresh``
    every later step brings a gradient with other non-zero rows, so it adds rows to the perturbed set and may complete
    it in any order; else the gradient is held fixed."""
    model = build(shape_list, dtype, density, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    origin = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    pgd = FusedPGD(model, eps=eps, alpha=alpha, backend=backend)
    for t in range(k):
        if t and fresh:
            fresh_grads(model, max(density, 0.3), gen)
        oracle = widened(model)
        reference = PGD(oracle, eps=eps, alpha=alpha)
        reference.emb_backup = {n: w.clone() for n, w in origin.items()}
        reference.attack(is_first_attack=False)
        pgd.attack(is_first_attack=t == 0)
        for p, q in zip(model.parameters(), oracle.parameters()):
            assert_matches(p.detach(), q.detach())
    pgd.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p.float(), origin[n])


@fast
@given(adv_eps=st.floats(1e-3, 1.0), k=st.integers(2, 4), **common)
def test_awp_rows_added_in_any_order(shape_list, dtype, density, seed, backend, adv_eps, k):
    """AWP's later attacks add rows the same way; the box is around the originals, the restore bit-exact."""
    model = build(shape_list, dtype, density, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    oracle = widened(model)
    original = [p.detach().clone() for p in model.parameters()]
    awp = FusedAWP(model, adv_param="word", adv_lr=0.1, adv_eps=adv_eps, backend=backend)
    reference = AWP(oracle, adv_param="word", adv_lr=0.1, adv_eps=adv_eps)
    for t in range(k):
        if t:
            fresh_grads(model, max(density, 0.3), gen)
            for p, q in zip(model.parameters(), oracle.parameters()):
                q.grad = p.grad.float().clone()
                q.data = p.detach().float().clone()  # the oracle steps from fastadv's state
        awp.attack()
        reference.attack()
        for p, q in zip(model.parameters(), oracle.parameters()):
            assert_matches(p.detach(), q.detach())
    awp.restore()
    for p, o in zip(model.parameters(), original):
        assert torch.equal(p, o)
