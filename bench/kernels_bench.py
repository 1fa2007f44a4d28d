"""gpt/kernels' Triton kernels against the torch / inductor paths they replace, at the record preset's shapes, on CUDA.

    python bench/kernels_bench.py [--out DIR] [--iters 20] [--tokens N] [--vocab 8192] [--time-limit 170]

Shapes from golf.config's record preset: tokens per micro-step per GPU (micro_batch_tokens), model_dim, the
MLP's width, the logit softcap; the vocabulary is the tokenizer's (sp8192), so --vocab. Each case times
forward + backward (CUDA events, median of --iters after warm-up), the peak memory it allocates above its inputs,
and the max abs error of its loss / output and gradients against an fp32 reference of the same maths.
Cases:
  ce/*      the loss on hidden states: h (tokens x d, bf16) and the tied embedding (vocab x d, fp32) to the mean
            loss and both gradients: the plain path (fp32 logits + F.cross_entropy, compiled: train.fused_loss=off),
            gpt/losses.py (eager and compiled: fused_loss=on), the Triton kernel's (chunk sizes; compiled too)
  ce_rows/* the kernel alone on bf16 logits (loss + dlogits in place) for block widths, vs inductor's fp32 chain
  mlp/*     LeakyReLU(0.5)^2 on the up projection's output (tokens x 4d, bf16), and the whole MLP (fc, act, proj)
            compiled with either activation
Writes DIR/kernels_bench.json and DIR/kernels_bench.md (DIR: --out, else $OUT, else ./kernels_bench_out). Exits 1
with the failing cases named when any case fails, and 2 (results so far written) past --time-limit seconds.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class OutOfTime(Exception):
    pass


# --cpu-smoke: the bench's own code run on the CPU at toy shapes (kernels under TRITON_INTERPRET=1, AOT-eager in
# place of inductor), to catch its mistakes where no GPU is; its figures mean nothing
DEV = torch.device("cuda")


def compiled_fn(fn):
    return torch.compile(fn) if DEV.type == "cuda" else torch.compile(fn, backend="aot_eager")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def out_of_time(signum, frame):
    raise OutOfTime()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "kernels_bench_out"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, default=0, help="tokens per micro-step (0: the record preset's)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--time-limit", type=float, default=170.0, help="seconds before the run stops itself")
    p.add_argument("--only", default="", help="comma-separated case-name prefixes to run (e.g. ce/,mlp/)")
    p.add_argument("--cpu-smoke", action="store_true", help="check the bench itself on the CPU (toy shapes; "
                   "needs TRITON_INTERPRET=1 and --tokens/--vocab small)")
    return p.parse_args()


def record_shapes(args) -> dict:
    from golf.config import preset
    from gpt.model import GPT
    cfg = preset("record").train
    m = cfg.model
    return {"tokens": args.tokens or cfg.micro_batch_tokens, "vocab": args.vocab, "dim": m.model_dim,
            "hidden": int(m.mlp_mult * m.model_dim), "softcap": m.logit_softcap,
            "mlp_calls_per_micro_step": len(GPT.looped_layers(m, True)),
            "mlp_calls_per_micro_step_before_recurrence": len(GPT.looped_layers(m, False))}


# --- measuring ---------------------------------------------------------------------------------------------
def measure(fn, iters: int, warmup: int) -> dict:
    """Median and min ms of fn() (CUDA events, synchronised each time) and its peak allocation above the start."""
    if DEV.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return {"ms": round((time.perf_counter() - t0) * 1e3, 4)}
    for _ in range(warmup):
        fn()
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        sync()
        times.append(a.elapsed_time(b))
    times.sort()
    return {"ms": round(times[len(times) // 2], 4), "ms_min": round(times[0], 4), "peak_mib": round(peak / 2**20, 1)}


def max_err(got, ref) -> dict:
    """Max abs error, and that over the reference's max abs value (so scales compare)."""
    out = {}
    for name, g in got.items():
        r = ref[name]
        e = (g.float() - r.float()).abs().max().item()
        out[f"{name}_max_abs_err"] = float(f"{e:.3e}")
        out[f"{name}_rel_to_max"] = float(f"{e / max(r.float().abs().max().item(), 1e-30):.3e}")
    return out


# --- the loss on hidden states ---------------------------------------------------------------------------
def plain_ce(h, w, t, cap):
    """train.fused_loss=off: GPT.project's fp32 softcapped logits, then F.cross_entropy."""
    z = F.linear(h, w.to(h.dtype)).float()
    return F.cross_entropy(cap * torch.tanh(z / cap) if cap > 0 else z, t)


def ce_inputs(s: dict):
    g = torch.Generator(device=DEV.type).manual_seed(0)
    # hidden states as the model hands them over (rms-normed, bf16); embedding at the scale training reaches
    h = F.rms_norm(torch.randn(s["tokens"], s["dim"], device=DEV.type, generator=g), (s["dim"],)).bfloat16()
    w = torch.randn(s["vocab"], s["dim"], device=DEV.type, generator=g) * 0.05
    t = torch.randint(0, s["vocab"], (s["tokens"],), device=DEV.type, generator=g)
    return h, w, t


def ce_step(fn, h, w, t, cap):
    """One forward + backward of fn with fresh leaves: (loss, grad_h, grad_w)."""
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(hh, ww, t, cap)
    loss.backward()
    return loss.detach(), hh.grad, ww.grad


def ce_cases(s: dict) -> dict:
    from gpt.kernels.softcap_ce import fused_softcap_cross_entropy as triton_ce
    from gpt.losses import fused_softcap_cross_entropy as torch_fused
    cases = {"ce/plain-fp32-logits-compiled": compiled_fn(plain_ce),
             "ce/torch-fused-eager": torch_fused,
             "ce/torch-fused-compiled": compiled_fn(torch_fused)}
    for chunk in (8192, 16384, 32768):
        cases[f"ce/triton-chunk{chunk}"] = lambda h, w, t, cap, c=chunk: triton_ce(h, w, t, cap, chunk=c)
    cases["ce/triton-chunk16384-compiled"] = compiled_fn(lambda h, w, t, cap: triton_ce(h, w, t, cap, chunk=16384))
    return cases


def run_ce(s: dict, args, results: list, only) -> None:
    from gpt.losses import fused_softcap_cross_entropy as torch_fused
    h, w, t = ce_inputs(s)
    cap = s["softcap"]
    # the fp32 reference: gpt/losses.py's maths on fp32 hidden states and weights
    ref_loss, ref_h, ref_w = ce_step(torch_fused, h.float(), w, t, cap)
    ref = {"loss": ref_loss, "grad_h": ref_h, "grad_w": ref_w}
    for name, fn in ce_cases(s).items():
        if only(name):
            run_case(results, name, lambda fn=fn: ce_step(fn, h, w, t, cap), args,
                     lambda out: max_err(dict(zip(("loss", "grad_h", "grad_w"), out)), ref))
    del ref_h, ref_w, ref


# --- the kernel alone, on logits -------------------------------------------------------------------------
def rows_torch(z, t, cap, dtype=torch.float32):
    """Inductor's version of what the kernel does: softcapped logits in ``dtype``, loss and its gradient."""
    zf = z.to(dtype)
    zc = cap * torch.tanh(zf / cap)
    lse = torch.logsumexp(zc, dim=-1)
    loss = lse - zc.gather(1, t[:, None]).squeeze(1)
    g = (torch.exp(zc - lse[:, None]) - F.one_hot(t, z.size(1))) * (1 - (zc / cap) ** 2)
    return loss, g.to(z.dtype)


def run_ce_rows(s: dict, args, results: list, only) -> None:
    from gpt.kernels.softcap_ce import softcap_ce_rows
    h, w, t = ce_inputs(s)
    logits = h @ w.bfloat16().T  # bf16, as the chunked loss makes them
    del h, w
    cap = s["softcap"]
    ref_loss, ref_g = rows_torch(logits, t, cap, torch.float64)
    ref = {"loss": ref_loss, "dlogits": ref_g}
    buf = torch.empty_like(logits)
    compiled = compiled_fn(rows_torch)
    if only("ce_rows/inductor-fp32"):
        run_case(results, "ce_rows/inductor-fp32", lambda: compiled(logits, t, cap), args,
                 lambda out: max_err({"loss": out[0], "dlogits": out[1]}, ref))
    for block, warps in ((1024, 4), (2048, 8), (4096, 8), (8192, 16)):
        name = f"ce_rows/triton-block{block}-warps{warps}"
        if only(name):
            def fn(block=block, warps=warps):
                return softcap_ce_rows(logits, t, cap, grad=buf, block_v=block, num_warps=warps), buf
            run_case(results, name, fn, args, lambda out: max_err({"loss": out[0], "dlogits": out[1]}, ref))
            if "ms" in results[-1]:  # HBM traffic: the bf16 logits read once (pass 2 hits L2) and written once
                results[-1]["hbm_gb_per_s"] = round(logits.numel() * 4 / results[-1]["ms"] / 1e6)


# --- LeakyReLU(0.5)^2 ----------------------------------------------------------------------------------------
def act_step(fn, h, g):
    hh = h.detach().requires_grad_()
    out = fn(hh)
    out.backward(g)
    return out.detach(), hh.grad


def mlp_forward(act):
    return lambda x, fc, proj: F.linear(act(F.linear(x, fc)), proj)


def mlp_step(fwd, x, fc, proj, g):
    xx, a, b = (v.detach().requires_grad_() for v in (x, fc, proj))
    out = fwd(xx, a, b)
    out.backward(g)
    return out.detach(), xx.grad, a.grad, b.grad


def run_mlp(s: dict, args, results: list, only) -> None:
    from gpt.kernels.leaky_relu2 import leaky_relu2, leaky_relu2_torch
    gen = torch.Generator(device=DEV.type).manual_seed(1)
    n, d, hid = s["tokens"], s["dim"], s["hidden"]
    h = torch.randn(n, hid, device=DEV.type, generator=gen).bfloat16()
    g = torch.randn(n, hid, device=DEV.type, generator=gen).bfloat16()
    ref = dict(zip(("out", "grad_h"), act_step(leaky_relu2_torch, h.float(), g.float())))
    acts = {"torch-eager": leaky_relu2_torch, "inductor": compiled_fn(leaky_relu2_torch), "triton": leaky_relu2}
    for name, fn in acts.items():
        if only(f"mlp/act-{name}"):
            run_case(results, f"mlp/act-{name}", lambda fn=fn: act_step(fn, h, g), args,
                     lambda out: max_err(dict(zip(("out", "grad_h"), out)), ref))
    del h, g, ref
    x = F.rms_norm(torch.randn(n, d, device=DEV.type, generator=gen), (d,)).bfloat16()
    fc = (torch.randn(hid, d, device=DEV.type, generator=gen) / d ** 0.5).bfloat16()
    proj = (torch.randn(d, hid, device=DEV.type, generator=gen) / hid ** 0.5).bfloat16()
    go = torch.randn(n, d, device=DEV.type, generator=gen).bfloat16()
    keys = ("out", "grad_x", "grad_fc", "grad_proj")
    ref = dict(zip(keys, mlp_step(mlp_forward(leaky_relu2_torch), *(v.float() for v in (x, fc, proj, go)))))
    for name, act in (("inductor", leaky_relu2_torch), ("triton", leaky_relu2)):
        if only(f"mlp/block-{name}-compiled"):
            fwd = compiled_fn(mlp_forward(act))
            run_case(results, f"mlp/block-{name}-compiled", lambda fwd=fwd: mlp_step(fwd, x, fc, proj, go), args,
                     lambda out: max_err(dict(zip(keys, out)), ref))


# --- running and reporting ----------------------------------------------------------------------------------
def run_case(results: list, name: str, fn, args, errors) -> None:
    """Time one case and record its errors; a failing case is recorded (with its traceback) and the rest go on."""
    t0 = time.perf_counter()
    row = {"case": name}
    try:
        row.update(measure(fn, args.iters, args.warmup))
        row.update(errors(fn()))
    except OutOfTime:
        raise
    except Exception as e:  # one broken case must not hide the others' figures; the exit status reports it
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-3000:]
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    results.append(row)
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("case", "traceback")), flush=True)


# the path each group's kernel replaces in the record step (fused_loss is on at vocab 8192; the model is compiled)
BASELINES = {"ce": "ce/torch-fused-compiled", "ce_rows": "ce_rows/inductor-fp32", "mlp/act": "mlp/act-inductor",
             "mlp/block": "mlp/block-inductor-compiled"}


def group_of(case: str) -> str:
    return next(g for g in sorted(BASELINES, key=len, reverse=True) if case.startswith(g + "/") or
                case.startswith(g + "-"))


def markdown(meta: dict, results: list) -> str:
    """One table per group, its own error columns, and each case's speed against the path it replaces."""
    lines = [f"# Triton kernels vs torch/inductor ({meta['device']}, torch {meta['torch']}, triton {meta['triton']})",
             "", f"Shapes: {json.dumps(meta['shapes'])}. Forward + backward, median of {meta['iters']} after "
             f"warm-up (ms_min: the fastest); peak: allocated above the inputs; errors: max abs against fp32; "
             f"speedup: the baseline's ms over the case's.", ""]
    for group, base in BASELINES.items():
        rows = [r for r in results if group_of(r["case"]) == group]
        if not rows:
            continue
        base_ms = next((r.get("ms") for r in rows if r["case"] == base), None)
        errs = sorted({k for r in rows for k in r if k.endswith("_max_abs_err")})
        cols = ["ms", "ms_min", "peak_mib"] + (["hbm_gb_per_s"] if group == "ce_rows" else []) + errs
        lines += [f"## {group} (baseline {base})", "", "| case | " + " | ".join(cols) + " | speedup |",
                  "|" + "---|" * (len(cols) + 2)]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['case']} | FAILED: {r['error'][:200]} |")
                continue
            speed = f"{base_ms / r['ms']:.2f}x" if base_ms and r.get("ms") else ""
            lines.append(f"| {r['case']} | " + " | ".join(str(r.get(c, "")) for c in cols) + f" | {speed} |")
        lines.append("")
    return "\n".join(lines)


def write(out: Path, meta: dict, results: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "kernels_bench.md").write_text(markdown(meta, results))


def main() -> int:
    global DEV
    args = parse_args()
    if args.cpu_smoke:
        DEV = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("kernels_bench: needs a CUDA GPU (torch.cuda.is_available() is False; --cpu-smoke checks the bench "
              "itself on the CPU)", file=sys.stderr)
        return 1
    try:
        import triton
    except Exception as e:
        print(f"kernels_bench: triton does not import: {e!r}", file=sys.stderr)
        return 1
    # stop in Python at the limit (results so far written); a hang in C is killed 20 s later with tracebacks
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.time_limit))
    faulthandler.dump_traceback_later(args.time_limit + 20, exit=True)
    shapes = record_shapes(args)
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke: figures mean nothing)"
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "shapes": shapes,
            "iters": args.iters}
    prefixes = [p for p in args.only.split(",") if p]
    only = lambda name: not prefixes or any(name.startswith(p) for p in prefixes)  # noqa: E731
    results, status, t0 = [], 0, time.perf_counter()
    try:
        for part in (run_ce, run_mlp, run_ce_rows):  # most wanted first, should the limit cut in
            part(shapes, args, results, only)
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    except OutOfTime:
        print(f"kernels_bench: stopped at the {args.time_limit:.0f} s limit; results so far written", file=sys.stderr)
        status = 2
    signal.alarm(0)
    faulthandler.cancel_dump_traceback_later()
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    write(args.out, meta, results)
    failed = [r["case"] for r in results if "error" in r]
    if failed:
        print(f"kernels_bench: {len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
        status = status or 1
    print(f"kernels_bench: wrote {args.out}/kernels_bench.json and .md in {meta['wall_s']} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
