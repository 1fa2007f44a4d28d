"""On the CPU, golf's record model and optimizer step against the 1.0611 record script's own, same weights, same batches.

    (the reference scripts and the FineWeb sample from .ref/, bench/parity_carry.sh, or from ../shared)
    python bench/parity_cpu.py [--steps 30] [--emb-bf16] [--golf-muon-bf16] > bench/results/parity/cpu_crosscheck.txt

The reference script is imported as a measuring instrument (its Triton kernels are never called: triton is stubbed
and torch.compile is the identity; its fused MLP and fused loss are off). golf's randomly perturbed weights are copied
into the reference's banks, then (1) both models' logits are compared, without and with the layer loop, and (2) both
train side by side on the same FineWeb sample batches with the record's optimizers: golf's ``build_optimizers`` with
the record preset, and the reference's Muon and AdamW groups as its ``Optimizers`` builds them (read from the script).
A systematic loss difference here is a difference of maths; none here and one on the GPU points at the GPU path
(compiled kernels, fused loss, bf16 autocast, data order).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from golf.config import preset  # noqa: E402  (before triton is stubbed: torch's own imports need the real state)
from gpt.model import GPT  # noqa: E402
from gpt.training import build_optimizers  # noqa: E402

# the reference scripts and the FineWeb sample: carried in .ref/ (bench/parity_carry.sh) or where ../shared keeps them
SHARED = Path(os.environ.get("GOLF_SHARED", ROOT.parent / "shared"))
SCRIPTS = next((p for p in (ROOT / ".ref" / "scripts", SHARED / "reference" / "scripts") if p.is_dir()), None)
SAMPLE = next((p for p in (ROOT / ".ref" / "fineweb_sample" / "fineweb_val_000000.bin",
                           SHARED / "data" / "fineweb_sample" / "fineweb_val_000000.bin") if p.exists()), None)


def load_reference(dim: int, heads: int, kv: int, vocab: int):
    for name in ("triton", "triton.language", "triton.tools", "triton.tools.tensor_descriptor"):
        sys.modules.setdefault(name, mock.MagicMock())
    torch.compile = lambda f=None, **kw: f if f is not None else (lambda g: g)
    os.environ.update(VOCAB_SIZE=str(vocab), MODEL_DIM=str(dim), NUM_HEADS=str(heads), NUM_KV_HEADS=str(kv),
                      CASEOPS_ENABLED="0", SPARSE_ATTN_GATE_ENABLED="1", SPARSE_ATTN_GATE_SCALE="0.5", GATE_WINDOW="12",
                      SMEAR_GATE_ENABLED="1", FUSED_CE_ENABLED="0", BETA2="0.99", MATRIX_LR="0.026", GRAD_CLIP_NORM="0.3")
    scripts = SCRIPTS
    if scripts is None or SAMPLE is None:
        raise SystemExit("the reference scripts are in neither .ref/ nor ../shared: run bash bench/parity_carry.sh")
    sys.path.insert(0, str(scripts))  # its flash_attn_interface shim: dense SDPA
    spec = importlib.util.spec_from_file_location("record_reference", scripts / "record_1.0611_train_gpt.py")
    ref = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, ["reference"]
    spec.loader.exec_module(ref)
    sys.argv = argv
    ref.BOS_ID = 1
    return ref


def copy_into_reference(golf: GPT, r) -> None:
    """golf's per-layer matrices into the reference's banks (Q|O, K|V, up, down), and every other parameter."""
    n = golf.cfg.num_layers
    with torch.no_grad():
        r.tok_emb.weight.copy_(golf.embed.weight)
        for i, b in enumerate(golf.blocks):
            r.qo_bank[i].copy_(b.attn.q.weight)
            r.qo_bank[n + i].copy_(b.attn.out.weight)
            r.kv_bank[i].copy_(b.attn.k.weight)
            r.kv_bank[n + i].copy_(b.attn.v.weight)
            r.mlp_up_bank[i].copy_(b.mlp.fc.weight)
            r.mlp_down_bank[i].copy_(b.mlp.proj.weight)
            rb = r.blocks[i]
            for mine, theirs in ((b.attn.q_gain, rb.attn.q_gain), (b.attn.gate_w, rb.attn.attn_gate_w),
                                 (b.attn_scale, rb.attn_scale), (b.mlp_scale, rb.mlp_scale), (b.resid_mix, rb.resid_mix)):
                theirs.copy_(mine)
            if b.two_lanes:
                r.parallel_post_lambdas[i].copy_(b.lane_post)
                r.parallel_resid_lambdas[i].copy_(b.lane_resid)
        r.skip_weights.copy_(golf.skip_weights)
        r.skip_gates.copy_(golf.skip_gates)
        r.smear_gate.weight.copy_(golf.smear.gate.weight)
        r.smear_lambda.copy_(golf.smear.lam)
    for m in r.modules():
        if isinstance(m, type(r.blocks[0].mlp)):
            m.use_fused = False  # its Triton MLP kernel: the plain path, same maths


def reference_optimizers(ref, r, t) -> tuple[list, object]:
    """The record script's three optimizers over its own parameter split (its Optimizers class, as read)."""
    patterns = ref.CONTROL_TENSOR_NAME_PATTERNS
    scalars = [p for name, p in r.blocks.named_parameters() if p.ndim < 2 or any(s in name for s in patterns)]
    scalars += [r.skip_weights, r.skip_gates, r.parallel_post_lambdas, r.parallel_resid_lambdas,
                r.smear_gate.weight, r.smear_lambda]
    tok = torch.optim.AdamW([{"params": [r.tok_emb.weight], "lr": t.embed_lr}], betas=(0.9, t.adam_beta2), eps=1e-8,
                            weight_decay=t.embed_weight_decay)
    muon = ref.Muon([r.qo_bank, r.kv_bank, r.mlp_up_bank, r.mlp_down_bank], lr=t.matrix_lr, momentum=t.muon_momentum,
                    backend_steps=5, weight_decay=t.muon_weight_decay, row_normalize=True)
    sc = torch.optim.AdamW([{"params": scalars, "lr": t.scalar_lr}], betas=(0.9, t.adam_beta2), eps=1e-8,
                           weight_decay=t.scalar_weight_decay)
    return [tok, muon, sc], muon


def check_init(ref, cfg) -> int:
    """Both models as each builds itself at seed 42, matrix against matrix: equal means the same draw."""
    torch.manual_seed(42)
    r = ref.GPT(ref.Hyperparameters())
    ref.restore_fp32_params(r.bfloat16())  # as its train_model builds it for the GPU: bf16, then fp32 but the embedding
    torch.manual_seed(42)
    golf = GPT(cfg)
    n = cfg.num_layers
    pairs = [("embedding", golf.embed.weight, r.tok_emb.weight), ("smear gate", golf.smear.gate.weight, r.smear_gate.weight),
             ("smear lambda", golf.smear.lam, r.smear_lambda), ("skip weights", golf.skip_weights, r.skip_weights),
             ("skip gates", golf.skip_gates, r.skip_gates)]
    for i, b in enumerate(golf.blocks):
        rb = r.blocks[i]
        pairs += [(f"layer {i} Q", b.attn.q.weight, r.qo_bank[i]), (f"layer {i} O", b.attn.out.weight, r.qo_bank[n + i]),
                  (f"layer {i} K", b.attn.k.weight, r.kv_bank[i]), (f"layer {i} V", b.attn.v.weight, r.kv_bank[n + i]),
                  (f"layer {i} MLP up", b.mlp.fc.weight, r.mlp_up_bank[i]),
                  (f"layer {i} MLP down", b.mlp.proj.weight, r.mlp_down_bank[i]),
                  (f"layer {i} attention gate", b.attn.gate_w, rb.attn.attn_gate_w),
                  (f"layer {i} q gain", b.attn.q_gain, rb.attn.q_gain), (f"layer {i} attn scale", b.attn_scale, rb.attn_scale),
                  (f"layer {i} mlp scale", b.mlp_scale, rb.mlp_scale), (f"layer {i} resid mix", b.resid_mix, rb.resid_mix)]
        if b.two_lanes:
            pairs += [(f"layer {i} lane residuals", b.lane_resid, r.parallel_resid_lambdas[i]),
                      (f"layer {i} lane outputs", b.lane_post, r.parallel_post_lambdas[i])]
    drawn = sum(1 for _, mine, _ in pairs if mine.detach().unique().numel() > 2)  # not a fill of constants
    worst = 0.0
    for name, mine, theirs in pairs:
        diff = (mine.detach().float() - theirs.detach().float()).abs().max().item()
        worst = max(worst, diff)
        if diff:
            print(f"init: {name} differs by {diff:.3g} (std {mine.std().item():.3g} against {theirs.std().item():.3g})")
    print(f"init at seed 42: max |golf - reference| {worst:.3g} over {len(pairs)} tensors ({drawn} of them random draws)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--emb-bf16", action="store_true", help="the reference's embedding in bf16, as its GPU run keeps it")
    ap.add_argument("--fused-loss", action="store_true", help="golf trains through its fused softcap loss, as on a GPU")
    ap.add_argument("--bf16", action="store_true", help="both under bf16 autocast with a bf16 residual stream, as on a "
                                                       "GPU (golf casts its embedding output; the reference's is bf16)")
    ap.add_argument("--schedule", action="store_true",
                    help="the record's step-based schedule over --steps (LR flat to 15%%, then down to 10%% of it, "
                         "warmdown_frac 0.85) and its loop from 35%%, instead of a constant LR and the loop from half-way")
    ap.add_argument("--check-init", action="store_true",
                    help="only compare the initial weights both draw at seed 42 (each its own draw, nothing copied)")
    ap.add_argument("--golf-muon-bf16", action="store_true",
                    help="golf's Muon with the script's precision: its gradient and momentum rounded to bf16 and the "
                         "script's own bf16 Newton-Schulz (on the CPU golf's runs in fp32; on a GPU both run bf16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    dim, heads, kv, vocab = args.dim, 8, 4, 1024
    ref = load_reference(dim, heads, kv, vocab)
    rec = preset("record").train
    cfg = dataclasses.replace(rec.model, vocab_size=vocab, model_dim=dim, num_heads=heads, num_kv_heads=kv,
                              doc_isolation=False)
    t = dataclasses.replace(rec, model=cfg)

    if args.check_init:
        return check_init(ref, cfg)

    # (1) the forward: perturbed weights (every path live), copied across, logits compared
    torch.manual_seed(0)
    golf = GPT(cfg)
    for p in golf.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    r = ref.GPT(ref.Hyperparameters()).float()
    copy_into_reference(golf, r)
    idx = torch.randint(2, vocab, (2, 256))
    idx[:, 0] = 1
    idx[0, 100] = 1
    for loop in (False, True):
        golf.recurrence_active = r.looping_active = loop
        with torch.no_grad():
            diff = (golf.logits(idx) - r.forward_logits(idx)).abs().max().item()
        print(f"forward, loop {'on ' if loop else 'off'}: max |golf - reference| logit {diff:.3g}")

    # (2) training from the record's own init, side by side
    torch.manual_seed(0)
    golf = GPT(cfg)
    r = ref.GPT(ref.Hyperparameters()).float()
    copy_into_reference(golf, r)
    if args.emb_bf16 or args.bf16:
        r.tok_emb.weight.data = r.tok_emb.weight.data.bfloat16()
    if args.bf16:  # what golf's hidden() does on CUDA under autocast: the residual stream in the autocast dtype
        golf.embed.register_forward_hook(lambda module, inputs, out: out.to(torch.bfloat16))
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    if args.fused_loss:
        from gpt.losses import fused_softcap_cross_entropy
        golf.loss_fn = fused_softcap_cross_entropy
    g_opts = build_optimizers(t, golf, torch.device("cpu"))
    r_opts, r_muon = reference_optimizers(ref, r, t)
    if args.golf_muon_bf16:  # the script's Newton-Schulz (Polar Express, bf16) in golf's Muon too
        ns = mock.patch("gpt.optim.newton_schulz", lambda g, steps, schedule, eps=1e-7:
                        ref.zeropower_via_newtonschulz5(g, steps=steps).to(g.dtype))
        ns.start()
    bf16_round = lambda x: x.copy_(x.bfloat16().float())  # noqa: E731  (values of bf16, dtype kept)
    tokens = np.fromfile(SAMPLE, dtype=np.uint16)[512:].astype(np.int64)
    B, T = 8, 256
    loop_from = int(np.ceil(t.recur_from_frac * args.steps)) if args.schedule else args.steps // 2

    def lr_mult(step: int) -> float:  # the record script's lr_mul(step / iterations), step counted from 0
        frac = step / args.steps
        if not args.schedule or frac < 1.0 - t.warmdown_frac:
            return 1.0
        return max((1.0 - frac) / t.warmdown_frac, t.min_lr_frac)

    for opt in (*g_opts, *r_opts):
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
    print(f"training {args.steps} steps, batch {B}x{T}, loop from step {loop_from}; "
          f"{'the record schedule' if args.schedule else 'constant LR'}; clip {t.grad_clip}")
    diffs = []
    for step in range(args.steps):
        chunk = torch.from_numpy(tokens[step * B * T: (step + 1) * B * T + 1])
        x, y = chunk[:-1].view(B, T), chunk[1:].view(B, T)
        frac = min(step / t.muon_momentum_warmup_steps, 1.0)
        momentum = (1 - frac) * t.muon_momentum_warmup_start + frac * t.muon_momentum
        losses = []
        for model, opts, muon in ((golf, g_opts, g_opts[0]), (r, r_opts, r_muon)):
            golf.recurrence_active = r.looping_active = step >= loop_from
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr_mult(step)
            with precision():
                loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), t.grad_clip)
            for group in muon.param_groups:
                group["momentum"] = momentum
            golf_bf16 = args.golf_muon_bf16 and model is golf
            if golf_bf16:  # the script casts each matrix's gradient to bf16 before its momentum
                for p in (p for group in muon.param_groups for p in group["params"] if p.grad is not None):
                    bf16_round(p.grad)
            for opt in opts:
                opt.step()
            if golf_bf16:  # and keeps the momentum in bf16
                for state in muon.state.values():
                    bf16_round(state["momentum_buffer"])
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        diffs.append(losses[0] - losses[1])
        print(f"step {step + 1:3d}  golf {losses[0]:.4f}  reference {losses[1]:.4f}  diff {diffs[-1]:+.4f}", flush=True)
    print(f"max |diff| {max(map(abs, diffs)):.4f}, mean diff {np.mean(diffs):+.4f} over {args.steps} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
