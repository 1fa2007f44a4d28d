"""The stages' one device rule: auto follows the machine, cuda without a GPU is an error naming the field."""

import pytest
import torch

from gpt.devices import resolve_device


def test_auto_and_cpu_resolve_here_and_a_missing_gpu_or_a_typo_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(RuntimeError, match="eval.device=cuda but no CUDA GPU"):
        resolve_device("cuda", "eval.device")
    with pytest.raises(ValueError, match="quantize.device='gpu'"):
        resolve_device("gpu", "quantize.device")


def test_under_torchrun_each_process_takes_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3) == resolve_device("cuda")
