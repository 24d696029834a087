"""Mixed precision: GradScaler-scaled gradients give the unscaled results, overflowed steps are skipped and counted
(never written into the weights), autocast training loops match the seed's."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE, TinyEncoder, batch
from test_parity import assert_same_params, twins, widened

from fastadv import FusedAWP, FusedFGM, FusedPGD
from fastadv.reference import AWP, FGM, PGD, awp_step, fgm_step, pgd_step

SCALE = 2.0**14  # a power of two: scaling is exact, so directions are exactly the unscaled ones


def make(kind: str, model, fused: bool, backend: str = "torch"):
    if kind == "fgm":
        return FusedFGM(model, eps=0.5, emb_name="embeddings", backend=backend) if fused else FGM(model, eps=0.5)
    if kind == "pgd":
        return (FusedPGD(model, eps=0.2, alpha=0.1, emb_name="embeddings", backend=backend) if fused
                else PGD(model, eps=0.2, alpha=0.1))
    return FusedAWP(model, adv_eps=0.02, backend=backend) if fused else AWP(model, adv_eps=0.02)


def attack(kind: str, attacker, fused: bool) -> None:
    if kind == "awp":
        attacker.attack()
    elif fused:
        attacker.attack() if kind == "fgm" else attacker.attack(is_first_attack=True)
    else:
        attacker.attack("embeddings") if kind == "fgm" else attacker.attack("embeddings", is_first_attack=True)


@pytest.mark.parametrize("kind", ["fgm", "pgd", "awp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_gradients_give_the_unscaled_attack(backend, seed, kind, dtype):
    """The oracle: the reference in fp32 on the same gradients unscaled (exactly, SCALE being a power of two)."""
    model = TinyEncoder(dtype=dtype)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=SCALE)
    scaler.scale(model(batch())).backward()
    oracle = widened(model)
    for p in oracle.parameters():
        p.grad /= SCALE
    attack(kind, make(kind, model, True, backend), True)
    attack(kind, make(kind, oracle, False), False)
    assert_same_params(model, oracle)


@pytest.mark.parametrize("kind", ["fgm", "pgd", "awp"])
def test_overflowed_step_is_skipped_counted_and_never_written(backend, seed, kind):
    """A GradScaler step whose gradients overflowed: the attack leaves the weights alone (the adversarial pass sees
    finite weights), counts the skip, and the scaler then skips the optimizer step and lowers its scale."""
    model = TinyEncoder()
    ids = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**24)  # too large for fp16 activation gradients
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen_finite = []

    def closure():
        seen_finite.append(all(torch.isfinite(p).all() for p in model.parameters()))
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            return scaler.scale(model(ids))

    attacker = make(kind, model, True, backend)
    with pytest.warns(RuntimeWarning, match="skipped"):
        if kind == "fgm":
            attacker.step(closure)
        elif kind == "pgd":
            attacker.step(closure, k=2)
        else:
            attacker.step(closure)
    assert all(seen_finite) and len(seen_finite) >= 2
    assert attacker.nonfinite_skips >= 1
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**24
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def autocast_loop(model, kind: str, fused: bool, backend: str, steps: int = 3) -> list[float]:
    """Training under ``torch.autocast`` with a GradScaler, the seed's usage loops around it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=SCALE)
    attacker = make(kind, model, fused, backend)
    if not fused and kind != "awp":  # the seed's default emb_name is word_embeddings; these tests attack more
        attacker.attack = functools.partial(attacker.attack, "embeddings")
        attacker.restore = functools.partial(attacker.restore, "embeddings")
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 6), device=DEVICE, generator=gen)

        def closure(ids=ids):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                return scaler.scale(model(ids))

        if kind == "fgm":
            loss = fgm_step(attacker, closure)
        elif kind == "pgd":
            loss = pgd_step(attacker, model, closure, 2)
        else:
            loss = awp_step(attacker, model, closure)
        losses.append(loss.item())
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return losses


@pytest.mark.parametrize("kind", ["fgm", "pgd", "awp"])
def test_autocast_training_loop_matches_the_seed(backend, seed, kind):
    fused, ref = twins()
    got = autocast_loop(fused, kind, True, backend)
    want = autocast_loop(ref, kind, False, backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_params(fused, ref)
