"""Triton kernels of mae_fast, installed as ``mae_fast.kernels``.

Import them only through the ops in ``mae_fast.ops``, which validate inputs before any launch.
"""
