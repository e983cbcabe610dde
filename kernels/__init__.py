"""Fused Triton kernels for SafeInfer (steering, decoding mix), each beside its torch reference."""
