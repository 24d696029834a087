"""The benchmark CLI, ``python -m fastadv.bench``: what it needs is checked before it runs, ``--help`` documents every
option and the environment, every caption prints the shapes it used, and every table's columns align (red rows
included). Runs are tiny (``FASTADV_BENCH_SCALE=0.01``, ``--repeats 1``, few cases); timings are not looked at."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from fastadv import bench

SCALE = "0.01"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: A table's cell: words separated by single spaces (columns are two or more spaces apart).
CELL = re.compile(r"\S+(?: \S+)*")
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

#: Runs the CLI on few cases: two of BERT-base's (and, not --quick, the scan and the LLM cases), one method end to
#: end on a smaller BERT, with the targets checked as at full scale and stdout taken for a terminal, so that rows that
#: miss are red.
RUN = """
import functools, sys, torch
from fastadv import bench
bench.cases = lambda quick=False: [
    bench.Case("bert-base", torch.float32, "rows", "fgm"), bench.Case("bert-base", torch.bfloat16, "dense", "pgd3")
]
bench.E2E_HIDDEN, bench.E2E_BATCH, bench.E2E_PAD_FROM = 64, (4, 16), 12  # a smaller BERT and batch
bench.end_to_end = functools.partial(bench.end_to_end, methods=("fgm",))
bench.input_end_to_end = functools.partial(bench.input_end_to_end, methods=("r3f",))
bench.full_scale = lambda: True

class Terminal:
    def __init__(self, stream):
        self.stream = stream
    def write(self, text):
        return self.stream.write(text)
    def flush(self):
        self.stream.flush()
    def isatty(self):
        return True

sys.stdout = Terminal(sys.stdout)
sys.exit(bench.main(sys.argv[1:]))
"""


def _run(*argv: str) -> str:
    env = {**os.environ, "FASTADV_BENCH_SCALE": SCALE}
    done = subprocess.run(
        [sys.executable, "-c", RUN, *argv],
        env=env,
        cwd=ROOT,  # this checkout's fastadv
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def cases_output() -> str:
    """The output of a run of the cases (scan and LLM tables included) and, with transformers, of --e2e."""
    return _run("--repeats", "1", *(["--e2e"] if HAS_TRANSFORMERS else []))


@pytest.fixture(scope="module")
def bandwidth_output() -> str:
    return _run("--bandwidth", "--repeats", "1")


def tables(output: str) -> Iterator[list[str]]:
    """Each table printed: its header (the line above a rule of dashes) and its rows (down to a blank line),
    colour codes removed; the rule is checked as wide as the widest line."""
    lines = [ANSI.sub("", line) for line in output.splitlines()]
    for i, line in enumerate(lines):
        if i and line and set(line) == {"-"}:
            rows = []
            for row in lines[i + 1 :]:
                if not row.strip():
                    break
                rows.append(row)
            assert rows, f"a table without rows under {lines[i - 1]!r}"
            assert max(len(row) for row in [lines[i - 1], *rows]) == len(line), "the rule is not the table's width"
            yield [lines[i - 1], *rows]


def assert_aligned(table: list[str]) -> None:
    """Every row has the header's cells, and each column's cells start at one place (text, left-aligned) or end at
    one place (right-aligned); a column of numbers, header included, is right-aligned."""
    cells = [[(m.start(), m.end(), m.group()) for m in CELL.finditer(line)] for line in table]
    header = cells[0]
    for line, row in zip(table[1:], cells[1:]):
        assert len(row) == len(header), f"{len(row)} cells, the header {len(header)}:\n{table[0]}\n{line}"
    for j, name in enumerate(c[2] for c in header):
        column = [row[j] for row in cells]
        starts, ends = {c[0] for c in column}, {c[1] for c in column}
        if any(c[2][0].isdigit() for c in column[1:]):
            assert len(ends) == 1, f"column {name!r} of numbers is not right-aligned:\n" + "\n".join(table)
        else:
            assert len(starts) == 1 or len(ends) == 1, f"column {name!r} is ragged:\n" + "\n".join(table)


def test_table_pads_before_colouring() -> None:
    rows = [["fgm-bert-base-float32-rows", "seed", "12.50", "1.0x"], ["awp", "torch+batch", "0.05", "250.0x"]]
    lines = bench.table(["case", "impl", "ms/call", "vs seed"], rows, "<<>>", misses=[False, True], colour=True)
    assert lines[2] == ANSI.sub("", lines[2]), "a row that meets its target is not coloured"
    assert re.fullmatch(r"\x1b\[31m[^\x1b]*\x1b\[0m", lines[3]), (
        f"the codes are not around the padded row: {lines[3]!r}"
    )
    assert_aligned([ANSI.sub("", line) for line in lines[:1] + lines[2:]])
    assert len(ANSI.sub("", lines[3])) == len(lines[1]), "the red row is not padded as wide as the table"
    assert bench.table(["a"], [["x"]], "<", misses=[True], colour=False)[2] == "x", "no colour off a terminal"


@pytest.mark.slow  # a run of the CLI, seconds
def test_every_table_aligns(cases_output: str, bandwidth_output: str) -> None:
    found = list(tables(cases_output)) + list(tables(bandwidth_output))
    assert len(found) == 3 + 2 * HAS_TRANSFORMERS + 1, "\n".join(t[0] for t in found)
    for table in found:
        assert_aligned(table)


@pytest.mark.slow  # a run of the CLI, seconds
def test_red_rows_are_whole_lines(cases_output: str) -> None:
    """Colour codes only around whole rows (a row's cells padded first), never inside one."""
    for line in cases_output.splitlines():
        if "\x1b" in line:
            assert re.fullmatch(r"\x1b\[31m[^\x1b]*\x1b\[0m", line), repr(line)


@pytest.mark.slow  # a run of the CLI, seconds
def test_captions_print_the_shapes_used(
    cases_output: str, bandwidth_output: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTADV_BENCH_SCALE", SCALE)
    scaled = float(SCALE)
    for case in [*bench.llm_cases(), bench.Case("bert-base", torch.float32, "rows", "fgm")]:
        rows, dim, touched = case.size()
        assert f"{rows}x{dim}" in cases_output, case
        assert str(touched) in cases_output
    rows, dim = bench.SHAPES["xlm-r"]
    assert f"{int(rows * scaled)}x{dim}" in cases_output  # the scan's embedding
    assert f"{int(rows * scaled)}x{dim}" in bandwidth_output
    examples, tokens, hidden = bench.INPUT_STEP_SHAPE
    assert f"{examples}x{int(tokens * scaled)}x{hidden}" in bandwidth_output
    for nominal in ("250002", "30522", "128256"):  # the full-scale sizes appear nowhere
        assert nominal not in cases_output + bandwidth_output


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="--e2e needs transformers")
@pytest.mark.slow  # a run of the CLI, seconds
def test_e2e_header_prints_the_vocabulary_used(cases_output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTADV_BENCH_SCALE", SCALE)
    model, _ = bench._e2e_bert(torch.device("cpu"))
    vocab = model.get_input_embeddings().num_embeddings
    assert vocab == max(1000, int(bench.E2E_VOCAB * float(SCALE))) != bench.E2E_VOCAB
    captions = [line for line in cases_output.splitlines() if line.startswith(("end to end", "input space"))]
    assert len(captions) == 2, cases_output
    for caption in captions:
        assert f"vocabulary {vocab}," in caption, caption
        assert "hidden 64," in caption and "batch 4x16 tokens" in caption, caption  # RUN's smaller BERT
    assert "padded from token 12" in cases_output


def _no_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the bench ran before checking what its options need")


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [(["--plot", "speedups.png"], "matplotlib", "plot"), (["--e2e"], "transformers", "transformers")],
)
def test_missing_extra_exits_before_running(
    argv: list[str], module: str, extra: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    monkeypatch.setenv("FASTADV_BENCH_SCALE", SCALE)
    for name in ("time_case", "op_bandwidth", "end_to_end", "input_end_to_end", "scan_vs_read"):
        monkeypatch.setattr(bench, name, _no_run)
    with pytest.raises(SystemExit) as exited:
        bench.main(["--quick", "--repeats", "1", *argv])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert module in err and f'pip install -e ".[{extra}]"' in err, err


def test_plot_into_a_missing_folder_exits_before_running(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "time_case", _no_run)
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--plot", os.path.join(str(tmp_path), "missing", "speedups.png")])
    assert "no folder" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    case = bench.Case("bert-base", torch.float32, "rows", "fgm")
    results = [bench.Result(case, "seed", 2e-3), bench.Result(case, "torch", 1e-3), bench.Result(case, "ext", 5e-4)]
    path = os.path.join(str(tmp_path), "speedups.png")
    bench._plot(results, path, torch.device("cpu"))
    with open(path, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in capsys.readouterr().out


def _help_entries(text: str) -> dict[str, str]:
    """``--flag -> its help`` from the options section of argparse's help (whitespace joined)."""
    section = text.split("options:", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    flag = ""
    for line in section.splitlines():
        match = re.match(r"  (-\w|--[\w-]+)", line)
        if match:
            flag = re.findall(r"--[\w-]+", line)[0] if "--" in line else match.group(1)
            entries[flag] = line
        elif flag:
            entries[flag] += " " + line.strip()
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


def test_help_documents_every_option_and_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    entries = _help_entries(text)
    flags = {s for a in bench.build_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert flags <= set(entries), flags - set(entries)
    assert {"--quick", "--e2e", "--device", "--repeats", "--plot", "--compiled-seed", "--bandwidth"} <= flags
    for flag in flags:
        assert "(default:" in entries[flag] or "; default:" in entries[flag], f"{flag} does not say its default"
        assert len(entries[flag].split()) > 6, f"{flag} does not say what it does: {entries[flag]!r}"
    epilog = text.split("options:", 1)[1]
    for variable in ("FASTADV_BENCH_SCALE", "FASTADV_BACKEND"):
        assert re.search(rf"^  {variable} ", epilog, re.M), f"the epilog does not document {variable}"
    assert 'pip install -e ".[plot]"' in " ".join(entries["--plot"].split())


def test_repeats_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "at least 1" in capsys.readouterr().err
