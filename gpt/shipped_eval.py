"""The entry point of the code that ships with an artifact: decode the weights, score the val shards.

    python shipped_code.py --weights weights.bin --tokenizer tokenizer.model --val fineweb_val_*.bin \
        [--stride 64] [--doc-isolation] [--ttt '{"method": "sgd"}'] [--val-bytes fineweb_val_bytes_*.bin]
    torchrun --nproc_per_node=8 shipped_code.py ...     (the same eval spread over 8 GPUs)

It prints val_loss, val_bpb and the eval seconds. train_gpt.py (``program``) runs this when given arguments:
scoring a shipped weights.bin without training. The eval stage runs the same loop (ttt.EvalLoop), so it
reproduces the stage's score, test-time training included. Data tokenized through a text transform (CaseOps) is
scored on its original bytes: pass its byte sidecar (--val-bytes, the challenge's fineweb_val_bytes_*.bin), as
the records do.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from .bpb import bits_per_byte, piece_tables, token_bytes
from .distributed import start_distributed
from .model import GPT, ModelConfig
from .quant import decode_weights
from .shards import load_split
from .ttt import EvalLoop, TTTConfig, warm_up


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
    p.add_argument("--batch-seqs", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--doc-isolation", action="store_true", help="score each document with its own context only")
    p.add_argument("--ttt", default="{}", help='test-time training settings as JSON, e.g. {"method": "sgd"}')
    p.add_argument("--budget", type=float, default=600.0, help="eval seconds allowed (0 = no limit)")
    p.add_argument("--on-budget", default="fail", choices=("fail", "stop"))
    p.add_argument("--val-bytes", nargs="*", default=[], help="per-token byte sidecar shards (transformed text)")
    a = p.parse_args(argv)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    ranks = start_distributed(device)
    sp = spm.SentencePieceProcessor(model_file=a.tokenizer)
    tokens = load_split([Path(v) for v in a.val])
    if a.max_tokens:
        tokens = tokens[:a.max_tokens]
    t = time.perf_counter()
    model = load_model(Path(a.weights).read_bytes()).to(device)
    load_s = time.perf_counter() - t
    args = dict(seq_len=a.seq_len, stride=a.stride, batch_seqs=a.batch_seqs, device=device,
                doc_isolation=a.doc_isolation, ttt=TTTConfig(**json.loads(a.ttt)))
    warm_up(model, model.cfg.vocab_size, sp.bos_id(), min(len(tokens), 4 * a.seq_len), **args)
    res = EvalLoop(model, tokens, bos_id=sp.bos_id(), budget_s=a.budget, on_budget=a.on_budget, spent_s=load_s,
                   **args).run()
    nll = res["nll"]
    if a.val_bytes:  # the original text's bytes per token: the piece table would count the transformed text's
        n_bytes = int(load_split([Path(v) for v in a.val_bytes])[1:len(tokens)].astype("int64").sum())
    else:
        n_bytes = int(token_bytes(tokens[1:], piece_tables(sp), prev=tokens[:-1]).sum())
    result = {"val_loss": float(nll.mean()), "val_bpb": bits_per_byte(float(nll.sum()), n_bytes),
              "val_tokens": int(nll.size), "val_bytes": n_bytes,
              "eval_seconds": round(load_s + res["loop_seconds"], 3)}
    if ranks.rank == 0:
        print(json.dumps(result))
    ranks.close()
    return result


if __name__ == "__main__":
    main()
