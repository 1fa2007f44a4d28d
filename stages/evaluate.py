"""eval: val_bpb of the artifact alone (decoded as an evaluator would), and of the pre-quantization weights.

The quantized model is rebuilt from the quantize artifact's weights blob with the shipped code's own
decoder; the pre-quantization score comes from the average stage's weights, giving the quantization
gap. Bytes per token come from the tokenizer's piece table and are checked against the tokenize
stage's byte sidecar. Per-token NLLs are saved so the compliance stage can recompute the score.

Run it alone:  python -m stages.evaluate --input quantize=KEY --input average=KEY --input tokenize=KEY
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from artifacts import Artifact, Stage, StageContext
from .average import load_weights
from .bpb import bits_per_byte, piece_tables, token_bytes
from .model import GPT
from .scoring import score_stream, window_plan
from .shards import load_split
from .shipped_eval import load_model
from .dataset import Dataset

log = logging.getLogger("golf.eval")


@dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 1024          # tokens of context per window
    stride: int = 0              # sliding-window stride (0 = non-overlapping windows; records: 64)
    batch_seqs: int = 32         # windows per forward pass
    max_tokens: int = 0          # score only the first N val tokens (0 = the whole val split)
    pre_quant: bool = True       # also score the average stage's weights (the quantization gap)
    device: str = "auto"         # auto | cpu | cuda
    budget_seconds: float = 600.0  # the challenge's eval limit; exceeding it is reported by compliance


class EvalError(RuntimeError):
    pass


def build(cfg: EvalConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    from tqdm import tqdm
    import sentencepiece as spm

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    ds = Dataset.open(inputs["tokenize"])
    tokens = load_split(ds.shard_paths("val"))
    if cfg.max_tokens:
        tokens = tokens[:cfg.max_tokens]
    if tokens.max() >= ds.vocab_size:
        raise EvalError(f"val tokens reach id {tokens.max()} but the tokenizer has {ds.vocab_size} pieces")
    sp = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    tables = piece_tables(sp)
    tok_bytes = token_bytes(tokens[1:], tables, prev=tokens[:-1])
    sidecar = np.load(inputs["tokenize"].file("val_token_bytes.npy"))[1:len(tokens)]
    if not np.array_equal(sidecar.astype(np.int64), tok_bytes):
        raise EvalError("byte counts from the tokenizer's piece table disagree with the tokenize stage's "
                        "byte sidecar: the tokenizer does not match the data")
    n_bytes = int(tok_bytes.sum())
    n_windows = len(window_plan(len(tokens), cfg.seq_len, cfg.stride))

    def score(model: GPT, label: str) -> tuple[np.ndarray, float]:
        model = model.to(device).eval()
        bar = tqdm(total=n_windows, desc=f"eval {label}", unit="win", mininterval=1.0, disable=None)
        t0 = time.perf_counter()
        nll = score_stream(model, tokens, cfg.seq_len, cfg.stride, cfg.batch_seqs, device, bar.update)
        if device.type == "cuda":
            torch.cuda.synchronize()
        bar.close()
        return nll, time.perf_counter() - t0

    # the artifact alone: decode the shipped blob with the shipped decoder
    t_load = time.perf_counter()
    model = load_model(inputs["quantize"].file("weights.bin").read_bytes())
    load_s = time.perf_counter() - t_load
    nll, eval_s = score(model, "quantized")
    if not np.isfinite(nll).all():
        raise EvalError("the quantized model gives non-finite losses")
    result = {"val_loss": float(nll.mean()), "val_bpb": bits_per_byte(nll.sum(), n_bytes),
              "val_tokens": int(nll.size), "val_bytes": n_bytes, "eval_seconds": round(eval_s, 3),
              "load_seconds": round(load_s, 3), "seq_len": cfg.seq_len, "stride": cfg.stride or cfg.seq_len,
              "device": device.type, "budget_seconds": cfg.budget_seconds}
    np.save(ctx.dir / "token_nll.npy", nll)
    if cfg.pre_quant:
        model_cfg, state = load_weights(inputs["average"])
        pre = GPT(model_cfg)
        pre.load_state_dict(state)
        pre_nll, pre_s = score(pre, "pre-quant")
        result["pre_quant_val_loss"] = float(pre_nll.mean())
        result["pre_quant_val_bpb"] = bits_per_byte(pre_nll.sum(), n_bytes)
        result["quant_gap_bpb"] = result["val_bpb"] - result["pre_quant_val_bpb"]
        result["pre_quant_eval_seconds"] = round(pre_s, 3)
    (ctx.dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("val_bpb %.4f (val_loss %.4f) over %d tokens / %d bytes in %.1f s", result["val_bpb"],
             result["val_loss"], result["val_tokens"], n_bytes, eval_s)
    return result


STAGE = Stage(name="eval", config=EvalConfig, inputs=("quantize", "average", "tokenize"), build=build,
              module=__name__)


if __name__ == "__main__":
    from golf.stage_cli import stage_main
    stage_main(STAGE)
