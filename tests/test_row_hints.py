"""rows="batch": the touched rows from the recorded embedding lookups instead of a scan of the gradient. Same results
as the seed, refused where it could be wrong (tied weights, other uses of the weight), on every backend."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from _helpers import TinyEncoder, assert_same_params, assert_step_matches_the_seed, batch, make_attacker, train, twins

from fastadv import FusedFGM, FusedPGD


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
@pytest.mark.parametrize("micro_batches", [1, 2], ids=["plain", "accumulated"])
def test_training_loop_matches_the_seed(backend, seed, kind, micro_batches):
    """The seed's usage loops with gradient accumulation over ``micro_batches``."""
    fused, ref = twins()
    attacker, oracle = make_attacker(kind, fused, backend, rows="batch"), make_attacker(kind, ref)
    got = train(fused, attacker, kind, seed=7, size=(3, 5), micro_batches=micro_batches)
    want = train(ref, oracle, kind, seed=7, size=(3, 5), micro_batches=micro_batches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(fused, ref)


def test_attack_touches_only_the_batch_rows(backend, seed):
    model = TinyEncoder()
    ids = batch(low=10)
    original = model.embeddings.word_embeddings.weight.detach().clone()
    fgm = FusedFGM(model, backend=backend, rows="batch")
    model(ids).backward()
    fgm.attack()
    changed = (model.embeddings.word_embeddings.weight != original).any(dim=1)
    assert torch.equal(changed.nonzero().view(-1), ids.unique())
    state = next(iter(fgm._rows._states.values()))
    assert state.n_rows == len(ids.unique())
    fgm.restore()
    assert torch.equal(model.embeddings.word_embeddings.weight, original)


def test_lookups_without_autograd_are_not_recorded(backend, seed):
    model = TinyEncoder()
    fgm = FusedFGM(model, backend=backend, rows="batch")
    ids = batch(size=(2, 3))
    with torch.no_grad():
        model(batch(size=(8, 8)))  # an evaluation pass: nothing to record
    model(ids).backward()
    fgm.attack()
    assert next(iter(fgm._rows._states.values())).n_rows == len(ids.unique())
    fgm.restore()


def test_lookups_by_keyword_are_recorded(backend, seed):
    model = TinyEncoder()
    fgm = FusedFGM(model, backend=backend, rows="batch")
    ids = batch()
    model.embeddings.word_embeddings(input=ids).sum().backward()
    fgm.attack()
    assert next(iter(fgm._rows._states.values())).n_rows == len(ids.unique())
    fgm.restore()


def test_hooks_go_with_the_attack_object():
    model = TinyEncoder()
    hooks = model.embeddings.word_embeddings._forward_hooks
    fgm = FusedFGM(model, rows="batch")
    checks = model.embeddings.word_embeddings.weight._backward_hooks  # the gradient check (provenance)
    assert len(hooks) == 1 and len(checks) == 1
    del fgm
    gc.collect()
    assert len(hooks) == 0 and len(checks) == 0


def test_tied_weight_is_refused():
    """Refused by the constructor, before any backend is involved: checked once (so are the checks around it)."""
    with pytest.raises(ValueError, match="tied"):
        FusedFGM(TinyEncoder(tied=True), rows="batch")


def test_parameter_that_is_not_an_embedding_weight_is_refused():
    with pytest.raises(ValueError, match="not an nn.Embedding"):
        FusedPGD(TinyEncoder(), emb_name="embeddings", rows="batch")


def test_bad_rows_value():
    with pytest.raises(ValueError, match="rows must be"):
        FusedFGM(TinyEncoder(), rows="every")


def assert_attack_refused_untouched(model: torch.nn.Module, fgm: FusedFGM, match: str) -> None:
    """``fgm.attack()`` raises (``match``) having modified no weight and no gradient, and leaves no attack active."""
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=match):
        fgm.attack()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(p.grad, grads[n]), n
    with pytest.raises(RuntimeError, match="without an active attack"):
        fgm.restore()


def test_other_use_of_the_weight_is_caught_on_the_first_attack(backend, seed):
    """A gradient the lookup does not explain (here a penalty on the whole weight): a clear error, nothing modified."""
    model = TinyEncoder()
    fgm = FusedFGM(model, backend=backend, rows="batch")
    (model(batch()) + 1e-3 * model.embeddings.word_embeddings.weight.square().sum()).backward()
    assert_attack_refused_untouched(model, fgm, "no recorded lookup")


def test_a_use_switched_on_later_is_an_error_at_the_first_attack_after_it(backend, seed):
    """A penalty on rows 150 and up (no batch looks them up), from the third attack on: that attack raises, having
    modified nothing; a scan would have perturbed those rows."""
    model = TinyEncoder(vocab=200)
    fgm = FusedFGM(model, backend=backend, rows="batch")
    penalty = False

    def loss(ids: torch.Tensor) -> torch.Tensor:
        extra = 1e-2 * model.embeddings.word_embeddings.weight[150:].square().sum() if penalty else 0
        return model(ids) + extra

    train(model, fgm, "fgm", steps=2, forward=loss)
    penalty = True
    model.zero_grad()
    loss(batch()).backward()
    assert_attack_refused_untouched(model, fgm, "rows='batch'.*no recorded lookup explains")


def test_attack_without_a_recorded_lookup(backend, seed):
    model = TinyEncoder()
    model(batch()).backward()
    fgm = FusedFGM(model, backend=backend, rows="batch")  # built after the forward pass: it saw no lookup
    with pytest.raises(RuntimeError, match="no lookup"):
        fgm.attack()
    model.zero_grad()
    model(batch()).backward()
    fgm.attack()  # the failed attack left nothing active
    fgm.restore()


def test_inf_gradient_is_skipped_and_counted(backend, seed):
    fused, ref = twins()
    ids = batch()
    fgm = FusedFGM(fused, backend=backend, rows="batch")
    for m in (fused, ref):
        m(ids).backward()
        m.embeddings.word_embeddings.weight.grad[ids[0, 0], 0] = float("inf")
    before = fused.embeddings.word_embeddings.weight.detach().clone()
    fgm.attack()
    with pytest.warns(RuntimeWarning, match="skipped"):
        assert fgm.nonfinite_skips == 1  # read lazily: counting it on the spot would take a second host sync
    assert torch.equal(fused.embeddings.word_embeddings.weight, before)
    fgm.restore()


def test_step_matches_the_seed(backend, seed):
    assert_step_matches_the_seed("pgd", backend, 3, eps=0.1, alpha=0.3, rows="batch")
