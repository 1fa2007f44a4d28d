"""Attention with documents isolated, three ways, at the record preset's shapes on one GPU (issue 18).

    python bench/attention_bench.py [--out DIR] [--iters 10] [--rows 48] [--seq 2048]

Cases, each forward + backward of one layer's attention on (rows x seq) tokens, 8 query / 4 KV heads of 64,
bf16, documents of FineWeb-like lengths (drawn from a log-normal, seed 0) packed into the rows:
  sdpa_dense     causal SDPA over whole rows, documents NOT isolated (what the reference runs without FA3)
  flex_isolated  FlexAttention with the per-document block mask, compiled (golf's fallback)
  fa4_varlen     golf's torch.library wrapper of FA4 (flash_attn.cute), when installed; eager and compiled
Reports median ms (CUDA events) and peak MiB, and each isolated case's max abs error against a float32 per-document
reference on the first rows (outputs and gradients). Writes DIR/attention_bench.{json,md} as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpt.model as M  # noqa: E402
from bench.kernels_bench import measure  # noqa: E402  (CUDA events, median of iters, peak memory)

H, KV, D = 8, 4, 64


def documents(rows: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, seq) token ids with BOS (1) where a document starts; median document about 700 tokens."""
    idx = torch.full((rows, seq), 5, dtype=torch.int64)
    for r in range(rows):
        t = 0
        while t < seq:
            idx[r, t] = 1
            t += max(16, int(torch.empty(1).log_normal_(6.5, 1.0, generator=gen).item()))
    return idx


def reference(q, k, v, idx):
    """float32, one document at a time: (rows, H, seq, D)."""
    out = torch.zeros_like(q, dtype=torch.float32)
    for r in range(q.size(0)):
        starts = (idx[r] == 1).nonzero().squeeze(1).tolist() + [q.size(2)]
        for a, b in zip(starts[:-1], starts[1:]):
            out[r, :, a:b] = F.scaled_dot_product_attention(
                q[r:r + 1, :, a:b].float(), k[r:r + 1, :, a:b].float(), v[r:r + 1, :, a:b].float(),
                is_causal=True, enable_gqa=True)[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "attention_bench_out"))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    idx = documents(args.rows, args.seq, gen).to(dev)
    B, T = idx.shape
    q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, KV, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
    n_docs = int((idx == 1).sum())
    rows: list[dict] = []

    def record(name, fn, check=None):
        row = {"case": name}
        try:
            row.update(measure(lambda: fn().backward(grad), args.iters, warmup=2))
            if check is not None:
                for t in (q, k, v):
                    t.grad = None
                y = fn()
                y.backward(grad)
                ref_q, ref_k, ref_v = (t.detach()[:2].clone().requires_grad_() for t in (q, k, v))
                want = reference(ref_q, ref_k, ref_v, idx[:2])
                want.backward(grad[:2].float())
                row["max_err_out"] = float((y.detach()[:2].float() - want.detach()).abs().max())
                row["max_err_dq"] = float((q.grad[:2].float() - ref_q.grad).abs().max())
                row["max_err_dk"] = float((k.grad[:2].float() - ref_k.grad).abs().max())
                row["max_err_dv"] = float((v.grad[:2].float() - ref_v.grad).abs().max())
        except Exception as e:  # one failing case must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "attention_bench.json").write_text(json.dumps(
            {"rows": rows, "shape": [B, H, KV, T, D], "documents": n_docs, "gpu": torch.cuda.get_device_name()},
            indent=1))

    record("sdpa_dense", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    flex_mask = M.DocumentMask(idx, 1, True)  # the FlexAttention block mask (no varlen passed)
    record("flex_isolated", lambda: M.flex_attention(q, k, v, flex_mask.block_mask, True), check=True)
    fa4 = M.find_flash_varlen()
    print("varlen kernel:", getattr(fa4, "__name__", None), flush=True)
    if fa4 is not None:
        mask = M.DocumentMask(idx, 1, True, fa4)

        def varlen():
            y = fa4(q.transpose(1, 2).reshape(B * T, H, D), k.transpose(1, 2).reshape(B * T, KV, D),
                    v.transpose(1, 2).reshape(B * T, KV, D), cu_seqlens_q=mask.cu_seqlens,
                    cu_seqlens_k=mask.cu_seqlens, max_seqlen_q=T, max_seqlen_k=T, causal=True)
            return (y[0] if isinstance(y, tuple) else y).view(B, T, H, D).transpose(1, 2)
        record(f"fa4_varlen ({fa4.__name__})", varlen, check=True)
        record("fa4_varlen compiled", torch.compile(varlen, fullgraph=fa4 is M.fa4_varlen), check=True)
    md = ["| case | ms fwd+bwd | peak MiB | max err out | dq | dk | dv | error |",
          "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r.get(k, "") for k in ("ms", "peak_mib", "max_err_out", "max_err_dq", "max_err_dk", "max_err_dv",
                                          "error")]
        md.append(f"| {r['case']} | " + " | ".join(map(str, cells)) + " |")
    (out / "attention_bench.md").write_text(
        f"{B} rows x {T} tokens, {n_docs} documents, {H}/{KV} heads of {D}, bf16, {torch.cuda.get_device_name()}\n\n"
        + "\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
