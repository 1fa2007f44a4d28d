"""Where a training step's time goes on one GPU: forward+backward, optimizer, and the top kernels.

    python bench/train_profile.py --preset baseline [--set train.model.num_layers=11 ...] --out DIR

Uses the train stage's own model, parameter split and optimizers on random tokens (no data loading),
timed with CUDA events after a compile warm-up. Writes profile.json and kernels.txt to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from golf.config import apply_overrides, preset
from gpt.model import GPT, flops_per_token
from gpt.training import attach_kernels, build_optimizers


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="baseline")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--recurrence", choices=["on", "off"], default="off")
    p.add_argument("--doc-len", type=int, default=1000, help="mean document length of the random tokens")
    p.add_argument("--label", default="")
    p.add_argument("--eager-embed", action="store_true", help="run the embedding lookup outside the compiled graph")
    p.add_argument("--out", type=Path, default=Path("/tmp/profile"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(preset(a.preset), a.set).train
    mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or a.vocab)
    dev = torch.device("cuda")
    model = GPT(mcfg).to(dev)
    model.recurrence_active = a.recurrence == "on" and mcfg.has_recurrence
    if a.eager_embed:  # aten's sort-based embedding backward instead of inductor's atomic scatter-add
        model.embed.forward = torch.compiler.disable(model.embed.forward)
    kernels = attach_kernels(model, cfg, dev)  # the train stage's rules and optimizers, so the profile is its step
    muon, adam = build_optimizers(cfg, model, dev)
    fwd = torch.compile(model, dynamic=False)
    accum = cfg.batch_tokens // cfg.micro_batch_tokens
    rows = cfg.micro_batch_tokens // cfg.seq_len
    gen = torch.Generator(device=dev).manual_seed(0)
    data = torch.randint(2, mcfg.vocab_size, (accum, rows, cfg.seq_len + 1), device=dev, generator=gen)
    starts = torch.rand(data.shape, device=dev, generator=gen) < 1.0 / a.doc_len
    data[starts] = mcfg.bos_id  # documents of about doc_len tokens, as isolation would see them

    def fb():
        for i in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(data[i, :, :-1], data[i, :, 1:]) / accum
            loss.backward()

    def opt():
        muon.step()
        adam.step()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):
        fb()
        opt()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()  # the timed steps' peak: what the fused loss should lower
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    fb_ms, opt_ms = [], []
    for _ in range(a.steps):
        e0, e1, e2 = ev(), ev(), ev()
        e0.record()
        fb()
        e1.record()
        opt()
        e2.record()
        torch.cuda.synchronize()
        fb_ms.append(e0.elapsed_time(e1))
        opt_ms.append(e1.elapsed_time(e2))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    step_ms = med(fb_ms) + med(opt_ms)
    tok_s = cfg.batch_tokens / (step_ms / 1e3)
    res = {"label": a.label, "fused_loss": hasattr(model, "loss_fn"), "kernels": kernels, "recurrence": model.recurrence_active, "model": dataclasses.asdict(mcfg), "batch_tokens": cfg.batch_tokens, "seq_len": cfg.seq_len,
           "warmup_s": round(warm, 1), "fwd_bwd_ms": round(med(fb_ms), 2), "optimizer_ms": round(med(opt_ms), 2),
           "step_ms": round(step_ms, 2), "tokens_per_s": round(tok_s),
           "tflops_per_s": round(tok_s * flops_per_token(mcfg, cfg.seq_len, model.recurrence_active) / 1e12, 1),
           "params_m": round(model.num_params() / 1e6, 2),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fb()
        opt()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=110)
    tag = a.label or "profile"
    (a.out / f"{tag}.kernels.txt").write_text(table)
    kernels = sorted(((e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages()),
                     key=lambda k: -k[2])
    res["kernels_ms_per_step"] = [{"name": n, "calls": c, "ms": round(ms, 3)} for n, c, ms in kernels[:40]]
    save_kernel_sources([n for n, _, _ in kernels[:15]], a.out / f"{tag}.kernel_src")
    (a.out / f"{tag}.json").write_text(json.dumps(res, indent=2))
    print("RESULT", json.dumps({k: v for k, v in res.items() if k != "model"}))
    print(table[:3000])


def save_kernel_sources(names: list[str], dest: Path) -> None:
    """Copy the inductor-generated Triton source of each named kernel (from inductor's cache) into dest."""
    import os
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    wanted = {n for n in names if n.startswith("triton_")}
    if not wanted:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for root, _, files in os.walk(cache_dir()):
        for f in files:
            if not f.endswith(".py"):
                continue
            text = Path(root, f).read_text(errors="replace")
            for n in list(wanted):
                if f"def {n}(" in text:
                    (dest / f"{n}.py").write_text(text)
                    wanted.discard(n)


if __name__ == "__main__":
    main()
