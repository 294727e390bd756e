"""Triton kernels with their launchers and autograd.Functions, one op per file."""
