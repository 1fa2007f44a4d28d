"""The seeds table's TTT columns: each seed's TTT gain, and PR #1886's collapse (2 of 3 seeds +0.05 BPB after
warm-start TTT at weight decay 1.0) flagged on the right seeds with the right knob."""

from __future__ import annotations

import pytest

from golf.reruns import format_seeds, seeds_summary
from golf.seed_stability import flag_outliers, ttt_knob

WARM = {"method": "phased", "lora_warm_a": True, "lora_wd": 1.0, "lora_lr": 1e-4, "phase_lr": 1e-3}


def fake_run(store, seed: int, bpb: float, no_ttt: float | None, ttt: dict) -> str:
    """Manifest-only artifacts of one run (tokenize .. eval); the eval key."""
    keys = {}
    for stage, inputs, config in [("tokenize", (), {}), ("train", ("tokenize",), {"seed": seed}),
                                  ("average", ("train",), {}), ("quantize", ("average",), {})]:
        keys[stage] = f"{stage}-s{seed}"
        store.commit(store.begin(keys[stage]), {"stage": stage, "config": config, "metrics": {"artifact_bytes": 1},
                                                "inputs": {r: keys[r] for r in inputs}})
    metrics = {"val_loss": bpb * 2.5 * 0.693, "val_bpb": bpb, "val_tokens": 1000, "val_bytes": 2500}
    if no_ttt is not None:
        metrics.update(no_ttt_val_bpb=no_ttt, ttt_gain_bpb=bpb - no_ttt)
    key = f"eval-s{seed}"
    store.commit(store.begin(key), {"stage": "eval", "config": {"ttt": ttt}, "metrics": metrics,
                                    "inputs": {r: keys[r] for r in ("quantize", "average", "tokenize")}})
    return key


def test_pr1886_collapse_is_flagged_on_the_two_collapsed_seeds_with_the_ttt_weight_decay(store):
    keys = [fake_run(store, 42, 1.06923, 1.0810, WARM), fake_run(store, 314, 1.12144, 1.0812, WARM),
            fake_run(store, 1337, 1.12145, 1.0815, WARM)]
    s = seeds_summary(store, keys)
    rows = {r["seed"]: r for r in s["rows"]}
    assert rows[42]["ttt_gain_bpb"] == pytest.approx(1.06923 - 1.0810)
    assert rows[314]["ttt_gain_bpb"] > 0  # TTT made it worse
    assert rows[42]["outlier"] is None  # the good seed is not the odd one out, though it is 1 of 3
    for seed in (314, 1337):
        assert rows[seed]["outlier"].startswith("TTT outlier: +0.05") and "eval.ttt.lora_wd (now 1.0)" in \
            rows[seed]["outlier"]
    text = format_seeds(s)
    assert "TTT gain" in text and "-0.01177" in text and "seed 314: TTT outlier" in text


def test_stable_seeds_are_not_flagged_and_a_training_outlier_is_named_as_such(store):
    fixed = dict(WARM, lora_wd=2.0)
    keys = [fake_run(store, 42, 1.06920, 1.0810, fixed), fake_run(store, 314, 1.06942, 1.0811, fixed),
            fake_run(store, 1337, 1.07010, 1.0815, fixed)]
    assert all(r["outlier"] is None for r in seeds_summary(store, keys)["rows"])
    # a seed already 0.03 behind before TTT: its training, not its TTT
    rows = flag_outliers([{"val_bpb": 1.07, "no_ttt_val_bpb": 1.08}, {"val_bpb": 1.10, "no_ttt_val_bpb": 1.11}],
                         [fixed, fixed])
    assert rows[0]["outlier"] is None and rows[1]["outlier"].startswith("training outlier: +0.03")
    # one seed: nothing to compare with
    assert flag_outliers([{"val_bpb": 1.2}], [fixed])[0]["outlier"] is None


def test_the_knob_follows_the_ttt_method():
    assert "lora_wd" in ttt_knob(WARM) and "lora_warm_a=false" in ttt_knob(WARM)
    assert ttt_knob({"method": "lora", "lora_lr": 0.001}) == "eval.ttt.lora_lr (now 0.001)"
    assert ttt_knob({"method": "sgd", "lr": 0.002, "epochs": 3}) == "eval.ttt.lr (now 0.002) or eval.ttt.epochs (now 3)"
    assert ttt_knob({"method": "none"}).startswith("training")
