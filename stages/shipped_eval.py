"""The entry point of the code that ships with an artifact: decode the weights, score the val shards.

    python shipped_code.py --weights weights.bin --tokenizer tokenizer.model --val fineweb_val_*.bin

It prints val_loss and val_bpb. The quantize stage assembles this module with model, quant, bpb,
scoring and shards into one file and counts its compressed bytes as the artifact's code bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .bpb import bits_per_byte, piece_tables, token_bytes
from .model import GPT, ModelConfig
from .quant import decode_weights
from .scoring import score_stream
from .shards import load_split


def load_model(blob: bytes) -> GPT:
    state, meta = decode_weights(blob)
    model = GPT(ModelConfig(**meta["model_config"]))
    model.load_state_dict(state)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    import sentencepiece as spm
    p = argparse.ArgumentParser(description="score a golf artifact on val shards")
    p.add_argument("--weights", default="weights.bin")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--val", nargs="+", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stride", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=0)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(Path(a.weights).read_bytes()).to(device)
    tokens = load_split([Path(v) for v in a.val])
    if a.max_tokens:
        tokens = tokens[:a.max_tokens]
    nll = score_stream(model, tokens, a.seq_len, a.stride, device=device)
    n_bytes = int(token_bytes(tokens[1:], piece_tables(spm.SentencePieceProcessor(model_file=a.tokenizer)),
                              prev=tokens[:-1]).sum())
    result = {"val_loss": float(nll.mean()), "val_bpb": bits_per_byte(float(nll.sum()), n_bytes),
              "val_tokens": int(nll.size), "val_bytes": n_bytes}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
