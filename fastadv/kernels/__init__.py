"""Triton kernels of the fastadv ops, one module per op."""
