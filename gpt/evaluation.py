"""The eval stage's scoring: val_bpb of the artifact alone, with its diagnostics (stages/evaluate.py says what).

The stage reads its input artifacts into an ``EvalInputs`` (val tokens, tokenizer, byte sidecar, the weights
blob, the averaged weights) and calls ``evaluate_artifact`` on each rank; it writes what that returns. Here:
the byte count checked against the tokenize stage's sidecar, the decode of the blob with the shipped decoder
(timed), the warm-up (not timed), the timed scoring by the shipped eval loop (``ttt.EvalLoop``) and the
diagnostics outside the timer (no-TTT and pre-quantization scores).

Part of the core: the standard library, torch, numpy, sentencepiece and the core only. It ships: train_gpt.py
(``program``) evaluates with it, under the eval config (``EvalConfig``, here so that it ships too).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checks
from .averaging import load_averaged
from .bpb import bits_per_byte, piece_tables, token_bytes
from .original_bytes import transformed_token_bytes
from .distributed import Ranks
from .model import GPT
from .progress import progress_bar
from .shipped_eval import load_model
from .ttt import EvalLoop, TTTConfig, warm_up

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


class EvalError(RuntimeError):
    pass


@dataclass
class EvalInputs:
    """What the eval reads of its input artifacts (the stage fills it in)."""
    tokens: np.ndarray                   # the val tokens scored (cut to max_tokens)
    vocab_size: int                      # the tokenizer's pieces
    bos_id: int
    tokenizer_path: Path                 # the SentencePiece model: bytes per token from its piece table
    byte_sidecar: Path | None            # the tokenize stage's val_token_bytes.npy (None: train_gpt.py has none)
    weights: Path                        # the quantize stage's weights.bin
    averaged: tuple[Path, Path] | None   # the average stage's weights.pt and average.json (pre_quant only)
    transform_ids: tuple[list[int], int] | None = None  # a text transform's operator ids and escape id (None: none)


@dataclass
class EvalRun:
    """What one rank's evaluation gives the stage to write."""
    result: dict                         # eval.json
    nll: np.ndarray                      # token_nll.npy: per target, stream order
    events: list[dict] | None            # ttt_log.jsonl's events (with TTT only)
    loop_seconds: float                  # the scoring loop's seconds, and the decode's: for the log line
    load_seconds: float
    no_ttt_curve: np.ndarray | None = None  # nll_no_ttt_cumsum.npy (with TTT and its no-TTT diagnostic only)


def val_bytes(data: EvalInputs) -> int:
    """The val targets' bytes from the tokenize stage's byte sidecar, which must agree with the tokenizer's piece
    table (else the tokenizer does not belong to the data). With a text transform the sidecar holds ORIGINAL
    bytes: checked per document against the piece table with operator tokens at 0 (a published sidecar may share
    a document's bytes among its tokens otherwise); compliance recounts them from the inverted text."""
    import sentencepiece as spm

    tokens = data.tokens
    if tokens.max() >= data.vocab_size:
        raise EvalError(f"val tokens reach id {tokens.max()} but the tokenizer has {data.vocab_size} pieces")
    tables = piece_tables(spm.SentencePieceProcessor(model_file=str(data.tokenizer_path)))
    if data.byte_sidecar is None:  # train_gpt.py run from a records folder: the piece table is the count
        if data.transform_ids is not None:
            raise EvalError("data tokenized through a text transform is scored on its original bytes: it needs "
                            "the byte sidecar (fineweb_val_bytes_*.bin), and none was given")
        return int(token_bytes(tokens[1:], tables, prev=tokens[:-1]).sum())
    full = np.load(data.byte_sidecar)
    if len(full) < len(tokens):
        raise EvalError(f"the byte sidecar has {len(full):,} counts for {len(tokens):,} val tokens: not this data's")
    sidecar = full[1:len(tokens)].astype(np.int64)
    if data.transform_ids is None:
        if not np.array_equal(sidecar, token_bytes(tokens[1:], tables, prev=tokens[:-1])):
            raise EvalError("byte counts from the tokenizer's piece table disagree with the tokenize stage's "
                            "byte sidecar: the tokenizer does not match the data")
        return int(sidecar.sum())
    rule = transformed_token_bytes(tokens, tables, *data.transform_ids)[1:]
    cuts = np.concatenate([[0], np.flatnonzero(tokens[1:] == data.bos_id)])  # target k+1 starts document k+1
    bad = np.flatnonzero(np.add.reduceat(sidecar, cuts) != np.add.reduceat(rule, cuts)) if len(rule) else []
    if len(bad):
        raise EvalError(f"the byte sidecar disagrees with the tokenizer's pieces (operators at 0 bytes) on val "
                        f"document {int(bad[0])}: the tokenizer or transform does not match the data")
    return int(sidecar.sum())


class Scorer:
    """Runs the eval loop over the val tokens with the stage's settings, one progress bar a run."""

    def __init__(self, cfg, data: EvalInputs, device: torch.device, rank: int):
        self.cfg, self.tokens, self.bos_id, self.rank = cfg, data.tokens, data.bos_id, rank
        self.loop_args = dict(seq_len=cfg.seq_len, stride=cfg.stride, batch_seqs=cfg.batch_seqs, device=device,
                              doc_isolation=cfg.doc_isolation)

    def score(self, model, ttt: TTTConfig, label: str, spent_s: float = 0.0, budget: bool = False) -> dict:
        """One run of the loop; with ``budget`` under the eval budget, ``spent_s`` already spent on it."""
        cfg = self.cfg
        bar = progress_bar(log, f"eval {label}", total=len(self.tokens) - 1, unit="tok", enabled=self.rank == 0,
                           unit_scale=True, mininterval=2.0)
        res = EvalLoop(model, self.tokens, bos_id=self.bos_id, ttt=ttt, budget_s=cfg.budget_seconds if budget else 0.0,
                       on_budget=cfg.on_budget, spent_s=spent_s, progress=bar.update, **self.loop_args).run()
        bar.close()
        if not np.isfinite(res["nll"]).all():
            raise EvalError(f"the {label} model gives non-finite losses")
        return res

    def warm(self, model) -> float:
        """Run the loop on random tokens before the clock starts (CUDA start-up, kernel compilation): its seconds."""
        cfg = self.cfg
        n_warm = min(len(self.tokens), max(4 * cfg.seq_len, 2 * cfg.ttt.chunk_tokens if cfg.ttt.method == "sgd" else 0))
        if self.rank == 0:
            log.info("warm-up on %d random tokens (compiles the kernels; not timed)", n_warm)
        warm_s = warm_up(model, model.cfg.vocab_size, self.bos_id, n_warm, ttt=cfg.ttt, **self.loop_args)
        if self.rank == 0:
            log.info("warm-up took %.1f s", warm_s)
        return warm_s


def decode_model(blob: bytes, device: torch.device) -> tuple[GPT, float]:
    """The artifact alone: the shipped blob decoded with the shipped decoder, on the device; the seconds (timed)."""
    t = time.perf_counter()
    model = load_model(blob).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, time.perf_counter() - t


def headline(cfg, res: dict, n_bytes: int, load_s: float, warm_s: float, world: int, device: torch.device) -> dict:
    """eval.json's score of the quantized model (with TTT if configured), its timer and its settings."""
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
    return result


# the no-TTT score's running sum is kept at this many places along the val stream (nll_no_ttt_cumsum.npy), for
# the report's TTT-gain curve: a per-token copy would add 8 bytes a val token (320 MB on the full val set)
CURVE_POINTS = 1000


def cumulative_points(nll: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """Rows of (targets scored so far, their summed NLL in nats) at up to ``points`` evenly spaced places along
    the stream, the last target always included."""
    if not len(nll):
        return np.zeros((0, 2))
    idx = np.unique(np.linspace(0, len(nll) - 1, min(points, len(nll))).astype(np.int64))
    return np.stack([(idx + 1).astype(np.float64), np.cumsum(nll, dtype=np.float64)[idx]], axis=1)


def no_ttt_diagnostic(scorer: Scorer, blob: bytes, device: torch.device, result: dict,
                      n_bytes: int) -> tuple[dict, np.ndarray]:
    """The quantized model scored again without TTT (a fresh decode): the TTT gain, and the no-TTT score's
    running sum along the stream (``cumulative_points``)."""
    plain = scorer.score(load_model(blob).to(device), TTTConfig(), "quantized, no TTT")
    no_ttt_bpb = bits_per_byte(plain["nll"].sum(), n_bytes)
    return ({"no_ttt_val_bpb": no_ttt_bpb, "ttt_gain_bpb": result["val_bpb"] - no_ttt_bpb,
             "no_ttt_eval_seconds": round(plain["loop_seconds"], 3)}, cumulative_points(plain["nll"]))


def pre_quant_diagnostic(scorer: Scorer, averaged: tuple[Path, Path], device: torch.device, result: dict,
                         n_bytes: int) -> dict:
    """The average stage's weights scored without TTT: the quantization gap."""
    model_cfg, state = load_averaged(*averaged)
    pre = GPT(model_cfg)
    pre.load_state_dict(state)
    pre_res = scorer.score(pre.to(device), TTTConfig(), "pre-quant")
    pre_bpb = bits_per_byte(pre_res["nll"].sum(), n_bytes)
    # against the same scoring without TTT, so the gap is quantization's alone
    return {"pre_quant_val_loss": float(pre_res["nll"].mean()), "pre_quant_val_bpb": pre_bpb,
            "quant_gap_bpb": result.get("no_ttt_val_bpb", result["val_bpb"]) - pre_bpb,
            "pre_quant_eval_seconds": round(pre_res["loop_seconds"], 3)}


def evaluate_artifact(cfg, data: EvalInputs, device: torch.device, ranks: Ranks) -> EvalRun:
    """This rank's evaluation of the artifact under the eval stage's ``cfg`` (its EvalConfig): the timed score,
    then the diagnostics outside the timer."""
    n_bytes = val_bytes(data)
    scorer = Scorer(cfg, data, device, ranks.rank)
    blob = data.weights.read_bytes()
    model, load_s = decode_model(blob, device)
    warm_s = scorer.warm(model) if cfg.warmup else 0.0
    ttt_on = cfg.ttt.method != "none"
    res = scorer.score(model, cfg.ttt, "quantized" + ("" if not ttt_on else f" + TTT {cfg.ttt.method}"),
                       spent_s=load_s, budget=True)
    result = headline(cfg, res, n_bytes, load_s, warm_s, ranks.world, device)
    if res["graphs_compiled_in_loop"] and ranks.rank == 0:
        log.warning("%d graph(s) were compiled inside the timed eval loop (the most on one rank): a batch shape the "
                    "warm-up did not reach; their compile time is in the eval seconds", res["graphs_compiled_in_loop"])
    curve = None
    if ttt_on and cfg.no_ttt_diagnostic:
        plain, curve = no_ttt_diagnostic(scorer, blob, device, result, n_bytes)
        result.update(plain)
    if cfg.pre_quant:
        result.update(pre_quant_diagnostic(scorer, data.averaged, device, result, n_bytes))
    return EvalRun(result, res["nll"], res["events"] if ttt_on else None, res["loop_seconds"], load_s, curve)
