"""Deployments: prefect.yaml, partial runs from the store, seeds, and a real local Prefect server with a worker.

The server tests start `prefect server start` on a free loopback port (analytics and UI off, PREFECT_HOME in
tmp), create a process work pool, deploy, and run deployments through `prefect worker start --run-once` and
`golf serve`. Every wait has a deadline and the server and worker are killed in a finally.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from artifacts import ArtifactStore
from golf.config import preset

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_S = 180   # ~15-20 s on an idle 2-core machine; CI may be slower
RUN_S = 300            # one quantize-only or eval-only run, worker start included


# --- prefect.yaml and the deployments built from it (no server) -------------------------------------------------
def test_prefect_yaml_lists_every_flow_with_typed_parameters_and_described_fields(tmp_path):
    from golf.deployments import build, field_comments, load_specs
    from stages.quantize import QuantizeConfig
    specs = load_specs()
    names = [s.name for s in specs]
    assert names == ["pipeline", "quantize-only", "eval-only", "seeds", "quantize-sweep", "train-sweep"]
    record = preset("record")
    deps, skipped = build(specs, record, str(tmp_path / "store"), project_dir="/opt/golf")
    built = {d.name: d for d in deps}
    sweep_present = (ROOT / "flows" / "quantize_sweep.py").is_file()
    assert set(built) == set(names) - (set() if sweep_present else {"quantize-sweep"})
    assert skipped == ([] if sweep_present else ["quantize-sweep: flows/quantize_sweep.py is not in this checkout"])

    q = built["quantize-only"]
    # the preset fills the typed sections; the store path is the one given; workers run from the image's copy
    assert q.parameters["quantize"] == dataclasses.asdict(record.quantize)
    assert q.parameters["eval"] == dataclasses.asdict(record.eval)
    assert q.parameters["store_root"] == str(tmp_path / "store")
    assert q.storage.to_pull_step() == {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/golf"}}
    assert built["pipeline"].parameters["config"] == dataclasses.asdict(record)
    assert built["seeds"].parameters["config"]["train"]["model"]["num_layers"] == 11

    # the form: one object per stage config, each field with its type, default and the comment from the dataclass
    schema = q._parameter_openapi_schema
    assert schema.properties["quantize"]["$ref"] == "#/definitions/QuantizeConfig"
    bits = schema.definitions["QuantizeConfig"]["properties"]["bits"]
    assert bits["type"] == "integer" and bits["description"] == field_comments(QuantizeConfig)["bits"]
    assert "2..8" in bits["description"]
    assert schema.properties["source_key"]["description"].startswith("an average key")
    if sweep_present:  # the sweep's form: a list of QuantizeConfig objects, starting from the preset's
        sweep = built["quantize-sweep"]
        configs = sweep._parameter_openapi_schema.properties["quantize_configs"]
        assert {"items": {"$ref": "#/definitions/QuantizeConfig"}, "type": "array"} in configs["anyOf"]
        assert sweep.parameters["quantize_configs"] == [dataclasses.asdict(record.quantize)]
        assert sweep._parameter_openapi_schema.properties["config"]["$ref"] == "#/definitions/PipelineConfig"
    model = built["pipeline"]._parameter_openapi_schema.definitions["ModelConfig"]["properties"]
    assert all("description" in p for name, p in model.items() if name in field_comments(
        __import__("gpt.model", fromlist=["ModelConfig"]).ModelConfig))


def test_prefect_yaml_errors_are_one_line(tmp_path):
    from golf.cli import main
    from golf.deployments import DeployError, load_specs, select
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n")
    with pytest.raises(DeployError, match="needs a name and an entrypoint"):
        load_specs(bad)
    with pytest.raises(DeployError, match="no deployment 'nope'"):
        select(load_specs(), ["nope"])
    assert main(["config", "--json", "quantiz"]) == 2  # a section that is not a stage
    from prefect.settings import PREFECT_API_URL, temporary_settings
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # no server configured: deploy refuses at once
        assert main(["--store", str(tmp_path), "deploy", "--only", "eval-only"]) == 2


# --- partial runs from the store ---------------------------------------------------------------------------------
def test_lineage_gives_the_upstream_keys_and_refuses_the_wrong_start(pipeline_run):
    from golf.reruns import RerunError, stages_after, start_from, upstream_keys
    store, _, results = pipeline_run
    keys = {name: r.artifact.key for name, r in results.items()}
    assert upstream_keys(store, keys["compliance"]) == keys
    assert upstream_keys(store, keys["average"]) == {k: keys[k] for k in ("tokenize", "train", "average")}
    stage, up = start_from(store, keys["train"][:12], ("train", "average"), "quantize-only")  # a prefix works
    assert stage == "train" and up == {"tokenize": keys["tokenize"], "train": keys["train"]}
    with pytest.raises(RerunError, match="starts from a train or average artifact; tokenize-.* is a tokenize"):
        start_from(store, keys["tokenize"], ("train", "average"), "quantize-only")
    with pytest.raises(RerunError, match="needs an artifact key"):
        start_from(store, "", ("quantize",), "eval-only")
    assert stages_after("average") == ["quantize", "eval", "compliance"]
    assert stages_after("train", "quantize") == ["average", "quantize"]
    with pytest.raises(RerunError, match="can stop after one of eval, compliance"):
        stages_after("quantize", "train")


def _fake_run(store, seed: int, loss: float, lr: float = 0.04, tokens: int = 1000, n_bytes: int = 2500) -> str:
    """Manifest-only artifacts standing for one pipeline run (tokenize .. eval); returns the eval key."""
    keys: dict[str, str] = {}
    chain = [("tokenize", (), {}), ("train", ("tokenize",), {"seed": seed, "matrix_lr": lr}),
             ("average", ("train",), {}), ("quantize", ("average",), {})]
    for stage, inputs, config in chain:
        keys[stage] = f"{stage}-s{seed}l{lr}"
        store.commit(store.begin(keys[stage]), {"stage": stage, "config": config, "metrics": {"artifact_bytes": 1},
                                                "inputs": {r: keys[r] for r in inputs}})
    key = f"eval-s{seed}l{lr}"
    store.commit(store.begin(key), {"stage": "eval", "config": {}, "inputs": {r: keys[r] for r in
                                                                              ("quantize", "average", "tokenize")},
                                    "metrics": {"val_loss": loss, "val_bpb": loss * tokens / n_bytes / 0.6931471805599453,
                                                "val_tokens": tokens, "val_bytes": n_bytes}})
    return key


def test_seeds_summary_runs_the_welch_test_against_the_baseline(store):
    from golf.reruns import RerunError, check_seeds, format_seeds, seeds_summary
    cand = [_fake_run(store, s, loss) for s, loss in [(1, 2.000), (2, 2.002), (3, 1.998)]]
    base = [_fake_run(store, s, loss, lr=0.05) for s, loss in [(1, 2.030), (2, 2.031), (3, 2.029)]]
    s = seeds_summary(store, cand, base)
    assert [r["seed"] for r in s["rows"]] == [1, 2, 3]
    assert s["mean_val_loss"] == pytest.approx(2.0) and s["std_val_loss"] == pytest.approx(0.002)
    assert s["significant"] is True and s["p_value"] < 0.01
    assert "verdict       SIGNIFICANT" in format_seeds(s)
    # a gain under the threshold: not significant
    close = [_fake_run(store, s, loss, lr=0.06) for s, loss in [(1, 2.028), (2, 2.029), (3, 2.027)]]
    assert seeds_summary(store, close, base)["significant"] is False
    assert seeds_summary(store, cand)["comparison"] is None
    with pytest.raises(RerunError, match="at least 2 baseline runs"):
        check_seeds([1, 2], base[:1], store)
    with pytest.raises(RerunError, match="repeat"):
        check_seeds([1, 1], [], store)


# --- a real Prefect server ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen | None) -> None:
    """End a process group we started: SIGTERM, then SIGKILL after 15 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local Prefect server on a free port; yields (api url, environment for its clients)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(ROOT))
    log = home / "server.log"
    proc = None
    try:
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                     "--port", str(port)], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Prefect server did not start in {SERVER_START_S} s:\n{_tail(log)}")
            time.sleep(1)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        _stop(proc)


def _run(cmd: list[str], env: dict, timeout: float = 180, stdout_only: bool = False) -> str:
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout if stdout_only else p.stdout + p.stderr


def _client(url: str):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    return temporary_settings({PREFECT_API_URL: url}), get_client


def _wait_final(url: str, run_id, timeout: float = RUN_S):
    settings, get_client = _client(url)
    deadline = time.monotonic() + timeout
    with settings, get_client(sync_client=True) as c:
        while True:
            run = c.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {run_id} not finished after {timeout} s (state {run.state})")
            time.sleep(1)


@pytest.fixture
def store_copy(pipeline_run, tmp_path):
    """The shared fast pipeline run's store, copied: the deployments here add artifacts to it."""
    store, cfg, results = pipeline_run
    copy = ArtifactStore(tmp_path / "store")
    for r in results.values():  # only the run's own artifacts: other tests add theirs to the shared store
        shutil.copytree(r.artifact.path, copy.path_of(r.artifact.key), symlinks=True)
    return copy, cfg, {k: r.artifact.key for k, r in results.items()}


def test_deploy_to_a_process_pool_and_run_quantize_only_through_a_worker(server, store_copy, tmp_path):
    url, env = server
    store, cfg, keys = store_copy
    pool = "golf-test"
    py = sys.executable
    _run([py, "-m", "prefect", "work-pool", "create", pool, "--type", "process"], env)
    # Prefect's own CLI reads prefect.yaml too
    out = _run([py, "-m", "prefect", "--no-prompt", "deploy", "--name", "eval-only", "--pool", pool], env)
    assert "golf-eval-only/eval-only" in out
    out = _run([py, "-m", "golf.cli", "--store", str(store.root), "deploy", "--pool", pool, "--preset", "tiny"], env)
    for name in ("golf-pipeline/pipeline", "golf-quantize-only/quantize-only", "golf-eval-only/eval-only",
                 "golf-seeds/seeds"):
        assert f"deployed {name}" in out

    settings, get_client = _client(url)
    with settings, get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name("golf-quantize-only/quantize-only")
        assert dep.work_pool_name == pool and dep.parameters["store_root"] == str(store.root)
        assert dep.parameter_openapi_schema["definitions"]["QuantizeConfig"]["properties"]["bits"]["description"]
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        quantize = dataclasses.asdict(cfg.quantize) | {"bits": 6}
        run = c.create_flow_run_from_deployment(dep.id, parameters={
            "source_key": keys["average"], "quantize": quantize, "eval": dataclasses.asdict(cfg.eval)})

    worker_log = tmp_path / "worker.log"
    worker = None
    try:
        with open(worker_log, "w") as fh:
            worker = subprocess.Popen([py, "-m", "prefect", "worker", "start", "--pool", pool, "--run-once"],
                                      env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        final = _wait_final(url, run.id)
        assert final.state.is_completed(), f"{final.state}\n{_tail(worker_log)}"
    finally:
        _stop(worker)

    # the quantize artifact with the run's config, built from the given average; eval and compliance after it
    by_stage = {}
    for a in store.list():
        if a.key not in keys.values():
            by_stage.setdefault(a.stage, []).append(a)
    assert sorted(by_stage) == ["compliance", "eval", "quantize"]
    q = by_stage["quantize"][0]
    # with the eval it is scored by embedded in its train_gpt.py, as golf run gives it (golf.pipeline.ship_eval)
    from golf.pipeline import ship_eval
    shipped = dataclasses.asdict(ship_eval({"quantize": dataclasses.replace(cfg.quantize, bits=6),
                                            "eval": cfg.eval})["quantize"])
    assert q.config == shipped and q.config["ship_eval"] and q.manifest["inputs"]["average"] == keys["average"]
    assert q.metrics["weights_bytes"] < store.get(keys["quantize"]).metrics["weights_bytes"]
    ev = by_stage["eval"][0]
    assert ev.manifest["inputs"] == {"quantize": q.key, "average": keys["average"], "tokenize": keys["tokenize"]}
    comp = by_stage["compliance"][0]
    assert comp.manifest["inputs"]["train"] == keys["train"] and comp.metrics["verdict"] == "PASS"
    assert store.verify(q.key) == []


def test_golf_serve_runs_eval_only_from_this_process(server, store_copy, tmp_path):
    url, env = server
    store, cfg, keys = store_copy
    log = tmp_path / "serve.log"
    proc = None
    try:
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "golf.cli", "--store", str(store.root), "serve",
                                     "--only", "eval-only", "--limit", "1"], env=env, cwd=ROOT, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while "being served" not in _tail(log, 100_000):  # `golf serve` has registered its deployment
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"golf serve did not register its deployment:\n{_tail(log)}")
            time.sleep(1)
        # the README's way: a stage's section from `golf config --json`, the run from Prefect's CLI
        ev = json.loads(_run([sys.executable, "-m", "golf.cli", "config", "--set", "eval.max_tokens=8192",
                              "--set", "eval.stride=128", "--json", "eval"], env, stdout_only=True))
        assert ev == dataclasses.asdict(cfg.eval) | {"stride": 128}
        out = _run([sys.executable, "-m", "prefect", "deployment", "run", "golf-eval-only/eval-only", "--params",
                    json.dumps({"quantize_key": keys["quantize"][:14], "eval": ev, "until": "eval"})], env)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        final = _wait_final(url, run_id)
        assert final.state.is_completed(), f"{final.state}\n{_tail(log)}"
    finally:
        _stop(proc)
    new = [a for a in store.list() if a.key not in keys.values()]
    assert [a.stage for a in new] == ["eval"]  # until=eval: no compliance
    assert new[0].config["stride"] == 128 and new[0].manifest["inputs"]["quantize"] == keys["quantize"]


def test_seeds_flow_serves_a_seed_already_in_the_store_and_tabulates(server, store_copy):
    from flows.seeds import seeds_flow
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
    url, _ = server
    store, cfg, keys = store_copy
    # no log shipping from this process: the server is gone before the interpreter exits
    with temporary_settings({PREFECT_API_URL: url, PREFECT_LOGGING_TO_API_ENABLED: False}):
        out = seeds_flow(config=dataclasses.asdict(cfg), seeds=[cfg.train.seed], store_root=str(store.root))
    assert [r["key"] for r in out["rows"]] == [keys["compliance"]]  # same keys as the plain runner: all cached
    assert out["mean_val_bpb"] == store.get(keys["eval"]).metrics["val_bpb"]
    assert json.loads(json.dumps(out))["comparison"] is None


def test_client_retries_are_cut_only_for_the_temporary_server(tmp_path, monkeypatch):
    """A stop signal ends Prefect's temporary server with golf; retrying it only delays golf's exit. A named
    server (environment or profile) keeps Prefect's own retry setting."""
    from golf import prefect_env
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert not prefect_env._api_url_configured()
    (tmp_path / "profiles.toml").write_text('[profiles.work]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n')
    assert prefect_env._api_url_configured()
    (tmp_path / "profiles.toml").unlink()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_env._api_url_configured()
