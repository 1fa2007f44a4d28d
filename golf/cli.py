"""The ``golf`` command.

    golf run [--preset tiny] [--set stage.field=value ...] [--force STAGE ...] [--no-prefect]
    golf config [--preset NAME] [--set ...] [--json [STAGE]]   the resolved config, one line per field (or JSON)
    golf stage NAME [--preset NAME] [--set FIELD=VALUE ...] --input ROLE=KEY ...   one stage alone, no Prefect
    golf artifacts ls | show KEY | verify KEY | path KEY
    golf submit COMPLIANCE_KEY [KEY ...] --out DIR --name NAME --github-id ID   a records folder (one key per seed)
    golf submit --verify DIR [--seed N] [--nproc N]   rerun DIR's train_gpt.py and compare it with the run
    golf compare --a KEY,KEY,KEY --b KEY,KEY,KEY     one-sided Welch test of A's gain over B (eval/compliance keys)
    golf report KEY [KEY ...] [--out report.html] [--against KEY,KEY,...]   one HTML page of runs (seeds overlaid)
    golf sweep-quantize [--preset ...] [--set ...] --variant "bits=6 clip=sd:12.85" --variant ...
    golf sweep-train [--preset ...] [--set ...] --grid train.muon_weight_decay=0.040,0.042 [--grid ...] [--fit]
    golf deploy [--pool golf] [--preset NAME] [--only NAME ...]   create/update prefect.yaml's deployments
    golf serve [--preset NAME] [--only NAME ...]     serve them from this process (no work pool, no worker)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

EXIT_USER_ERROR = 2      # bad flag, preset, key or value; missing or corrupt artifact
EXIT_COMPLIANCE_FAIL = 3  # the pipeline ran but the compliance stage says FAIL
EXIT_STORE_WRITE = 4      # the disk refused a write to the store (full, read-only, quota); partial files removed


def _store(args):
    from artifacts import ArtifactStore
    return ArtifactStore(args.store)


def _config(args):
    from .config import apply_overrides, preset
    return apply_overrides(preset(args.preset), args.set or [])


def print_summary(summaries: list[dict], wall: float) -> None:
    print()
    print(f"{'stage':<11}{'key':<32}{'status':<8}{'seconds':>9}  metric")
    for s in summaries:
        seconds = 0.0 if s["cached"] else s["seconds"]
        print(f"{s['stage']:<11}{s['key']:<32}{'cached' if s['cached'] else 'ran':<8}{seconds:>9.1f}  "
              f"{s.get('headline', '')}")
    by = {s["stage"]: s["metrics"] for s in summaries}
    print()
    if "eval" in by:
        e = by["eval"]
        pre = f" (pre-quantization {e['pre_quant_val_bpb']:.4f}, gap {e['quant_gap_bpb']:+.4f})" if "pre_quant_val_bpb" in e else ""
        print(f"val_bpb        {e['val_bpb']:.4f}{pre}  over {e['val_tokens']:,} tokens")
    if "quantize" in by:
        q = by["quantize"]
        print(f"artifact bytes {q['artifact_bytes']:,} = weights {q['weights_bytes']:,} + code {q['code_bytes']:,} "
              f"(cap {q['cap_bytes']:,})")
    if "compliance" in by:
        c = by["compliance"]
        print(f"compliance     {c['verdict']}" + (f" (failed: {', '.join(c['failed'])})" if c["failed"] else ""))
    print(f"wall time      {wall:.1f} s")


def cmd_run(args) -> int:
    from .pipeline import check_stage_names, preflight, stages_until
    cfg = _config(args)
    force = check_stage_names(args.force or [])
    stages_until(args.until)  # a misspelt stage is one line here, before Prefect starts a flow run for it
    preflight(cfg)
    store = _store(args)
    t0 = time.perf_counter()
    if args.no_prefect:
        from .pipeline import run_pipeline

        def show(res):
            print(f"{res.artifact.stage:<10} {'cached' if res.cached else 'built':<6} {res.artifact.key}", flush=True)
        summaries = [r.summary() for r in run_pipeline(cfg, store, force, args.until, show)]
    else:
        from .prefect_env import ensure_server
        ensure_server()  # a temporary Prefect server tied to golf's life, unless the user names one
        from flows.pipeline import pipeline_flow
        summaries = pipeline_flow(config=dataclasses.asdict(cfg), store_root=str(store.root), force=force,
                                  until=args.until)
    print_summary(summaries, time.perf_counter() - t0)
    verdict = next((s["metrics"].get("verdict") for s in summaries if s["stage"] == "compliance"), None)
    return EXIT_COMPLIANCE_FAIL if verdict == "FAIL" else 0


def cmd_stage(args) -> int:
    """One stage alone, without Prefect, on the preset's config for it plus --set FIELD=VALUE; inputs by key."""
    from artifacts import run_stage
    from .config import ConfigError, apply_overrides, preset
    from .pipeline import STAGE_BY_NAME, check_stage_names, ship_eval
    check_stage_names([args.stage])
    stage = STAGE_BY_NAME[args.stage]
    if args.eval_set and stage.name != "quantize":
        raise ConfigError("--eval-set is for the quantize stage (the eval settings its train_gpt.py embeds)")
    cfg = apply_overrides(preset(args.preset), [f"{stage.name}.{s}" for s in args.set or []] +
                          [f"eval.{s}" for s in args.eval_set or []])
    stage_cfg = getattr(cfg, stage.name)
    if stage.name == "quantize" and not stage_cfg.ship_eval:  # as golf run gives it: the run's eval settings
        stage_cfg = ship_eval({"quantize": stage_cfg, "eval": cfg.eval})["quantize"]
    store = _store(args)
    inputs = {}
    for item in args.input or []:
        role, sep, key = item.partition("=")
        if not sep or role not in stage.inputs:
            raise ConfigError(f"--input expects ROLE=KEY with ROLE in: {', '.join(stage.inputs) or 'none'}")
        inputs[role] = store.get(key)
    res = run_stage(stage, stage_cfg, inputs, store, force=args.force)
    print(json.dumps(res.summary(), indent=2, default=str))
    return 0


def cmd_sweep_quantize(args) -> int:
    """quantize + eval for several quantize variants of one config; upstream stages from the store."""
    import dataclasses as dc
    from .config import ConfigError, apply_overrides
    from .pipeline import preflight
    cfg = _config(args)
    preflight(cfg)
    if not args.variant:
        raise ConfigError("sweep-quantize needs at least one --variant \"field=value ...\" (quantize fields)")
    variants = [apply_overrides(cfg, [f"quantize.{kv}" for kv in v.split()]).quantize for v in args.variant]
    from .prefect_env import ensure_server
    ensure_server()
    from flows.quantize_sweep import format_table, quantize_sweep_flow
    out = quantize_sweep_flow(config=dc.asdict(cfg), store_root=str(_store(args).root),
                              quantize_configs=[dc.asdict(v) for v in variants], labels=list(args.variant))
    print()
    print(format_table(out["rows"]))
    return 1 if any(r["error"] for r in out["rows"]) else 0


def cmd_sweep_train(args) -> int:
    """Train + quantize + eval every point of a grid; with --fit, the best val_bpb under the cap (exit 1: none fits)."""
    import dataclasses as dc
    from .pipeline import preflight
    from .sweeps import grid_points, parse_grid
    cfg = _config(args)
    preflight(cfg)
    grid = parse_grid(args.grid or [])
    points = grid_points(cfg, grid)  # a bad key or value is one line here, before the Prefect server starts
    if args.no_prefect:  # the same points and table in this process, stage by stage (golf run --no-prefect's way)
        from .pipeline import run_pipeline
        from .sweeps import format_sweep, run_sweep
        store, cap = _store(args), args.cap_bytes or cfg.quantize.cap_bytes

        def run_point(label, point):
            print(f"--- point {label}", flush=True)
            return [r.summary() for r in run_pipeline(point, store, (), "eval")]
        out = run_sweep(points, cap, args.fit, run_point)
        print(format_sweep(out["rows"], out["chosen"], cap if args.fit else None))
    else:
        from .prefect_env import ensure_server
        ensure_server()
        from flows.train_sweep import train_sweep_flow
        out = train_sweep_flow(config=dc.asdict(cfg), grid=grid, mode="fit" if args.fit else "table",
                               cap_bytes=args.cap_bytes, store_root=str(_store(args).root))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    failed = any(r["error"] for r in out["rows"])
    return 1 if failed or (args.fit and out["chosen"] is None) else 0


def cmd_config(args) -> int:
    from .config import ConfigError, flatten
    cfg = _config(args)
    if args.json is not None:  # a deployment's parameters: the whole config or one stage's section
        if args.json and args.json not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"--json {args.json}: not a stage; stages: {', '.join(f.name for f in dataclasses.fields(cfg))}")
        print(json.dumps(dataclasses.asdict(getattr(cfg, args.json) if args.json else cfg)))
        return 0
    for k, v in flatten(cfg).items():
        print(f"{k} = {v!r}")
    return 0


def cmd_artifacts(args) -> int:
    store = _store(args)
    if args.action == "ls":
        from artifacts.store import file_problems
        arts, broken, incomplete = store.list(), store.broken(), store.incomplete()
        if not (arts or broken or incomplete):
            print(f"no artifacts in {store.root}")
            return 0
        print(f"{'stage':<11}{'key':<32}{'created':<21}{'status':<10}{'size':>12}  metric")
        for a in arts:
            # sizes only (cheap); `golf artifacts verify KEY` re-hashes, and every stage re-hashes its inputs
            problems = file_problems(a.path, a.manifest.get("files", {}), hashed=False)
            note = f"{problems[0]} (golf artifacts verify {a.key})" if problems else a.manifest.get("headline", "")
            print(f"{a.stage:<11}{a.key:<32}{a.manifest.get('finished_at', '')[:19]:<21}"
                  f"{'damaged' if problems else 'ok':<10}{a.total_bytes:>12,}  {note}")
        for name, why in broken:
            print(f"{'?':<11}{name[:31]:<32}{'':<21}{'broken':<10}{'':>12}  {why}")
        for p in incomplete:
            print(f"{'?':<11}{p.name[:31]:<32}{'':<21}{'incomplete':<10}{'':>12}  (being built, or left by a killed "
                  f"build: removed by the next build)")
        return 0
    key = store.resolve(args.key)
    if args.action == "path":
        print(store.path_of(key))
    elif args.action == "show":
        art = store.get(key)
        m = dict(art.manifest)
        print(json.dumps(m, indent=2))
        print("\nlineage:")
        for depth, role, k in store.lineage(key):
            print(f"{'  ' * depth}{role}: {k}")
    elif args.action == "verify":
        problems = store.verify(key)
        if problems:
            print(f"{key}: CORRUPT")
            for p in problems:
                print(f"  {p}")
            return 1
        n = len(store.get(key).manifest["files"])
        print(f"{key}: ok ({n} files re-hashed)")
    return 0


def cmd_submit(args) -> int:
    from .submit import SubmitError, parse_keys, submit, verify
    if args.verify:
        for line in verify(_store(args), Path(args.verify), args.seed, args.nproc, args.tolerance):
            print(line)
        print("verified: the folder's train_gpt.py reproduces the run")
        return 0
    missing = [f for f, v in (("COMPLIANCE_KEY", args.keys), ("--out", args.out), ("--name", args.name),
                              ("--github-id", args.github_id)) if not v]
    if missing:
        raise SubmitError(f"golf submit needs {', '.join(missing)} (or --verify DIR to rerun a folder)")
    against = parse_keys(args.against) if args.against else []
    out = submit(_store(args), args.keys, Path(args.out), args.name, args.github_id, args.author, args.blurb or "",
                 against, args.allow_fail)
    print(f"wrote {out}:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:<32}{f.stat().st_size:>12,} bytes")
    return 0


def cmd_compare(args) -> int:
    from .submit import compare_runs, format_comparison, parse_keys, resolve_run
    store = _store(args)
    a = [resolve_run(store, k) for k in parse_keys(args.a)]
    b = [resolve_run(store, k) for k in parse_keys(args.b)]
    print(format_comparison(compare_runs(a, b, args.threshold_nats, args.alpha)))
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    from .submit import parse_keys
    t0 = time.perf_counter()
    out = write_report(_store(args), args.keys, Path(args.out), parse_keys(args.against) if args.against else [])
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {len(args.keys)} run{'s' if len(args.keys) > 1 else ''}, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_deploy(args) -> int:
    from .deployments import deploy, load_specs, parse_job_variables, preset_or_none, select
    specs = select(load_specs(Path(args.prefect_file)), args.only)
    done, skipped = deploy(specs, args.pool, args.pool_type, preset_or_none(args.preset), str(Path(args.store).resolve()),
                           args.project_dir, args.image, parse_job_variables(args.job_variables))
    for line in skipped:
        print(f"skipped {line}" if not line.startswith("(") else line)
    for name, dep_id in done:
        print(f"deployed {name:<36} {dep_id}")
    print(f"\nstart a worker:  prefect worker start --pool {args.pool}\n"
          f"run one:         prefect deployment run {done[0][0] if done else 'FLOW/DEPLOYMENT'} --param KEY=VALUE")
    return 0


def cmd_serve(args) -> int:
    from .deployments import load_specs, preset_or_none, select, serve
    serve(select(load_specs(Path(args.prefect_file)), args.only), preset_or_none(args.preset),
          str(Path(args.store).resolve()), args.limit)
    return 0


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record is written (not the one at set-up: a caller that
    swaps stderr, as pytest's capture does, would otherwise leave it writing to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = False) -> None:
    """Our stages' messages on stderr; other libraries (httpx, prefect) only when they warn."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    golf_log = logging.getLogger("golf")
    golf_log.handlers[:] = [handler]
    golf_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    golf_log.propagate = False
    logging.getLogger().setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    from artifacts.store import DEFAULT_ROOT, ENV_ROOT
    from .defaults import DEFAULT_POOL, DEFAULT_PRESET, PREFECT_FILE, PRESET_NAMES  # torch-free, unlike golf.config
    presets = ", ".join(PRESET_NAMES)
    p = argparse.ArgumentParser(prog="golf", description="The Parameter Golf pipeline.")
    p.add_argument("--store", default=None,
                   help=f"artifact store root (default: ${ENV_ROOT} or ./{DEFAULT_ROOT})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp):
        sp.add_argument("--preset", default=DEFAULT_PRESET, help=f"config preset ({presets}; default {DEFAULT_PRESET})")
        sp.add_argument("--set", action="append", metavar="STAGE.FIELD=VALUE",
                        help="override one config field; repeatable")

    r = sub.add_parser("run", help="run the pipeline end to end (stages cached in the store)")
    config_args(r)
    r.add_argument("--force", action="append", metavar="STAGE", help="rebuild this stage even if cached ('all')")
    r.add_argument("--until", metavar="STAGE", help="stop after this stage")
    r.add_argument("--no-prefect", action="store_true", help="run the stages in this process without Prefect")
    r.set_defaults(fn=cmd_run)
    st = sub.add_parser("stage", help="run one stage alone, without Prefect (inputs by key), and print its summary")
    st.add_argument("stage", help="tokenize, train, average, quantize, eval or compliance")
    st.add_argument("--preset", default=DEFAULT_PRESET, help=f"the preset whose config for the stage is the base ({presets})")
    st.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override one of the stage's fields; repeatable")
    st.add_argument("--input", action="append", metavar="ROLE=KEY", help="an input artifact by key or unique prefix")
    st.add_argument("--eval-set", action="append", metavar="FIELD=VALUE",
                    help="quantize only: an eval field of the run, which train_gpt.py embeds (default: the preset's)")
    st.add_argument("--force", action="store_true", help="rebuild even if the artifact exists")
    st.set_defaults(fn=cmd_stage)
    c = sub.add_parser("config", help="print the resolved config")
    config_args(c)
    c.add_argument("--json", nargs="?", const="", metavar="STAGE",
                   help="print it as JSON (only STAGE's section if given): a deployment's parameters")
    c.set_defaults(fn=cmd_config)
    sw = sub.add_parser("sweep-quantize", help="quantize + eval several quantize variants of one trained model")
    config_args(sw)
    sw.add_argument("--variant", action="append", metavar='"FIELD=VALUE ..."',
                    help="quantize fields of one variant, space-separated; repeatable")
    sw.set_defaults(fn=cmd_sweep_quantize)
    tw = sub.add_parser("sweep-train", help="train + quantize + eval a grid of configs; --fit picks the best that fits")
    config_args(tw)
    tw.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                    help="a config field and its values (train.muon_weight_decay=0.040,0.042); repeatable: every "
                         "combination runs")
    tw.add_argument("--fit", action="store_true", help="pick the lowest val_bpb whose artifact fits the cap")
    tw.add_argument("--cap-bytes", type=int, default=0, help="the cap for --fit (default: quantize.cap_bytes)")
    tw.add_argument("--no-prefect", action="store_true", help="run the points in this process without Prefect")
    tw.add_argument("--json", metavar="FILE", help="also write the rows and the choice to FILE")
    tw.set_defaults(fn=cmd_sweep_train)
    a = sub.add_parser("artifacts", help="list and inspect artifacts")
    a.add_argument("action", choices=["ls", "show", "verify", "path"])
    a.add_argument("key", nargs="?", help="artifact key or unique prefix")
    a.set_defaults(fn=cmd_artifacts)
    s = sub.add_parser("submit", help="write a records-style folder from compliance artifacts (one per seed)")
    s.add_argument("keys", nargs="*", metavar="COMPLIANCE_KEY", help="one per seed of one config; the first ships")
    s.add_argument("--out", help="the folder to write (new or empty)")
    s.add_argument("--name", help="the submission's name")
    s.add_argument("--github-id", help="your GitHub user name")
    s.add_argument("--author", help="author shown in submission.json (default: the GitHub id)")
    s.add_argument("--blurb", help="one paragraph on what the submission does")
    s.add_argument("--against", metavar="KEY,KEY,...", help="reference runs: adds the Welch test to the README")
    s.add_argument("--allow-fail", action="store_true", help="package runs whose compliance FAILed (marked so)")
    s.add_argument("--verify", metavar="DIR", help="rerun DIR's train_gpt.py against the store's data and compare")
    s.add_argument("--seed", type=int, help="--verify: the seed to rerun (default: the folder's first)")
    s.add_argument("--nproc", type=int, default=1, help="--verify: processes for torchrun (default 1)")
    s.add_argument("--tolerance", type=float, default=0.01, help="--verify: val_bpb difference allowed off the "
                   "one-process CPU case (seed noise)")
    s.set_defaults(fn=cmd_submit)
    c = sub.add_parser("compare", help="one-sided Welch test: does config A beat config B by the threshold?")
    c.add_argument("--a", required=True, metavar="KEY,KEY,...", help="candidate runs (eval or compliance keys)")
    c.add_argument("--b", required=True, metavar="KEY,KEY,...", help="reference runs (eval or compliance keys)")
    c.add_argument("--threshold-nats", type=float, default=0.005, help="the gain to beat, nats per token")
    c.add_argument("--alpha", type=float, default=0.01, help="one-sided significance level")
    c.set_defaults(fn=cmd_compare)
    rp = sub.add_parser("report", help="one self-contained HTML page of runs: curves, bytes, scores, checks, seeds")
    rp.add_argument("keys", nargs="+", metavar="KEY", help="compliance, eval or train keys (or unique prefixes); "
                                                          "several: seeds or variants overlaid")
    rp.add_argument("--out", default="report.html", help="the page to write (default: report.html); nothing is opened")
    rp.add_argument("--against", metavar="KEY,KEY,...", help="baseline runs (eval or compliance keys): adds the "
                                                             "Welch test to the seeds section")
    rp.set_defaults(fn=cmd_report)

    def deployment_args(sp):
        sp.add_argument("--preset", help=f"default parameters of every deployment from this preset ({presets}; "
                                         f"default: the flows' own, the {DEFAULT_PRESET} preset)")
        sp.add_argument("--only", action="append", metavar="NAME", help="only this deployment; repeatable")
        sp.add_argument("--prefect-file", default=str(PREFECT_FILE), help="the list of deployments")
    d = sub.add_parser("deploy", help="create or update the Prefect deployments on the server at $PREFECT_API_URL")
    deployment_args(d)
    d.add_argument("--pool", default=DEFAULT_POOL, help="work pool (a process pool is created when missing)")
    d.add_argument("--pool-type", default="process", help="type of the pool if it must exist already: docker, "
                                                          "kubernetes, ...")
    d.add_argument("--project-dir", help="where the workers find this project (default: this checkout; "
                                         "/opt/golf in docker/Dockerfile's image)")
    d.add_argument("--image", help="the image a container work pool runs (docker or kubernetes pools)")
    d.add_argument("--job-variables", metavar="JSON", help="the work pool's job variables for every deployment, "
                                                           "e.g. volumes and GPUs of a docker pool (see README)")
    d.set_defaults(fn=cmd_deploy)
    sv = sub.add_parser("serve", help="serve the deployments from this process (runs are its subprocesses)")
    deployment_args(sv)
    sv.add_argument("--limit", type=int, help="at most this many runs at once")
    sv.set_defaults(fn=cmd_serve)
    return p


# The errors that are the user's to fix (exit 2): (module, class). They are looked up in sys.modules rather
# than imported: golf.config and the stages import torch, which `golf --help` and `golf artifacts` do not
# need, and an exception of a class whose module was never imported cannot have been raised.
USER_ERRORS = (("artifacts.configs", "ConfigError"), ("artifacts.store", "StoreError"), ("tokenizing.docs", "DataError"),
               ("gpt.shards", "ShardError"), ("golf.submit", "SubmitError"), ("golf.deployments", "DeployError"),
               ("golf.report", "ReportError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS' classes among the modules imported so far, and FileNotFoundError."""
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules) + (FileNotFoundError,)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.store is None:
            from artifacts.store import default_root
            args.store = str(default_root())
        return args.fn(args)
    except user_errors() as e:  # evaluated when an exception arrives, so after the command imported its modules
        print(f"golf: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (RuntimeError, ValueError) as e:  # a stage failed: the message names the cause
        if args.verbose:
            raise
        print(f"golf: error: {type(e).__name__}: {e} (rerun with -v for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("golf: interrupted (complete artifacts are kept; rerun to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `golf config | head`: the reader left; nothing to report
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a disk full or read-only under the store (StoreWriteError), or another OS refusal
        if args.verbose:
            raise
        from artifacts.store import StoreWriteError
        print(f"golf: error: {e}", file=sys.stderr)
        return EXIT_STORE_WRITE if isinstance(e, StoreWriteError) else 1


if __name__ == "__main__":
    sys.exit(main())
