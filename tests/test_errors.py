"""Bad input: a clear error raised before anything is modified; and the deviations from the seed that prevent loss.

Checks that fail before any backend op runs (argument and target validation, calls out of order) run once, with the
default backend; those that attack first run on every backend."""

from __future__ import annotations

import pytest
import torch
from _helpers import TinyEncoder, batch

from fastadv import FusedFGM, FusedPGD
from fastadv.reference import FGM, PGD


def snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    for n, p in model.named_parameters():
        weight, grad = before[n]
        assert torch.equal(p, weight), n
        assert (p.grad is None) == (grad is None), n
        if grad is not None:
            assert torch.equal(p.grad, grad), n


@pytest.fixture
def model(seed) -> TinyEncoder:
    m = TinyEncoder()
    m(batch()).backward()
    return m


@pytest.mark.parametrize(("cls", "name"), [(FusedFGM, "eps"), (FusedPGD, "eps"), (FusedPGD, "alpha")])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_eps_alpha(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(TinyEncoder(), **{name: value})


def test_no_matching_parameter_lists_candidates(backend, model):
    """At construction (before the clean pass, which would be wasted), and at an attack given another name."""
    before = snapshot(model)
    with pytest.raises(ValueError, match="tok_emb.*embeddings.word_embeddings.weight"):
        FusedFGM(model, emb_name="tok_emb", backend=backend)
    fgm = FusedFGM(model, backend=backend)
    with pytest.raises(ValueError, match="tok_emb.*embeddings.word_embeddings.weight"):
        fgm.attack(emb_name="tok_emb")
    assert_untouched(model, before)
    fgm.attack()  # nothing half-done: the object still works


def test_matched_parameter_without_grad(model):
    model.embeddings.position_embeddings.weight.grad = None
    before = snapshot(model)
    pgd = FusedPGD(model, emb_name="embeddings")
    with pytest.raises(RuntimeError, match="position_embeddings.weight.*no .grad.*backward"):
        pgd.attack(is_first_attack=True)
    assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="without an active attack"):
        pgd.restore()


@pytest.mark.parametrize("cls", [FusedFGM, FusedPGD])
def test_restore_without_attack(model, cls):
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="restore.*without an active attack"):
        cls(model).restore()
    assert_untouched(model, before)


def test_second_fgm_attack_before_restore(backend, model):
    """Deviation: the seed backs up the perturbed weights on a second attack and can never restore the originals."""
    before = snapshot(model)
    fgm = FusedFGM(model, backend=backend)
    fgm.attack()
    attacked = snapshot(model)
    with pytest.raises(RuntimeError, match="already active.*restore"):
        fgm.attack()
    assert_untouched(model, attacked)
    fgm.restore()
    assert_untouched(model, before)

    seed = FGM(model)
    seed.attack()
    seed.attack()
    seed.restore()
    assert not torch.equal(model.embeddings.word_embeddings.weight, before["embeddings.word_embeddings.weight"][0])


def test_pgd_first_attack_twice(backend, model):
    """Deviation: is_first_attack=True twice in the seed overwrites the backup with perturbed weights."""
    before = snapshot(model)
    pgd = FusedPGD(model, backend=backend)
    pgd.attack(is_first_attack=True)
    attacked = snapshot(model)
    with pytest.raises(RuntimeError, match="already active"):
        pgd.attack(is_first_attack=True)
    assert_untouched(model, attacked)
    pgd.restore()
    assert_untouched(model, before)

    seed = PGD(model)
    seed.attack(is_first_attack=True)
    seed.attack(is_first_attack=True)
    seed.restore()
    assert not torch.equal(model.embeddings.word_embeddings.weight, before["embeddings.word_embeddings.weight"][0])


def test_pgd_continue_without_first_attack(model):
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="is_first_attack=True"):
        FusedPGD(model).attack()
    assert_untouched(model, before)


def test_restore_with_other_emb_name(backend, model):
    fgm = FusedFGM(model, backend=backend)
    fgm.attack()
    with pytest.raises(ValueError, match="position_embeddings.*word_embeddings"):
        fgm.restore(emb_name="position_embeddings")
    fgm.restore(emb_name="word_embeddings")


def test_restore_grad_after_in_place_zeroing(backend, model):
    """zero_grad(set_to_none=False) zeroes the referenced clean gradients: fastadv refuses to return them."""
    pgd = FusedPGD(model, backend=backend)
    pgd.backup_grad()
    pgd.attack(is_first_attack=True)
    model.zero_grad(set_to_none=False)
    model(batch()).backward()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="modified in place.*set_to_none.*copy_grads=True"):
        pgd.restore_grad()
    assert_untouched(model, before)
    pgd.restore()


def test_copy_grads_supports_in_place_zeroing_like_the_seed(backend, seed):
    """The documented remedy for zero_grad(set_to_none=False): whole training steps (the clones' versions, not the
    gradients', are what is guarded) against the seed."""
    fused, ref = TinyEncoder(), TinyEncoder()
    ref.load_state_dict(fused.state_dict())
    batches = [batch() for _ in range(3)]
    grads = []
    for m, attacker in ((fused, FusedPGD(fused, backend=backend, copy_grads=True)), (ref, PGD(ref))):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        grads.append([])
        for ids in batches:
            m(ids).backward()
            attacker.backup_grad()
            for t in range(3):
                attacker.attack(is_first_attack=t == 0)
                if t != 2:
                    m.zero_grad(set_to_none=False)
                else:
                    attacker.restore_grad()
                m(ids).backward()
            attacker.restore()
            grads[-1].append([p.grad.clone() for p in m.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=False)
    for step_fused, step_ref in zip(*grads):
        for a, b in zip(step_fused, step_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_restore_grad_without_backup(model):
    with pytest.raises(RuntimeError, match="without backup_grad"):
        FusedPGD(model).restore_grad()


def test_sparse_gradient_is_refused(seed):
    model = torch.nn.Module()
    model.word_embeddings = torch.nn.Embedding(20, 4, sparse=True)
    model.word_embeddings(torch.tensor([1, 2, 2])).sum().backward()
    before = model.word_embeddings.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse=False"):
        FusedFGM(model).attack()
    assert torch.equal(model.word_embeddings.weight, before)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        FusedFGM(TinyEncoder(), backend="cuda-magic")


def test_backend_env_override(monkeypatch, model):
    monkeypatch.setenv("FASTADV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        FusedFGM(model)
    monkeypatch.setenv("FASTADV_BACKEND", "torch")
    fgm = FusedFGM(model)
    fgm.attack()
    assert next(iter(fgm._rows._backends.values())).__name__ == "fastadv.backends.torch_ops"
    fgm.restore()


def test_pgd_step_rejects_bad_k(model):
    before = snapshot(model)
    with pytest.raises(ValueError, match="k must be"):
        FusedPGD(model).step(lambda: model(batch()), k=0)
    assert_untouched(model, before)
