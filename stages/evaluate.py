"""eval: val_bpb of the artifact alone (decoded as an evaluator would), with or without test-time training.

The quantized model is rebuilt from the quantize artifact's weights blob with the shipped code's own
decoder and scored by the shipped eval loop (stages/gpt/ttt.py: sliding windows, document isolation,
score-first TTT, several ranks). Bytes per token come from the tokenizer's piece table and are checked
against the tokenize stage's byte sidecar. Diagnostics outside the timer: the pre-quantization score
from the average stage's weights (the quantization gap) and, with TTT, the same scoring without it.

Files: token_nll.npy (float64 per target, stream order), eval.json, and with TTT ttt_log.jsonl (the
order of scoring and adaptation, for the compliance stage).

The eval timer counts what the records' timer counts plus the weights decode: load_seconds (decode)
+ eval_seconds (scoring, incl. gathering the ranks' results) + ttt_seconds (adaptation steps). Outside
it, stated in eval.json: start-up, reading the val shards and counting bytes, the warm-up on random
tokens (CUDA start-up, kernel compilation), the TTT event log (bookkeeping for compliance) and the
diagnostics. With several ranks the clock is the slowest rank's; ttt_seconds is the busiest rank's.
With a budget, the loop projects its finish from its pace: on_budget=fail stops with an error as soon
as the projection passes the budget, on_budget=stop stops adapting and scores the rest with the
weights it has (the compliance stage still fails an eval that ends over 600 s).

Run it alone:  golf stage eval --input quantize=KEY --input average=KEY --input tokenize=KEY
On 8 GPUs:     ... --set nproc=8   (the stage launches torchrun itself)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from artifacts import Artifact, Stage, StageContext
from gpt import checks
from gpt.averaging import load_averaged
from gpt.devices import resolve_device
from artifacts.worker import launch_stage
from gpt.distributed import start_distributed
from gpt.progress import progress_bar
from gpt.bpb import bits_per_byte, piece_tables, token_bytes
from tokenizing.dataset import Dataset
from gpt.model import GPT
from gpt.shards import load_split
from gpt.shipped_eval import load_model
from gpt.ttt import EvalLoop, TTTConfig, warm_up

log = logging.getLogger("golf.eval")

TIMER_INCLUDES = ["weights decode (load_seconds)", "scoring forward passes and gathering the ranks' results "
                  "(eval_seconds)", "test-time training steps (ttt_seconds)"]
TIMER_EXCLUDES = ["process start-up and imports", "reading the val shards and counting bytes",
                  "warm-up on random tokens: CUDA start-up, kernel compilation (warmup_seconds)",
                  "gathering and writing the TTT event log (ttt_log.jsonl)",
                  "diagnostics: pre-quantization and no-TTT scores"]


@dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 1024          # tokens of context per window
    stride: int = 0              # sliding-window stride (0 = non-overlapping windows; records: 64)
    batch_seqs: int = 32         # scoring batch: batch_seqs * seq_len tokens per forward pass
    max_tokens: int = 0          # score only the first N val tokens (0 = the whole val split)
    doc_isolation: bool = False  # score each document with its own context only (windows never cross a BOS)
    ttt: TTTConfig = field(default_factory=TTTConfig)  # test-time training (method none = off)
    pre_quant: bool = True       # also score the average stage's weights (the quantization gap)
    no_ttt_diagnostic: bool = True  # with TTT: also score the quantized model without it (the TTT gain)
    warmup: bool = True          # run the loop on random tokens before the clock starts (CUDA init, compilation)
    nproc: int = 1               # processes (GPUs); > 1 launches torchrun
    device: str = "auto"         # auto | cpu | cuda
    budget_seconds: float = 600.0  # the challenge's eval limit (0 = none); load + scoring + TTT count
    on_budget: str = "fail"      # projected past the budget: fail (error) | stop (stop adapting, score the rest)

    def __post_init__(self):
        check_config(self)


class EvalError(RuntimeError):
    pass


class EvalConfigError(ValueError):
    pass


def check_config(cfg: EvalConfig) -> None:
    """Run when an EvalConfig is built (its __post_init__): a bad value is refused before any stage runs."""
    checks.choices(cfg, "eval", {"on_budget": ("fail", "stop"), "device": ("auto", "cpu", "cuda")}, EvalConfigError)
    checks.ints(cfg, "eval", ("seq_len", "batch_seqs", "nproc"), 1, EvalConfigError)
    checks.ints(cfg, "eval", ("stride", "max_tokens"), 0, EvalConfigError)
    checks.reals(cfg, "eval", ("budget_seconds",), error=EvalConfigError)
    if cfg.ttt.method in ("lora", "phased") and not cfg.doc_isolation:
        raise EvalConfigError(f"eval.ttt.method={cfg.ttt.method} adapts per document and scores each document on "
                              f"its own: set eval.doc_isolation=true")
    if not 0 <= cfg.stride <= cfg.seq_len:
        raise EvalConfigError(f"eval.stride must be in 0..seq_len ({cfg.seq_len}), got {cfg.stride}")


def evaluate(cfg: EvalConfig, inputs: Mapping[str, Artifact], out: Path) -> dict:
    """Evaluate in this process (one rank of a torchrun job, or alone). Rank 0 writes ``out``."""
    import sentencepiece as spm

    device = resolve_device(cfg.device, "eval.device")
    ranks = start_distributed(device)
    world, rank = ranks.world, ranks.rank
    try:
        ds = Dataset.open(inputs["tokenize"])
        tokens = load_split(ds.shard_paths("val"))
        if cfg.max_tokens:
            tokens = tokens[:cfg.max_tokens]
        if tokens.max() >= ds.vocab_size:
            raise EvalError(f"val tokens reach id {tokens.max()} but the tokenizer has {ds.vocab_size} pieces")
        tables = piece_tables(spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path)))
        tok_bytes = token_bytes(tokens[1:], tables, prev=tokens[:-1])
        sidecar = np.load(inputs["tokenize"].file("val_token_bytes.npy"))[1:len(tokens)]
        if not np.array_equal(sidecar.astype(np.int64), tok_bytes):
            raise EvalError("byte counts from the tokenizer's piece table disagree with the tokenize stage's "
                            "byte sidecar: the tokenizer does not match the data")
        n_bytes = int(tok_bytes.sum())
        loop_args = dict(seq_len=cfg.seq_len, stride=cfg.stride, batch_seqs=cfg.batch_seqs, device=device,
                         doc_isolation=cfg.doc_isolation)

        def score(model, ttt: TTTConfig, label: str, spent_s: float = 0.0, budget: bool = False) -> dict:
            bar = progress_bar(log, f"eval {label}", total=len(tokens) - 1, unit="tok", enabled=rank == 0,
                               unit_scale=True, mininterval=2.0)
            res = EvalLoop(model, tokens, bos_id=ds.bos_id, ttt=ttt, budget_s=cfg.budget_seconds if budget else 0.0,
                           on_budget=cfg.on_budget, spent_s=spent_s, progress=bar.update, **loop_args).run()
            bar.close()
            if not np.isfinite(res["nll"]).all():
                raise EvalError(f"the {label} model gives non-finite losses")
            return res

        # the artifact alone: decode the shipped blob with the shipped decoder
        blob = inputs["quantize"].file("weights.bin").read_bytes()
        t = time.perf_counter()
        model = load_model(blob).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        load_s = time.perf_counter() - t
        warm_s = 0.0
        if cfg.warmup:
            n_warm = min(len(tokens), max(4 * cfg.seq_len, 2 * cfg.ttt.chunk_tokens if cfg.ttt.method == "sgd" else 0))
            if rank == 0:
                log.info("warm-up on %d random tokens (compiles the kernels; not timed)", n_warm)
            warm_s = warm_up(model, model.cfg.vocab_size, ds.bos_id, n_warm, ttt=cfg.ttt, **loop_args)
            if rank == 0:
                log.info("warm-up took %.1f s", warm_s)
        res = score(model, cfg.ttt, "quantized" + ("" if cfg.ttt.method == "none" else f" + TTT {cfg.ttt.method}"),
                    spent_s=load_s, budget=True)
        nll, ttt_on = res["nll"], cfg.ttt.method != "none"
        result = {"val_loss": float(nll.mean()), "val_bpb": bits_per_byte(nll.sum(), n_bytes),
                  "val_tokens": int(nll.size), "val_bytes": n_bytes,
                  "eval_seconds": round(res["score_seconds"], 3), "load_seconds": round(load_s, 3)}
        if ttt_on:
            result["ttt_seconds"] = round(res["ttt_seconds"], 3)
        result.update({"total_eval_seconds": round(load_s + res["loop_seconds"], 3), "warmup_seconds": round(warm_s, 3),
                       "timer_includes": TIMER_INCLUDES, "timer_excludes": TIMER_EXCLUDES,
                       "budget_seconds": cfg.budget_seconds, "on_budget": cfg.on_budget,
                       "budget_stop": res["budget_stop"], "seq_len": cfg.seq_len, "stride": cfg.stride or cfg.seq_len,
                       "doc_isolation": cfg.doc_isolation, "ttt": cfg.ttt.method if ttt_on else False,
                       "adapt_steps": res["adapt_steps"], "world_size": world, "device": device.type,
                       "graphs_compiled_in_timed_loop": res["graphs_compiled_in_loop"]})
        if res["graphs_compiled_in_loop"] and rank == 0:
            log.warning("%d graph(s) were compiled inside the timed eval loop (the most on one rank): a batch shape the "
                        "warm-up did not reach; their compile time is in the eval seconds", res["graphs_compiled_in_loop"])
        if ttt_on and cfg.no_ttt_diagnostic:
            plain = score(load_model(blob).to(device), TTTConfig(), "quantized, no TTT")
            result["no_ttt_val_bpb"] = bits_per_byte(plain["nll"].sum(), n_bytes)
            result["ttt_gain_bpb"] = result["val_bpb"] - result["no_ttt_val_bpb"]
            result["no_ttt_eval_seconds"] = round(plain["loop_seconds"], 3)
        if cfg.pre_quant:
            model_cfg, state = load_averaged(inputs["average"].file("weights.pt"), inputs["average"].file("average.json"))
            pre = GPT(model_cfg)
            pre.load_state_dict(state)
            pre_res = score(pre.to(device), TTTConfig(), "pre-quant")
            result["pre_quant_val_loss"] = float(pre_res["nll"].mean())
            result["pre_quant_val_bpb"] = bits_per_byte(pre_res["nll"].sum(), n_bytes)
            # against the same scoring without TTT, so the gap is quantization's alone
            result["quant_gap_bpb"] = result.get("no_ttt_val_bpb", result["val_bpb"]) - result["pre_quant_val_bpb"]
            result["pre_quant_eval_seconds"] = round(pre_res["loop_seconds"], 3)
        if rank == 0:
            np.save(out / "token_nll.npy", nll)
            if ttt_on:
                with open(out / "ttt_log.jsonl", "w") as f:
                    f.writelines(json.dumps(e) + "\n" for e in res["events"])
            (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            log.info("val_bpb %.4f (val_loss %.4f) over %d tokens / %d bytes in %.1f s (+ %.1f s decode)",
                     result["val_bpb"], result["val_loss"], result["val_tokens"], n_bytes, res["loop_seconds"], load_s)
        return result
    finally:
        if ranks.distributed and dist.is_initialized():
            dist.barrier()
        ranks.close()


def build(cfg: EvalConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    check_config(cfg)
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:  # torchrun runs this build on every rank (artifacts.worker)
        launch_stage(STAGE, cfg, inputs, ctx, cfg.nproc)
        return json.loads((ctx.dir / "eval.json").read_text())
    return evaluate(cfg, inputs, ctx.dir)


STAGE = Stage(name="eval", config=EvalConfig, inputs=("quantize", "average", "tokenize"), build=build,
              module=__name__, headline=("val_bpb",))
