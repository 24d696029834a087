"""rows="auto", the default: row hints wherever they are exact, a scan of the gradient elsewhere; the seed's results
either way, and never an error: where the hints turn out inexact (at the first attack or any later one), one warning
and scans from then on; in a normal run, no warning and no scan after the first attack."""

from __future__ import annotations

import copy
import functools
import itertools
import warnings

import pytest
import torch
from _helpers import DEVICE, HALF, TinyEncoder, assert_same_params, batch, make_attacker, train, twins, widened
from torch import nn

import fastadv._hints
from fastadv._hints import _SWEEP_MIN_ROWS, BatchRows

#: What rows="auto" says when it finds rows that the hints do not explain.
FALLBACK = "rows='auto'.*no recorded lookup explains"


class SecondUse(TinyEncoder):
    """The word embeddings also used outside their lookup: a penalty on rows 64..71, which the batches (ids below 64,
    see :func:`train`) never look up."""

    def __init__(self) -> None:
        super().__init__(vocab=72)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + 1e-2 * self.embeddings.word_embeddings.weight[64:].square().sum()


class Scaled(nn.Embedding):
    """An embedding scaling its lookup, as BART's and M2M100's do: its output's autograd node is not the lookup's."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


class LateUses(TinyEncoder):
    """Its word embeddings' weight used outside their lookup once a test switches a use on: ``decode``, an MLM loss
    decoding the hidden states through ``weight.T`` (every row gets gradient); ``penalty``, an auxiliary loss on rows
    1000 and up, which no batch looks up (ids below 64, see :func:`train`) and which the sweep (from row 0,
    ``_SWEEP_MIN_ROWS`` rows an attack) does not reach in these tests. ``views=2`` looks every batch up twice (two
    views of it, as contrastive training does); ``scaled`` makes the word embeddings :class:`Scaled`."""

    def __init__(self, views: int = 1, scaled: bool = False, **kwargs) -> None:
        super().__init__(vocab=1100, **kwargs)
        if scaled:
            self.embeddings.word_embeddings = Scaled(1100, 16, device=DEVICE, dtype=kwargs.get("dtype"))
        self.views = views
        self.decode = self.penalty = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings.word_embeddings
        pos = self.embeddings.position_embeddings(torch.arange(ids.shape[1], device=ids.device))
        # the penalty before the lookup, the decode after it: the engine gets their gradients before and after the
        # lookup's, and must not sum either into the lookup's in place
        loss = 1e-2 * emb.weight[1000:].float().square().sum() if self.penalty else 0
        for view in (ids, ids.flip(1))[: self.views]:
            h = torch.tanh(self.hidden(self.embeddings.LayerNorm(emb(view) + pos)))
            loss = loss + nn.functional.cross_entropy(self.lm_head(h).float().flatten(0, 1), view.flatten())
            if self.decode:
                loss = loss + nn.functional.cross_entropy((h @ emb.weight.T).float().flatten(0, 1), view.flatten())
        return loss


def pair(kind: str, model, backend: str, **options):
    """fastadv's attacker on ``model`` and the seed's on a copy of it, with that copy."""
    ref = copy.deepcopy(model)
    return make_attacker(kind, model, backend, **options), make_attacker(kind, ref, **options), ref


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
@pytest.mark.parametrize("micro_batches", [1, 2], ids=["plain", "accumulated"])
def test_default_takes_the_rows_from_the_lookups_and_matches_the_seed(backend, seed, kind, micro_batches):
    model = TinyEncoder()
    attacker, oracle, ref = pair(kind, model, backend)
    assert attacker._rows.row_source.mode == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact hints: no fallback, no warning
        got = train(model, attacker, kind, steps=3, micro_batches=micro_batches)
    want = train(ref, oracle, kind, steps=3, micro_batches=micro_batches)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)
    assert attacker._rows.row_source.hints.verified  # the hints were used, checked once


@pytest.mark.parametrize(
    ("model", "emb_name"),
    [(TinyEncoder(tied=True), "word_embeddings"), (TinyEncoder(), "embeddings")],
    ids=["tied-head", "layernorm-too"],
)
def test_targets_without_exact_hints_are_scanned_without_a_warning(backend, seed, model, emb_name):
    model = copy.deepcopy(model)
    hooks = dict(model.embeddings.word_embeddings._forward_hooks)
    attacker, oracle, ref = pair("pgd", model, backend, emb_name=emb_name)
    assert attacker._rows.row_source.mode == "scan" and model.embeddings.word_embeddings._forward_hooks == hooks
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
    assert attacker._rows.row_source.mode == "scan" and not model.embeddings.word_embeddings._forward_hooks


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
        assert not attacker._rows.row_source.hints.verified
        train(model, attacker, "fgm", steps=1)
        train(ref, oracle, "fgm", steps=1)
    assert attacker._rows.row_source.hints.verified
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
    assert attacker._rows.row_source.mode == "scan"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attack_with_set_gradients(attacker, oracle, model, ref)


def test_several_processes_are_scanned(backend, seed, monkeypatch):
    """Under DDP, FSDP or DeepSpeed the gradients are all-reduced: other ranks' rows, which no local lookup explains."""
    monkeypatch.setattr(fastadv._hints, "distributed", lambda: True)
    model = TinyEncoder()
    attacker, oracle, ref = pair("fgm", model, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, attacker, "fgm", steps=2)
    train(ref, oracle, "fgm", steps=2)
    assert_same_params(model, ref)
    assert attacker._rows.row_source.mode == "scan" and not model.embeddings.word_embeddings._forward_hooks


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
    assert attacker._rows.row_source.mode == "auto" and attacker._rows.row_source.hints is not None


def switch_on(use: str, *models: LateUses) -> None:
    for model in models:
        setattr(model, use, True)


@pytest.fixture
def checks(monkeypatch) -> list[bool]:
    """What :meth:`BatchRows.needs_check` answered at each attack: ``True`` is a scan of the whole gradient."""
    answers = []
    needs_check = BatchRows.needs_check

    def spy(self, names: list[str]) -> bool:
        answers.append(needs_check(self, names))
        return answers[-1]

    monkeypatch.setattr(BatchRows, "needs_check", spy)
    return answers


@pytest.mark.parametrize(
    ("kind", "use", "scaled"),
    [
        ("fgm", "decode", False),
        ("fgm", "penalty", False),
        ("pgd", "decode", False),
        ("pgd", "penalty", False),
        ("fgm", "penalty", True),
    ],
)
def test_a_use_switched_on_later_warns_at_once_and_matches_the_seed(backend, seed, kind, use, scaled):
    """The decode is dense and the penalty sparse, out of the sweep's reach here: each is found at the first attack
    after the backward pass that used it (provenance, through a scaled lookup too), and that attack is a scan."""
    model = LateUses(scaled=scaled)
    attacker, oracle, ref = pair(kind, model, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train(model, attacker, kind, steps=3)
    want = train(ref, oracle, kind, steps=3)
    switch_on(use, model, ref)
    with pytest.warns(RuntimeWarning, match=FALLBACK) as caught:
        got += train(model, attacker, kind, steps=1, seed=5)
        assert attacker._rows.row_source.mode == "scan"
        got += train(model, attacker, kind, steps=2, seed=6)
    assert len([w for w in caught if "rows='auto'" in str(w.message)]) == 1
    want += train(ref, oracle, kind, steps=1, seed=5) + train(ref, oracle, kind, steps=2, seed=6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)


def test_a_use_switched_on_between_two_pgd_attacks_is_found_by_the_second(backend, seed):
    """The penalty starts with the first adversarial pass of the fourth step: the attack after it continues a
    hinted first attack, and is a scan."""
    model = LateUses()
    attacker, oracle, ref = pair("pgd", model, backend)

    def forward(m: LateUses, calls: itertools.count, ids: torch.Tensor) -> torch.Tensor:
        m.penalty = m.penalty or next(calls) == 3 * 4 + 1  # four passes a step: clean, then one per attack
        return m(ids)

    with pytest.warns(RuntimeWarning, match=FALLBACK):
        got = train(model, attacker, "pgd", steps=5, forward=functools.partial(forward, model, itertools.count()))
    want = train(ref, oracle, "pgd", steps=5, forward=functools.partial(forward, ref, itertools.count()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)


@pytest.mark.parametrize("use", ["decode", "penalty"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_attack_that_finds_a_later_use_is_the_seeds_within_one_ulp(backend, seed, dtype, use):
    model = LateUses(dtype=dtype)
    attacker = make_attacker("fgm", model, backend)
    for _ in range(2):  # the first attack proves the hints, the second uses them
        model.zero_grad()
        model(batch()).backward()
        attacker.attack()
        attacker.restore()
    switch_on(use, model)
    model.zero_grad()
    model(batch()).backward()
    wide = widened(model)
    with pytest.warns(RuntimeWarning, match=FALLBACK):
        attacker.attack()
    make_attacker("fgm", wide).attack()
    assert_same_params(model, wide)


class GradientEdit:
    """A post-accumulate-grad hook on the word embeddings' weight: from ``start`` on, adds ``value`` to ``rows`` of
    each gradient accumulated into it, as gradient surgery outside autograd does (provenance cannot see it)."""

    def __init__(self, model: nn.Module, rows: slice) -> None:
        self.rows, self.on = rows, False
        model.embeddings.word_embeddings.weight.register_post_accumulate_grad_hook(self)

    def __call__(self, weight: nn.Parameter) -> None:
        if self.on:
            weight.grad[self.rows] += 1e-3


def test_the_sweep_finds_a_dense_gradient_written_outside_autograd_at_once(backend, seed):
    """Batches of 12 ids: the hinted rows (two passes' lookups) cannot fill the sweep's slice of 32 rows."""
    model = LateUses()
    attacker, oracle, ref = pair("fgm", model, backend)
    edits = [GradientEdit(m, slice(None)) for m in (model, ref)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, attacker, "fgm", steps=2, size=(2, 6))
    train(ref, oracle, "fgm", steps=2, size=(2, 6))
    for edit in edits:
        edit.on = True
    with pytest.warns(RuntimeWarning, match=FALLBACK):
        train(model, attacker, "fgm", steps=1, seed=5, size=(2, 6))
        assert attacker._rows.row_source.mode == "scan"
    train(ref, oracle, "fgm", steps=1, seed=5, size=(2, 6))
    assert_same_params(model, ref)


def test_the_sweep_finds_a_sparse_gradient_written_outside_autograd_within_its_period(backend, seed):
    """One row out of 1100, written from the third attack on: the sweep's slices reach it within 1100 / 32 attacks
    (every attack until then perturbs the hinted rows with the wrong norm: what the sweep bounds)."""
    model = LateUses()
    attacker = make_attacker("fgm", model, backend)
    edit = GradientEdit(model, slice(1099, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, attacker, "fgm", steps=2)
    edit.on = True
    with pytest.warns(RuntimeWarning, match=FALLBACK):
        for attacks in range(1, -(-1100 // _SWEEP_MIN_ROWS) + 1):
            train(model, attacker, "fgm", steps=1, seed=attacks)
            if attacker._rows.row_source.mode == "scan":
                break
    assert attacker._rows.row_source.mode == "scan" and attacks > 1  # not by chance at the first: by the sweep's slice


def test_two_lookups_per_backward_pass_keep_the_hints_and_the_sweep(backend, seed, checks):
    """Provenance cannot pair two lookups' gradients: the first attack's scan proves the hints anyway and provenance
    goes off, quietly, without a scan at every attack; a dense use switched on later is then found by the sweep."""
    model = LateUses(views=2)
    attacker, oracle, ref = pair("pgd", model, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = train(model, attacker, "pgd", steps=3)
    want = train(ref, oracle, "pgd", steps=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    hints = attacker._rows.row_source.hints
    assert hints.verified and not hints.lookups.tracking and attacker._rows.row_source.mode == "auto"
    assert checks == [True] + [False] * 8
    switch_on("decode", model, ref)
    with pytest.warns(RuntimeWarning, match=FALLBACK):
        train(model, attacker, "pgd", steps=1, seed=5)
        assert attacker._rows.row_source.mode == "scan"
    train(ref, oracle, "pgd", steps=1, seed=5)
    assert_same_params(model, ref)


class Padded(TinyEncoder):
    """Looked-up rows whose gradient is zero: id 0 is the padding index, and positions holding id 1 are masked out
    (an attention mask would zero them too); ids taken modulo 16, so most ids repeat within a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings.word_embeddings = nn.Embedding(64, 16, padding_idx=0, device=DEVICE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids % 16
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.embeddings.word_embeddings(ids) * (ids != 1).unsqueeze(-1) + self.embeddings.position_embeddings(pos)
        h = torch.tanh(self.hidden(self.embeddings.LayerNorm(h)))
        return nn.functional.cross_entropy(self.lm_head(h).flatten(0, 1), ids.flatten())


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_a_long_normal_run_keeps_the_hints_quietly_and_scans_only_once(backend, seed, kind, checks):
    """Zero-gradient rows in the batch, repeated ids, micro-batches, evaluation passes between the steps, the sweep
    wrapping around the vocabulary many times: no warning, provenance stays on, no scan after the first attack."""
    model = Padded()
    attacker, oracle, ref = pair(kind, model, backend)
    got, want = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(8):
            got += train(model, attacker, kind, steps=1, micro_batches=2, seed=step)
            want += train(ref, oracle, kind, steps=1, micro_batches=2, seed=step)
            for m in (model, ref):  # an evaluation pass: nothing recorded, nothing to check
                m.eval()
                with torch.no_grad():
                    m(batch(size=(8, 8)))
                m.train()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref)
    assert checks == [True] + [False] * (8 * 2 * (3 if kind == "pgd" else 1) - 1)
    assert attacker._rows.row_source.mode == "auto" and attacker._rows.row_source.hints.lookups.tracking
