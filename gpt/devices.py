"""Which torch device a stage runs on, from its ``device`` setting (auto | cuda | cpu).

Under torchrun each process takes the GPU of its LOCAL_RANK. Asking for cuda where none is visible is an
error naming the setting, not a silent fall back to the CPU.
"""

from __future__ import annotations

import os

import torch


def resolve_device(setting: str, field: str = "device") -> torch.device:
    if setting not in ("auto", "cuda", "cpu"):
        raise ValueError(f"{field}={setting!r}: use auto, cuda or cpu")
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{field}=cuda but no CUDA GPU is visible")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
