"""Where an attack's rows come from (:class:`RowSource`): a scan of the gradient, or row hints (``rows="batch"``, and
``rows="auto"`` where they are exact): the rows of each target embedding looked up since the last attack, recorded by
forward hooks (:class:`BatchRows`), so an attack reads only those rows instead of scanning the whole gradient.

Hints are exact while every non-zero row of the gradient was looked up. Three checks keep that proved, each read at
the attack's one host sync (:meth:`RowSource.find`):

- a *scan* (the whole gradient) at the first attack, and at any attack before which a lookup went unrecorded or a
  backward pass gave the weight gradient that its lookup does not explain (the next two);
- *provenance*, per backward pass and free of reads: the autograd engine hands a leaf's gradient hook the one
  gradient it received as is, and a new tensor (the sum) when it received several. So the weight's gradient hook must
  see the very tensor that the autograd node of its one recorded lookup produced; another use of the weight in that
  backward (a decoder reading ``emb.weight``, an auxiliary loss) breaks that, and so do a second lookup, a user's hook
  that replaces the gradient, or a compiled model. Where a scan then finds the hints exact anyway, provenance is
  switched off for good (a model with two lookups per backward would otherwise scan every attack);
- a *sweep*: each attack also reads a slice of ``1/_SWEEP_ATTACKS`` of the gradient's rows (at least
  ``_SWEEP_MIN_ROWS``) and requires its non-zero rows to be looked up or already perturbed; the slice moves on, so
  every row is read once every ``_SWEEP_ATTACKS`` attacks. It sees what provenance cannot: gradients written outside
  autograd, rows left from lookups an earlier attack consumed, other uses after provenance was switched off. A dense
  other use (a tied decode) shows in the first slice; a sparse one that persists, within ``_SWEEP_ATTACKS`` attacks;
  a sparse one that comes and goes may be missed (see the README).
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.graph import Node

from fastadv._rows import RowState
from fastadv._sharding import Sharding, distributed
from fastadv._targets import NonfiniteSkips, StepTargets
from fastadv._util import user_stacklevel

#: How an attack finds its rows: ``"auto"`` (row hints where exact, else a scan), ``"scan"``, ``"batch"`` (hints).
ROWS = ("auto", "scan", "batch")

#: Every row of a hinted gradient is read once every this many attacks (the sweep).
_SWEEP_ATTACKS = 256
#: The sweep reads at least this many rows per attack (a small vocabulary is swept in a few attacks).
_SWEEP_MIN_ROWS = 32
#: Autograd nodes searched from an embedding's output back to its lookup (a scaled embedding, an added noise).
_LOOKUP_DEPTH = 4
#: Below this gradient sum of squares, a row whose squares all underflow to zero in fp32 (|g| < 4e-23) could still get
#: a perturbation above 1e-12 * eps, so the attack covers every row instead of the rows the scan found non-zero.
_UNDERFLOW_SUMSQ = 1e-20


class _Lookups:
    """What the hooks recorded since the last attack, by target weight name: the looked-up rows, which targets were
    looked up at all, which were looked up where nothing can be recorded, which got gradient that their recorded
    lookup does not explain; and each lookup gradient on its way to the weight's hook (``arrivals``: the backward
    pass it belongs to, and the tensor, or ``None`` for several)."""

    def __init__(self) -> None:
        self.masks: dict[str, Tensor] = {}
        self.seen: set[str] = set()
        self.unrecorded: set[str] = set()
        self.foreign: set[str] = set()
        self.arrivals: dict[str, tuple[int, Tensor | None]] = {}
        self.tracking = True  # provenance on


def _not_real(weight: Tensor) -> bool:
    """Whether a lookup runs where recording it would record garbage or be written into a trace: inside a functorch
    transform (``vmap``, ``grad``: the ids or the weight are wrapped), under fake tensors (a ``FakeTensorMode``, a
    fake weight) or a tracer (``make_fx``, ``torch.jit.trace``). ``torch.compile`` and ``torch.export`` are told apart
    before (see :class:`_LookupRecorder`); other dispatch modes (a FLOP counter) run on real tensors and record."""
    modes = torch._C._TorchDispatchModeKey
    return (
        torch._C._functorch.peek_interpreter_stack() is not None
        or torch._C._get_dispatch_mode(modes.FAKE) is not None
        or torch._C._get_dispatch_mode(modes.PROXY) is not None
        or torch.jit.is_tracing()
        or isinstance(weight, FakeTensor)
    )


def _lookup_node(node: Node, weight: Tensor) -> tuple[Node, int] | None:
    """The autograd node that passes a lookup's gradient to ``weight``, and that gradient's index among the node's
    outputs, from ``node``, the lookup's output's: that one, or one a few single-input steps up (a scaled embedding, a
    hook adding noise)."""
    for _ in range(_LOOKUP_DEPTH):
        edges = [(index, edge) for index, (edge, _) in enumerate(node.next_functions) if edge is not None]
        if len(edges) != 1:
            return None
        index, edge = edges[0]
        if getattr(edge, "variable", None) is weight:
            return node, index
        node = edge
    return None


class _LookupRecorder:
    """Forward hook of one target ``nn.Embedding``: flags the looked-up ids while autograd records (evaluation passes
    add nothing), and with provenance on, asks the lookup's autograd node for its gradient (:func:`_arrived`).
    Under ``torch.compile`` the recording is traced into the compiled graph; under ``torch.export`` nothing is.

    A copy (``copy.deepcopy`` or pickling of the model, ``torch.save``) is inert: it records nothing and refers to
    nothing of the original; an attack object copied with its model installs recorders of its own."""

    def __init__(self, name: str, lookups: _Lookups | None, weight: Tensor | None) -> None:
        self.name = name
        self.lookups = lookups
        self._weight = None if weight is None else weakref.ref(weight)  # the one that carries the gradient check

    def __reduce__(self) -> tuple:
        return _LookupRecorder, (self.name, None, None)

    def __deepcopy__(self, memo: dict) -> _LookupRecorder:
        return _LookupRecorder(self.name, None, None)

    def __call__(self, module: nn.Embedding, args: tuple, kwargs: dict, output: object) -> None:
        lookups = self.lookups
        ids = args[0] if args else kwargs.get("input")
        if lookups is None or ids is None or not torch.is_grad_enabled():
            return
        weight = module.weight
        if torch.compiler.is_compiling():
            if not torch.compiler.is_exporting():
                self._record(lookups, weight, ids)
            return
        if _not_real(weight):
            if not lookups.tracking:  # with provenance on, the gradient check sees whether this lookup gave gradient
                lookups.unrecorded.add(self.name)
            return
        self._record(lookups, weight, ids)
        if lookups.tracking:
            self._track(lookups, weight, output)

    def _record(self, lookups: _Lookups, weight: Tensor, ids: Tensor) -> None:
        mask = lookups.masks.get(self.name)
        if mask is None or mask.device != weight.device or len(mask) != weight.shape[0]:
            mask = lookups.masks[self.name] = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        mask.index_fill_(0, ids.reshape(-1).to(device=weight.device, dtype=torch.long), True)
        lookups.seen.add(self.name)

    def _track(self, lookups: _Lookups, weight: Tensor, output: object) -> None:
        node = output.grad_fn if isinstance(output, Tensor) else None
        if node is None:  # no autograd graph: no gradient will come from this lookup
            return
        found = _lookup_node(node, weight) if self._weight is not None and self._weight() is weight else None
        if found is None:  # not pairable (or the weight was rebound since the check was put on it): check it once
            lookups.foreign.add(self.name)
            return
        node, index = found
        node.register_hook(functools.partial(_arrived, lookups, self.name, index))


def _arrived(lookups: _Lookups, name: str, index: int, grad_inputs: tuple, grad_outputs: tuple) -> None:
    """Post-hook of a recorded lookup's autograd node: its gradient, for the weight's :class:`_GradientCheck` of the
    same backward pass (two lookups in one pass leave ``None``: not pairable). Holding the gradient also keeps the
    engine from summing another contribution into it in place, which would keep its identity; the check lets go of
    it before the weight's gradient is accumulated, which can then take it over without a copy."""
    grad = grad_inputs[index]
    if grad is None or not lookups.tracking:
        return
    task = torch._C._current_graph_task_id()
    earlier = lookups.arrivals.get(name)
    lookups.arrivals[name] = (task, None if earlier is not None and earlier[0] == task else grad)


class _GradientCheck:
    """Gradient hook of a target weight: the gradient of this backward pass must be its one recorded lookup's."""

    def __init__(self, name: str, lookups: _Lookups) -> None:
        self.name = name
        self.lookups = lookups

    def __call__(self, grad: Tensor) -> None:
        arrival = self.lookups.arrivals.pop(self.name, None)
        if arrival is None or arrival[1] is not grad:  # a stale arrival's tensor is never this one
            self.lookups.foreign.add(self.name)


def _hinted_modules(model: nn.Module, emb_name: str) -> tuple[list[tuple[str, nn.Embedding]], str | None]:
    """The ``nn.Embedding`` modules whose weights match ``emb_name``, and why row hints would not be exact for them
    (``None`` when they are): a matching weight that is no embedding's, or one shared with another module (a tied LM
    head), whose gradient reaches rows no lookup explains."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module_name or "<model>")
    embeddings = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    hinted = []
    for name, param in model.named_parameters():
        if not (param.requires_grad and emb_name in name):
            continue
        module = embeddings.get(name)
        if module is None:
            return [], (
                f"{name!r} (matching emb_name={emb_name!r}) is not an nn.Embedding's weight, so no lookup gives its"
                " rows"
            )
        if len(owners[id(param)]) > 1:
            return [], (
                f"{name!r} is shared by modules {', '.join(owners[id(param)])} (a tied LM head?), whose gradient"
                " reaches every row"
            )
        hinted.append((name, module))
    if not hinted:
        return [], f"no trainable nn.Embedding weight name contains emb_name={emb_name!r}"
    return hinted, None


def batch_rows(model: nn.Module, emb_name: str, *, required: bool) -> BatchRows | None:
    """Row hints for the weights matching ``emb_name``, or ``None`` where they would not be exact (with ``required``,
    ``rows="batch"``, an error saying why)."""
    hinted, blocker = _hinted_modules(model, emb_name)
    if blocker is None:
        return BatchRows(emb_name, hinted)
    if required:
        raise ValueError(f"rows='batch' records the ids of nn.Embedding lookups, but {blocker}; use rows='scan'")
    return None


class BatchRows:
    """The rows of each target embedding looked up since the last attack, recorded by forward hooks on its
    ``nn.Embedding`` (only where autograd records, so evaluation passes add nothing), and the checks that keep them
    exact (see the module's docstring): :meth:`needs_check` says when an attack must scan, :meth:`sweep` is the
    slice every other attack reads, :meth:`confirm` takes a scan's proof."""

    def __init__(self, emb_name: str, hinted: list[tuple[str, nn.Embedding]]) -> None:
        self.emb_name = emb_name
        self.lookups = _Lookups()
        self.verified = False  # a scan proved the hints (confirm)
        self._modules = hinted
        self._sweep_at: dict[str, int] = {}
        self._install()

    def _install(self) -> None:
        self._handles = [
            module.register_forward_hook(_LookupRecorder(name, self.lookups, module.weight), with_kwargs=True)
            for name, module in self._modules
        ]
        self._checks = (
            [module.weight.register_hook(_GradientCheck(name, self.lookups)) for name, module in self._modules]
            if self.lookups.tracking
            else []
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_checks"]  # handles into the weights' hook dicts, which may hold the user's unpicklable hooks
        return state

    def __setstate__(self, state: dict) -> None:
        """A copy (``copy.deepcopy``, pickling) of the attack object with its model: the copied model carries inert
        recorders (see :class:`_LookupRecorder`); replace them by live ones."""
        self.__dict__.update(state)
        self.lookups.arrivals.clear()
        for handle in self._handles:
            handle.remove()
        self._install()

    def needs_check(self, names: list[str]) -> bool:
        """Whether this attack must prove the recorded rows against a scan: the first one; any in which a target was
        not looked up at all (a forward pass that ran without the hooks would otherwise perturb nothing), or looked
        up where nothing is recorded; any after a backward pass whose gradient provenance did not explain."""
        lookups = self.lookups
        return not self.verified or any(
            name not in lookups.seen or name in lookups.unrecorded or name in lookups.foreign for name in names
        )

    def unpaired(self, names: list[str]) -> bool:
        """Whether provenance flagged any of ``names`` since the last attack (asked before :meth:`take`)."""
        return not self.lookups.foreign.isdisjoint(names)

    def confirm(self, *, unpaired: bool) -> None:
        """A scan found the hints exact (at an attack :meth:`needs_check` asked it for): from now on the sweep and
        provenance suffice; ``unpaired`` (provenance could not pair the gradients, :meth:`unpaired`) switches
        provenance off, which would only cost scans."""
        self.verified = True
        if unpaired:
            self.stop_tracking()

    def take(self, name: str, state: RowState) -> None:
        """Flag in ``state.fresh`` the rows looked up since the last call and not yet perturbed; forget them."""
        lookups = self.lookups
        for flags in (lookups.seen, lookups.unrecorded, lookups.foreign):
            flags.discard(name)
        lookups.arrivals.pop(name, None)  # one whose gradient hook never ran (a backward that skipped the weight)
        mask = lookups.masks.get(name)
        if mask is None or mask.shape != state.touched.shape:
            state.fresh.zero_()
            return
        torch.logical_and(mask, state.touched.logical_not(), out=state.fresh)
        mask.zero_()

    def sweep(self, step: StepTargets) -> Tensor:
        """float64 ``[n]``: the rows of this attack's slice of each gradient that are non-zero but neither looked up
        (``state.fresh``, after :meth:`take`) nor perturbed (``state.touched``); the next attack reads the next
        slice. One scan of the slices: about ``1/_SWEEP_ATTACKS`` of a full scan's reads."""
        slices, explained, found = [], [], []
        for name, grad, state in zip(step.names, step.grads, step.states):
            n_rows = len(state.touched)
            start = self._sweep_at.get(name, 0) % n_rows
            stop = min(start + max(_SWEEP_MIN_ROWS, -(-n_rows // _SWEEP_ATTACKS)), n_rows)
            self._sweep_at[name] = stop % n_rows
            slices.append(grad[start:stop])
            explained.append(state.fresh[start:stop] | state.touched[start:stop])
            found.append(torch.empty(stop - start, dtype=torch.bool, device=grad.device))
        return step.backend.scan(slices, explained, found)[:, 1]

    def stop_tracking(self) -> None:
        """Provenance off: a model it cannot pair (two lookups per backward, a hook that replaces the gradient, a
        compiled model) keeps the sweep, and a scan after any lookup that goes unrecorded."""
        self.lookups.tracking = False
        self.lookups.arrivals.clear()
        for handle in self._checks:
            handle.remove()
        self._checks = []

    @staticmethod
    def unexplained(missed: list[str], *, looked_up: set[str]) -> str:
        """Why gradients of ``missed`` have rows that no recorded lookup explains."""
        silent = [name for name in missed if name not in looked_up]
        if silent:
            return (
                f"no lookup of {', '.join(silent)} was recorded since the last attack, but its gradient has non-zero"
                " rows: the forward pass ran without fastadv's hook. A model compiled with torch.compile and run"
                " before this attack object was built keeps running without hooks added later. Build the attack"
                " object before the first forward pass of the compiled model"
            )
        return (
            f"the gradient of {', '.join(missed)} has non-zero rows that no recorded lookup explains (the weight is"
            " used elsewhere too: a decoder reading its .weight, an auxiliary loss; or a lookup ran where it cannot"
            " be recorded, inside a torch.func transform; or the ranks' gradients were all-reduced by DDP)"
        )

    def remove(self) -> None:
        self.stop_tracking()
        for handle in self._handles:
            handle.remove()


class RowSource:
    """How an attack object finds the rows to perturb (``rows``): a scan of the gradient (``"scan"``), the row hints
    (``"batch"``), or ``"auto"``: the hints where they are exact, kept checked at every attack (see the module's
    docstring), falling back to scans with one warning when they are not. The hooks go with this object."""

    def __init__(self, model: nn.Module, *, rows: str, emb_name: str | None) -> None:
        if rows not in ROWS:
            raise ValueError(
                f"rows must be 'auto' (row hints where exact, else a scan), 'scan' (from the gradient) or 'batch'"
                f" (the looked-up ids), got {rows!r}"
            )
        self.hints: BatchRows | None = None
        if rows != "scan" and emb_name is not None:
            self.hints = batch_rows(model, emb_name, required=rows == "batch")
        # rows="auto" scans where hints would not be exact (not an embedding's weight, a tied head)
        self.mode = rows if self.hints is not None else "scan"
        self._built_late = False  # rows="auto": the first attack found no lookup recorded at all
        self._remove_hooks_with_self()

    def _remove_hooks_with_self(self) -> None:
        if self.hints is not None:
            weakref.finalize(self, self.hints.remove)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._remove_hooks_with_self()

    def check_target(self, name_part: str) -> None:
        """``rows="batch"`` attacks only the embedding whose lookups it records."""
        if self.mode == "batch" and self.hints is not None and name_part != self.hints.emb_name:
            raise ValueError(
                f"rows='batch' records lookups of emb_name={self.hints.emb_name!r} (given to the constructor),"
                f" not {name_part!r}"
            )

    def hints_for(self, name_part: str, sharding: Sharding) -> BatchRows | None:
        """The row hints for this attack, or ``None`` to scan. ``rows="auto"`` scans other targets than the
        constructor's, and from now on scans sharded (FSDP2) or all-reduced (several processes) gradients."""
        if self.hints is None or name_part != self.hints.emb_name:
            return None
        if sharding.groups:
            if self.mode == "batch":
                raise RuntimeError("rows='batch' does not support sharded (FSDP2) parameters; use rows='scan'")
            self._stop_hints()
            return None
        if self.mode == "auto" and distributed():
            self._stop_hints()
            return None
        return self.hints

    def remove_hooks(self) -> None:
        """Take the row-hint hooks off the model; attacks scan from then on."""
        if self.hints is not None:
            self._stop_hints()

    def _stop_hints(self) -> None:
        assert self.hints is not None  # callers check
        self.hints.remove()
        self.hints, self.mode = None, "scan"

    def find(self, step: StepTargets, *, hints: BatchRows | None, reads_weights: bool, skips: NonfiniteSkips) -> Tensor:
        """Adds each target's new rows (pending) and returns the ``[n, 3]`` stats the step sizes come from: from
        ``hints`` (:meth:`hints_for`) where they prove exact, else from a scan (of the weights too with
        ``reads_weights``). A target whose norm is inf or NaN gets no rows and counts in ``skips``."""
        if hints is not None:
            stats = self._hinted(step, hints, skips)
            if stats is not None:
                return stats
        return _scanned(step, reads_weights=reads_weights, skips=skips)

    def _hinted(self, step: StepTargets, hints: BatchRows, skips: NonfiniteSkips) -> Tensor | None:
        """The recorded rows instead of a scan, and the gradient norms over those rows only (the skip decisions stay
        on the device, deferred in ``skips``). Proved at the same sync by a scan where :meth:`BatchRows.needs_check`
        asks for one, else by the sweep of a slice of the gradient. ``None`` when ``rows="auto"`` found the hints
        inexact: the caller scans, as every later attack will."""
        names, states = step.names, step.states
        check = hints.needs_check(names)
        unpaired = hints.unpaired(names)
        looked_up = set(hints.lookups.seen)
        for name, state in zip(names, states):
            hints.take(name, state)
        counts = torch.stack([s.fresh.sum() for s in states]).double()
        if check:  # every non-zero gradient row must be recorded (or perturbed already)
            scanned = [torch.empty_like(s.fresh) for s in states]
            step.backend.scan(step.grads, [s.touched for s in states], scanned)
            unexplained = torch.stack([(found & ~s.fresh).sum() for found, s in zip(scanned, states)]).double()
        else:  # the same, on this attack's slice of each gradient
            unexplained = hints.sweep(step)
        deferred = skips.deferred()
        host = torch.cat([counts, unexplained] + [flags.double() for flags in deferred]).tolist()  # the one host sync
        n = len(states)
        if deferred:
            skips.read(host[2 * n :])
        missed = [name for name, extra in zip(names, host[n : 2 * n]) if extra]
        if missed:
            self._inexact(hints, hints.unexplained(missed, looked_up=looked_up))
            return None
        if check:
            hints.confirm(unpaired=unpaired)
        for state, count in zip(states, host[:n]):
            state.add_fresh(int(count))
        grad_sumsq = step.backend.row_sumsq(step.grads, [s.rows for s in states])
        skips.defer(names, ~torch.isfinite(grad_sumsq))
        stats = torch.zeros(n, 3, dtype=torch.float64, device=grad_sumsq.device)
        stats[:, 0] = grad_sumsq
        return stats

    def _inexact(self, hints: BatchRows, reason: str) -> None:
        """The hints missed gradient rows (``reason``): an error for ``rows="batch"``; for ``"auto"`` a scan, quietly
        once where no lookup was recorded yet (built after the forward pass), else from now on with one warning."""
        if self.mode == "batch":
            raise RuntimeError(f"rows='batch': {reason}; use rows='scan'")
        if not (hints.lookups.masks or self._built_late):
            # no lookup since the hooks were added: likely built after this batch's forward pass; scan this
            # attack and check the hints again at the next (a compiled model stays silent: warned then)
            self._built_late = True
            return
        self._stop_hints()
        warnings.warn(
            f"rows='auto': {reason}. Row hints are not exact for this model, so this attack object scans"
            " the gradient from now on (pass rows='scan' to skip the hints and this warning)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def _scanned(step: StepTargets, *, reads_weights: bool, skips: NonfiniteSkips) -> Tensor:
    """The rows of a scan: each gradient's non-zero rows not perturbed yet, read with the one host sync."""
    states = step.states
    stats = step.backend.scan(
        step.grads, [s.touched for s in states], [s.fresh for s in states], step.weights if reads_weights else None
    )
    if step.sharding.groups:  # the sums of squares are global; the row counts stay local
        sums = stats[:, 0::2].contiguous()
        step.sharding.all_reduce(sums)
        stats[:, 0::2] = sums
    host = stats.tolist()  # the one host sync
    for name, state, (grad_sumsq, n_fresh, param_sumsq) in zip(step.names, states, host):
        if not (math.isfinite(grad_sumsq) and math.isfinite(param_sumsq)):
            skips.skip(name)
        elif grad_sumsq > 0:
            state.add_fresh(state.mark_all_fresh() if grad_sumsq < _UNDERFLOW_SUMSQ else int(n_fresh))
    return stats
