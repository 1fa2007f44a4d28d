"""Triton kernels for the training step, each with the plain-torch path it replaces beside it.

Importing this package needs torch alone: the kernel modules (``softcap_ce``, ``leaky_relu2``) import
triton, so callers reach them through ``triton_usable`` first. Training only: nothing here ships in
train_gpt.py's scoring program (shipping/assemble.py lists what does).
"""

from __future__ import annotations

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # missing, or built against another CUDA: the torch path serves
        return False
    return True


def use_triton(choice: str, device: torch.device) -> bool:
    """auto: triton on CUDA when it imports; triton: always (raises when it cannot import); torch: never.

    'triton' on a CPU device only works under TRITON_INTERPRET=1 (the tests' way to run the kernels)."""
    if choice == "torch":
        return False
    if choice == "triton":
        if not triton_importable():
            raise RuntimeError("train kernel 'triton' was asked for, but triton cannot be imported here")
        return True
    return device.type == "cuda" and triton_importable()
