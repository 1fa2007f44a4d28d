"""The training sweep (flows/train_sweep.py, golf/sweeps.py): the grid, the fit choice, and the flow on the tiny
preset over 3 weight decays, through the store."""

from __future__ import annotations

import dataclasses

import pytest

from artifacts import ArtifactStore
from artifacts.configs import ConfigError
from golf.sweeps import format_sweep, grid_points, parse_grid, pick_fit


def test_parse_grid_reads_each_key_and_its_values():
    assert parse_grid(["train.muon_weight_decay=0.040, 0.042", "train.seed=1"]) == \
        {"train.muon_weight_decay": ["0.040", "0.042"], "train.seed": ["1"]}
    for bad, msg in (("train.muon_weight_decay", "expected KEY=V1,V2"), ("train.seed=1,,2", "an empty value")):
        with pytest.raises(ConfigError, match=msg):
            parse_grid([bad])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["train.seed=1", "train.seed=2"])
    with pytest.raises(ConfigError, match="at least one --grid"):
        parse_grid([])


def test_grid_points_are_every_combination_checked_before_training(fast_cfg):
    pts = grid_points(fast_cfg, {"train.muon_weight_decay": ["0.0", "0.5"], "train.seed": [1, 2]})
    assert [label for label, _ in pts] == [
        "train.muon_weight_decay=0.0 train.seed=1", "train.muon_weight_decay=0.0 train.seed=2",
        "train.muon_weight_decay=0.5 train.seed=1", "train.muon_weight_decay=0.5 train.seed=2"]
    assert [(c.train.muon_weight_decay, c.train.seed) for _, c in pts] == [(0.0, 1), (0.0, 2), (0.5, 1), (0.5, 2)]
    assert all(not c.quantize.fail_over_cap for _, c in pts)  # an over-cap point still reports its bytes
    assert all(c.train.max_steps == fast_cfg.train.max_steps for _, c in pts)  # the rest of the config is kept
    with pytest.raises(ConfigError, match="unknown config key 'train.muon_weight_decy'"):
        grid_points(fast_cfg, {"train.muon_weight_decy": ["0.1"]})
    with pytest.raises(ConfigError, match="weight_decay"):
        grid_points(fast_cfg, {"train.muon_weight_decay": ["-1"]})
    with pytest.raises(ConfigError, match="repeats a point"):
        grid_points(fast_cfg, {"train.seed": ["1", "1"]})


def row(point, size, bpb, cap=100, error=None):
    return {"point": point, "artifact_bytes": size, "fits": None if size is None else size <= cap, "val_bpb": bpb,
            "steps": 8, "train_key": None, "eval_key": None, "error": error}


def test_fit_picks_the_lowest_val_bpb_among_the_fitting_points():
    rows = [row("wd=0.040", 120, 1.10), row("wd=0.042", 95, 1.13), row("wd=0.045", 90, 1.14),
            row("wd=0.050", 80, 1.12), row("broken", None, None, error="TrainingDiverged: nan")]
    chosen = pick_fit(rows)
    assert chosen is rows[3]  # 0.040 scores best but is over the cap
    text = format_sweep(rows, chosen, 100)
    assert "* wd=0.050" in text and "fit: wd=0.050" in text and "TrainingDiverged" in text
    assert pick_fit([row("big", 200, 1.0)]) is None
    assert "no point fits the cap" in format_sweep([row("big", 200, 1.0)], None, 100)


def test_sweep_flow_on_tiny_over_three_weight_decays_picks_the_fitting_point(tmp_path, fast_cfg):
    from flows.train_sweep import train_sweep_flow
    store = ArtifactStore(tmp_path / "store")
    grid = {"train.muon_weight_decay": [0.0, 0.5, 2.0]}
    args = dict(config=dataclasses.asdict(fast_cfg), grid=grid, store_root=str(store.root))
    table = train_sweep_flow(**args, mode="table")
    rows = table["rows"]
    assert [r["point"] for r in rows] == [f"train.muon_weight_decay={v}" for v in (0.0, 0.5, 2.0)]
    assert table["chosen"] is None and all(r["error"] is None and r["fits"] for r in rows)
    assert len({r["train_key"] for r in rows}) == 3  # three trainings, one per weight decay
    sizes = [r["artifact_bytes"] for r in rows]
    assert len(set(sizes)) == 3  # the decay changes what is stored

    # fit under a cap between the sizes: only the points at or under it compete (served from the store)
    cap = sorted(sizes)[1]
    fit = train_sweep_flow(**args, mode="fit", cap_bytes=cap)
    fitting = [r for r in fit["rows"] if r["artifact_bytes"] <= cap]
    assert len(fitting) == 2 and [r["fits"] for r in fit["rows"]] == [s <= cap for s in sizes]
    assert fit["chosen"] == min(fitting, key=lambda r: r["val_bpb"])
    assert [r["train_key"] for r in fit["rows"]] == [r["train_key"] for r in rows]  # nothing retrained
    assert train_sweep_flow(**args, mode="fit", cap_bytes=min(sizes) - 1)["chosen"] is None


def test_cli_refuses_a_bad_grid_in_one_line_before_anything_runs(tmp_path, capsys):
    from golf.cli import main
    store = ["--store", str(tmp_path / "store")]
    assert main([*store, "sweep-train", "--grid", "train.muon_weight_decy=0.1,0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown config key 'train.muon_weight_decy'" in err
    assert main([*store, "sweep-train"]) == 2
    assert "at least one --grid" in capsys.readouterr().err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifest.json"))


def test_cli_sweep_without_prefect_trains_each_point_and_writes_its_table(tmp_path, capsys):
    """`golf sweep-train --no-prefect` (the GPU bench's way: no server to carry): the same rows as the flow, the
    fitting point chosen under the given cap, a point that fails kept as a row with its error."""
    import json
    from conftest import FAST
    from golf.cli import main
    store = ["--store", str(tmp_path / "store")]
    sets = [a for kv in FAST for a in ("--set", kv)]
    out = tmp_path / "sweep.json"
    rc = main([*store, "sweep-train", "--preset", "tiny", *sets, "--no-prefect", "--json", str(out),
               "--grid", "train.muon_weight_decay=0.0,2.0", "--fit", "--cap-bytes", "100000000"])
    res = json.loads(out.read_text())
    assert rc == 0, capsys.readouterr()
    rows = res["rows"]
    assert [r["point"] for r in rows] == ["train.muon_weight_decay=0.0", "train.muon_weight_decay=2.0"]
    assert all(r["error"] is None and r["fits"] and r["val_bpb"] > 0 for r in rows)
    assert len({r["train_key"] for r in rows}) == 2 and rows[0]["artifact_bytes"] != rows[1]["artifact_bytes"]
    assert res["chosen"] == min(rows, key=lambda r: r["val_bpb"])
    assert f"fit: {res['chosen']['point']}" in capsys.readouterr().out
    # under a cap nothing meets, --fit exits 1 and says so
    assert main([*store, "sweep-train", "--preset", "tiny", *sets, "--no-prefect",
                 "--grid", "train.muon_weight_decay=0.0,2.0", "--fit", "--cap-bytes", "1000"]) == 1
    assert "no point fits the cap" in capsys.readouterr().out


def test_a_failing_point_is_a_row_but_a_stop_signal_ends_the_sweep(fast_cfg):
    from gpt.training import TrainingInterrupted
    from golf.sweeps import run_sweep
    points = grid_points(fast_cfg, {"train.seed": ["1", "2"]})
    ran = []

    def diverges(label, point):
        ran.append(label)
        raise RuntimeError("training loss is nan at step 3")
    out = run_sweep(points, 100, True, diverges)
    assert len(ran) == 2 and all("RuntimeError: training loss is nan" in r["error"] for r in out["rows"])
    assert out["chosen"] is None

    def stopped(label, point):
        ran.append(label)
        raise TrainingInterrupted("stopped by SIGTERM at step 3")
    ran.clear()
    with pytest.raises(TrainingInterrupted):
        run_sweep(points, 100, True, stopped)
    assert ran == ["train.seed=1"]  # the second point never started
