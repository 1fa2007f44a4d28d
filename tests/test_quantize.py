"""average + quantize: codec round trips, clip rules, GPTQ, calibration data, cap fit, errors, the sweep flow."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from artifacts import run_stage
from gpt import averaging
from stages import average, quantize  # noqa: F401
from gpt.capfit import CapFitError
from gpt.gptq import ClipSpecError, gptq, lqer, parse_clip, quantize_matrix, row_scales, rtn, sort_rows
from gpt.qpack import SectionCache, assemble, available_compressors, layout, pack_sections, shuffle
from gpt.quant import BlobError, decode_weights, dequantize_entry, dequantize_rows, unshuffle


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02 + (torch.rand(rows, cols, generator=g) < 0.002) * 0.3


def blob_of(entries: dict, methods=("zlib",), shuffle_mode=False) -> bytes:
    lay = layout(entries, {n: "g" if "q" in t else "float" for n, t in entries.items()})
    return assemble(lay.index, pack_sections(lay, SectionCache(), list(methods), shuffle_mode), {"m": 1})


# --- codec ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_every_bit_width_round_trips_exactly(bits):
    w = heavy_tailed(48, 80, seed=bits)
    t = quantize_matrix(w, bits, "sd:4")
    qmax = 2 ** (bits - 1) - 1
    assert int(t["q"].abs().max()) <= qmax and int(t["q"].abs().max()) == qmax  # sd:4 clips the outliers
    entries = {"w": t, "f": {"float": torch.randn(7, dtype=torch.float32).half()}}
    state, meta = decode_weights(blob_of(entries))
    assert meta == {"m": 1}
    assert torch.equal(state["w"], dequantize_rows(t["q"], t["scale"]))
    assert torch.equal(state["f"], entries["f"]["float"].float())


def test_every_compressor_shuffle_row_order_and_lqer_round_trip():
    w = heavy_tailed(64, 96)
    t = lqer(w, quantize_matrix(w, 5, "pct:99.9"), rank=3, bits=4)
    t = sort_rows(t)
    f32 = {"float": torch.randn(5, 3)}
    expected = dequantize_entry(t)
    for method in available_compressors() + ["none"]:
        for sh in (False, True):
            state, _ = decode_weights(blob_of({"w": t, "b": f32}, [method], sh))
            assert torch.equal(state["w"], expected), (method, sh)
            assert torch.equal(state["b"], f32["float"])
    # the stored row order and the correction both act: undo either and the weights differ
    assert not torch.equal(dequantize_rows(t["q"], t["scale"]), expected)
    # LQER lowers the error it was fitted to
    plain = quantize_matrix(w, 5, "pct:99.9")
    assert (expected - w).norm() < (dequantize_entry(plain) - w).norm()


@pytest.mark.parametrize("n,width", [(0, 2), (1, 2), (7, 2), (8, 4), (13, 4), (10, 1)])
def test_byte_shuffle_round_trips(n, width):
    data = bytes(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8))
    assert unshuffle(shuffle(data, width), width) == data
    if n >= 2 * width and width > 1:
        assert shuffle(data, width) != data or len(set(data)) == 1


def test_best_compressor_is_never_larger_than_any_single_one():
    w = heavy_tailed(128, 128)
    entries = {"w": quantize_matrix(w, 6, "sd:12.85"), "s": {"float": torch.randn(300).half()}}
    lay = layout(entries, {"w": "g", "s": "float"})

    def section_bytes(methods, sh):
        return sum(len(p.data) for p in pack_sections(lay, SectionCache(), methods, sh).values())
    best = section_bytes(available_compressors(), None)
    assert all(best <= section_bytes([m], sh) for m in available_compressors() for sh in (False, True))


def test_corrupt_or_foreign_blobs_fail_with_blob_error():
    blob = blob_of({"w": quantize_matrix(heavy_tailed(32, 32), 6, "max")})
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01
    for bad, message in [(bytes(flipped), "checksum mismatch"), (blob[:-5], "checksum mismatch"),
                         (blob[:12], "truncated"), (b"GOLFQ1" + blob[6:], "older GOLFQ1"),
                         (b"PK\x03\x04" + blob[4:], "bad magic")]:
        with pytest.raises(BlobError, match=message):
            decode_weights(bad)


# --- clip rules and GPTQ -------------------------------------------------------------------------
def test_sdclip_sets_the_step_from_the_row_std_and_larger_k_costs_fewer_bytes():
    w = heavy_tailed(64, 256)
    for k in (4.0, 12.85):
        s = row_scales(w, 6, f"sd:{k}")
        assert torch.equal(s, (k * w.std(dim=1, unbiased=False) / 31).to(torch.float16))
    def sizes_errors(x):
        sizes, errors = [], []
        for k in (3, 6, 12, 24):
            t = quantize_matrix(x, 6, f"sd:{k}")
            sizes.append(len(blob_of({"w": t}, ["lzma"])))
            errors.append(float((dequantize_entry(t) - x).norm()))
        return sizes, errors

    sizes, errors = sizes_errors(w)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4  # coarser steps: fewer bytes
    assert errors[0] > errors[2]  # k=3 clips the heavy tail's outliers: more error than k=12
    gaussian = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02
    sizes, errors = sizes_errors(gaussian)
    assert sizes == sorted(sizes, reverse=True)
    assert errors[1] < errors[2] < errors[3]  # nothing left to clip: a coarser step is only more error
    with pytest.raises(ClipSpecError, match="sd:K"):
        parse_clip("sd:-1")
    with pytest.raises(ClipSpecError):
        parse_clip("pct:101")


def test_clip_search_keeps_per_row_the_least_error_of_its_grid():
    from gpt.gptq import PCT_GRID, SD_GRID
    w = heavy_tailed(64, 128)

    def row_err(spec):
        s = row_scales(w, 5, spec)
        return (dequantize_rows(rtn(w, s, 5), s) - w).pow(2).sum(dim=1)

    for search, grid in (("search:pct", [f"pct:{p}" for p in PCT_GRID]), ("search:sd", [f"sd:{k}" for k in SD_GRID])):
        found = row_err(search)
        singles = torch.stack([row_err(g) for g in grid])
        assert torch.all(found <= singles.min(dim=0).values + 1e-12), search
        assert float(found.sum()) < float(singles.sum(dim=1).min())  # rows pick different candidates


def test_gptq_lowers_the_layer_output_error_against_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    n, cols, rows = 4096, 96, 64
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)  # correlated, uneven
    H = X.T @ X / n
    W = torch.randn(rows, cols, generator=g) * 0.05
    for bits in (4, 6):
        scale = row_scales(W, bits, "max")
        err = {}
        for name, q in (("rtn", rtn(W, scale, bits)), ("gptq", gptq(W, H, scale, bits, block=32))):
            err[name] = float(((dequantize_rows(q, scale) - W) @ X.T).pow(2).mean())
        assert err["gptq"] < 0.7 * err["rtn"], (bits, err)


# --- the stages on a real (fast) run ---------------------------------------------------------------
def run_quantize(pipeline_run, **changes):
    store, cfg, results = pipeline_run
    qcfg = dataclasses.replace(cfg.quantize, **changes)
    inputs = {"average": results["average"].artifact, "tokenize": results["tokenize"].artifact}
    return run_stage(quantize.STAGE, qcfg, inputs, store)


def test_calibration_reads_only_train_shards(pipeline_run, monkeypatch):
    import gpt.shards
    opened = []
    real = gpt.shards.load_tokens

    def spy(path):
        opened.append(path.name)
        return real(path)
    import gpt.quantization
    monkeypatch.setattr(gpt.quantization, "load_tokens", spy)
    monkeypatch.setattr(gpt.shards, "load_tokens", spy)
    res = run_quantize(pipeline_run, method="gptq", bits=6, clip="sd:12.85", calib_seqs=4, lqer_rank=2)
    m = res.artifact.metrics
    assert not res.cached and opened and all("_train_" in n for n in opened), opened
    assert m["calibration_shards"] == ["fineweb_train_000000.bin"] and m["calibration_tokens"] == 4 * 256
    assert m["calibration_seconds"] > 0
    size = json.loads(res.artifact.file("size.json").read_text())
    assert sum(r["lqer"] for r in size["tensors"]) == 3
    assert all(r["rel_output_error"] is not None for r in size["tensors"] if r["scheme"].startswith("int"))


def test_over_cap_fails_with_the_excess_and_nothing_is_stored(pipeline_run):
    store = pipeline_run[0]
    before = set(store.keys())
    with pytest.raises(quantize.OverCap) as e:
        run_quantize(pipeline_run, cap_bytes=100_000)
    msg = str(e.value)
    total = int(re.search(r"artifact is ([\d,]+) bytes", msg).group(1).replace(",", ""))
    assert f"{total - 100_000:,} over the cap of 100,000" in msg
    assert set(store.keys()) == before and store.incomplete() == []
    # without fail_over_cap the artifact is kept and says it does not fit
    m = run_quantize(pipeline_run, cap_bytes=100_000, fail_over_cap=False).artifact.metrics
    assert m["fits"] is False and m["margin_bytes"] == 100_000 - m["artifact_bytes"]
    # the same weights; train_gpt.py embeds the quantize config, fail_over_cap's value included: a few bytes apart
    assert abs(m["artifact_bytes"] - total) < 64


def test_cap_fit_picks_a_candidate_under_a_small_cap_and_fails_clearly_when_none_fits(pipeline_run):
    int8 = run_quantize(pipeline_run).artifact.metrics["artifact_bytes"]
    grid = dict(mode="fit", fit_bits="4,8", fit_clips="sd:12.85,pct:99.99984", heldout_tokens=2048, fit_verify_top=2,
                compressor="zlib", fit_margin_bytes=1000)
    res = run_quantize(pipeline_run, cap_bytes=int8 - 1, fit_val_bpb=True, fit_val_tokens=4096, **grid)
    art = res.artifact
    m = art.metrics
    assert m["artifact_bytes"] <= int8 - 1 - 1000 and m["fit_candidates"] == 4 ** 3
    report = json.loads(art.file("candidates.json").read_text())
    rows = report["candidates"]
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["verified"] and chosen[0]["artifact_bytes"] == m["artifact_bytes"]
    assert all(r["fits"] == (r["artifact_bytes"] <= report["target_bytes"]) for r in rows)
    # the chosen one has the lowest measured held-out loss of the verified ones that fit
    measured = [r["heldout_loss"] for r in rows if r.get("verified") and r["fits"]]
    assert chosen[0]["heldout_loss"] == min(measured)
    # val_bpb is reported for the verified rows when asked (never used to choose)
    assert all(1.0 < r["val_bpb"] < 6.0 for r in rows if r.get("verified") and r["fits"])
    assert "val_bpb" not in [k for r in rows if not r.get("verified") for k in r] and report["pre_quant_val_bpb"] > 1.0
    assert "| embed | attn | mlp | artifact bytes |" in art.file("candidates.md").read_text()
    assert set(report["groups"]) == {"embed", "attn", "mlp"} and len(report["groups"]["mlp"]) == 4
    with pytest.raises(CapFitError, match=r"no candidate fits the target of 39,000 bytes .* over, with"):
        run_quantize(pipeline_run, cap_bytes=40_000, **grid)


def test_average_rerun_with_a_new_swa_window_reuses_the_train_artifact(pipeline_run):
    from golf.config import apply_overrides
    from golf.pipeline import run_pipeline
    store, cfg, results = pipeline_run
    ckpts = results["train"].artifact.files("checkpoints/")
    assert len(ckpts) >= 2
    last = apply_overrides(cfg, ["average.method=swa", "average.swa_last=1", "average.swa_include_final=false"])
    window = apply_overrides(cfg, ["average.method=swa", f"average.swa_start_step={averaging.checkpoint_step(ckpts[0]) + 1}"])
    seen = []
    for c in (last, window):
        res = run_pipeline(c, store, until="average")
        assert [r.cached for r in res] == [True, True, False]
        assert res[1].artifact.key == results["train"].artifact.key
        seen.append(json.loads(res[2].artifact.file("average.json").read_text())["swa_members"])
    assert seen[0] == [ckpts[-1]]
    assert seen[1] == ckpts[1:] + ["final.pt"]
    assert averaging.swa_window(["checkpoints/step_000010.pt", "checkpoints/step_000020.pt",
                               "checkpoints/step_000030.pt"], stride=2) == \
        ["checkpoints/step_000010.pt", "checkpoints/step_000030.pt"]


def test_sweep_flow_maps_quantize_and_eval_and_publishes_one_table(pipeline_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from flows.quantize_sweep import TABLE_KEY, quantize_sweep_flow
    store, cfg, results = pipeline_run
    variants = [cfg.quantize, dataclasses.replace(cfg.quantize, bits=6, clip="sd:12.85", compressor="lzma"),
                dataclasses.replace(cfg.quantize, cap_bytes=50_000)]
    out = quantize_sweep_flow(config=dataclasses.asdict(cfg), store_root=str(store.root),
                              quantize_configs=[dataclasses.asdict(v) for v in variants],
                              labels=["int8", "int6 sd", "tiny cap"])
    assert all(s["cached"] for s in out["upstream"])  # tokenize, train, average: from the store
    rows = {r["config"]: r for r in out["rows"]}
    assert rows["int8"]["quantize_cached"] and rows["int8"]["quantize_key"] == results["quantize"].artifact.key
    assert rows["int8"]["eval_cached"] and rows["int8"]["val_bpb"] == results["eval"].artifact.metrics["val_bpb"]
    assert rows["int6 sd"]["quantize_cached"] is False
    assert rows["int6 sd"]["artifact_bytes"] < rows["int8"]["artifact_bytes"]
    assert rows["int6 sd"]["quant_gap_bpb"] == pytest.approx(rows["int6 sd"]["val_bpb"] - rows["int6 sd"]["pre_quant_val_bpb"])
    assert rows["tiny cap"]["val_bpb"] is None and "over the cap" in rows["tiny cap"]["error"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[TABLE_KEY])))
    table = json.loads(arts[-1].data) if isinstance(arts[-1].data, str) else arts[-1].data
    assert [r["config"] for r in table] == ["int8", "int6 sd", "tiny cap"] and "over the cap" in table[2]["error"]
    # typed configs work as well as dicts; a typo is refused before anything runs
    again = quantize_sweep_flow(config=cfg, store_root=str(store.root), quantize_configs=[cfg.quantize])
    assert again["rows"][0]["quantize_key"] == results["quantize"].artifact.key
    with pytest.raises(Exception, match="bitz"):  # Prefect's parameter validation refuses it
        quantize_sweep_flow(config=dataclasses.asdict(cfg), store_root=str(store.root),
                            quantize_configs=[{"bitz": 6}])


def test_asym_lqer_is_the_records_packing_and_round_trips():
    from gpt.gptq import lqer_asym
    w = heavy_tailed(64, 128, seed=3)
    base = quantize_matrix(w, 5, "sd:4")
    t = lqer_asym(w, base, rank=4, group=64)
    at, b = t["lqer"]
    # A (stored transposed, 4 x 64): values -2..1 under one scale = max|A| / 1.5; B: 4 x 128 as 8 groups of 64
    assert at["q"].shape == (4, 64) and int(at["q"].min()) >= -2 and int(at["q"].max()) <= 1 and at["bits"] == 2
    assert torch.unique(at["scale"]).numel() == 1
    assert b["q"].shape == (8, 64) and int(b["q"].abs().max()) <= 8 and int(b["q"].max()) <= 7 and b["bits"] == 4
    # the correction is the SVD's rank-4 part of the error, packed as the record packs it (computed here apart)
    E = w - dequantize_entry(base)
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = U[:, :4] * S[:4], Vh[:4]
    s_a = (A.abs().max() / 1.5).half().float()
    s_b = (B.reshape(-1, 64).abs().amax(dim=1, keepdim=True) / 7.5).half().float()
    packed = (torch.round(A / s_a).clamp(-2, 1) * s_a) @ (torch.round(B.reshape(-1, 64) / s_b).clamp(-8, 7) * s_b).reshape(4, -1)
    got = dequantize_entry(t) - dequantize_entry(base)
    assert torch.allclose(got, packed, atol=1e-6)
    assert (dequantize_entry(t) - w).norm() < E.norm()
    state, _ = decode_weights(blob_of({"w": t}, ["zlib"], True))
    assert torch.equal(state["w"], dequantize_entry(t))
    # a B whose size is no multiple of the group: one scale per row of B
    odd = lqer_asym(w[:, :100], quantize_matrix(w[:, :100], 5, "sd:4"), rank=4, group=64)
    assert odd["lqer"][1]["q"].shape == (4, 100)


def test_asym_lqer_and_int8_gates_through_the_quantizer():
    from gpt.quantization import QuantizeConfig, Quantizer, fixed_schemes
    g = torch.Generator().manual_seed(0)
    state = {"blocks.0.attn.q.weight": heavy_tailed(64, 64, 1), "blocks.0.mlp.fc.weight": heavy_tailed(128, 64, 2),
             "blocks.1.mlp.fc.weight": heavy_tailed(128, 64, 4) * 3, "blocks.0.attn.gate_w": torch.randn(8, 12, generator=g)}
    cfg = QuantizeConfig(bits=4, keep_float_max_numel=1024, lqer_rank=2, lqer_top=1, lqer_mode="asym", gate_int8=True)
    qz = Quantizer(state, cfg, None)
    entries = qz.entries(fixed_schemes(cfg))
    # the largest error norm gets the correction: the 3x-scaled MLP matrix
    assert [n for n, t in entries.items() if t.get("lqer")] == ["blocks.1.mlp.fc.weight"]
    gate = entries["blocks.0.attn.gate_w"]
    assert gate["bits"] == 8 and qz.groups["blocks.0.attn.gate_w"] == "float"
    err = (dequantize_entry(gate) - state["blocks.0.attn.gate_w"]).abs()
    assert (err <= state["blocks.0.attn.gate_w"].abs().amax(dim=1, keepdim=True) / 127 / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="lqer_mode"):
        QuantizeConfig(lqer_mode="both")
