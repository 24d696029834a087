"""Build and load fastadv's C++/CUDA extension: the kernels of the ``ext`` backend (sources in ``csrc/``).

Command line::

    python -m fastadv.ext build [--cpu] [--cuda] [--verbose]

builds (or finds in the cache) and loads the CPU library and, with ``--cuda``, the CUDA one (needs nvcc and a CUDA
build of torch, not a GPU), then prints what it loaded.

There are two shared libraries. The CPU one holds the op schemas (``torch.ops.fastadv.*``) and the CPU kernels and is
always needed; the CUDA one holds only the CUDA kernels and is loaded after it, so a machine without nvcc still gets
the CPU kernels. Each library comes from an ahead-of-time build (``fastadv._C`` / ``fastadv._C_cuda``, made by
``FASTADV_BUILD_EXT=1 pip install --no-build-isolation .``) when one is installed and loads, else it is compiled just
in time with ninja into ``<torch extensions dir>/fastadv/<name>``, where the name hashes the sources, the flags and the
torch/Python/CUDA versions: a cached build loads without running the compiler, and a stale one is never reused.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["ExtensionUnavailable", "load", "load_cpu", "load_cuda", "main"]

#: What nvcc compiles for when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: machine code for the A100 (8.0),
#: A10/RTX 30 (8.6), L4/L40/RTX 40 (8.9) and H100/H200 (9.0), and PTX that the driver compiles when it loads the
#: library on anything newer (B200, RTX 50). nvcc 13 has no Maxwell, Pascal or Volta targets (5.x to 7.2) any more.
DEFAULT_CUDA_ARCH = "8.0;8.6;8.9;9.0+PTX"

CUDA_FLAGS = ["-O3"]
_AOT_MODULES = {"cpu": "fastadv._C", "cuda": "fastadv._C_cuda"}
#: Beside the ahead-of-time CUDA library: the targets it was compiled for (:func:`cuda_targets`), one line.
CUDA_TARGETS_FILE = "_C_cuda.targets"

# What each load attempt gave, so that a failure is reported (and warned about) once and never retried.
_loaded: dict[str, str] = {}
_failed: dict[str, str] = {}
_warned = False


class ExtensionUnavailable(ImportError):
    """The extension could not be built or loaded here; the message says why."""


def source_dir() -> Path:
    """``csrc/``: beside the package in a checkout or an editable install, the ``fastadv.csrc`` package data in a wheel.

    Found without importing anything, so that setup.py can use this module before fastadv is installed.
    """
    here = Path(__file__).resolve().parent
    checkout = here.parent / "csrc"
    return checkout if (checkout / "common.h").exists() else here / "csrc"


def cpu_flags() -> list[str]:
    """Compiler flags of the CPU library.

    OpenMP because at::parallel_for is inline OpenMP code (without -fopenmp it runs serially). On x86-64, AVX2/FMA/F16C
    when torch reports this CPU has them (honouring ATEN_CPU_CAPABILITY): at::vec is 8-wide fp32 with hardware bf16/fp16
    conversion then, which is what lets scan run at memory speed; the generic at::vec is two to eight times slower. The
    flags are part of the JIT build's name, so a cache shared by different CPUs keeps one build per capability; for a
    portable ahead-of-time build set ATEN_CPU_CAPABILITY=default.
    """
    flags = ["-O3", "-fopenmp"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def cpu_sources() -> list[Path]:
    """The sources of the CPU library: the op schemas and the CPU kernels."""
    return sorted(source_dir().glob("*.cpp"))


def cuda_sources() -> list[Path]:
    """The sources of the CUDA library: the CUDA kernels only (the schemas come with the CPU library)."""
    return sorted(source_dir().glob("*.cu"))


def cuda_include_dirs() -> list[str]:
    """Header folders of the CUDA libraries that torch's CUDA headers include (cuBLAS, cuSPARSE, ...).

    The nvidia wheels installed beside torch ship them (e.g. ``site-packages/nvidia/cu13/include``); a CUDA toolkit
    without those libraries lacks them.
    """
    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted({str(header.parent) for header in nvidia.glob("*/include/cusparse.h")})


def _visible_capabilities() -> list[tuple[int, int]]:
    """The compute capabilities of the visible GPUs, each once, in order; none without a GPU."""
    if not torch.cuda.is_available():
        return []
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def cuda_arch_list() -> str:
    """What nvcc compiles for: TORCH_CUDA_ARCH_LIST, else the visible GPUs, else :data:`DEFAULT_CUDA_ARCH`."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    capabilities = _visible_capabilities()
    if capabilities:
        return ";".join(f"{major}.{minor}" for major, minor in capabilities)
    return DEFAULT_CUDA_ARCH


def cuda_targets(gencode_flags: list[str]) -> list[str]:
    """What nvcc's ``-gencode=arch=compute_XY,code=T`` flags put in a library: each ``T``, ``sm_XY`` (machine code) or
    ``compute_XY`` (PTX), sorted."""
    return sorted({flag.rsplit("code=", 1)[1] for flag in gencode_flags if "code=" in flag})


def runs_on(targets: list[str], capability: tuple[int, int]) -> bool:
    """Whether a library compiled for ``targets`` (as :func:`cuda_targets` names them) has code for a GPU of this
    compute capability: machine code of the same major version and an older or equal minor one (sm_80 runs on 8.6;
    sm_90a only on 9.0), or PTX of an older or equal capability, which the driver compiles for the GPU (compute_90 on
    10.0 and 12.0; compute_90a only on 9.0)."""
    for target in targets:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
        if match is None:
            continue
        kind, arch, suffix = match[1], (int(match[2]), int(match[3])), match[4]
        if suffix == "a":
            covered = capability == arch
        elif kind == "sm" or suffix == "f":
            covered = capability[0] == arch[0] and capability[1] >= arch[1]
        else:
            covered = capability >= arch
        if covered:
            return True
    return False


def _library_name(kind: str, sources: list[Path], flags: list[str]) -> str:
    """``fastadv_<kind>_<hash>``: the hash covers everything the binary depends on."""
    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.version, *flags):
        digest.update(part.encode())
    headers = [*source_dir().glob("*.h"), *(source_dir().glob("*.cuh") if kind == "cuda" else [])]
    for path in sorted({*sources, *headers}):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"fastadv_{kind}_{digest.hexdigest()[:12]}"


def _build_root() -> Path:
    """``<torch extensions dir>/fastadv``: torch's default (TORCH_EXTENSIONS_DIR, else the user cache), computed here so
    that loading a cached build does not import torch.utils.cpp_extension."""
    root: str | Path | None = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"
    return Path(root) / "fastadv"


def cuda_home() -> Path | None:
    """The CUDA toolkit: CUDA_HOME/CUDA_PATH, else the one of the nvcc on PATH, else /usr/local/cuda; the first that
    has nvcc and the runtime headers (a wrapper script /usr/local/bin/nvcc points at /usr/local, which has neither)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home)
    return None


def _check_toolchain(cuda: bool) -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ExtensionUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (set CXX or install g++)")
    if not cpp_extension.is_ninja_available():
        raise ExtensionUnavailable("ninja is not installed (pip install ninja)")
    if cuda:
        if torch.version.cuda is None:
            raise ExtensionUnavailable(f"torch {torch.__version__} is not a CUDA build")
        if cuda_home() is None:
            raise ExtensionUnavailable("no CUDA toolkit (nvcc and headers) found: set CUDA_HOME, e.g. /usr/local/cuda")


@contextlib.contextmanager
def _progress(directory: Path, sources: int, every: float = 20.0) -> Iterator[None]:
    """While the block compiles into ``directory``: a line on stderr every ``every`` seconds with the time so far and
    how many of the ``sources`` object files ninja has written."""
    done = threading.Event()
    start = time.monotonic()

    def report() -> None:
        while not done.wait(every):
            built = sum(1 for _ in directory.glob("*.o"))
            print(
                f"fastadv: still compiling ({time.monotonic() - start:.0f} s, {built} of {sources} sources compiled)",
                file=sys.stderr,
                flush=True,
            )

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _jit(kind: str, verbose: bool) -> str:
    """Compile (once) and load the ``kind`` library; returns its path."""
    cuda = kind == "cuda"
    sources = cuda_sources() if cuda else cpu_sources()
    flags = CUDA_FLAGS + [f"--arch-list={cuda_arch_list()}"] if cuda else cpu_flags()
    name = _library_name(kind, sources, flags)
    directory = _build_root() / name
    library = directory / f"{name}.so"
    complete = directory / "complete"  # written after a build succeeded: a library still being linked is not loaded
    if complete.exists():
        torch.ops.load_library(str(library))
        return str(library)
    _check_toolchain(cuda)
    what = "CUDA extension (once: 2-5 min)" if cuda else "C++ extension (once: about 2 min on 2 cores)"
    print(f"fastadv: building the {what} into {directory}...", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    # torch takes both from globals at build time, and guesses the toolkit wrong from a wrapper script named nvcc on
    # PATH (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local): set the checked ones for the build, then put them back
    saved = (cpp_extension.CUDA_HOME, os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if cuda:
        cpp_extension.CUDA_HOME = str(cuda_home())
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    try:
        with _progress(directory, len(sources)):
            cpp_extension.load(
                name=name,
                sources=[str(source) for source in sources],
                extra_cflags=None if cuda else flags,
                extra_cuda_cflags=CUDA_FLAGS if cuda else None,
                extra_ldflags=None if cuda else ["-fopenmp"],
                extra_include_paths=[str(source_dir()), *(cuda_include_dirs() if cuda else [])],
                build_directory=str(directory),
                with_cuda=cuda,
                is_python_module=False,
                verbose=verbose,
            )
        complete.touch()
        return str(library)
    except (RuntimeError, OSError, ImportError) as err:  # compiler and linker errors surface as RuntimeError
        raise ExtensionUnavailable(f"building the {kind} library failed ({name}): {err}") from err
    finally:
        cpp_extension.CUDA_HOME = saved[0]
        if saved[1] is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved[1]


def _ahead_of_time(kind: str) -> str | None:
    """Load the library that setup.py built (FASTADV_BUILD_EXT=1), if there is one that loads and, for the CUDA one,
    has code for every visible GPU; returns its path."""
    spec = importlib.util.find_spec(_AOT_MODULES[kind])
    if spec is None or spec.origin is None:
        return None
    if kind == "cuda":
        record = Path(spec.origin).with_name(CUDA_TARGETS_FILE)
        targets = record.read_text().split() if record.exists() else []
        capabilities = _visible_capabilities()
        missing = [f"{major}.{minor}" for major, minor in capabilities if not runs_on(targets, (major, minor))]
        if missing:  # its kernels would fail there with "no kernel image is available"
            held = " ".join(targets) or "no record of its targets"
            warnings.warn(
                f"fastadv: the prebuilt {spec.origin} has no code for compute capability {', '.join(missing)} (it "
                f"holds {held}); compiling for this machine's GPUs instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:  # e.g. built against another torch: fall back to the JIT build
        warnings.warn(
            f"fastadv: ignoring the prebuilt {spec.origin} ({err}); compiling instead", RuntimeWarning, stacklevel=3
        )
        return None
    return spec.origin


def _load(kind: str, verbose: bool, prebuilt: bool) -> str:
    if kind in _loaded:
        return _loaded[kind]
    if kind in _failed:
        raise ExtensionUnavailable(_failed[kind])
    try:
        path = (_ahead_of_time(kind) if prebuilt else None) or _jit(kind, verbose)
    except ExtensionUnavailable as err:
        _failed[kind] = str(err)
        raise
    _loaded[kind] = path
    return path


def load_cpu(verbose: bool = False, prebuilt: bool = True) -> str:
    """Load the CPU library (schemas and CPU kernels), building it on first use; returns its path.

    Raises :class:`ExtensionUnavailable` (an ImportError) with the reason when it can't be built or loaded.
    """
    return _load("cpu", verbose, prebuilt)


def load_cuda(verbose: bool = False, prebuilt: bool = True) -> str:
    """Load the CUDA library (after the CPU one), building it on first use; returns its path."""
    load_cpu(verbose, prebuilt)
    return _load("cuda", verbose, prebuilt)


def load(cuda: bool) -> dict[str, str]:
    """What the ``ext`` backend needs: the CPU library, and the CUDA one when ``cuda``; ``{kind: path}``.

    A CUDA library that can't be built only warns: the CPU kernels still work.
    """
    loaded = {"cpu": load_cpu()}
    if cuda:
        try:
            loaded["cuda"] = load_cuda()
        except ExtensionUnavailable as err:
            warn_unavailable(err, "on CUDA tensors the 'auto' backend falls back to triton or torch")
    return loaded


def warn_unavailable(err: Exception, consequence: str) -> None:
    """Warn, once per process, that the extension is missing and what is used instead."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fastadv: the C++ extension is unavailable: {err}; {consequence}", RuntimeWarning, stacklevel=3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastadv.ext", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or find in the cache) and load the libraries")
    build.add_argument("--cpu", action="store_true", help="the CPU library (always built: it holds the op schemas)")
    build.add_argument("--cuda", action="store_true", help="the CUDA library (needs nvcc and a CUDA torch, no GPU)")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    try:
        for kind in ("cpu", "cuda"):
            if kind == "cpu" or args.cuda:
                start = time.perf_counter()
                path = (load_cpu if kind == "cpu" else load_cuda)(verbose=args.verbose, prebuilt=False)
                print(f"fastadv: {kind} library loaded in {time.perf_counter() - start:.1f} s: {path}")
    except ExtensionUnavailable as err:
        print(f"fastadv: {err}", file=sys.stderr)
        return 1
    ops = ("scan", "row_sumsq", "perturb", "measure", "project", "restore", "input_step")
    print(f"fastadv: torch.ops.fastadv: {', '.join(op for op in ops if hasattr(torch.ops.fastadv, op))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
