"""C++/CUDA sources of the ``ext`` backend, shipped as package data and compiled by ``fastadv.backends.ext_ops``."""
