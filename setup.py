"""Packaging lives in pyproject.toml; this file is the hook for the ahead-of-time C++/CUDA build (FASTADV_BUILD_EXT=1)
that the csrc/ backend adds."""

from setuptools import setup

setup()
