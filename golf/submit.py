"""A records-style submission folder from compliance artifacts, and the seed comparison behind a claimed gain.

    golf submit COMPLIANCE_KEY [KEY ...] --out records/2026-05-01_MyRun --name "My run" --github-id me
    golf compare --a KEY1,KEY2,KEY3 --b KEY4,KEY5,KEY6

    golf submit --verify DIR [--seed N] [--nproc N]   (rerun the folder's train_gpt.py and compare)

``submit`` takes one compliance artifact per seed of one config (the first one is the artifact that
ships) and writes README.md, submission.json, train_gpt.py, requirements.txt, weights.bin, each seed's
train and eval logs and, when the run used a non-standard one, the tokenizer. train_gpt.py is the
quantize stage's shipped_code.py byte for byte (``shipping.assemble``), so its size is the code size
that was counted against the cap; it reruns the whole run (train, average, quantize, eval) from the
records' ./data layout, as reviewers do with ``torchrun --standalone --nproc_per_node=8 train_gpt.py``.

``--verify`` reruns a folder's train_gpt.py against the run's tokenize artifact (laid out as ./data in a
scratch copy of the folder) and compares: with one CPU process the weights bit for bit and val_bpb to
1e-9; otherwise val_bpb within ``tolerance``.

``compare`` runs a one-sided Welch t-test that config A's val loss is lower than config B's by more
than the threshold (the challenge's rule: 0.005 nats at p < 0.01), from eval or compliance keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from artifacts import Artifact, ArtifactStore

from .stats import WelchResult, mean_std, welch_one_sided

THRESHOLD_NATS = 0.005  # a new record must beat the previous one by this much per token ...
ALPHA = 0.01            # ... at this one-sided significance level
MIN_SEEDS = 3           # what reviewers ask for before they accept a claimed gain


class SubmitError(ValueError):
    """Keys or runs that cannot make a submission (the key and the reason are named)."""


# --- runs -------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One pipeline run seen from its eval (and, when given, compliance) artifact."""

    eval: Artifact
    quantize: Artifact
    average: Artifact
    train: Artifact
    tokenize: Artifact
    compliance: Artifact | None = None

    @property
    def key(self) -> str:
        return (self.compliance or self.eval).key

    @property
    def seed(self):
        return self.train.config.get("seed")

    @property
    def val_loss(self) -> float:
        return self.eval.metrics["val_loss"]

    @property
    def val_bpb(self) -> float:
        return self.eval.metrics["val_bpb"]

    @property
    def tokens_per_byte(self) -> float:
        return self.eval.metrics["val_tokens"] / self.eval.metrics["val_bytes"]

    def by_role(self) -> dict[str, Artifact]:
        return {"tokenize": self.tokenize, "train": self.train, "average": self.average, "quantize": self.quantize,
                "eval": self.eval}


def _input(store: ArtifactStore, art: Artifact, role: str) -> Artifact:
    key = art.manifest.get("inputs", {}).get(role)
    if key is None:
        raise SubmitError(f"{art.key} has no {role} input")
    return store.get(key)


def resolve_run(store: ArtifactStore, key: str) -> Run:
    """The run behind an eval or compliance key (or a unique prefix of one)."""
    art = store.get(store.resolve(key))
    comp = None
    if art.stage == "compliance":
        comp, art = art, _input(store, art, "eval")
    elif art.stage != "eval":
        raise SubmitError(f"{art.key} is a {art.stage} artifact; give an eval or compliance key")
    avg = _input(store, art, "average")
    return Run(eval=art, quantize=_input(store, art, "quantize"), average=avg, train=_input(store, avg, "train"),
               tokenize=_input(store, art, "tokenize"), compliance=comp)


def parse_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise SubmitError(f"no keys in {text!r}: give comma-separated eval or compliance keys")
    return keys


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(runs: Sequence[Run]) -> list[str]:
    """Config fields (other than train.seed) where a run differs from the first one."""
    def flat(run: Run) -> dict:
        out = {}
        for role, art in run.by_role().items():
            out.update({f"{role}.{k}": v for k, v in _flat(art.config).items()})
        out.pop("train.seed", None)
        return out
    ref = flat(runs[0])
    diffs = []
    for run in runs[1:]:
        other = flat(run)
        for k in sorted(set(ref) | set(other)):
            if ref.get(k) != other.get(k):
                diffs.append(f"{k}: {ref.get(k)!r} in {runs[0].key} vs {other.get(k)!r} in {run.key}")
    return diffs


# --- the seed comparison ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    candidate: list[Run]
    reference: list[Run]
    threshold_nats: float
    alpha: float
    unit: str              # "nats" (same tokenization: val loss per token) or "bpb" (threshold converted)
    test: WelchResult
    threshold_bpb: float   # the threshold in bits per byte at the reference's tokens per byte
    bpb_improvement: float

    @property
    def significant(self) -> bool:
        return self.test.p_value < self.alpha


def compare_runs(candidate: Sequence[Run], reference: Sequence[Run], threshold_nats: float = THRESHOLD_NATS,
                 alpha: float = ALPHA) -> Comparison:
    """One-sided Welch test that the candidate's val loss beats the reference's by more than the threshold.

    With the same tokenization on both sides the test is on val_loss (nats per token), as the rule is
    stated; otherwise nats per token are not comparable and the test is on val_bpb, with the threshold
    converted at the reference's tokens per byte."""
    candidate, reference = list(candidate), list(reference)
    if len(candidate) < 2 or len(reference) < 2:
        raise SubmitError(f"Welch's test needs at least 2 runs per side (got {len(candidate)} and {len(reference)}): "
                          f"run more seeds")
    tpb = mean_std([r.tokens_per_byte for r in reference])[0]
    threshold_bpb = threshold_nats / math.log(2) * tpb
    same_tokens = len({(r.eval.metrics["val_tokens"], r.eval.metrics["val_bytes"])
                       for r in candidate + reference}) == 1
    if same_tokens:
        test = welch_one_sided([r.val_loss for r in candidate], [r.val_loss for r in reference], threshold_nats)
        unit = "nats"
    else:
        test = welch_one_sided([r.val_bpb for r in candidate], [r.val_bpb for r in reference], threshold_bpb)
        unit = "bpb"
    bpb_improvement = mean_std([r.val_bpb for r in reference])[0] - mean_std([r.val_bpb for r in candidate])[0]
    return Comparison(candidate, reference, threshold_nats, alpha, unit, test, threshold_bpb, bpb_improvement)


def format_comparison(c: Comparison) -> str:
    def side(label: str, runs: list[Run]) -> str:
        loss, loss_sd = mean_std([r.val_loss for r in runs])
        bpb, bpb_sd = mean_std([r.val_bpb for r in runs])
        seeds = ", ".join(str(r.seed) for r in runs)
        return (f"{label:<14}{len(runs):>4}  {loss:.6f} +- {loss_sd:.6f}  {bpb:.6f} +- {bpb_sd:.6f}  seeds {seeds}")
    t = c.test
    nats = t.improvement if c.unit == "nats" else t.improvement * math.log(2) / \
        mean_std([r.tokens_per_byte for r in c.reference])[0]
    lines = [
        f"{'':<14}{'runs':>4}  {'val_loss (nats/token)':<22}  {'val_bpb':<20}",
        side("a (candidate)", c.candidate),
        side("b (reference)", c.reference),
        f"improvement   b - a = {nats:.6f} nats/token, {c.bpb_improvement:.6f} bpb",
        f"threshold     {c.threshold_nats} nats/token = {c.threshold_bpb:.6f} bpb at b's "
        f"{1 / mean_std([r.tokens_per_byte for r in c.reference])[0]:.3f} bytes/token",
        f"Welch         one-sided on {'val_loss' if c.unit == 'nats' else 'val_bpb (tokenizations differ)'}: "
        f"t = {t.t:.3f}, df = {t.df:.1f}, p = {t.p_value:.3g}  (H1: improvement > threshold)",
        f"verdict       {'SIGNIFICANT' if c.significant else 'NOT significant'}: "
        f"{'a beats b by more than' if c.significant else 'a does not beat b by more than'} {c.threshold_nats} nats "
        f"at p < {c.alpha}",
    ]
    if min(len(c.candidate), len(c.reference)) < MIN_SEEDS:
        lines.append(f"note          fewer than {MIN_SEEDS} seeds on a side: reviewers ask for {MIN_SEEDS}")
    return "\n".join(lines)


# --- the submission folder ---------------------------------------------------------------------------------
def _ledgers(run: Run) -> tuple[float, float]:
    from gpt.calibration import read_calibration
    from stages.compliance import eval_ledger, train_ledger
    counted_train, _ = train_ledger(run.train, run.average, read_calibration(run.quantize))
    counted_eval, _ = eval_ledger(run.eval)
    return sum(counted_train.values()), sum(counted_eval.values())


def eval_command(run: Run, tokenizer: str, val: Sequence[str]) -> list[str]:
    """The command that reproduces the run's val_bpb from the folder (argv after ``python``)."""
    cfg = run.eval.config
    argv = ["train_gpt.py", "--weights", "weights.bin", "--tokenizer", tokenizer, "--val", *val,
            "--seq-len", str(cfg["seq_len"]), "--stride", str(cfg.get("stride", 0))]
    if cfg.get("max_tokens"):
        argv += ["--max-tokens", str(cfg["max_tokens"])]
    if cfg.get("batch_seqs"):
        argv += ["--batch-seqs", str(cfg["batch_seqs"])]
    if cfg.get("doc_isolation"):
        argv.append("--doc-isolation")
    if (cfg.get("ttt") or {}).get("method", "none") != "none":  # the shipped program runs the same TTT
        argv += ["--ttt", json.dumps(cfg["ttt"], separators=(",", ":"))]
    return argv


def _hardware(run: Run) -> str:
    from stages.compliance import hardware
    return hardware(run.train.manifest.get("environment", {}), run.train.metrics.get("world_size", 1))[0]


def reproduce_section(primary: Run) -> list[str]:
    """README's "Reproduce": what train_gpt.py is and the command a reviewer runs."""
    program = json.loads(primary.quantize.file("program.json").read_text())
    data, tok = program["data"]["dataset"], program["data"]["tokenizer"]
    ttt = ((program.get("eval") or {}).get("ttt") or {}).get("method", "none") != "none"
    cmd = eval_command(primary, f"./data/tokenizers/{tok}", [f"./data/datasets/{data}/fineweb_val_*.bin"])
    nproc = primary.train.metrics.get("world_size", 1)
    return ["", "## Reproduce", "",
            f"`train_gpt.py` ({len(primary.quantize.file('shipped_code.py').read_bytes()):,} bytes, the code bytes "
            f"counted against the cap) is the whole run: it trains (wallclock cap, warmdown, EMA/SWA), chooses "
            f"the averaged weights, quantizes and compresses them, and scores the val shards with the run's "
            f"evaluation{' and test-time training' if ttt else ''}. It is generated from the project's core modules, "
            f"embedded in one file with the run's configs, minified and wrapped in a self-extracting lzma stub; it "
            f"imports nothing of the project, only torch, numpy, sentencepiece and `requirements.txt`.", "",
            f"With the challenge's data in the records' layout (`./data/datasets/{data}/fineweb_{{train,val}}_*.bin`, "
            f"`./data/tokenizers/{tok}`), from this folder:", "", "```",
            f"SEED={primary.seed} torchrun --standalone --nproc_per_node={nproc} train_gpt.py", "```", "",
            "`DATA_PATH`, `TOKENIZER_PATH`, `SEED`, `MAX_WALLCLOCK_SECONDS` and `ITERATIONS` override the embedded "
            "settings; the run's files (`train_seed<N>.log`, `weights.bin`, `eval.json`, `result.json`) go to "
            "`RUN_DIR` (default `./run_seed<N>`), and its last stdout line is the result. One CPU process "
            "(`python train_gpt.py`) runs the same program.", "",
            "Score the shipped `weights.bin` only (no training):", "", "```",
            "python " + " ".join(shlex.quote(x) if "{" in x else x for x in cmd), "```", ""]


def _readme(runs: list[Run], meta: dict, comparison: Comparison | None, report: dict) -> str:
    primary = runs[0]
    bpb, bpb_sd = mean_std([r.val_bpb for r in runs])
    size = json.loads(primary.quantize.file("size.json").read_text())
    lines = [f"# {meta['name']}", "",
             f"val_bpb **{bpb:.8f}**" + (f" (std {bpb_sd:.8f} over {len(runs)} seeds)" if len(runs) > 1 else
                                         " (1 seed)")
             + f"; artifact {size['artifact_bytes']:,} bytes; by {meta['author']} (@{meta['github_id']})", ""]
    if meta["blurb"]:
        lines += [meta["blurb"], ""]
    lines += ["## Results", "",
              "| seed | val_loss | val_bpb | bytes total | weights | code | train s | eval s | compliance |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        q = r.quantize.metrics
        train_s, eval_s = _ledgers(r)
        lines.append(f"| {r.seed} | {r.val_loss:.8f} | {r.val_bpb:.8f} | {q['artifact_bytes']:,} | "
                     f"{q['weights_bytes']:,} | {q['code_bytes']:,} | {train_s:.1f} | {eval_s:.1f} | "
                     f"{r.compliance.metrics.get('verdict') if r.compliance else '-'} |")
    if len(runs) > 1:
        loss, loss_sd = mean_std([r.val_loss for r in runs])
        lines.append(f"| mean | {loss:.8f} | {bpb:.8f} | | | | | | |")
        lines.append(f"| std | {loss_sd:.8f} | {bpb_sd:.8f} | | | | | | |")
    if len(runs) < MIN_SEEDS:
        lines += ["", f"Only {len(runs)} seed(s): reviewers ask for {MIN_SEEDS} seeds of one config before a gain is "
                      f"accepted."]
    lines += ["", "Train seconds count everything the rules count on the training side (the training loop, GPTQ "
                  "calibration, held-out selection on training data; not the compile warm-up); eval seconds count "
                  "the weights decode, scoring and any test-time training."]

    lines += reproduce_section(primary)

    lines += ["## Configuration", "", "```"]
    for role, art in primary.by_role().items():
        for k, v in _flat(art.config).items():
            if not (role == "train" and k == "seed") and not (role == "quantize" and k == "ship_eval"):
                lines.append(f"{role}.{k} = {v!r}")
    lines += ["```", "", f"Model: {primary.train.metrics.get('params', '?'):,} parameters; "
                         f"{primary.train.metrics.get('steps')} steps, {primary.train.metrics.get('tokens', 0):,} "
                         f"training tokens.", ""]

    lines += ["## Hardware and timings", ""]
    for r in runs:
        env = r.eval.manifest.get("environment", {})
        lines.append(f"- seed {r.seed}: trained on {_hardware(r)}; evaluated on "
                     f"{env.get('gpu_name') or 'CPU'}; torch {r.train.manifest.get('environment', {}).get('torch')}; "
                     f"code {r.train.manifest.get('git', {}).get('commit') or '?'}")
    if report.get("warnings"):
        lines += [""] + [f"- WARNING {w}" for w in report["warnings"]]

    lines += ["", f"## Compliance (seed {primary.seed})", "", "| check | status | evidence |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['status']} | {c['evidence'].replace('|', '/')} |" for c in report.get("checks", [])]
    lines += ["", "Each seed's full report: compliance_seed<N>.md."]

    if comparison is not None:
        lines += ["", "## Significance against the reference", "", "```", format_comparison(comparison), "```",
                  "", "Reference runs: " + ", ".join(r.key for r in comparison.reference)]

    lines += ["", "## Files", "",
              "- `train_gpt.py`: the run as one program: trains, quantizes, evaluates (counted code bytes)",
              "- `requirements.txt`: what train_gpt.py imports beyond torch, numpy and sentencepiece",
              "- `weights.bin`: the compressed weights of seed " + str(primary.seed),
              "- `submission.json`: the metadata and per-seed values",
              "- `train_seed<N>.log`, `train_seed<N>_metrics.jsonl`, `train_seed<N>.json`: each seed's training log, "
              "per-step metrics and summary",
              "- `eval_seed<N>.log`, `eval_seed<N>.json`: each seed's evaluation log and result",
              "- `compliance_seed<N>.md`: each seed's compliance report"]
    if ships_tokenizer(primary):
        lines.append("- `tokenizer/`: the run's SentencePiece model (not a published one; not counted, as the rules say)")
    return "\n".join(lines + [""])


# --- the program that ships ------------------------------------------------------------------------------
STANDARD_TOKENIZERS = ("embedded", "embedded-sp8192")  # the official sp1024 and the records' sp8192
OPTIONAL_IMPORTS = ("zstandard", "brotli", "tqdm")  # what the core imports beyond torch, numpy, sentencepiece


def check_program(run: Run) -> None:
    """train_gpt.py must embed this run's configs: a quantize artifact built outside golf run (``golf stage
    quantize``) embeds the eval's defaults, and its train_gpt.py would not reproduce the eval artifact."""
    from gpt.training import TrainConfig
    program = json.loads(run.quantize.file("program.json").read_text())
    want = {"train": {k: v for k, v in run.train.config.items() if k not in TrainConfig.NOT_IN_KEY},
            "average": run.average.config,
            "eval": {k: v for k, v in run.eval.config.items() if k != "nproc"}}
    for part, cfg in want.items():
        if program.get(part) != cfg:
            diff = sorted(k for k in set(cfg) | set(program.get(part) or {})
                          if cfg.get(k) != (program.get(part) or {}).get(k))
            raise SubmitError(f"{run.quantize.key}: its train_gpt.py embeds another {part} config than the run's "
                              f"({', '.join(diff[:3]) or 'all of it'}): rebuild it with golf run")


def requirements() -> str:
    """requirements.txt: the packages train_gpt.py may import beyond the challenge image's torch, numpy and
    sentencepiece, at the versions this machine has."""
    from importlib.metadata import PackageNotFoundError, version
    lines = []
    for name in OPTIONAL_IMPORTS:
        try:
            lines.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            lines.append(name)
    return "\n".join(lines) + "\n"


def ships_tokenizer(run: Run) -> bool:
    """Whether the run's tokenizer is one reviewers would not already have."""
    cfg = run.tokenize.config
    return cfg.get("mode") != "import" and cfg.get("tokenizer", "embedded") not in STANDARD_TOKENIZERS


def layout_data(folder: Path, run: Run) -> Path:
    """The run's tokenize artifact linked into ``folder`` as the records' ./data layout (what train_gpt.py reads
    by default)."""
    from tokenizing.dataset import Dataset
    program = json.loads(run.quantize.file("program.json").read_text())
    ds = Dataset.open(run.tokenize)
    shards = Path(folder) / "data" / "datasets" / program["data"]["dataset"]
    shards.mkdir(parents=True, exist_ok=True)
    for p in ds.shard_paths("train") + ds.shard_paths("val"):
        (shards / p.name).symlink_to(p.resolve())
    tok = Path(folder) / "data" / "tokenizers" / program["data"]["tokenizer"]
    tok.parent.mkdir(parents=True, exist_ok=True)
    tok.symlink_to(ds.tokenizer_path.resolve())
    return Path(folder) / "data"


def run_program(folder: Path, seed, nproc: int, env: dict | None = None, timeout: float = 3600) -> dict:
    """``torchrun --standalone --nproc_per_node=N train_gpt.py`` in ``folder`` with SEED=seed: its result.json
    (from RUN_DIR, default run_seed<seed>). The environment is the bare minimum (no PYTHONPATH) plus ``env``, so the
    program finds nothing of the project."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
    base = {k: os.environ[k] for k in ("PATH", "HOME", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if k in os.environ}
    env = {**base, "SEED": str(seed), "RUN_DIR": f"run_seed{seed}", **(env or {})}
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        # the rank's exception, not torchrun's summary of it
        why = [x for x in lines if re.match(r"^\w*(Error|Exception|Exit)\b", x.strip())] or lines[-3:]
        raise SubmitError(f"train_gpt.py failed in {folder} (exit {proc.returncode}): {why[-1].strip()}")
    return json.loads((Path(folder) / env["RUN_DIR"] / "result.json").read_text())


def verify(store: ArtifactStore, folder: Path, seed=None, nproc: int = 1, tolerance: float = 0.01) -> list[str]:
    """Rerun the folder's train_gpt.py (in a scratch copy with ./data linked in) for one of its seeds and compare
    it with that seed's pipeline run: the lines of the comparison. Raises SubmitError on a mismatch."""
    sub = json.loads((Path(folder) / "submission.json").read_text())
    by_seed = {r["seed"]: r["artifact"] for r in sub["seed_results"]}
    seed = sub["seeds"][0] if seed is None else seed
    if seed not in by_seed:
        raise SubmitError(f"seed {seed} is not one of the folder's seeds ({', '.join(map(str, by_seed))})")
    run = resolve_run(store, by_seed[seed])
    shipped = (Path(folder) / "train_gpt.py").read_bytes()
    if shipped != run.quantize.file("shipped_code.py").read_bytes():  # before minutes of training find it out
        raise SubmitError(f"{folder}/train_gpt.py ({len(shipped):,} bytes) differs from the program "
                          f"{run.quantize.key} counted ({run.quantize.metrics['code_bytes']:,} bytes)")
    with tempfile.TemporaryDirectory(prefix="golf-verify-") as tmp:
        shutil.copyfile(Path(folder) / "train_gpt.py", Path(tmp) / "train_gpt.py")
        layout_data(tmp, run)
        got = run_program(Path(tmp), seed, nproc)
        same_blob = (Path(tmp) / f"run_seed{seed}" / "weights.bin").read_bytes() == run.quantize.file(
            "weights.bin").read_bytes()
    want, bpb = run.val_bpb, got["val_bpb"]
    lines = [f"seed {seed}, {nproc} process(es): val_bpb {bpb:.10f} (pipeline {want:.10f}, diff {bpb - want:+.2e}); "
             f"code bytes {got['code_bytes']:,} (counted {run.quantize.metrics['code_bytes']:,}); weights.bin "
             f"{'identical' if same_blob else 'different'}"]
    exact = nproc == 1 and run.train.metrics.get("device") == "cpu" and run.train.metrics.get("world_size") == 1
    if got["code_bytes"] != run.quantize.metrics["code_bytes"]:
        raise SubmitError(lines[0] + ": the code bytes differ")
    if exact and not (same_blob and abs(bpb - want) <= 1e-9):
        raise SubmitError(lines[0] + ": a one-process CPU rerun must reproduce the weights and val_bpb exactly")
    if abs(bpb - want) > tolerance:
        raise SubmitError(lines[0] + f": more than {tolerance} bpb apart")
    return lines


def submit(store: ArtifactStore, keys: Sequence[str], out: Path, name: str, github_id: str, author: str | None = None,
           blurb: str = "", against: Sequence[str] = (), allow_fail: bool = False) -> Path:
    """Write the records folder; nothing is left at ``out`` if anything fails."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SubmitError(f"{out} exists and is not empty; give a new folder")
    runs = [resolve_run(store, k) for k in keys]
    for r in runs:
        if r.compliance is None:
            raise SubmitError(f"{r.key} is an eval artifact: golf submit needs compliance keys (the verdict ships "
                              f"with the record)")
    failed = [f"{r.key} (failed: {', '.join(r.compliance.metrics.get('failed', []))})" for r in runs
              if r.compliance.metrics.get("verdict") != "PASS"]
    if failed and not allow_fail:
        raise SubmitError(f"compliance FAIL for {'; '.join(failed)} (--allow-fail packages it anyway, marked)")
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SubmitError(f"the runs repeat a seed ({', '.join(map(str, seeds))}): give one run per seed")
    diffs = config_differences(runs)
    if diffs:
        raise SubmitError(f"the runs are not seeds of one config: {diffs[0]}" +
                          (f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""))
    for r in runs:  # what ships (weights, code, logs, reports) must be what the manifests hashed
        for art in (*r.by_role().values(), r.compliance):
            problems = store.verify(art.key)
            if problems:
                raise SubmitError(f"{art.key} fails verification ({problems[0]}"
                                  + (f", and {len(problems) - 1} more" if len(problems) > 1 else "")
                                  + f"): nothing written; rebuild it with golf run --force {art.stage}")
    primary = runs[0]
    check_program(primary)
    code = primary.quantize.file("shipped_code.py").read_bytes()
    counted = json.loads(primary.quantize.file("size.json").read_text())["code_bytes"]
    if len(code) != counted:
        raise SubmitError(f"{primary.quantize.key}: shipped_code.py is {len(code):,} bytes but size.json counted "
                          f"{counted:,}")
    comparison = compare_runs(runs, [resolve_run(store, k) for k in against]) if against else None
    report = json.loads(primary.compliance.file("report.json").read_text())

    meta = {"name": name, "github_id": github_id, "author": author or github_id, "blurb": blurb}
    bpb, bpb_sd = mean_std([r.val_bpb for r in runs])
    loss, _ = mean_std([r.val_loss for r in runs])
    submission = {
        "author": meta["author"], "github_id": github_id, "name": name, "blurb": blurb,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "val_loss": loss, "val_bpb": bpb, "val_bpb_std": bpb_sd,
        "bytes_total": max(r.quantize.metrics["artifact_bytes"] for r in runs),
        "bytes_code": len(code),
        "seeds": seeds,
        "seed_results": [{"seed": r.seed, "val_loss": r.val_loss, "val_bpb": r.val_bpb,
                          "bytes_total": r.quantize.metrics["artifact_bytes"],
                          "bytes_model": r.quantize.metrics["weights_bytes"],
                          "train_seconds": round(_ledgers(r)[0], 3), "eval_seconds": round(_ledgers(r)[1], 3),
                          "compliance": r.compliance.metrics.get("verdict"), "artifact": r.key} for r in runs],
        "hardware": _hardware(primary),
        "compliance": "PASS" if not failed else "FAIL",
    }
    if comparison is not None:
        t = comparison.test
        submission["significance"] = {"unit": comparison.unit, "threshold_nats": comparison.threshold_nats,
                                      "improvement": t.improvement, "t": t.t, "df": t.df, "p_value": t.p_value,
                                      "alpha": comparison.alpha, "significant": comparison.significant,
                                      "reference": [r.key for r in comparison.reference]}

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "train_gpt.py").write_bytes(code)
        (tmp / "requirements.txt").write_text(requirements())
        if ships_tokenizer(primary):  # reviewers lay it out as ./data/tokenizers/<name> (or set TOKENIZER_PATH)
            from tokenizing.dataset import Dataset
            name = json.loads(primary.quantize.file("program.json").read_text())["data"]["tokenizer"]
            (tmp / "tokenizer").mkdir()
            shutil.copyfile(Dataset.open(primary.tokenize).tokenizer_path, tmp / "tokenizer" / name)
        shutil.copyfile(primary.quantize.file("weights.bin"), tmp / "weights.bin")
        for r in runs:
            s = r.seed
            shutil.copyfile(r.train.file("log.txt"), tmp / f"train_seed{s}.log")
            shutil.copyfile(r.train.file("metrics.jsonl"), tmp / f"train_seed{s}_metrics.jsonl")
            shutil.copyfile(r.train.file("train.json"), tmp / f"train_seed{s}.json")
            shutil.copyfile(r.eval.file("log.txt"), tmp / f"eval_seed{s}.log")
            shutil.copyfile(r.eval.file("eval.json"), tmp / f"eval_seed{s}.json")
            shutil.copyfile(r.compliance.file("report.md"), tmp / f"compliance_seed{s}.md")
        (tmp / "submission.json").write_text(json.dumps(submission, indent=2) + "\n")
        readme = _readme(runs, meta, comparison, report)
        if failed:
            readme = readme.replace("\n", f"\n\n**NOT COMPLIANT: {'; '.join(failed)}**\n", 1)
        (tmp / "README.md").write_text(readme)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
