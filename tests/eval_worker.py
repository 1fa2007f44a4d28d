"""A toy model, a toy stream and every eval variant, shared by tests/test_eval.py and run by it under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.eval_worker OUT.pkl
"""

from __future__ import annotations

import copy
import pickle
import sys

import numpy as np
import torch

from gpt.model import GPT, ModelConfig
from gpt.ttt import EvalLoop, TTTConfig

VOCAB, BOS, SEQ_LEN = 64, 1, 64
_SGD = dict(chunk_tokens=300, epochs=2, batch_seqs=3, lr=0.05)
_LORA = dict(lora_chunk=16, lora_docs=3, lora_rank=4, lora_lr=0.02)
VARIANTS = {
    "plain": dict(doc_isolation=False, stride=0, ttt=TTTConfig()),
    "sliding": dict(doc_isolation=False, stride=16, ttt=TTTConfig()),
    "isolated": dict(doc_isolation=True, stride=16, ttt=TTTConfig()),
    "sgd": dict(doc_isolation=False, stride=16, ttt=TTTConfig(method="sgd", **_SGD)),
    "sgd_isolated": dict(doc_isolation=True, stride=16, ttt=TTTConfig(method="sgd", **_SGD)),
    "lora": dict(doc_isolation=True, stride=16, ttt=TTTConfig(method="lora", **_LORA)),
    "phased": dict(doc_isolation=True, stride=16, ttt=TTTConfig(method="phased", phase_docs=8, phases=2,
                                                                 phase_lr=0.05, **_SGD, **_LORA)),
    # the 1.0611 record's adapters: per layer call on q, k, v, o and the MLP, and one on the output projection
    "phased_record": dict(doc_isolation=True, stride=16, ttt=TTTConfig(method="phased", phase_docs=8, phases=2,
                                                                        phase_lr=0.05, lora_layout="record",
                                                                        lora_head=True, **_SGD, **_LORA)),
}


def toy_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bos_id=BOS))
    for p in model.parameters():  # random weights everywhere, so no score is trivially equal
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def toy_stream(n_docs: int = 14, seed: int = 0) -> np.ndarray:
    """Documents of 4 to 150 tokens (some longer than a window), each opening with BOS; a repeated
    phrase gives test-time training something to learn."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(2, VOCAB, size=12)
    docs = []
    for _ in range(n_docs):
        body = np.concatenate([phrase if rng.random() < 0.5 else rng.integers(2, VOCAB, size=12)
                               for _ in range(rng.integers(1, 13))])[:rng.integers(3, 150)]
        docs.append(np.concatenate([[BOS], body]))
    return np.concatenate(docs).astype(np.int64)


def run_variant(name: str, tokens: np.ndarray | None = None, model: GPT | None = None, **kw) -> dict:
    model = copy.deepcopy(model or toy_model())
    tokens = toy_stream() if tokens is None else tokens
    args = {**VARIANTS[name], **kw}
    return EvalLoop(model, tokens, seq_len=SEQ_LEN, batch_seqs=4, device="cpu", bos_id=BOS, **args).run()


def main(out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {name: run_variant(name) for name in VARIANTS}
    # out of time after each rank's first group of documents: the rest scored without adapters, on its own rank
    results["lora_stop"] = run_variant("lora", budget_s=1e-4, on_budget="stop")
    if dist.get_rank() == 0:
        with open(out, "wb") as f:
            pickle.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
