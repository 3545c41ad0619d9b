"""Pallas TPU kernels for the image encoder's attention (placeholder)."""


def supports(size, head_dim) -> bool:
    return False
