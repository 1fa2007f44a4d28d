"""The record preset keeps every feature of the 1.0611 record it reproduces (issue 16), and each feature does
what the record's does: a numerical check per piece, causality and document isolation of the whole model.

If one of these fails, golf's record preset has silently drifted from the parity measured in BENCHMARKS.md."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from golf.config import preset
from gpt.model import GPT, PLAIN_CAUSAL, ModelConfig, rms_norm
from gpt.training import build_optimizers, split_params

RECORD = preset("record")


def small_record(**over) -> ModelConfig:
    """The record's model at a width the CPU runs in milliseconds: every feature and the layer count kept."""
    fields = dict(vocab_size=96, model_dim=64, num_heads=4, num_kv_heads=2, doc_isolation=False, bos_id=1)
    fields.update(over)
    return dataclasses.replace(RECORD.train.model, **fields)


def test_the_preset_says_what_the_record_runs():
    m, t, q, e = RECORD.train.model, RECORD.train, RECORD.quantize, RECORD.eval
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult) == (11, 512, 8, 4, 4.0)
    assert (m.attn_gate_dims, m.attn_gate_scale, m.orthogonal_init, m.skip_gates) == (12, 0.5, True, True)
    assert (m.recur_start, m.recur_end, m.recur_passes, m.recur_resplit) == (3, 5, 3, True)
    assert (m.parallel_from, m.parallel_lanes, m.parallel_resid_init) == (8, 2, 1.1)
    assert (m.rope_dims, m.qk_gain_init, m.xsa, m.ln_scale, m.smear_gate) == (16, 5.0, True, True, True)
    assert (t.grad_clip, t.embed_lr, t.scalar_lr, t.matrix_lr, t.adam_beta2) == (0.3, 0.03, 0.02, 0.026, 0.99)
    assert (t.embed_weight_decay, t.scalar_weight_decay, t.muon_weight_decay) == (0.085, 0.02, 0.095)
    assert (t.loader, t.clip_scope) == ("shard_spans", "local")
    assert (t.muon_momentum, t.muon_momentum_warmup_start, t.muon_momentum_warmup_steps) == (0.97, 0.92, 1500)
    assert (t.warmdown_frac, t.min_lr_frac, t.ema_decay, t.recur_from_frac, t.warmup_steps) == (0.85, 0.1, 0.9965, 0.35, 0)
    assert (q.bits, q.embed_bits, q.attn_clip, q.mlp_clip, q.embed_clip, q.lqer_rank) == (6, 7, "sd:13", "sd:11.5", "sd:14", 4)
    assert (q.lqer_mode, q.lqer_top, q.lqer_group, q.gate_int8) == ("asym", 3, 64, True)
    assert (e.seq_len, e.stride, e.doc_isolation, e.ttt.method) == (2048, 0, True, "phased")
    assert (e.ttt.lora_rank, e.ttt.lora_alpha, e.ttt.lora_lr, e.ttt.lora_wd, e.ttt.phase_docs) == (80, 144.0, 1e-4, 0.5, 2500)
    assert (e.ttt.lora_layout, e.ttt.lora_head, e.ttt.lora_warm_a) == ("record", True, True)
    assert e.ttt.lora_compile == "dynamic"  # the TTT forward compiled as the record does (CUDA only)


def test_the_baseline_preset_has_none_of_the_record_features():
    m = preset("baseline").train.model
    assert not (m.attn_gate_dims or m.orthogonal_init or m.skip_gates or m.recur_resplit or m.has_recurrence)
    assert m.parallel_from == -1 and m.parallel_lanes == 1
    names = {n for n, _ in GPT(dataclasses.replace(m, vocab_size=64, num_layers=4, model_dim=32)).named_parameters()}
    assert not any("gate" in n or "lane" in n for n in names)


def test_looped_order_and_skip_pairing_are_the_records():
    model = GPT(small_record())
    model.recurrence_active = True
    plan = model.layer_plan()
    # 3 + 3 x 3 + 5 = 17 calls; the first 8 push, the next 8 take skips 0..7 (LIFO), the last takes none
    assert [i for i, _, _ in plan] == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [p for _, p, _ in plan] == [True] * 8 + [False] * 9
    assert [j for _, _, j in plan] == [-1] * 8 + list(range(8)) + [-1]
    assert model.skip_weights.shape == (8, 64) and model.skip_gates.shape == (8, 64)
    model.recurrence_active = False  # before 35% of training: the plain halves, 5 skips
    assert [(i, p, j) for i, p, j in model.layer_plan()] == \
        [(i, True, -1) for i in range(5)] + [(5 + k, False, k) for k in range(6)]
    assert [b.two_lanes for b in model.blocks] == [False] * 8 + [True] * 3


def test_orthogonal_init_and_zero_outputs():
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(RECORD.train.model, vocab_size=8192))
    eye = lambda n: torch.eye(n)  # noqa: E731
    for block in model.blocks[:2]:
        # rows orthonormal, up to the bf16 rounding of every starting value (the script's GPU build)
        for w in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight):
            assert torch.allclose(w @ w.T, eye(w.shape[0]), atol=5e-3)
        fc = block.mlp.fc.weight  # 2048 x 512: columns orthonormal
        assert torch.allclose(fc.T @ fc, eye(fc.shape[1]), atol=5e-3)
        assert block.attn.out.weight.abs().max() == 0 and block.mlp.proj.weight.abs().max() == 0
        assert block.attn.gate_w.abs().max() == 0
    assert abs(model.embed.weight.std().item() - 0.005) < 2e-4
    assert torch.equal(model.blocks[9].lane_resid, torch.full((2,), 1.1).bfloat16().float())  # 1.1015625


def test_attention_gate_is_a_per_head_sigmoid_of_the_first_dims():
    torch.manual_seed(1)
    cfg = small_record()
    gated = GPT(cfg).blocks[0].attn
    plain = GPT(dataclasses.replace(cfg, attn_gate_dims=0)).blocks[0].attn
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "gate_w"})
    w_out = torch.randn_like(gated.out.weight)  # a non-zero output projection, so the outputs can be compared
    gated.out.weight.data.copy_(w_out)
    plain.out.weight.data.copy_(w_out)
    x = rms_norm(torch.randn(2, 7, 64))
    # zero-initialised: every head at sigmoid(0) = 0.5, so the output is exactly half the ungated one
    assert torch.allclose(gated(x, PLAIN_CAUSAL), 0.5 * plain(x, PLAIN_CAUSAL), atol=1e-6)
    # a trained gate: head h scaled by sigmoid(0.5 * w_h . x[:12]) before the output projection
    gated.gate_w.data.normal_()
    g = torch.sigmoid(0.5 * x[..., :12] @ gated.gate_w.T)  # (B, T, H)
    seen = {}
    plain.out.register_forward_hook(lambda m, i, o: seen.setdefault("y", i[0]))
    plain(x, PLAIN_CAUSAL)
    y = seen["y"].view(2, 7, 4, 16) * g.unsqueeze(-1)
    assert torch.allclose(gated(x, PLAIN_CAUSAL), y.reshape(2, 7, 64) @ w_out.T, atol=1e-5)


def test_two_lanes_and_gated_skips_follow_the_records_formulas():
    torch.manual_seed(2)
    model = GPT(small_record())
    block = model.blocks[9]
    for p in (block.attn.out.weight, block.mlp.proj.weight):
        p.data.normal_(std=0.1)
    block.lane_resid.data = torch.tensor([1.1, 0.9])
    block.lane_post.data = torch.tensor([[1.0, 0.5], [0.25, 2.0]])
    lane0, lane1, x0 = torch.randn(3, 2, 5, 64).unbind(0)
    out0, out1 = block.forward_lanes(lane0, lane1, x0, PLAIN_CAUSAL)
    mix = block.resid_mix
    a = block.attn_scale * block.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * block.in_scale, PLAIN_CAUSAL)
    m = block.mlp_scale * block.mlp(rms_norm(lane1) * block.in_scale)
    assert torch.allclose(out0, 1.1 * lane0 + 1.0 * a + 0.25 * m, atol=1e-5)
    assert torch.allclose(out1, 0.9 * lane1 + 0.5 * a + 2.0 * m, atol=1e-5)
    # a gated skip at init is the midpoint of the stream and the weighted skip
    x, skip = torch.randn(2, 2, 5, 64).unbind(0)
    model.skip_weights.data[3] = 2.0
    assert torch.allclose(model.add_skip(x, 3, skip), 0.5 * x + 0.5 * 2.0 * skip, atol=1e-6)


@pytest.mark.parametrize("recurrence", [False, True])
def test_the_record_model_is_causal_and_isolates_documents(recurrence):
    torch.manual_seed(3)
    model = GPT(small_record(doc_isolation=True))
    for p in model.parameters():  # away from the identity-like init, so every path carries signal
        p.data.add_(torch.randn_like(p) * 0.05)
    model.recurrence_active = recurrence
    idx = torch.randint(2, 96, (1, 24))
    idx[0, 0] = idx[0, 12] = 1  # two documents: 0..11 and 12..23
    with torch.no_grad():
        base = model.logits(idx)
        future = idx.clone()
        future[0, 8:] = torch.randint(2, 96, (16,))  # change the future of position 7 (and document 2)
        assert torch.allclose(model.logits(future)[0, :8], base[0, :8], atol=1e-5)
        first = idx.clone()
        first[0, 1:12] = torch.randint(2, 96, (11,))  # change all of document 1 but its BOS
        assert torch.allclose(model.logits(first)[0, 12:], base[0, 12:], atol=1e-5)
        assert not torch.allclose(model.logits(first)[0, 1:12], base[0, 1:12], atol=1e-3)


def test_optimizer_groups_and_decoupled_decay():
    model = GPT(small_record())
    groups = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(groups["matrix"]) == 6 * 11  # Q, K, V, out, MLP in and out of each block; no gate, lane or skip
    scalars = {names[id(p)] for p in groups["scalar"]}
    assert {"skip_gates", "skip_weights", "blocks.0.attn.gate_w", "blocks.8.lane_post", "blocks.10.lane_resid"} <= scalars
    muon, adam = build_optimizers(RECORD.train, model, torch.device("cpu"))
    assert adam.defaults["betas"] == (0.9, 0.99)
    assert [g["weight_decay"] for g in adam.param_groups] == [0.085, 0.02]
    emb = model.embed.weight
    before = emb.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adam.step()  # zero gradient: Adam's step is 0, what is left is p *= 1 - lr * wd
    assert torch.allclose(emb, before * (1 - 0.03 * 0.085), atol=1e-9)


def test_shard_spans_cut_the_same_rows_on_every_pass(tmp_path):
    from gpt.shards import write_shard
    from gpt.training import ShardSpans
    a = np.arange(100, 150, dtype=np.uint16)
    a[:3] = [7, 8, 9]  # tokens before the first BOS are never read
    a[3] = 1
    b = np.arange(200, 230, dtype=np.uint16)
    b[0] = 1
    paths = [tmp_path / "a.bin", tmp_path / "b.bin"]
    write_shard(paths[0], a)
    write_shard(paths[1], b)
    streams = [ShardSpans(paths, rank, 2, micro_tokens=4, bos_id=1) for rank in (0, 1)]
    x0, y0 = streams[0].next_batch(8, 4, torch.device("cpu"))  # 2 micro-batches of 4 per rank
    x1, _ = streams[1].next_batch(8, 4, torch.device("cpu"))
    # rank 0 takes a[3:8] and a[13:18], rank 1 a[8:13] and a[18:23]: spans of 5, the 5th target only
    assert x0.tolist() == [a[3:7].tolist(), a[13:17].tolist()] and y0.tolist() == [a[4:8].tolist(), a[14:18].tolist()]
    assert x1.tolist() == [a[8:12].tolist(), a[18:22].tolist()]
    seen = [streams[0].next_batch(8, 4, torch.device("cpu"))[0][:, 0].tolist() for _ in range(4)]
    # shard a holds 47 tokens from its BOS: 4 global spans of 10; the 5th would cross its end, so shard b starts,
    # whose 30 tokens hold 3 spans; then shard a again, from its BOS, cut as on the first pass
    assert seen[0] == [a[23], a[33]] and seen[1] == [b[0], b[10]] and seen[2] == [b[20], a[3]]
    assert seen[3] == [a[13], a[23]]
    with pytest.raises(ValueError, match="no train shard holds"):
        ShardSpans(paths, 0, 2, micro_tokens=40, bos_id=1).next_batch(40, 4, torch.device("cpu"))


def test_gated_skip_weighs_the_stream_by_the_gate():
    model = GPT(small_record())
    x, skip = torch.randn(2, 2, 5, 64).unbind(0)
    model.skip_gates.data[1] = 2.0  # sigmoid(2) = 0.881 of the stream, the rest of the weighted skip
    model.skip_weights.data[1] = 0.5
    s = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(model.add_skip(x, 1, skip), s * x + (1 - s) * 0.5 * skip, atol=1e-6)


def test_shard_spans_resume_where_they_stopped_and_refuse_a_stream_snapshot(tmp_path):
    from gpt.shards import write_shard
    from gpt.training import ShardSpans, TokenStream
    paths = []
    for i, n in enumerate((300, 170, 230)):
        t = np.random.default_rng(i).integers(2, 90, n).astype(np.uint16)
        t[::37] = 1
        paths.append(tmp_path / f"s{i}.bin")
        write_shard(paths[-1], t)
    cpu = torch.device("cpu")
    whole = ShardSpans(paths, 0, 1, micro_tokens=16, bos_id=1)
    expected = [whole.next_batch(32, 8, cpu)[0] for _ in range(40)]  # wraps over the three shards twice
    first = ShardSpans(paths, 0, 1, micro_tokens=16, bos_id=1)
    got = [first.next_batch(32, 8, cpu)[0] for _ in range(17)]
    again = ShardSpans(paths, 0, 1, micro_tokens=16, bos_id=1)
    again.load_state(first.state())
    got += [again.next_batch(32, 8, cpu)[0] for _ in range(23)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(ValueError, match="stream loader"):
        again.load_state(TokenStream(paths, 0, 1).state())
    with pytest.raises(ValueError, match="shard_spans loader"):
        TokenStream(paths, 0, 1).load_state(again.state())


def test_golf_and_the_record_script_agree_on_the_cpu():
    """bench/parity_cpu.py with the record script from ../shared as the instrument: same logits, same steps."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    scripts = [root / ".ref" / "scripts", root.parent / "shared" / "reference" / "scripts"]
    if not any((p / "record_1.0611_train_gpt.py").exists() for p in scripts):
        pytest.skip("the record script is in neither .ref/ nor ../shared")
    out = subprocess.run([sys.executable, str(root / "bench" / "parity_cpu.py"), "--steps", "6"],
                         capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    forward = [float(x) for x in re.findall(r"max \|golf - reference\| logit (\S+)", out.stdout)]
    assert forward == [0.0, 0.0], out.stdout
    diffs = [float(x) for x in re.findall(r"step +\d+ .* diff ([+-]\d+\.\d+)", out.stdout)]
    assert len(diffs) == 6 and max(map(abs, diffs)) < 0.01, out.stdout


@pytest.mark.parametrize("prime", [True, False])
def test_the_warm_up_leaves_muon_momentum_primed_and_nothing_else(tmp_path, prime):
    """The record's warm-up undoes its steps except for Muon's momentum (the parity gap of BENCHMARKS.md)."""
    from gpt.shards import write_shard
    from gpt.training import Muon, Trainer
    tokens = np.random.default_rng(0).integers(2, 96, 4096).astype(np.uint16)
    tokens[::100] = 1
    write_shard(tmp_path / "train.bin", tokens)
    cfg = dataclasses.replace(RECORD.train, model=small_record(), seq_len=32, batch_tokens=64, micro_batch_tokens=64,
                              compile="off", device="cpu", compile_warmup_steps=2, warmup_primes_muon=prime)
    assert RECORD.train.warmup_primes_muon and not preset("baseline").train.warmup_primes_muon
    trainer = Trainer(cfg, [tmp_path / "train.bin"], 96, tmp_path / "out", tmp_path / "work")
    trainer.set_up()
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stream, active, steps = trainer.stream.state(), trainer.model.recurrence_active, []
    trainer.step = lambda s, lr, step=trainer.step: steps.append((s, trainer.model.recurrence_active)) or step(s, lr)
    trainer.warm_up()
    if not prime:  # without compile there is nothing to warm up
        assert steps == [] and all(not o.state for o in trainer.optimizers)
        return
    # 2 steps without the loop, 2 with it, each pass counting from 0 as the momentum schedule expects
    assert steps == [(0, False), (1, False), (0, True), (1, True)]
    assert all(torch.equal(v, init[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.stream.state() == stream and trainer.model.recurrence_active == active
    muon, adams = trainer.optimizers[0], trainer.optimizers[1:]
    assert isinstance(muon, Muon) and all(not o.state for o in adams)
    bufs = [muon.state[p]["momentum_buffer"] for g in muon.param_groups for p in g["params"]]
    assert len(bufs) == sum(len(g["params"]) for g in muon.param_groups) and all(b.abs().sum() > 0 for b in bufs)


def test_the_record_draws_the_scripts_initial_weights_at_the_same_seed():
    """bench/parity_cpu.py --check-init: each side builds its own model at seed 42, nothing copied across; every
    matrix must be the same draw. golf's blocks used to draw their Linears' default init as they were built, which
    the script's banks never do, so golf at seed 42 was in effect another seed of the script (0.66 apart)."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    scripts = [root / ".ref" / "scripts", root.parent / "shared" / "reference" / "scripts"]
    if not any((p / "record_1.0611_train_gpt.py").exists() for p in scripts):
        pytest.skip("the record script is in neither .ref/ nor ../shared")
    out = subprocess.run([sys.executable, str(root / "bench" / "parity_cpu.py"), "--check-init"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.search(r"max \|golf - reference\| (\S+) over (\d+) tensors \((\d+) of them random draws\)", out.stdout)
    n = RECORD.train.model.num_layers
    # the embedding and per layer Q, K, V and the MLP input are draws; the rest (zeros, ones, 1.1) are constants
    assert found and int(found[2]) >= 5 + 11 * n and int(found[3]) == 1 + 4 * n, out.stdout
    assert float(found[1]) == 0.0, out.stdout


def test_record_init_order_draws_no_default_init_and_needs_orthogonal_matrices():
    from gpt.model import Linear
    state = torch.random.get_rng_state()
    layer = Linear(32, 48, draw=False)
    assert torch.equal(torch.random.get_rng_state(), state) and not layer.weight.any()
    Linear(32, 48)  # the default init draws
    assert not torch.equal(torch.random.get_rng_state(), state)
    assert RECORD.train.model.init_order == "record" and preset("baseline").train.model.init_order == "official"
    torch.manual_seed(3)
    model = GPT(small_record())
    for block in model.blocks:  # drawn by init_weights, orthogonal up to bf16 rounding; the outputs zero
        for w in (block.attn.q.weight, block.mlp.fc.weight):
            torch.testing.assert_close(w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w,
                                       torch.eye(min(w.shape)), atol=5e-3, rtol=0)
        assert not block.attn.out.weight.any() and not block.mlp.proj.weight.any()
    for p in model.parameters():  # every starting value a bf16 one, as the script's GPU build leaves them
        assert torch.equal(p, p.bfloat16().float())
    # the order of the draws: the embedding, each layer's Q, K, V, then every layer's MLP input
    torch.manual_seed(3)
    torch.nn.Embedding(*model.embed.weight.shape)  # the embedding's default draw, as at build
    torch.nn.Linear(model.smear.gate_dims, 1, bias=False)  # the smear gate's default draw
    expect = [torch.nn.init.normal_(torch.empty_like(model.embed.weight), std=model.cfg.tied_embed_init_std)]
    for block in model.blocks:
        expect += [torch.nn.init.orthogonal_(torch.empty_like(w)) for w in (block.attn.q.weight, block.attn.k.weight,
                                                                             block.attn.v.weight)]
    expect += [torch.nn.init.orthogonal_(torch.empty_like(block.mlp.fc.weight)) for block in model.blocks]
    got = [model.embed.weight] + [w for b in model.blocks for w in (b.attn.q.weight, b.attn.k.weight, b.attn.v.weight)]
    got += [b.mlp.fc.weight for b in model.blocks]
    for mine, want in zip(got, expect, strict=True):
        assert torch.equal(mine.detach(), want.bfloat16().float())
    for bad in (dict(orthogonal_init=False), dict(mup_out_init=True), dict(bigram_buckets=64), dict(init_order="banks")):
        with pytest.raises(ValueError, match="init_order"):
            small_record(**bad)
