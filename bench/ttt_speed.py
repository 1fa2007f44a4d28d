"""The eval loop's speed with a preset's TTT on its model, with no training and no artifacts: random weights, random
documents at FineWeb-like lengths. It compares the eval as it is (isolated rows scored causally) with the old
path, which builds the model's isolating mask in every forward (FlexAttention on CUDA).

    python bench/ttt_speed.py [--preset pr1886] [--docs 64] [--variants now,masked] [--out DIR] [--set ttt.lora_docs=32]

Why it exists: on one H200 (2026-12-01, BENCHMARKS.md "Seed presets"), pr1886's phased LoRA TTT scored 1.2K tokens/s,
falling to 0.7K, after a 119 s warm-up. This is the few-minute measurement that says whether a change to the loop
helped, without a 10-minute pipeline run before it.

For each variant, it reports the warm-up seconds (compiles; not timed), the timed loop's seconds, the scored tokens
per second, the TTT (adapt) seconds, the graphs compiled inside the timed loop and the peak GPU memory.

The model is the preset's (train.model, its vocab: 8192 for the record line), on CUDA when there is one. On the CPU,
`--shrink` makes it small (a smoke run of this script). The eval settings are the preset's eval (seq_len, stride,
batch_seqs, TTT), with `--set` overrides of eval fields.

Writes DIR/ttt_speed.json and DIR/ttt_speed.md (DIR: --out, else $OUT, else ./ttt_speed_out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gpt.model import GPT  # noqa: E402
from gpt.ttt import EvalLoop, warm_up  # noqa: E402


class AlwaysIsolating(GPT):
    """The model before rows_are_documents: it builds its isolating mask in every forward, whatever the eval says."""

    @property
    def rows_are_documents(self):
        return False

    @rows_are_documents.setter
    def rows_are_documents(self, value):
        pass


# name: (the model's class, TTT fields changed from the preset's)
VARIANTS = {"now": (GPT, {}), "masked": (AlwaysIsolating, {}),
            "eager": (GPT, {"lora_compile": "off"}), "static": (GPT, {"lora_compile": "static"}),
            "dynamic": (GPT, {"lora_compile": "dynamic"})}


def documents(n_docs: int, vocab: int, bos: int, seed: int = 0, mean_log: float = 6.6) -> np.ndarray:
    """n_docs documents, each opened by BOS, their lengths lognormal (median ~735 tokens: FineWeb's val at sp8192
    averages ~930) and clipped to 16..8000."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean_log, 0.9, n_docs).astype(int), 16, 8000)
    docs = []
    for n in lengths:
        body = rng.integers(0, vocab, n)
        body[body == bos] = (bos + 1) % vocab
        docs.append(np.concatenate([[bos], body]))
    return np.concatenate(docs).astype(np.int64)


@contextlib.contextmanager
def profiled(path: Path | None, device: torch.device):
    """torch.profiler around the block when ``path`` is given; the op tables (by device time, by CPU time) go there."""
    if path is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        yield
    ka = prof.key_averages()
    by_device = ka.table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                         row_limit=40)
    path.write_text("## by self device time\n" + by_device + "\n## by CPU time\n"
                    + ka.table(sort_by="cpu_time_total", row_limit=40) + "\n")


def main() -> None:
    from golf.config import apply_overrides, preset
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pr1886")
    ap.add_argument("--docs", type=int, default=64, help="documents to score (64: one LoRA group of the record's)")
    ap.add_argument("--variants", default="now,masked", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="an eval field (eval. is implied)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up (its compiles land in the loop)")
    ap.add_argument("--shrink", action="store_true", help="a small model and short windows (a CPU smoke run)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over each variant's timed loop: its top ops by device and CPU time to DIR")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or Path(os.environ.get("OUT") or "ttt_speed_out")
    out.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(preset(a.preset), [s if s.startswith("eval.") else f"eval.{s}" for s in a.set])
    m = cfg.train.model
    vocab = m.vocab_size or 8192
    e = cfg.eval
    if a.shrink:
        m = dataclasses.replace(m, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=16,
                                recur_start=1, recur_end=2, parallel_from=3 if m.parallel_from >= 0 else -1)
        vocab = 512
        e = dataclasses.replace(e, seq_len=256, ttt=dataclasses.replace(e.ttt, lora_rank=4, lora_docs=8,
                                                                        phase_docs=16))
    m = dataclasses.replace(m, vocab_size=vocab)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = documents(a.docs, vocab, m.bos_id, mean_log=4.5 if a.shrink else 6.6)
    loop_args = dict(seq_len=e.seq_len, stride=e.stride, batch_seqs=e.batch_seqs, device=device,
                     doc_isolation=e.doc_isolation)
    rows = []
    (out / "ttt_speed_rows.jsonl").unlink(missing_ok=True)
    torch.manual_seed(0)
    state = GPT(m).state_dict()
    for name in a.variants.split(","):
        model_class, changes = VARIANTS[name]
        ttt = dataclasses.replace(e.ttt, **changes)
        model = model_class(m)
        model.load_state_dict(state)
        model = model.to(device).eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_s = 0.0
        print(f"{time.strftime('%T')} {name}: warm-up{' skipped' if a.no_warmup else ''}", flush=True)
        if not a.no_warmup:
            warm_s = warm_up(model, vocab, m.bos_id, max(4 * e.seq_len, 2 * ttt.chunk_tokens), ttt=ttt, **loop_args)
        t = time.perf_counter()
        with profiled(out / f"profile_{name}.txt" if a.profile else None, device):
            res = EvalLoop(model, tokens, bos_id=m.bos_id, ttt=ttt, **loop_args).run()
        wall = time.perf_counter() - t
        n = len(res["nll"])
        row = {"variant": name, "docs": a.docs, "tokens": n, "warmup_s": round(warm_s, 1),
               "loop_s": round(res["loop_seconds"], 2), "tokens_per_s": round(n / res["loop_seconds"]),
               "ttt_s": round(res["ttt_seconds"], 2),
               # LoRA's computed positions (each chunk's context too) per second: how busy the device was
               "lora_positions_per_s": round(res["lora_positions"] / res["loop_seconds"]), "graphs_compiled_in_loop": res["graphs_compiled_in_loop"],
               "mean_nll": float(res["nll"].mean()), "wall_s": round(wall, 1),
               "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with (out / "ttt_speed_rows.jsonl").open("a") as f:  # kept if a later variant runs out of time
            f.write(json.dumps(row) + "\n")
    meta = {"preset": a.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": dataclasses.asdict(m), "eval": dataclasses.asdict(e),
            "shrink": a.shrink, "warmup": not a.no_warmup}
    (out / "ttt_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    keys = list(rows[0])
    md = [f"# TTT eval speed: --preset {a.preset}, {meta['device']}, torch {meta['torch']}", "",
          f"TTT {e.ttt.method}, seq_len {e.seq_len}, {a.docs} random documents, random weights.", "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (out / "ttt_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
