"""What the report shows of one run, read from the artifacts of its lineage: nothing is recomputed.

A run is a mapping of stage name -> Artifact (the lineage of a compliance, eval or train key); stages absent
from it (a train key has no quantize) leave their part None, and the page says so. The compliance stage
builds the page before its own artifact is committed, so its checks come in as the report dict itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from artifacts import Artifact

STAGE_ORDER = ("tokenize", "train", "average", "quantize", "eval", "compliance")  # the DAG's, for listing keys
# Document-length buckets (tokens, BOS included): powers of two, as the records' per-length tables use.
DOC_BUCKET_EDGES = (0, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class RunData:
    label: str                          # how the page names the run: "seed 1337", or its key when seeds agree
    keys: dict[str, str]                # stage -> artifact key, for the stages in the run's lineage
    seed: int | None = None
    train: dict | None = None           # records (metrics.jsonl), summary (train.json), config, marks
    average: dict | None = None         # average.json and the stage's metrics
    quantize: dict | None = None        # size.json, metrics, candidates.json (cap fit) if any
    eval: dict | None = None            # eval.json (its metrics), config, doc buckets, TTT curve
    compliance: dict | None = None      # report.json: verdict, checks with evidence
    notes: dict[str, str] = field(default_factory=dict)  # section -> why a part is missing


def _json(art: Artifact, name: str):
    """A JSON file of the artifact, or None when the artifact does not list it (an older or other layout)."""
    return json.loads(art.file(name).read_text()) if name in art.manifest.get("files", {}) else None


def train_marks(records: list[dict], config: dict) -> dict:
    """The steps where the recurrence and the warmdown started, read off the per-step records: the recurrence
    flag turns on; the LR multiplier first drops below 1 after the warmup (None: it never did)."""
    recur = next((r["step"] for r in records if r.get("recurrence")), None)
    warmup = int(config.get("warmup_steps", 0) or 0)
    warmdown = next((r["step"] for r in records if r["step"] > warmup and r.get("lr_mult", 1.0) < 1.0), None)
    return {"recurrence_step": recur, "warmdown_step": warmdown}


def load_train(art: Artifact) -> dict:
    lines = art.file("metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {"records": records, "summary": _json(art, "train.json") or dict(art.metrics), "config": art.config,
            "metrics": art.metrics, "marks": train_marks(records, art.config)}


def load_quantize(art: Artifact) -> dict:
    return {"size": _json(art, "size.json"), "metrics": art.metrics, "candidates": _json(art, "candidates.json"),
            "config": art.config}


def doc_buckets(tok: Artifact, ev: Artifact) -> list[dict] | None:
    """BPB by document length from eval's per-token NLLs, the val tokens' BOS positions (document boundaries)
    and tokenize's byte sidecar. Target i is val token i + 1; it belongs to the document that holds that token,
    bucketed by the document's whole length in the val stream (a document cut by eval.max_tokens keeps its own)."""
    from gpt.shards import load_split
    from tokenizing.dataset import Dataset
    if "token_nll.npy" not in ev.manifest.get("files", {}) or \
            "val_token_bytes.npy" not in tok.manifest.get("files", {}):
        return None
    ds = Dataset.open(tok)
    tokens = load_split(ds.shard_paths("val"))
    nll = np.load(ev.file("token_nll.npy"))
    n = len(nll)
    tok_bytes = np.load(tok.file("val_token_bytes.npy"))[1:n + 1].astype(np.float64)
    starts = np.flatnonzero(tokens == ds.bos_id)
    if not len(starts) or starts[0] != 0:  # a stream that does not open with BOS opens with a partial document
        starts = np.concatenate([[0], starts])
    lengths = np.diff(np.concatenate([starts, [len(tokens)]]))
    # linear in the stream (40M targets on the real split): a document per token, sums by bincount
    doc_of_target = np.repeat(np.arange(len(lengths)), lengths)[1:n + 1]
    bucket_of_doc = np.searchsorted(DOC_BUCKET_EDGES, lengths, side="right") - 1
    bucket = bucket_of_doc[doc_of_target]
    k = len(DOC_BUCKET_EDGES)
    nll_sum = np.bincount(bucket, weights=nll, minlength=k)
    byte_sum = np.bincount(bucket, weights=tok_bytes, minlength=k)
    targets = np.bincount(bucket, minlength=k)
    # targets are a prefix of the stream, so the documents scored are the first doc_of_target[-1] + 1
    docs = np.bincount(bucket_of_doc[:doc_of_target[-1] + 1], minlength=k) if n else np.zeros(k, int)
    out = []
    for b, lo in enumerate(DOC_BUCKET_EDGES):
        if not targets[b] or byte_sum[b] <= 0:
            continue
        hi = DOC_BUCKET_EDGES[b + 1] if b + 1 < k else None
        out.append({"bucket": f"{lo}–{hi - 1}" if hi else f"{lo}+", "docs": int(docs[b]), "targets": int(targets[b]),
                    "bytes": int(byte_sum[b]), "bpb": float(nll_sum[b] / math.log(2) / byte_sum[b])})
    return out


def ttt_curve(tok: Artifact, ev: Artifact, points: int = 400) -> dict | None:
    """The cumulative TTT gain over the val stream (bpb so far without TTT minus with it), from the no-TTT run's
    running sum the eval stage keeps (nll_no_ttt_cumsum.npy) or its per-token NLLs (token_nll_no_ttt.npy); None
    when eval kept neither (no TTT, or eval.no_ttt_diagnostic=false)."""
    files = ev.manifest.get("files", {})
    if "token_nll.npy" not in files or not {"token_nll_no_ttt.npy", "nll_no_ttt_cumsum.npy"} & set(files):
        return None
    nll = np.load(ev.file("token_nll.npy"))
    tok_bytes = np.load(tok.file("val_token_bytes.npy"))[1:len(nll) + 1].astype(np.float64)
    cum_bytes = np.maximum(np.cumsum(tok_bytes), 1.0)
    cum_ttt = np.cumsum(nll, dtype=np.float64)
    if "token_nll_no_ttt.npy" in files:
        idx = np.unique(np.linspace(0, len(nll) - 1, min(points, len(nll))).astype(int))
        cum_plain = np.cumsum(np.load(ev.file("token_nll_no_ttt.npy")), dtype=np.float64)[idx]
    else:
        rows = np.load(ev.file("nll_no_ttt_cumsum.npy"))
        idx, cum_plain = rows[:, 0].astype(np.int64) - 1, rows[:, 1]
        if len(idx) == 0 or idx[-1] != len(nll) - 1:
            return None  # not this eval's stream
    gain = (cum_plain - cum_ttt[idx]) / math.log(2) / cum_bytes[idx]
    return {"targets": (idx + 1).tolist(), "gain_bpb": gain.tolist(), "final_gain_bpb": float(gain[-1])}


def load_eval(tok: Artifact | None, art: Artifact) -> dict:
    out = {"result": _json(art, "eval.json") or dict(art.metrics), "config": art.config, "buckets": None, "ttt": None}
    if tok is not None:
        out["buckets"] = doc_buckets(tok, art)
        out["ttt"] = ttt_curve(tok, art)
    return out


def load_run(arts: Mapping[str, Artifact], label: str = "", compliance_report: dict | None = None,
             compliance_key: str | None = None) -> RunData:
    """The report's view of one run from its artifacts (stage name -> Artifact); ``compliance_report`` and
    ``compliance_key`` stand in for a compliance artifact not yet committed (the compliance stage writing it)."""
    keys = {s: a.key for s, a in arts.items()}
    if compliance_key:
        keys["compliance"] = compliance_key
    run = RunData(label=label, keys={s: keys[s] for s in STAGE_ORDER if s in keys})
    if "train" in arts:
        run.train = load_train(arts["train"])
        run.seed = run.train["config"].get("seed")
    if "average" in arts:
        run.average = {"report": _json(arts["average"], "average.json"), "metrics": arts["average"].metrics}
    if "quantize" in arts:
        run.quantize = load_quantize(arts["quantize"])
    if "eval" in arts:
        run.eval = load_eval(arts.get("tokenize"), arts["eval"])
    if compliance_report is not None:
        run.compliance = compliance_report
    elif "compliance" in arts:
        run.compliance = _json(arts["compliance"], "report.json")
    return run
