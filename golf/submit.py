"""A records-style submission folder from compliance artifacts, and the seed comparison behind a claimed gain.

    golf submit COMPLIANCE_KEY [KEY ...] --out records/2026-05-01_MyRun --name "My run" --github-id me
    golf compare --a KEY1,KEY2,KEY3 --b KEY4,KEY5,KEY6

``submit`` takes one compliance artifact per seed of one config (the first one is the artifact that
ships) and writes README.md, submission.json, train_gpt.py, weights.bin and each seed's train and eval
logs. train_gpt.py is the quantize stage's shipped_code.py byte for byte, so its size is the code
size that was counted against the cap; it is the program an evaluator runs (decode weights.bin,
score the val shards), not a trainer: the project trains through its pipeline.

``compare`` runs a one-sided Welch t-test that config A's val loss is lower than config B's by more
than the threshold (the challenge's rule: 0.005 nats at p < 0.01), from eval or compliance keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
import shutil
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

    cmd = eval_command(primary, "PATH/TO/fineweb_1024_bpe.model", ["PATH/TO/fineweb_val_*.bin"])
    lines += ["", "## What train_gpt.py is", "",
              f"`train_gpt.py` ({len(primary.quantize.file('shipped_code.py').read_bytes()):,} bytes, the code bytes "
              f"counted against the cap) is the program an evaluator runs with this artifact: it decodes "
              f"`weights.bin` and scores the validation shards. **It does not train.** This project trains through "
              f"its pipeline (`golf run`: tokenize, train, average, quantize, eval, compliance); this folder ships "
              f"what the evaluator runs, test-time training included. The file is generated from the project's own "
              f"modules (stages/shards.py, bpb.py, quant.py, model.py, scoring.py, ttt.py, shipped_eval.py), "
              f"minified and wrapped in a self-extracting lzma stub, byte for byte the file the quantize stage "
              f"counted.", "",
              "Reproduce the seed-" + str(primary.seed) + " score from this folder (needs torch, numpy, "
              "sentencepiece and the challenge's data):", "", "```",
              "python " + " ".join(shlex.quote(x) if "{" in x else x for x in cmd), "```", ""]

    lines += ["## Configuration", "", "```"]
    for role, art in primary.by_role().items():
        for k, v in _flat(art.config).items():
            if not (role == "train" and k == "seed"):
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
              "- `train_gpt.py`: the shipped evaluation program (counted code bytes)",
              "- `weights.bin`: the compressed weights of seed " + str(primary.seed),
              "- `submission.json`: the metadata and per-seed values",
              "- `train_seed<N>.log`, `train_seed<N>_metrics.jsonl`, `train_seed<N>.json`: each seed's training log, "
              "per-step metrics and summary",
              "- `eval_seed<N>.log`, `eval_seed<N>.json`: each seed's evaluation log and result",
              "- `compliance_seed<N>.md`: each seed's compliance report", ""]
    return "\n".join(lines)


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
