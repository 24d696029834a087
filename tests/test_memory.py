"""What the attack objects hold between steps: a backup of a whole weight (a tied embedding) is freed at restore;
backups of some rows keep their buffers, reused step after step. (Sizes and peaks are measured in the benchmarks.)"""

from __future__ import annotations

import torch
from _helpers import TinyEncoder, batch

from fastadv import FusedFGM, FusedPGD

NAME = "embeddings.word_embeddings.weight"


def test_a_backup_of_every_row_is_freed_at_restore(backend, seed):
    """Tied to the LM head, every row of the embedding has a gradient: its backup is the whole weight."""
    model = TinyEncoder(tied=True)
    before = model.embeddings.word_embeddings.weight.detach().clone()
    fgm = FusedFGM(model, backend=backend)
    model(batch()).backward()
    fgm.attack()
    state = fgm._rows._states[NAME]
    assert state.n_rows == state.param.shape[0] and state.backup.untyped_storage().nbytes() >= before.nbytes
    fgm.restore()
    assert state._backup.untyped_storage().nbytes() == 0 and state._rows.untyped_storage().nbytes() == 0
    assert torch.equal(model.embeddings.word_embeddings.weight, before)
    model.zero_grad()
    model(batch()).backward()
    fgm.attack()  # a new backup
    fgm.restore()
    assert torch.equal(model.embeddings.word_embeddings.weight, before)


def test_backups_of_some_rows_are_kept_and_reused(backend, seed):
    """Untied, a batch touches a few rows: the buffers stay, smaller than the weight, and the next steps on as many
    rows write into the same memory."""
    model = TinyEncoder(vocab=512)
    pgd = FusedPGD(model, backend=backend)
    ids = batch(vocab=512, size=(2, 4))
    addresses = set()
    for _ in range(3):
        model.zero_grad()
        pgd.step(lambda: model(ids), k=2)
        state = pgd._rows._states[NAME]
        assert 0 < len(state._backup) < state.param.shape[0]
        addresses.add(state._backup.data_ptr())
    assert len(addresses) == 1
