"""eval: val_bpb of the artifact alone (decoded as an evaluator would), with or without test-time training.

The quantized model is rebuilt from the quantize artifact's weights blob with the shipped code's own
decoder and scored by the shipped eval loop (stages/gpt/ttt.py: sliding windows, document isolation,
score-first TTT, several ranks). Bytes per token come from the tokenize stage's byte sidecar, checked
against the tokenizer's piece table (with a text transform such as CaseOps: the original text's bytes,
operator tokens 0, checked document by document). Diagnostics outside the timer: the pre-quantization score
from the average stage's weights (the quantization gap) and, with TTT, the same scoring without it.

The stage reads its inputs and writes the files; the scoring itself is gpt/evaluation.py.

Files: token_nll.npy (float64 per target, stream order), eval.json, and with TTT ttt_log.jsonl (the
order of scoring and adaptation, for the compliance stage) and, with its no-TTT diagnostic, nll_no_ttt_cumsum.npy
(the no-TTT score's running sum at up to 1000 places along the stream: the report's TTT-gain curve).

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
from pathlib import Path
from typing import Mapping

import numpy as np
import torch.distributed as dist

from artifacts import Artifact, Stage, StageContext
from artifacts.worker import launch_stage
from gpt.devices import resolve_device
from gpt.distributed import start_distributed
from gpt.evaluation import EvalConfig, EvalConfigError, EvalInputs, EvalRun, check_config, evaluate_artifact  # noqa: F401
from gpt.evaluation import TIMER_EXCLUDES, TIMER_INCLUDES, EvalError  # noqa: F401  (re-exported: the stage's error, its timer)
from gpt.shards import load_split
from tokenizing.dataset import Dataset

log = logging.getLogger("golf.eval")


def read_inputs(cfg: EvalConfig, inputs: Mapping[str, Artifact]) -> EvalInputs:
    """What the eval reads of its input artifacts: the val tokens and tokenizer, the byte sidecar, the weights
    blob and (for the pre-quantization score) the averaged weights."""
    tok = inputs["tokenize"]
    ds = Dataset.open(tok)
    tokens = load_split(ds.shard_paths("val"))
    if cfg.max_tokens:
        tokens = tokens[:cfg.max_tokens]
    avg = inputs["average"]
    return EvalInputs(tokens=tokens, vocab_size=ds.vocab_size, bos_id=ds.bos_id, tokenizer_path=ds.tokenizer_path,
                      byte_sidecar=tok.file("val_token_bytes.npy"), weights=inputs["quantize"].file("weights.bin"),
                      averaged=(avg.file("weights.pt"), avg.file("average.json")) if cfg.pre_quant else None,
                      transform_ids=ds.transform_ids() if ds.transform != "none" else None)


def write_outputs(run: EvalRun, out: Path) -> None:
    """token_nll.npy, with TTT ttt_log.jsonl, and eval.json (rank 0 only)."""
    np.save(out / "token_nll.npy", run.nll)
    if run.no_ttt_curve is not None:
        np.save(out / "nll_no_ttt_cumsum.npy", run.no_ttt_curve)
    if run.events is not None:
        with open(out / "ttt_log.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in run.events)
    (out / "eval.json").write_text(json.dumps(run.result, indent=2) + "\n")
    result = run.result
    log.info("val_bpb %.4f (val_loss %.4f) over %d tokens / %d bytes in %.1f s (+ %.1f s decode)",
             result["val_bpb"], result["val_loss"], result["val_tokens"], result["val_bytes"], run.loop_seconds,
             run.load_seconds)


def evaluate(cfg: EvalConfig, inputs: Mapping[str, Artifact], out: Path) -> dict:
    """Evaluate in this process (one rank of a torchrun job, or alone). Rank 0 writes ``out``."""
    device = resolve_device(cfg.device, "eval.device")
    ranks = start_distributed(device)
    try:
        run = evaluate_artifact(cfg, read_inputs(cfg, inputs), device, ranks)
        if ranks.rank == 0:
            write_outputs(run, out)
        return run.result
    finally:
        # the ranks leave together: none closes the process group while another still uses it
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
