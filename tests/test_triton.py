"""What only the triton backend has; its ops against the contract are in the table of test_ops.py.

Its plan (one launch per dtype and vector width, bounded programs walking several row blocks), programs that walk
several blocks giving what one block each gives, listed rows outside the parameter, the tables of launches captured
into CUDA graphs, the restore kernel's float64 bits. Without a GPU the kernels run under ``TRITON_INTERPRET=1``; what
only the compiled kernels show (the instructions of the box and of the projection, registers and spills) is checked on
the sm_90 code that ``triton.compile`` generates without a GPU.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import subprocess
import sys
import weakref

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

triton_backend = pytest.importorskip("fastadv.backends.triton_ops", reason="triton does not import here")

import triton  # noqa: E402
from _helpers import (  # noqa: E402
    assert_matches,  # noqa: E402
    clones,
    input_step_args,
    make_tensors,
    nonzero_rows,
)

from fastadv.kernels import _common  # noqa: E402
from fastadv.kernels._common import col_block, plan, row_block  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not triton_backend.supports(DEVICE):
    pytest.skip(
        f"the triton backend does not run on {DEVICE} here (TRITON_INTERPRET is for CPU tensors)",
        allow_module_level=True,
    )

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (rows, cols, dtype) of the tensors in one call: dtype groups of 2, 3 and 1 tensors; (40, 130): two programs of 32
# rows, three 64-column chunks; (7, 1100): nine 128-column chunks; (1, 24) and (1, 1): 1-D parameters.
SPECS = [(40, 130, F32), (1, 24, BF16), (7, 1100, F16), (3, 5, F32), (1, 1, BF16), (20, 16, BF16)]


def make_case(density: float = 0.4, specs=SPECS):
    return make_tensors(specs, DEVICE, density)


def test_block_heuristics():
    assert col_block([768]) == 256  # three full chunks rather than a quarter-empty 1024 one
    assert col_block([4096]) == 1024 and col_block([1000]) == 1024 and col_block([5]) == 8
    assert row_block(256, 100_000) == 8 and row_block(1024, 1) == 1
    tensors = [torch.zeros(r, c, dtype=d) for r, c, d in SPECS]
    groups, first = plan(
        [t.dtype for t in tensors], [t.shape[1] for t in tensors], [t.shape[0] for t in tensors], [[t] for t in tensors]
    )
    # One launch per (dtype, vector width), whatever the list order: widths of 130, 1100 and 5 columns (or 1) allow
    # 2, 4 and 1 elements per access.
    assert [(g.key, g.meta["VEC"]) for g in groups] == [(F32, 2), (BF16, 8), (F16, 4), (F32, 1), (BF16, 1)]
    assert [g.members for g in groups] == [[0], [1, 5], [2], [3], [4]]
    assert first[-1] == sum(g.grid[0] for g in groups)


def test_an_odd_tensor_keeps_the_others_vectorised():
    """A ``[1, 3]`` bias or an offset view in the list gets its own launch, the aligned embedding keeps 16-byte
    accesses."""
    embedding = torch.empty(250002, 768, device="meta")
    bias = torch.zeros(1, 3)
    offset = torch.zeros(8, 65)[:, 1:]  # 4 bytes past an aligned address
    tensors = [embedding, bias, offset, torch.zeros(30, 768)]
    groups, _ = plan(
        [t.dtype for t in tensors], [t.shape[1] for t in tensors], [t.shape[0] for t in tensors], [[t] for t in tensors]
    )
    assert [(g.members, g.meta["VEC"]) for g in groups] == [([0, 3], 4), ([1, 2], 1)]


def test_programs_are_bounded_and_cover_every_block():
    """A 250002 x 768 tensor takes at most MAX_PROGRAMS programs of several row blocks each (not 31251 of one), so
    its per-tensor sum adds few partials; every row block belongs to exactly one program."""
    lengths = [250002, 514, 1]
    tensors = [torch.empty(n, 768, device="meta") for n in lengths]
    (group,), first = plan([F32] * 3, [768] * 3, lengths, [[t] for t in tensors])
    assert group.meta["BLOCK_M"] == 8 and group.blocks_per_program == 8
    assert first[-1] == group.grid[0] <= _common.MAX_PROGRAMS + len(lengths)
    for i, n in enumerate(lengths):
        blocks, programs = triton.cdiv(n, 8), first[i + 1] - first[i]
        assert (programs - 1) * group.blocks_per_program < blocks <= programs * group.blocks_per_program
    assert triton.cdiv(first[1] - first[0], _common._SEGMENT_BLOCK) <= 4  # steps of the per-tensor sum


def test_restore_moves_float64_as_pairs_of_words(seed):
    """The restore kernel copies bits, float64 (which the other kernels don't take) as pairs of 4-byte words, next to
    the dtypes of the table: any bit pattern comes back, in place, and no other row changes."""
    params, grads = make_case(specs=[(6, 10, torch.float64), (5, 7, F32), (1, 3, torch.float64)])
    rows = [nonzero_rows(g) for g in grads]
    ptrs = [p.data_ptr() for p in params]
    bits = [torch.int64 if p.dtype == torch.float64 else torch.int32 for p in params]
    backups = [
        torch.randint(torch.iinfo(k).min, torch.iinfo(k).max, (len(r), p.shape[1]), dtype=k, device=DEVICE)
        for p, r, k in zip(params, rows, bits, strict=True)
    ]
    untouched = clones(params)
    triton_backend.restore(params, rows, [b.view(p.dtype) for p, b in zip(params, backups, strict=True)])
    for p, r, b, k, u, ptr in zip(params, rows, backups, bits, untouched, ptrs, strict=True):
        assert p.data_ptr() == ptr
        assert torch.equal(p.view(k)[r], b)
        others = torch.ones(p.shape[0], dtype=torch.bool, device=DEVICE)
        others[r] = False
        assert torch.equal(p.view(k)[others], u.view(k)[others])


def test_programs_walking_several_blocks_match_one_block_each(seed, monkeypatch):
    """With few programs per launch each walks several row blocks, the last of a tensor fewer: the elementwise ops
    come out bit for bit as with one block per program, the sums as close as their order allows."""
    # (70, 1024): 35 blocks of 2 rows; with at most 4 programs, 10 blocks each, the last 5; (5, 1024): one program of
    # 3 blocks, the last half empty; (33, 256) bf16: its own launch.
    specs = [(70, 1024, F32), (5, 1024, F32), (33, 256, BF16)]
    params, grads = make_case(specs=specs)
    rows = [torch.arange(specs[0][0], device=DEVICE), torch.arange(specs[1][0], device=DEVICE), nonzero_rows(grads[2])]
    n_backed = [len(r) // 3 for r in rows]
    backups = [p[r] for p, r in zip(params, rows, strict=True)]
    scales = torch.tensor([0.05, 0.02, 0.05], device=DEVICE)
    touched = [torch.rand(g.shape[0], device=DEVICE) < 0.5 for g in grads]

    # One norm for the projection in both runs: the measured one differs across runs in its last bits, as sums may.
    norm = 4 * triton_backend.measure(clones(params), grads, rows, clones(backups), n_backed, scales)

    def run():
        ps, bs = clones(params), clones(backups)
        fresh = [torch.empty(g.shape[0], dtype=torch.bool, device=DEVICE) for g in grads]
        stats = triton_backend.scan(grads, touched, fresh, ps)
        sums = triton_backend.row_sumsq(ps, rows)
        boxed_ps, boxed_bs = clones(ps), clones(bs)
        triton_backend.perturb(boxed_ps, grads, rows, boxed_bs, n_backed, scales, 0.05)
        delta = triton_backend.measure(ps, grads, rows, bs, n_backed, scales)
        triton_backend.project(ps, grads, rows, bs, scales, norm, 0.3)
        triton_backend.restore(boxed_ps, rows, bs)
        return [stats, sums, delta], [fresh, boxed_bs, ps, bs, boxed_ps]

    sums_one, exact_one = run()
    monkeypatch.setattr(_common, "MAX_PROGRAMS", 4)
    groups, _ = plan(
        [p.dtype for p in params], [p.shape[1] for p in params], [len(r) for r in rows], [[p] for p in params]
    )
    assert groups[0].blocks_per_program == 10 and groups[0].grid == (5,)
    sums_few, exact_few = run()
    for a, b in zip(sums_few, sums_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0)
    for k, (a, b) in enumerate(zip(exact_few, exact_one, strict=True)):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), k


def test_listed_rows_outside_the_parameter_touch_nothing(seed):
    """A row index outside ``[0, rows)`` (the torch backend raises, the extension asserts) reads and writes nothing:
    not the memory around the parameter, not its backup entry; the rows inside come out as if listed alone."""
    n_rows, cols = 12, 40
    idx = torch.tensor([3, -1, n_rows, 7, 2**40, -(2**40), 0], device=DEVICE)
    inside = (idx >= 0) & (idx < n_rows)
    weights = torch.randn(n_rows, cols, device=DEVICE)
    grad = torch.randn(n_rows, cols, device=DEVICE)
    scales = torch.full((1,), 0.05, device=DEVICE)

    def fresh_case():
        """The parameter between two poisoned rows on each side, a poisoned backup for every listed row, and the
        same for the rows inside alone."""
        memory = torch.full((n_rows + 4, cols), math.nan, device=DEVICE)
        memory[2:-2] = weights
        alone = weights.clone()
        return (
            memory,
            memory[2:-2],
            torch.full((len(idx), cols), math.nan, device=DEVICE),
            alone,
            torch.full((int(inside.sum()), cols), math.nan, device=DEVICE),
        )

    def check(memory, param, backup, alone, alone_backup):
        assert memory[:2].isnan().all() and memory[-2:].isnan().all()
        assert backup[~inside].isnan().all()
        assert torch.equal(param, alone) and torch.equal(backup[inside], alone_backup)

    for box_eps in (None, 0.05):
        memory, param, backup, alone, alone_backup = fresh_case()
        triton_backend.perturb([param], [grad], [idx], [backup], [0], scales, box_eps)
        triton_backend.perturb([alone], [grad], [idx[inside]], [alone_backup], [0], scales, box_eps)
        check(memory, param, backup, alone, alone_backup)

    memory, param, backup, alone, alone_backup = fresh_case()
    delta = triton_backend.measure([param], [grad], [idx], [backup], [0], scales)
    alone_delta = triton_backend.measure([alone], [grad], [idx[inside]], [alone_backup], [0], scales)
    torch.testing.assert_close(delta, alone_delta, rtol=1e-6, atol=0.0)
    triton_backend.project([param], [grad], [idx], [backup], scales, delta, 0.01)
    triton_backend.project([alone], [grad], [idx[inside]], [alone_backup], scales, delta, 0.01)
    check(memory, param, backup, alone, alone_backup)

    torch.testing.assert_close(
        triton_backend.row_sumsq([param], [idx]), triton_backend.row_sumsq([alone], [idx[inside]]), rtol=1e-6, atol=0.0
    )
    backup = torch.randn(len(idx), cols, device=DEVICE)
    alone_backup = backup[inside]
    triton_backend.restore([param], [idx], [backup])
    triton_backend.restore([alone], [idx[inside]], [alone_backup])
    check(memory, param, backup.masked_fill(~inside[:, None], math.nan), alone, alone_backup)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"delta": torch.zeros(2, 3, 8, dtype=torch.float64)}, r"delta must be a contiguous \[B, T, D\] float32"),
        ({"delta": torch.zeros(2, 8, 3).transpose(1, 2)}, r"delta must be a contiguous \[B, T, D\] float32"),
        ({"grad": torch.zeros(2, 3, 8, dtype=BF16)}, "grad must be contiguous and of delta's shape and dtype"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, r"mask must be a bool \[B, T\] = \(2, 3\) tensor"),
        ({"norm": "linf"}, "norm must be one of l2, inf, sign"),
        ({"lr": math.inf}, "lr must be finite"),
        ({"denom_eps": 0.0, "denom_floor": 0.0}, "not both 0"),
        ({"radius": -1.0}, "radius must be finite and >= 0"),
    ],
)
def test_input_step_rejects_what_the_kernel_would_misread(change, complaint):
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in {**input_step_args(), **change}.items()}
    with pytest.raises(ValueError, match=complaint):
        triton_backend.input_step(**args)


class LaunchRecorder:
    """Stands in for the input_step kernel: records each launch's grid, phase and tile instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple[int, int, int]] = []

    def __getitem__(self, grid: tuple[int]):
        def launch(*args, PHASE, BLOCK_T, BLOCK_D):
            self.launches.append((grid[0], PHASE, BLOCK_T))

        return launch


@pytest.mark.parametrize(
    ("shape", "per_token", "bound", "launches"),
    [
        # FreeLB's default batch: 16 slices of 8 tokens per example, 512 programs (a program per example: 32)
        ((32, 128, 768), False, "l2", [(512, "NORM", 8), (512, "STEP", 8), (512, "SCALE", 8)]),
        ((32, 128, 768), False, "inf", [(512, "NORM", 8), (512, "STEP", 8)]),
        # one long example over 64 programs; a batch of them capped near MAX_PROGRAMS, 4 slices each (2 tokens of 4096)
        ((1, 512, 768), False, "none", [(64, "NORM", 8), (64, "STEP", 8)]),
        ((64, 512, 4096), False, "none", [(4096, "NORM", 2), (4096, "STEP", 2)]),
        # a group of one slice: every token, an example of at most 8 tokens of 768
        ((32, 128, 768), True, "l2", [(4096, "WHOLE", 1)]),
        ((32, 8, 768), False, "l2", [(32, "WHOLE", 8)]),
    ],
)
def test_input_step_spreads_examples_over_programs(monkeypatch, shape, per_token, bound, launches):
    from fastadv.kernels import input_step

    recorder = LaunchRecorder()
    monkeypatch.setattr(input_step, "_input_step_kernel", recorder)
    delta = torch.empty(shape, device="meta")
    input_step.input_step(delta, torch.empty_like(delta), None, 0.1, "l2", per_token, 1e-6, 1e-8, bound, 1.0)
    assert recorder.launches == [
        (grid, getattr(input_step, "_" + phase).value, block_t) for grid, phase, block_t in launches
    ]


def test_input_step_bits_do_not_depend_on_the_grid(seed, monkeypatch):
    """Examples of several slices (4 of 2 tokens at 1024 columns, the last one short), whatever the programs: one per
    slice, three slices each and a ragged last program, all four in one (MAX_PROGRAMS capped), an example alone: the
    same bits, and the torch backend's results (fp32 tight, bf16 one ulp)."""
    from fastadv.backends import torch_ops

    shape = (2, 7, 1024)
    mask = torch.arange(7, device=DEVICE) < torch.tensor([[7], [3]], device=DEVICE)
    modes = [("l2", "l2", True, F32), ("inf", "inf", False, BF16), ("sign", "l2", False, BF16)]
    for norm, bound, masked, dtype in modes:
        delta = (0.1 * torch.randn(shape, device=DEVICE)).to(dtype)
        grad = torch.randn(shape, device=DEVICE).to(dtype)
        m = mask if masked else None
        args = (0.3, norm, False, 1e-6, 1e-3, bound, 0.5)

        def run(cap: int, examples: slice = slice(None), delta=delta, grad=grad, m=m, args=args):
            monkeypatch.setattr(_common, "MAX_PROGRAMS", cap)
            out = delta[examples].clone()
            norms = triton_backend.input_step(
                out, grad[examples].contiguous(), None if m is None else m[examples], *args
            )
            return out, norms

        out, norms = run(4096)
        expected = delta.to(F32, copy=True)
        torch.testing.assert_close(norms, torch_ops.input_step(expected, grad.float(), m, *args), rtol=1e-5, atol=0)
        assert_matches(out, expected)
        bits = torch.int32 if dtype == F32 else torch.int16
        for cap, examples in [(3, slice(None)), (1, slice(None)), (4096, slice(1, 2))]:
            alone, alone_norms = run(cap, examples)
            assert torch.equal(alone.view(bits), out[examples].view(bits)), (norm, cap, examples)
            assert torch.equal(alone_norms, norms[examples]), (norm, cap, examples)


@pytest.mark.skipif(not _common.INTERPRETED, reason="compiled kernels assert only when built under TRITON_DEBUG=1")
def test_rows_outside_the_parameter_fail_the_debug_assertion(monkeypatch):
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    param, backup = torch.zeros(5, 8), torch.zeros(2, 8)
    triton_backend.restore([param], [torch.tensor([1, 4])], [backup])
    with pytest.raises(Exception, match="outside its parameter"):
        triton_backend.restore([param], [torch.tensor([1, 5])], [backup])


def test_tables_of_captured_launches_outlive_the_cache(monkeypatch):
    """A launch captured into a CUDA graph replays its table's address (and its copy the pinned buffer's) as long as
    the graph lives: the eager launches after it, with new row counts every step, must not evict and free them."""
    monkeypatch.setattr(_common, "_CAPTURED", [])

    def launch(step: int) -> torch.Tensor:  # a table as a launch builds it: a row count changes every step
        return _common.table([(1, 2, step)], DEVICE)

    eager = weakref.ref(launch(-1))
    monkeypatch.setattr(_common, "capturing", lambda device: True)
    captured = weakref.ref(launch(-2))
    params, _ = make_case(specs=SPECS[:3])
    triton_backend.restore(params, [torch.arange(len(p), device=DEVICE) for p in params], clones(params))
    assert len(_common._CAPTURED) == 1 + 3  # one table per launch: three vector-width groups
    monkeypatch.setattr(_common, "capturing", lambda device: False)
    for step in range(200):
        launch(step)
    gc.collect()
    assert eager() is None  # the cache lets eager tables go
    assert captured() is not None and captured().tolist() == [[1, 2, -2]]
    assert all(t.device.type == DEVICE.type and h.device.type == "cpu" for h, t in _common._CAPTURED)


# Every kernel variant compiled for sm_90 without a GPU (``triton.compile``, in a process without TRITON_INTERPRET),
# each with its PTX and what ptxas reports: ``{name: {"ptx": text, "registers": n, "spill_bytes": n}}`` on stdout.
_AOT_SCRIPT = r"""
import json, re, subprocess, sys, tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
try:
    from triton.backends.nvidia.compiler import get_ptxas

    @triton.jit
    def probe(x):
        tl.store(x, 1.0)

    triton.compile(ASTSource(probe, {"x": "*fp32"}), target=TARGET)
    PTXAS = get_ptxas(TARGET.arch).path
except Exception as err:
    print(f"triton.compile for sm_90 does not run here: {err!r}")
    sys.exit(3)

from fastadv.kernels import _common, input_step, perturb, restore, scan

TYPES = {"table": "*i64", "bounds": "*i64", "n": "i32", "blocks_per_program": "i32", "partials": "*fp32",
         "scales": "*fp32", "box_eps": "fp32", "delta_sumsq": "*fp32", "eps": "fp32", "mask": "*u8",
         "norms": "*fp32", "sizes": "*fp32", "tokens": "i32", "masked_tokens": "i32", "cols": "i32", "slices": "i32",
         "slices_per_program": "i32", "lr": "fp32", "denom_eps": "fp32", "denom_floor": "fp32", "radius": "fp32",
         "norm": "i32", "bound": "i32"}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
out = {}


# aligned: the arguments that a launch finds 16-byte aligned (pointers) or divisible by 16 (ints), as Triton specialises
# them: rows of 768 or 1024 elements, not of 130.
def build(name, fn, constexprs, aligned=(), **types):
    signature = {a: "constexpr" if a in constexprs else types.get(a) or TYPES[a] for a in fn.arg_names}
    src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    ptx = triton.compile(src, target=TARGET).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([PTXAS, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    out[name] = {"ptx": ptx, "registers": int(re.search(r"Used (\d+) registers", log)[1]),
                 "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill", log))}


for label, dtype in DTYPES.items():
    tile = {"NT": 1, "VEC": 16 // (dtype.primitive_bitwidth // 8), "BLOCK_M": 8, "BLOCK_N": 256}  # XLM-R's
    for has_params in (False, True):
        build(f"scan-{label}-params={has_params}", scan._scan_kernel,
              {"G_DTYPE": dtype, "P_DTYPE": dtype, "HAS_PARAMS": has_params, **tile})
    for stage, box in [("STEP", False), ("STEP", True), ("MEASURE", False), ("PROJECT", False), ("SUMSQ", False)]:
        build(f"rows-{label}-{stage}-box={box}", perturb._rows_kernel,
              {"P_DTYPE": dtype, "G_DTYPE": dtype, "STAGE": getattr(perturb, "_" + stage).value, "BOX": box, **tile})
    for phase in ("WHOLE", "NORM", "STEP", "SCALE"):  # a token of XLM-R's, else one of its examples' slices
        for aligned in ((), ("delta", "grad", "mask", "tokens", "cols")):
            build(f"input_step-{label}-{phase}-aligned={bool(aligned)}", input_step._input_step_kernel,
                  {"PHASE": getattr(input_step, "_" + phase).value, "BLOCK_T": 1 if phase == "WHOLE" else 8,
                   "BLOCK_D": 256}, aligned, delta=f"*{label}", grad=f"*{label}")
for size, bits in restore._BITS.items():
    build(f"restore-{size}", restore._restore_kernel, {"DTYPE": bits, "NT": 1, "VEC": max(1, 16 // size),
                                                       "BLOCK_M": 8, "BLOCK_N": 256})
for k, out_type in [(1, "*fp32"), (3, "*fp64")]:
    build(f"segment_sum-{k}", _common._segment_sum_kernel,
          {"K": k, "BLOCK_K": triton.next_power_of_2(k), "BLOCK": _common._SEGMENT_BLOCK}, out=out_type)
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """The sm_90 build of every variant (see ``_AOT_SCRIPT``); skips where triton.compile can't target sm_90."""
    script = tmp_path_factory.mktemp("sm90") / "build.py"  # triton.jit reads the source of what it compiles
    script.write_text(_AOT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_variant_compiles_for_sm90_without_spills(sm90):
    assert len(sm90) == 3 * (2 + 5 + 8) + 3 + 2
    assert not {name: v["spill_bytes"] for name, v in sm90.items() if v["spill_bytes"]}
    # The streaming kernels leave room for at least 3 programs of 4 warps per SM (65536 registers); the per-tensor
    # sum runs one program per tensor.
    assert max(v["registers"] for name, v in sm90.items() if not name.startswith("segment_sum")) <= 168


def _instructions(ptx: str, opcode: str) -> list[list[str]]:
    """The register operands of each ``opcode`` instruction (destination first)."""
    return [re.findall(r"%\w+", line) for line in ptx.splitlines() if line.split()[:1] == [opcode]]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_box_bounds_round_the_reach_first(sm90, dtype):
    """``d = fp32(box_eps * |B|)`` is its own ``mul.rn`` (never contracted), then ``B - d`` and ``B + d``: the box
    adds no fma to the step, and no fma reads ``d``."""
    box, plain = sm90[f"rows-{dtype}-STEP-box=True"]["ptx"], sm90[f"rows-{dtype}-STEP-box=False"]["ptx"]
    reaches = {ops[0] for ops in _instructions(box, "mul.rn.f32")}
    assert reaches
    fmas = _instructions(box, "fma.rn.f32")
    assert len(fmas) == len(_instructions(plain, "fma.rn.f32"))
    assert not any(reaches & set(ops[1:]) for ops in fmas)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_projection_is_correctly_rounded(sm90, dtype):
    """``sqrt`` and ``eps / norm`` correctly rounded, as in the extension: ``norm > eps`` decides alike everywhere."""
    ptx = sm90[f"rows-{dtype}-PROJECT-box=False"]["ptx"]
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    assert not re.search(r"sqrt\.approx|div\.(full|approx)|rcp\.approx", ptx)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_input_step_is_correctly_rounded(sm90, dtype):
    """input_step's step ``(g * lr) / denominator``, l2 norms and bound factor: correctly rounded divisions and square
    roots, as the torch backend and the extension compute them; the norm partials need neither."""
    for name, variant in sm90.items():
        if name.startswith(f"input_step-{dtype}-"):
            needs = name.split("-")[2] != "NORM"
            assert ("div.rn.f32" in variant["ptx"]) == needs and ("sqrt.rn.f32" in variant["ptx"]) == needs, name
            assert not re.search(r"sqrt\.approx|div\.(full|approx)|rcp\.approx", variant["ptx"]), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_input_step_reads_aligned_rows_in_16_byte_loads(sm90, dtype):
    """An example's slices of aligned rows (768, 1024 columns) are read and written 16 bytes at a time; odd rows
    element by element."""
    for phase in ("NORM", "STEP", "SCALE"):
        assert "ld.global.v4.b32" in sm90[f"input_step-{dtype}-{phase}-aligned=True"]["ptx"], phase
        assert "ld.global.v4" not in sm90[f"input_step-{dtype}-{phase}-aligned=False"]["ptx"], phase
    assert "st.global.v4.b32" in sm90[f"input_step-{dtype}-STEP-aligned=True"]["ptx"]
