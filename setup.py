"""Packaging lives in pyproject.toml; this file adds the optional ahead-of-time build of the C++/CUDA extension.

    FASTADV_BUILD_EXT=1 pip install --no-build-isolation .    # torch and setuptools>=77 installed first

builds ``fastadv._C`` (op schemas and CPU kernels) and, when a GPU is visible or FASTADV_BUILD_CUDA=1, also
``fastadv._C_cuda`` (CUDA kernels; needs nvcc, not a GPU). The flags, sources and CUDA settings are those of the
just-in-time build in fastadv/ext.py, which loads these libraries in preference to compiling. The CUDA library is
compiled for TORCH_CUDA_ARCH_LIST, else the visible GPUs, else fastadv.ext.DEFAULT_CUDA_ARCH (several GPU
generations and PTX for newer ones; each one adds to the build time), and the targets are recorded beside it in
``_C_cuda.targets``: fastadv/ext.py compiles just in time instead on a GPU that they don't cover. The CPU library uses
this machine's vector instructions (AVX2 on x86-64): set ATEN_CPU_CAPABILITY=default for one that runs anywhere.
Without FASTADV_BUILD_EXT nothing is compiled here; the extension is then built on first use.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _extension_build() -> dict:
    try:
        from torch.utils import cpp_extension
    except ImportError as err:
        raise SystemExit(
            "FASTADV_BUILD_EXT=1 needs torch at build time: pip install --no-build-isolation ... (torch installed)"
        ) from err
    import torch

    # fastadv/ext.py by path: the package itself can't be imported before it is installed
    spec = importlib.util.spec_from_file_location("_fastadv_ext_build", ROOT / "fastadv" / "ext.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)

    def relative(paths: list[Path]) -> list[str]:
        return [str(path.relative_to(ROOT)) for path in paths]

    include = [str(ext.source_dir())]
    modules = [
        cpp_extension.CppExtension(
            "fastadv._C",
            relative(ext.cpu_sources()),
            include_dirs=include,
            extra_compile_args={"cxx": ext.cpu_flags()},
            extra_link_args=["-fopenmp"],
        )
    ]
    targets: list[str] = []
    if torch.cuda.is_available() or os.environ.get("FASTADV_BUILD_CUDA") == "1":
        home = ext.cuda_home()
        if home is None:
            raise SystemExit("FASTADV_BUILD_CUDA: no CUDA toolkit (nvcc and headers) found; set CUDA_HOME")
        cpp_extension.CUDA_HOME = str(home)  # torch may have guessed it from a wrapper script named nvcc
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ext.cuda_arch_list())
        # the -gencode flags that BuildExtension adds, from TORCH_CUDA_ARCH_LIST (named architectures included)
        targets = ext.cuda_targets(cpp_extension._get_cuda_arch_flags(ext.CUDA_FLAGS))
        modules.append(
            cpp_extension.CUDAExtension(
                "fastadv._C_cuda",
                relative(ext.cuda_sources()),
                include_dirs=include + ext.cuda_include_dirs(),
                extra_compile_args={"cxx": ["-O3"], "nvcc": ext.CUDA_FLAGS},
            )
        )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's, then the CUDA library's targets written beside it (in place too, for editable installs)."""

        def run(self) -> None:
            super().run()
            if targets:
                record = Path(self.get_ext_fullpath("fastadv._C_cuda")).with_name(ext.CUDA_TARGETS_FILE)
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(" ".join(targets) + "\n")

    return {"ext_modules": modules, "cmdclass": {"build_ext": BuildExtension}}


setup(**(_extension_build() if os.environ.get("FASTADV_BUILD_EXT") == "1" else {}))
