"""rows="auto", the default: row hints wherever they are exact, a scan of the gradient elsewhere; the seed's results
either way, and never an error: where the hints turn out inexact, one warning and scans from then on."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _helpers import assert_same_params, make_attacker, train, twins
from conftest import DEVICE, TinyEncoder, batch

import fastadv._driver


class SecondUse(TinyEncoder):
    """The word embeddings also used outside their lookup: a penalty on rows 64..71, which the batches (ids below 64,
    see :func:`train`) never look up."""

    def __init__(self) -> None:
        super().__init__(vocab=72)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + 1e-2 * self.embeddings.word_embeddings.weight[64:].square().sum()


def pair(kind: str, model, backend: str, **options):
    """fastadv's attacker on ``model`` and the seed's on a copy of it, with that copy."""
    ref = copy.deepcopy(model)
    return make_attacker(kind, model, backend, **options), make_attacker(kind, ref, **options), ref


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
@pytest.mark.parametrize("micro_batches", [1, 2], ids=["plain", "accumulated"])
def test_default_takes_the_rows_from_the_lookups_and_matches_the_seed(backend, seed, kind, micro_batches):
    model = TinyEncoder()
    attacker, oracle, ref = pair(kind, model, backend)
    assert attacker._rows.rows == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact hints: no fallback, no warning
        got = train(model, attacker, kind, steps=3, micro_batches=micro_batches)
    want = train(ref, oracle, kind, steps=3, micro_batches=micro_batches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)
    assert attacker._rows.batch_rows.verified  # the hints were used, checked once


@pytest.mark.parametrize(("model", "emb_name"), [(TinyEncoder(tied=True), "word_embeddings"),
                                                 (TinyEncoder(), "embeddings")], ids=["tied-head", "layernorm-too"])
def test_targets_without_exact_hints_are_scanned_without_a_warning(backend, seed, model, emb_name):
    model = copy.deepcopy(model)
    hooks = dict(model.embeddings.word_embeddings._forward_pre_hooks)
    attacker, oracle, ref = pair("pgd", model, backend, emb_name=emb_name)
    assert attacker._rows.rows == "scan" and model.embeddings.word_embeddings._forward_pre_hooks == hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = batch(size=(3, 5))
        for a, m in ((attacker, model), (oracle, ref)):
            m(ids).backward()
            a.attack(is_first_attack=True)
    assert_same_params(model, ref)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_another_use_of_the_weight_warns_once_and_scans_from_then_on(backend, seed, kind):
    model = SecondUse()
    attacker, oracle, ref = pair(kind, model, backend)
    with pytest.warns(RuntimeWarning, match="rows='auto'.*no recorded lookup explains") as caught:
        got = train(model, attacker, kind, steps=3)
    assert len([w for w in caught if "rows='auto'" in str(w.message)]) == 1
    want = train(ref, oracle, kind, steps=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)
    assert attacker._rows.rows == "scan" and not model.embeddings.word_embeddings._forward_pre_hooks


def attack_with_set_gradients(attacker, oracle, model, ref) -> None:
    """One FGM attack (and restore) on gradients set by hand, no forward pass: the weights must match the seed's."""
    for m in (model, ref):
        m.zero_grad()
    grad = torch.zeros_like(model.embeddings.word_embeddings.weight)
    grad[torch.randint(0, 64, (9,), device=DEVICE)] = torch.randn(9, grad.shape[1], device=DEVICE)
    for a, m in ((attacker, model), (oracle, ref)):
        m.embeddings.word_embeddings.weight.grad = grad.clone()
        a.attack()
    assert_same_params(model, ref)
    attacker.restore()
    oracle.restore()


def test_built_after_the_forward_pass_scans_once_quietly_then_uses_the_hints(backend, seed):
    model, ref = twins()
    ids = batch()
    for m in (model, ref):
        m(ids).backward()
    attacker, oracle = make_attacker("fgm", model, backend), make_attacker("fgm", ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attacker.attack()  # no lookup recorded yet: this attack scans
        oracle.attack()
        assert_same_params(model, ref)
        attacker.restore()
        oracle.restore()
        model.zero_grad()
        ref.zero_grad()
        assert not attacker._rows.batch_rows.verified
        train(model, attacker, "fgm", steps=1)
        train(ref, oracle, "fgm", steps=1)
    assert attacker._rows.batch_rows.verified
    assert_same_params(model, ref)


def test_hooks_that_never_run_warn_once_and_scan(backend, seed):
    """As a model compiled before the attack object was built: the forward passes skip the hooks."""
    model = TinyEncoder()
    attacker, oracle, ref = pair("fgm", model, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attack_with_set_gradients(attacker, oracle, model, ref)  # could be a late build: quiet
    with pytest.warns(RuntimeWarning, match="rows='auto': no lookup .* was recorded"):
        attack_with_set_gradients(attacker, oracle, model, ref)
    assert attacker._rows.rows == "scan"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attack_with_set_gradients(attacker, oracle, model, ref)


def test_several_processes_are_scanned(backend, seed, monkeypatch):
    """Under DDP, FSDP or DeepSpeed the gradients are all-reduced: other ranks' rows, which no local lookup explains."""
    monkeypatch.setattr(fastadv._driver, "distributed", lambda: True)
    model = TinyEncoder()
    attacker, oracle, ref = pair("fgm", model, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, attacker, "fgm", steps=2)
    train(ref, oracle, "fgm", steps=2)
    assert_same_params(model, ref)
    assert attacker._rows.rows == "scan" and not model.embeddings.word_embeddings._forward_pre_hooks


def test_another_emb_name_is_scanned_and_the_hints_stay(backend, seed):
    model = TinyEncoder()
    attacker, oracle, ref = pair("fgm", model, backend)
    ids = batch()
    for a, m in ((attacker, model), (oracle, ref)):
        m(ids).backward()
        a.attack("position_embeddings")
    assert_same_params(model, ref)
    attacker.restore("position_embeddings")
    oracle.restore("position_embeddings")
    assert attacker._rows.rows == "auto" and attacker._rows.batch_rows is not None
