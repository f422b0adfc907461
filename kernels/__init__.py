"""Triton kernels, installed as `fasttrain.kernels`. Imports only torch and triton."""
