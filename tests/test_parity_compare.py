"""bench/parity_compare.py reads the record script's log and golf's run folder into one verdict: the band, the
throughput windows and (parity.sh POSTQUANT=1) the artifact bytes and quantization gap of both sides."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def parity_compare():
    spec = importlib.util.spec_from_file_location("parity_compare", ROOT / "bench" / "parity_compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_log(path: Path, steps: int, offset: float = 0.0, post: bool = True) -> Path:
    """The record script's lines: train_loss with its running tok/s (1,000K before the loop, slower in it)."""
    lines, clock = [], 0.0
    for s in range(1, steps + 1):
        clock += 786_432 / (1.0e6 if s <= 0.35 * steps else 0.66e6)
        lines.append(f"{s}/{steps} train_loss: {8 - 4 * s / steps + offset:.4f} train_time: {clock / 60:.1f}m "
                     f"tok/s: {int(s * 786_432 / clock)}")
    lines.append(f"{steps}/{steps} val_loss: 5.0000 val_bpb: 2.0500")
    lines.append("diagnostic pre-quantization post-ema val_loss:5.10000000 val_bpb:2.06000000 eval_time:900ms")
    if post:
        lines += ["Serialized model quantized+brotli: 15912345 bytes",
                  "Total submission size quantized+brotli: 15952301 bytes",
                  "diagnostic quantized val_loss:5.20000000 val_bpb:2.09000000 eval_time:950ms"]
    path.write_text("\n".join(lines) + "\n")
    return path


def golf_folder(path: Path, steps: int, offset: float, post: bool = True) -> Path:
    path.mkdir()
    rows, clock = [], 0.0
    for s in range(1, steps + 1):
        clock += 786_432 / (1.1e6 if s <= 0.35 * steps else 0.7e6)
        rows.append({"step": s, "loss": 8 - 4 * s / steps + offset, "elapsed_s": clock,
                     "recurrence": s > 0.35 * steps})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = {"pre_quant_val_bpb": 2.061}
    if post:
        ev["val_bpb"] = 2.101
        (path / "size.json").write_text(json.dumps({"artifact_bytes": 15_800_000, "weights_bytes": 15_740_000}))
    (path / "eval.json").write_text(json.dumps(ev))
    return path


def test_post_quantization_figures_of_both_sides(parity_compare, tmp_path):
    ref = reference_log(tmp_path / "ref.log", 120)
    golf = golf_folder(tmp_path / "golf_record_seed42_postquant", 120, offset=0.02)
    assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(golf),
                                "--out", str(tmp_path / "out" / "pq")]) == 0
    res = json.loads((tmp_path / "out" / "pq.json").read_text())
    assert res["post_quant"]["reference 1"] == pytest.approx(
        {"artifact_bytes": 15_952_301, "pre_quant_val_bpb": 2.06, "val_bpb": 2.09, "gap_bpb": 0.03})
    assert res["post_quant"]["golf"] == pytest.approx(
        {"artifact_bytes": 15_800_000, "pre_quant_val_bpb": 2.061, "val_bpb": 2.101, "gap_bpb": 0.04})
    # golf's pre-quant score is its EMA weights': beside the reference's post-EMA line, not its raw weights' 2.05
    assert res["val_bpb"]["reference"] == pytest.approx(2.06) and res["val_bpb"]["diff"] == pytest.approx(0.001)
    assert res["within_band"] and res["max_abs_diff_from_10"] == pytest.approx(0.02, abs=1e-3)
    speed = res["throughput"]
    assert speed["golf"]["before_loop"] == pytest.approx(1.1e6, rel=1e-3)
    assert speed["reference"]["in_loop"] == pytest.approx(0.66e6, rel=0.02)  # from its rounded running tok/s
    md = (tmp_path / "out" / "pq.md").read_text()
    assert "| reference 1 | 15,952,301 | 2.0600 | 2.0900 | +0.0300 |" in md and "(averaged (EMA) weights)" in md
    assert "| golf | 15,800,000 | 2.0610 | 2.1010 | +0.0400 |" in md


def test_a_run_stopped_before_quantizing_has_no_post_quant_row_and_a_shifted_curve_fails(parity_compare, tmp_path):
    """golf's eval.json always has a quantized score (RTN in a raw-weights run): no row without the reference's."""
    ref = reference_log(tmp_path / "ref.log", 120, post=False)
    golf = golf_folder(tmp_path / "golf", 120, offset=0.07, post=True)
    assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(golf),
                                "--out", str(tmp_path / "o")]) == 1  # 0.07 nats off: outside the 0.06 band
    res = json.loads((tmp_path / "o.json").read_text())
    assert "post_quant" not in res and not res["within_band"]
    assert res["val_bpb"]["reference"] == pytest.approx(2.05)  # a PREQUANT_ONLY run: the raw weights' score
    assert "after quantization" not in (tmp_path / "o.md").read_text()


def test_an_isolated_postquant_run_beside_a_reference_stopped_in_its_gptq(parity_compare, tmp_path):
    """The sitting's case: the reference's call ended inside its GPTQ (a post-EMA line, no quantized one); golf's
    POSTQUANT run isolated documents. Its EMA score goes beside the reference's post-EMA line, its post-quant row
    is shown alone, and its curve is not held to the band (another task than the reference's dense rows)."""
    ref = reference_log(tmp_path / "ref.log", 120, post=False)
    golf = golf_folder(tmp_path / "golf_record_seed42_postquant_isolated", 120, offset=-0.12, post=True)
    (golf / "train.json").write_text(json.dumps({"model_config": {"doc_isolation": True}}))
    assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(golf),
                                "--out", str(tmp_path / "iso")]) == 0
    res = json.loads((tmp_path / "iso.json").read_text())
    assert res["within_band"] is None and res["golf_isolated"]
    assert res["val_bpb"]["reference"] == pytest.approx(2.06) and res["val_bpb"]["weights"] == "averaged (EMA)"
    assert list(res["post_quant"]) == ["golf"]
    md = (tmp_path / "iso.md").read_text()
    assert "Not banded" in md and "Outside the band" not in md
    # a STOP_AFTER run's folder has only its live log: its name says it isolated
    stopped = tmp_path / "golf_record_seed42_isolated"
    stopped.mkdir()
    (golf / "metrics.jsonl").rename(stopped / "metrics.live.jsonl")
    assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(stopped),
                                "--out", str(tmp_path / "stopped")]) == 0
    assert json.loads((tmp_path / "stopped.json").read_text())["within_band"] is None
    # the same curve from a dense-rows run is held to the band, and fails it
    dense = tmp_path / "golf_record_seed42_postquant"
    golf.rename(dense)
    (stopped / "metrics.live.jsonl").rename(dense / "metrics.jsonl")
    (dense / "train.json").write_text(json.dumps({"model_config": {"doc_isolation": False}}))
    assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(dense),
                                "--out", str(tmp_path / "dense")]) == 1


def test_a_raw_run_beside_its_postquant_twin_and_a_reference_that_quantized(parity_compare, tmp_path):
    """This sitting's case: golf's dense-rows run twice over one training (raw weights + RTN, and the preset's EMA
    + GPTQ, the store serving the second's train stage), the reference through its GPTQ. The raw scores are
    compared (the reference's log has its raw line too), the EMA scores beside them, and the post-quant rows are
    the reference's and golf's POSTQUANT run's, never the raw run's RTN gap."""
    ref = reference_log(tmp_path / "ref.log", 120)
    raw = golf_folder(tmp_path / "golf_record_seed42", 120, offset=0.02)
    twin = golf_folder(tmp_path / "golf_record_seed42_postquant", 120, offset=0.02)
    (twin / "eval.json").write_text(json.dumps({"pre_quant_val_bpb": 2.07, "val_bpb": 2.08}))
    out = tmp_path / "both"
    assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(raw),
                                "--golf-postquant", str(twin), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["val_bpb"]["weights"] == "raw" and res["val_bpb"]["reference"] == pytest.approx(2.05)
    assert res["val_bpb"]["diff"] == pytest.approx(0.011)
    assert res["val_bpb_averaged"] == pytest.approx({"reference": 2.06, "golf": 2.07})
    assert res["post_quant"]["golf"]["gap_bpb"] == pytest.approx(0.01)  # the twin's GPTQ gap, not the raw RTN's
    assert set(res["post_quant"]) == {"reference 1", "golf"}
    assert "(averaged (EMA) weights): reference 2.0600, golf 2.0700" in out.with_suffix(".md").read_text()
    # without the twin, the raw run's RTN "gap" is not shown beside the reference's GPTQ
    assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(raw),
                                "--out", str(tmp_path / "raw")]) == 0
    assert list(json.loads((tmp_path / "raw.json").read_text())["post_quant"]) == ["reference 1"]
    # the two folders swapped: refused (the raw run's RTN gap would stand as golf's post-quantization row)
    with pytest.raises(SystemExit, match="POSTQUANT folder"):
        parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(twin),
                             "--golf-postquant", str(raw), "--out", str(tmp_path / "x")])
    # an isolated run's post-quant row only when it averaged; --shared-gpu leaves every tokens/s out
    iso_raw = golf_folder(tmp_path / "golf_record_seed42_isolated", 120, offset=0.0)
    iso_pq = golf_folder(tmp_path / "golf_record_seed42_postquant_isolated", 120, offset=0.0)
    for iso, rows in ((iso_raw, {"reference 1", "golf"}), (iso_pq, {"reference 1", "golf", "golf_isolated"})):
        assert parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(raw), "--golf-postquant",
                                    str(twin), "--golf-isolated", str(iso), "--shared-gpu", "--out", str(out)]) == 0
        res = json.loads(out.with_suffix(".json").read_text())
        assert set(res["post_quant"]) == rows and res["throughput"] == {}
    assert "tokens/s: not shown" in out.with_suffix(".md").read_text()
    # a twin that trained otherwise is not the same run's training
    other = golf_folder(tmp_path / "golf_record_seed7_postquant", 120, offset=0.03)
    with pytest.raises(SystemExit, match="trained otherwise"):
        parity_compare.main(["--which", "record", "--ref", str(ref), "--golf", str(raw),
                             "--golf-postquant", str(other), "--out", str(tmp_path / "x")])


def test_the_sitting_queue_runs_its_phases_in_order_in_the_background(tmp_path):
    """bench/sitting_queue.sh on the CPU with a stand-in phase (it sleeps, prints its variables and its clock):
    `start` returns while the phases still run, lines run in order, "A+B" together, each item's variables exported
    ("~" a space), the finished phases sent once in one archive, a failed phase in the exit status."""
    import shutil
    import subprocess
    import tarfile
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "sitting_queue.sh", repo / "bench")
    phase = tmp_path / "phase.sh"
    phase.write_text('echo "begin $(date +%s.%N)"; sleep "${NAP:-0}"; env | grep -E "^(PHASE|A|B|EXTRA)="\n'
                     'echo "end $(date +%s.%N)"; exit "${FAIL:-0}"\n')
    env = {"PATH": "/usr/bin:/bin", "QUEUE_DIR": str(tmp_path / "q"), "QUEUE_REPO": str(tmp_path / "qrepo"),
           "QUEUE_PHASE_CMD": f"bash {phase}", "STAGGER": "0", "OUT": str(tmp_path / "out1"), "WAIT": "0",
           "QUEUE": "first:A=1,NAP=2 second:EXTRA=--set~x=y,B=2,NAP=1+third:FAIL=3"}
    run = lambda cmd, **more: subprocess.run(["bash", "bench/sitting_queue.sh", cmd], cwd=repo, env={**env, **more},  # noqa: E731
                                            capture_output=True, text=True, timeout=60)
    first = run("start")
    assert first.returncode == 0, first.stderr
    # returned while the first phase (2 s) still ran
    assert "queue done" not in first.stdout and not (tmp_path / "q" / "all.done").exists()
    done = run("poll", OUT=str(tmp_path / "out2"), WAIT="30")
    assert "queue done" in done.stdout and done.returncode == 1  # the third phase exited 3
    archives = list((tmp_path / "out2").glob("finished_*.tgz"))
    assert len(archives) == 1
    with tarfile.open(archives[0]) as tar:
        logs = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert sorted(logs) == ["01a_first.log", "02a_second.log", "02b_third.log"]
    assert {"PHASE=first", "A=1"} <= set(logs["01a_first.log"].splitlines())
    second = logs["02a_second.log"].splitlines()
    assert {"PHASE=second", "EXTRA=--set x=y", "B=2"} <= set(second) and "A=1" not in second
    clock = {name: [float(line.split()[1]) for line in text.splitlines() if line.startswith(("begin", "end"))]
             for name, text in logs.items()}
    assert clock["01a_first.log"][1] <= min(clock["02a_second.log"][0], clock["02b_third.log"][0])  # in order
    assert clock["02b_third.log"][0] < clock["02a_second.log"][1]  # A+B: the third began before the second ended
    # nothing is sent twice; a second start, and an append after the end, are refused
    again = run("poll", OUT=str(tmp_path / "out3"), WAIT="0")
    assert "finished" not in again.stdout and not list((tmp_path / "out3").glob("finished_*"))
    assert run("start").returncode == 2
    late = run("poll", OUT=str(tmp_path / "out4"), APPEND="fourth")
    assert late.returncode == 2 and "APPEND not run" in late.stderr


def test_the_sitting_queue_refuses_two_runs_at_once_that_would_collide(tmp_path):
    """parity.sh copies the newest run folder out of a golf store and run_reference.sh keeps fixed paths: two runs
    at once in one store, one wheel folder, or two references, are refused before anything starts."""
    import subprocess
    env = {"PATH": "/usr/bin:/bin", "QUEUE_DIR": str(tmp_path / "q"), "QUEUE_REPO": str(tmp_path / "r"),
           "OUT": str(tmp_path / "o"), "QUEUE_PHASE_CMD": "true", "WAIT": "0"}
    for queue, says in [("golf_dense:STEPS=9+golf_dense:SITE=/tmp/b", "one store"),
                        ("golf:GOLF_STORE=/a,SITE=/s+golf_dense:GOLF_STORE=/b,SITE=/s", "one SITE"),
                        ("reference:STEPS=9+golf_dense:GOLF_STORE=/b", "needs SITE="),
                        ("setup reference:SEED=1+reference:SEED=2", "two reference runs")]:
        res = subprocess.run(["bash", str(ROOT / "bench" / "sitting_queue.sh"), "start"], cwd=tmp_path,
                             env={**env, "QUEUE": queue}, capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and says in res.stderr, (queue, res.stderr)
        assert not (tmp_path / "q" / "items").exists()  # nothing started
