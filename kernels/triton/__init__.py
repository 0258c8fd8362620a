"""Triton kernels for the cuda target (run on CPU under TRITON_INTERPRET=1 in tests)."""
