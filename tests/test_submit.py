"""golf submit's train_gpt.py: generated from a tiny CPU run, rerun from its records folder under torchrun.

The run is step-limited (max_steps=8, no wallclock cap), so one CPU process reproduces the pipeline's weights
bit for bit; two gloo processes average their gradients in another order and land within float noise.
"""

from __future__ import annotations

import base64
import json
import lzma
import re

import pytest

from golf.cli import main

from conftest import FAST

PROJECT = ("golf", "artifacts", "stages", "shipping", "tokenizing", "runtime", "flows", "gpt")
# installed by site before the program starts: any import of the project's packages from disk fails the run
# (train_gpt.py serves its own embedded gpt package ahead of this finder)
BLOCKER = f'''import sys
class _NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROJECT!r}:
            raise ImportError("train_gpt.py imported " + name + " from outside itself")
sys.meta_path.insert(0, _NoProject())
'''


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    """A fast tiny run stopped by steps alone (no wallclock cap), so a rerun can match it exactly."""
    from artifacts import ArtifactStore
    from golf.config import apply_overrides, preset
    from golf.pipeline import run_pipeline
    store = ArtifactStore(tmp_path_factory.mktemp("submit") / "store")
    cfg = apply_overrides(preset("tiny"), FAST + ["train.max_seconds=0"])
    return store, {r.artifact.stage: r.artifact for r in run_pipeline(cfg, store)}


def unwrapped(code: str) -> str:
    return lzma.decompress(base64.b85decode(re.search(r'b85decode\("([^"]*)"\)', code).group(1))).decode()


def test_the_folder_train_gpt_trains_and_reproduces_the_run(step_run, tmp_path):
    from golf.submit import layout_data, resolve_run, run_program
    store, arts = step_run
    q, ev, comp = arts["quantize"], arts["eval"], arts["compliance"]
    out = tmp_path / "record"
    assert main(["--store", str(store.root), "submit", comp.key, "--out", str(out), "--name", "Tiny",
                 "--github-id", "someone"]) == 0
    assert {"README.md", "submission.json", "train_gpt.py", "requirements.txt", "weights.bin",
            "train_seed1337.log"} <= {p.name for p in out.iterdir()}
    code = (out / "train_gpt.py").read_text()
    assert code == q.file("shipped_code.py").read_text() and len(code.encode()) == q.metrics["code_bytes"]
    program = unwrapped(code)
    assert not re.search(r"^\s*(from|import) (golf|artifacts|stages|shipping|tokenizing|runtime)\b", program, re.M)
    assert "torchrun --standalone" in (out / "README.md").read_text()

    layout_data(out, resolve_run(store, comp.key))
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    one = run_program(out, 1337, 1, env={"PYTHONPATH": str(blocker)}, timeout=300)
    assert one["val_bpb"] == pytest.approx(ev.metrics["val_bpb"], abs=1e-9)
    assert one["code_bytes"] == q.metrics["code_bytes"] and one["artifact_bytes"] == q.metrics["artifact_bytes"]
    assert (out / "run_seed1337" / "weights.bin").read_bytes() == q.file("weights.bin").read_bytes()
    log = (out / "run_seed1337" / "train_seed1337.log").read_text()
    assert "step:8/8 train_loss:" in log and "final val_loss:" in log
    assert log.index("step:8/8 train_loss:") < log.index("stopped by")  # logged as it happens, not after the loop

    two = run_program(out, 1337, 2, env={"PYTHONPATH": str(blocker), "RUN_DIR": "run_two"}, timeout=300)
    assert two["world_size"] == 2 and two["steps"] == 8
    # the gradients are averaged over the ranks in another order: the same run within float noise
    assert two["val_bpb"] == pytest.approx(ev.metrics["val_bpb"], abs=1e-4)
    assert two["code_bytes"] == q.metrics["code_bytes"]


def test_submit_verify_reruns_the_folder_and_fails_on_a_changed_program(step_run, tmp_path, capsys):
    store, arts = step_run
    out = tmp_path / "record"
    assert main(["--store", str(store.root), "submit", arts["compliance"].key, "--out", str(out), "--name", "Tiny",
                 "--github-id", "someone"]) == 0
    capsys.readouterr()
    assert main(["--store", str(store.root), "submit", "--verify", str(out)]) == 0
    said = capsys.readouterr().out
    assert "weights.bin identical" in said and "verified" in said

    # a program that trains one step fewer is not the program that was counted: refused before it runs
    code = (out / "train_gpt.py").read_text()
    program = unwrapped(code).replace('"max_steps":8,', '"max_steps":7,')
    assert program != unwrapped(code)
    packed = base64.b85encode(lzma.compress(program.encode())).decode()
    (out / "train_gpt.py").write_text(f'import lzma,base64\nexec(lzma.decompress(base64.b85decode("{packed}")))\n')
    assert main(["--store", str(store.root), "submit", "--verify", str(out)]) == 2
    assert "differ" in capsys.readouterr().err


def test_submit_refuses_a_quantize_artifact_that_embeds_another_eval(step_run, tmp_path, capsys):
    """golf stage quantize alone embeds the eval's defaults: its train_gpt.py would score another way."""
    store, arts = step_run
    prog = json.loads(arts["quantize"].file("program.json").read_text())
    assert prog["eval"]["max_tokens"] == 8192 and prog["train"]["max_steps"] == 8
    assert prog["data"] == {"dataset": "fineweb10B_sp1024", "tokenizer": "fineweb_1024_bpe.model"}
    from golf.submit import SubmitError, check_program, resolve_run
    run = resolve_run(store, arts["compliance"].key)
    run.eval.manifest["config"] = {**run.eval.config, "max_tokens": 4096}
    with pytest.raises(SubmitError, match="embeds another eval config"):
        check_program(run)
