"""Triton kernels, one file per op, installed as gptfast.kernels."""
