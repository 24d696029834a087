"""Mixed precision: GradScaler-scaled gradients give the unscaled results, overflowed steps are skipped and counted
(never written into the weights), autocast training loops match the seed's."""

from __future__ import annotations

import pytest
import torch
from _helpers import DEVICE, KINDS, TinyEncoder, assert_same_params, batch, make_attacker, train, twins, widened

SCALE = 2.0**14  # a power of two: scaling is exact, so directions are exactly the unscaled ones


def make(kind: str, model, backend: str | None = None):
    """fastadv's attack object on ``backend``, or (None) the seed's, on every embedding (AWP: every weight)."""
    return make_attacker(kind, model, backend, emb_name="embeddings")


def attack(kind: str, attacker) -> None:
    attacker.attack(is_first_attack=True) if kind == "pgd" else attacker.attack()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_gradients_give_the_unscaled_attack(backend, seed, kind, dtype):
    """The oracle: the reference in fp32 on the same gradients unscaled (exactly, SCALE being a power of two)."""
    model = TinyEncoder(dtype=dtype)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=SCALE)
    scaler.scale(model(batch())).backward()
    oracle = widened(model)
    for p in oracle.parameters():
        p.grad /= SCALE
    attack(kind, make(kind, model, backend))
    attack(kind, make(kind, oracle))
    assert_same_params(model, oracle)


@pytest.mark.parametrize("kind", KINDS)
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

    attacker = make(kind, model, backend)
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


def autocast_loop(model, kind: str, backend: str | None) -> list[float]:
    """Training under ``torch.autocast`` with a GradScaler, the seed's usage loops around it (PGD with 2 passes)."""
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=SCALE)

    def forward(ids):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return scaler.scale(model(ids))

    return train(
        model,
        make(kind, model, backend),
        kind,
        steps=3,
        k=2 if kind == "pgd" else None,
        seed=3,
        forward=forward,
        scaler=scaler,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_training_loop_matches_the_seed(backend, seed, kind):
    fused, ref = twins()
    got = autocast_loop(fused, kind, backend)
    want = autocast_loop(ref, kind, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_same_params(fused, ref)
