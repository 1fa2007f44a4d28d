"""compliance: the challenge's rules checked from the artifacts, PASS, FAIL or SKIP with the evidence used.

Each check is a small pure function (plain data in, a check dict out); ``build`` gathers the data
from the artifacts and calls them. A check is PASS, FAIL, or SKIP (not applicable here, with why).
A FAIL is a result, not an error: the artifact records it and ``golf run`` exits non-zero.

  size           weights.bin + shipped_code.py bytes (from the files) <= 16,000,000, and size.json agrees
  train_time     training loop + GPTQ calibration + held-out selection on training data, <= 600 s
  eval_time      weights decode + scoring (+ test-time training), <= 600 s
                 both with the hardware they ran on; anything but 8x H100 SXM is not a compliant timing
  val_not_in_train   no validation document's text (SHA-256) is also a training document (the original
                     texts, before any transform)
  calibration    quantization calibration data comes from no val shard (calibration.json, below)
  val_split      the val split is the canonical one: 50,000 documents, the token count for known
                 tokenizers (by the tokenizer file's SHA-256), and every target scored
  ttt_order      test-time training adapted only on tokens already scored (ttt_log.jsonl, below)
  bpb_recomputed val_bpb from eval's per-token NLLs and bytes counted by decoding each document (with a
                 text transform such as CaseOps: decoding, then inverting the transform, so the bytes are the
                 original text's); each document's count must equal the tokenize stage's byte sidecar, the
                 first one that does not is named
  boundary_leak  changing the previous document must not move the next one's scores when eval
                 claims document isolation

Files other stages write for these checks (absent = not applicable):

  quantize/calibration.json   ``gpt.calibration.CalibrationRecord``: source ("train"), shards, tokens,
                               seconds. FAIL if the source is not train or a listed shard is a val shard;
                               absent while quantize's config calibrates (GPTQ, LQER): unverifiable, FAIL.
                               Its seconds are counted in the training ledger.
  average metrics             ``selection_seconds``: the held-out candidate scoring on training data that
                               chose the weights (method=best), counted in the training ledger (the stage
                               duration is used as an upper bound when the metric is absent and a selection
                               ran); ``heldout_diagnostic_seconds``: the same scoring with a fixed method,
                               shown but not counted (nothing was decided by it).
  eval/ttt_log.jsonl          test-time training's order of events, one JSON object per line, in the order
                               the eval loop did them:
                                 {"event": "score", "start": S, "end": E}  NLLs of targets S..E-1 computed (final)
                                 {"event": "adapt", "start": S, "end": E}  weights updated on targets S..E-1
                               Indices are positions in token_nll.npy (target i is val token i+1), half-open.
                               Several processes write one merged timeline: an adapt that updates shared
                               weights comes after every score event whose tokens it used. Rules: every
                               adapted-on target was scored by an earlier event; no target is scored twice;
                               the score events cover token_nll.npy exactly. eval.json ``ttt`` true or a
                               ``ttt_seconds`` metric without the log is a FAIL (unverifiable).
  eval metrics                ``ttt_seconds``: counted in the eval ledger. ``doc_isolation`` (eval.json,
                               default false): eval claims each document is scored without the previous
                               ones; the boundary check then scores with ``scoring.score_stream(...,
                               doc_isolation=True)`` when that parameter exists, as eval would.

Run it alone:  golf stage compliance --input tokenize=KEY --input train=KEY --input average=KEY
               --input quantize=KEY --input eval=KEY
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from artifacts import Artifact, Stage, StageContext
from gpt import checks
from gpt.bpb import bits_per_byte, piece_tables
from gpt.calibration import FILE as CALIBRATION_FILE
from gpt.calibration import CalibrationFileError, CalibrationRecord, calibrates, read_calibration
from gpt.scoring import document_spans, score_stream
from gpt.shards import load_split
from tokenizing import transforms
from tokenizing.dataset import Dataset
from gpt.devices import resolve_device

log = logging.getLogger("golf.compliance")

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
CANONICAL_VAL_DOCS = 50_000  # the challenge's val split: the first 50,000 documents of docs_selected.jsonl

# Known tokenizers, by the SHA-256 of the .model file: the canonical val split's counts for each.
# val_tokens is the raw token count of the val shards (BOS included); None = not known here. The records
# log val_tokens 40,540,160 (SP8192) and 47,851,520 (CaseOps), but those are the counts after truncation
# to a multiple of the 2048 sequence length, not the shards' raw counts, and the tokenizer files' hashes
# are not at hand: add an entry (or set compliance.expected_val_tokens) when they are.
KNOWN_TOKENIZERS: dict[str, dict] = {
    "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a": {
        "name": "sp1024 (the challenge's fineweb_1024_bpe.model)", "val_docs": CANONICAL_VAL_DOCS,
        "val_tokens": None},
    "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d": {
        "name": "CaseOps sp8192 (the records' fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model)",
        "val_docs": CANONICAL_VAL_DOCS, "val_tokens": None},
}


@dataclass(frozen=True)
class ComplianceConfig:
    cap_bytes: int = 16_000_000     # decimal bytes, code included (the challenge's rule)
    train_limit_s: float = 600.0    # training wallclock on 8x H100 SXM (GPTQ calibration included)
    eval_limit_s: float = 600.0     # evaluation wallclock on 8x H100 SXM (test-time training included)
    bpb_rel_tolerance: float = 1e-12  # recomputed val_bpb must agree this closely (bytes must agree exactly)
    expected_val_tokens: int = 0    # raw val token count the split must have (0 = from KNOWN_TOKENIZERS)
    leak_pairs: int = 4             # document pairs in the boundary-leak test
    leak_tolerance_nats: float = 1e-6  # largest NLL shift of the next document that counts as no leak
    leak_seed: int = 0              # seed of the random tokens that replace the previous document
    device: str = "auto"            # device for the boundary-leak test: auto | cpu | cuda
    html_report: bool = True        # also write report.html: golf report's page of this run (plots, no network)

    def __post_init__(self):
        checks.choices(self, "compliance", {"device": ("auto", "cpu", "cuda")})
        checks.ints(self, "compliance", ("cap_bytes",), 1)
        checks.ints(self, "compliance", ("expected_val_tokens", "leak_pairs", "leak_seed"))
        checks.reals(self, "compliance", ("train_limit_s", "eval_limit_s"), lo_open=True)
        checks.reals(self, "compliance", ("bpb_rel_tolerance", "leak_tolerance_nats"))


class ComplianceInputError(ValueError):
    """An artifact file the checks read is malformed (the file and line are named)."""


def result(name: str, status: str, evidence: str, warning: str | None = None) -> dict:
    return {"check": name, "status": status, "evidence": evidence, "warning": warning}


def passed(ok: bool) -> str:
    return PASS if ok else FAIL


# --- size ----------------------------------------------------------------------------------------------
def check_size(weights_bytes: int, code_bytes: int, cap_bytes: int, counted: dict | None = None) -> dict:
    """The files that ship against the cap; ``counted`` (size.json) must agree with the files."""
    total = weights_bytes + code_bytes
    ok = total <= cap_bytes
    evidence = (f"weights.bin {weights_bytes:,} + shipped_code.py {code_bytes:,} = {total:,} bytes; cap {cap_bytes:,}; "
                f"{'margin' if ok else 'OVER by'} {abs(cap_bytes - total):,}")
    if counted is not None:
        claimed = (counted.get("weights_bytes"), counted.get("code_bytes"), counted.get("artifact_bytes"))
        if claimed != (weights_bytes, code_bytes, total):
            return result("size", FAIL, evidence + f"; size.json claims weights {claimed[0]}, code {claimed[1]}, "
                                                   f"total {claimed[2]}: the counted bytes are not the files' bytes")
        evidence += "; size.json agrees with the files"
    return result("size", passed(ok), evidence)


# --- time ledger -----------------------------------------------------------------------------------------
def hardware(env: dict, processes: int) -> tuple[str, bool]:
    """A description of the machine a stage ran on, and whether it is the challenge's 8x H100 SXM."""
    gpus, name = env.get("gpu_count") or 0, env.get("gpu_name") or ""
    procs = f"{processes} process{'es' if processes != 1 else ''}"
    if not gpus:
        return f"CPU ({env.get('cpu_count')} cores), {procs}", False
    # torch names the SXM part "NVIDIA H100 80GB HBM3"; PCIe and NVL parts are slower and say so
    sxm = "H100" in name and "PCIe" not in name and "NVL" not in name
    return f"{gpus}x {name}, {procs}", sxm and gpus >= 8 and processes == 8


def check_time(name: str, counted: Mapping[str, float], limit_s: float, hw: str, on_target: bool,
               excluded: Mapping[str, float] | None = None) -> dict:
    """The seconds the rules count, item by item, against the limit."""
    total = sum(counted.values())
    items = " + ".join(f"{k} {v:.1f} s" for k, v in counted.items())
    evidence = f"{items} = {total:.1f} s on {hw}; limit {limit_s:.0f} s"
    if excluded:
        evidence += "; not counted: " + ", ".join(f"{k} {v:.1f} s" for k, v in excluded.items())
    warning = None if on_target else f"{name}: measured on {hw}, not 8x H100 SXM: not a compliant timing"
    return result(name, passed(total <= limit_s), evidence, warning)


# --- data ------------------------------------------------------------------------------------------------
def check_val_not_in_train(val_hashes: np.ndarray, train_hashes: np.ndarray) -> dict:
    shared = int(np.isin(train_hashes, val_hashes).sum())
    return result("val_not_in_train", passed(shared == 0),
                  f"{len(val_hashes):,} val documents vs {len(train_hashes):,} train documents by SHA-256 of their "
                  f"text: {shared} shared")


def check_calibration(record: CalibrationRecord | None, val_shards: Sequence[str], calibrated: bool) -> dict:
    """Calibration tokens must not come from the val split (quantize's calibration.json says which it read)."""
    if record is None:
        if calibrated:
            return result("calibration", FAIL, f"quantize calibrates (GPTQ or LQER) but wrote no {CALIBRATION_FILE}: "
                                               f"the calibration data cannot be checked")
        return result("calibration", PASS, f"no calibration: quantize reads no data (no {CALIBRATION_FILE})")
    source = record.source.lower()
    shards = [Path(s).name for s in record.shards]
    val_names = {Path(s).name for s in val_shards}
    bad = [s for s in shards if s in val_names or "_val_" in s]
    listed = ", ".join(shards[:4]) + (" ..." if len(shards) > 4 else "")
    evidence = f"source {source or '?'}, {len(shards)} shard(s) {listed}, {record.tokens:,} tokens"
    if source != "train" or bad:
        return result("calibration", FAIL,
                      evidence + f": calibration reads validation data ({', '.join(bad) or source})")
    return result("calibration", PASS, evidence + "; no val shard among them")


def check_val_split(sample: bool, val_docs: int, val_tokens: int, scored_targets: int, tokenizer_sha: str,
                    known: Mapping[str, dict] = KNOWN_TOKENIZERS, expected_tokens: int = 0,
                    canonical_docs: int = CANONICAL_VAL_DOCS) -> dict:
    """The val split is the challenge's (documents, tokens when known) and eval scored all of it."""
    entry = known.get(tokenizer_sha)
    tok = entry["name"] if entry else f"unknown tokenizer (sha256 {tokenizer_sha[:12]}...)"
    counts = (f"{val_docs:,} val documents, {val_tokens:,} tokens ({tok}); eval scored {scored_targets:,} of "
              f"{val_tokens - 1:,} targets")
    if sample:
        return result("val_split", SKIP, f"embedded FineWeb sample, not the canonical split: {counts}",
                      f"val_split: val_bpb is measured on the bundled sample ({val_docs} documents), not the "
                      f"challenge's {canonical_docs:,}-document split: not comparable with the leaderboard")
    problems = []
    if val_docs != canonical_docs:
        problems.append(f"the challenge's val split is the first {canonical_docs:,} documents, this one has "
                        f"{val_docs:,}" + (" (documents from there on are in the training split: the canonical val "
                                           "documents leak into training)" if val_docs < canonical_docs else ""))
    expected = expected_tokens or (entry or {}).get("val_tokens")
    if expected:
        if val_tokens != expected:
            problems.append(f"{val_tokens:,} val tokens, expected {expected:,}")
        counts += f"; token count checked against {expected:,}"
    else:
        counts += "; token count not checked (unknown for this tokenizer)"
    if scored_targets != val_tokens - 1:
        problems.append(f"eval scored {scored_targets:,} targets, not all {val_tokens - 1:,} (eval.max_tokens)")
    if problems:
        return result("val_split", FAIL, counts + ": " + "; ".join(problems))
    return result("val_split", PASS, counts)


# --- test-time training order ------------------------------------------------------------------------------
def read_ttt_log(path: Path) -> list[dict]:
    """The events of ttt_log.jsonl, validated line by line."""
    events = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            raise ComplianceInputError(f"{path.name}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(ev, dict) or ev.get("event") not in ("score", "adapt") \
                or not isinstance(ev.get("start"), int) or not isinstance(ev.get("end"), int) \
                or not 0 <= ev["start"] <= ev["end"]:
            raise ComplianceInputError(f"{path.name}:{lineno}: expected {{\"event\": \"score\"|\"adapt\", "
                                       f"\"start\": int, \"end\": int}} with 0 <= start <= end, "
                                       f"got {line.strip()[:80]}")
        events.append(ev)
    return events


def check_ttt_order(events: list[dict] | None, n_scored: int, ttt_claimed: bool = False) -> dict:
    """Replay the eval loop's events: adapt only on targets already scored, each target scored once."""
    if events is None:
        if ttt_claimed:
            return result("ttt_order", FAIL, "eval reports test-time training but wrote no ttt_log.jsonl: the order "
                                             "of scoring and adaptation cannot be checked")
        return result("ttt_order", SKIP, "no test-time training (eval wrote no ttt_log.jsonl)")
    end = max([n_scored] + [e["end"] for e in events])
    scored = np.zeros(end, dtype=bool)
    n_score = n_adapt = adapted = 0
    for i, e in enumerate(events, 1):
        s, t = e["start"], e["end"]
        if e["event"] == "score":
            if scored[s:t].any():
                first = s + int(np.argmax(scored[s:t]))
                return result("ttt_order", FAIL, f"event {i}: target {first:,} is scored a second time (a score after "
                                                 f"adaptation would replace the first one)")
            scored[s:t] = True
            n_score += 1
        else:
            if not scored[s:t].all():
                first = s + int(np.argmin(scored[s:t]))
                return result("ttt_order", FAIL, f"event {i}: adapts on targets {s:,}..{t - 1:,} but target {first:,} "
                                                 f"was not scored before (adapt before score)")
            n_adapt += 1
            adapted += t - s
    if scored[n_scored:].any() or not scored[:n_scored].all():
        return result("ttt_order", FAIL, f"the score events cover {int(scored.sum()):,} targets, token_nll.npy has "
                                         f"{n_scored:,}: the logged scoring is not the scoring that was reported")
    return result("ttt_order", PASS, f"{n_score:,} score and {n_adapt:,} adapt events; {adapted:,} adapted-on targets, "
                                     f"each scored before its adaptation; all {n_scored:,} targets scored exactly once")


# --- bits per byte -----------------------------------------------------------------------------------------
@dataclass
class Recount:
    total: int              # UTF-8 bytes of the documents' (original) text
    roundtrip: int          # complete documents whose text is their original text (by SHA-256 prefix) ...
    checked: int            # ... of this many
    mismatch: str | None    # the first document whose text is not the transform's, or whose bytes the sidecar miscounts


def recount_documents(sp, tokens: np.ndarray, bos: int, doc_hashes: np.ndarray | None = None,
                      last_complete: bool = False, inverse=None, sidecar: np.ndarray | None = None) -> Recount:
    """Decode the documents one by one (``inverse``: then undo the text transform, so the text is the original),
    count the UTF-8 bytes of each and compare them with the ``sidecar``'s sum over its tokens (aligned with
    ``tokens``); and of the complete documents, count how many give back their original text (the tokenize
    stage's SHA-256 prefix). The last document counts as complete only when ``last_complete`` (eval.max_tokens
    may cut it short)."""
    out = Recount(0, 0, 0, None)
    spans = document_spans(tokens, bos)
    for i, (a, b) in enumerate(spans):
        doc = tokens[a:b]
        complete = last_complete or i < len(spans) - 1
        text = sp.decode(doc[doc != bos].tolist())
        if inverse is not None:
            try:
                text = inverse(text, partial=not complete)
            except ValueError as e:  # the tokens do not decode to text the transform can have written
                out.mismatch = out.mismatch or f"val document {i} (0-based) does not invert: {e}"
        raw = text.encode("utf-8")
        out.total += len(raw)
        if sidecar is not None and out.mismatch is None and int(sidecar[a:b].sum(dtype=np.int64)) != len(raw):
            out.mismatch = (f"val document {i} (0-based, tokens {a:,}..{b - 1:,}): the byte sidecar counts "
                            f"{int(sidecar[a:b].sum(dtype=np.int64)):,} bytes, its decoded"
                            f"{' and inverted' if inverse is not None else ''} text has {len(raw):,}")
        if doc_hashes is not None and complete and i < len(doc_hashes):
            out.checked += 1
            out.roundtrip += bool(np.frombuffer(hashlib.sha256(raw).digest()[:8], dtype="<u8")[0] == doc_hashes[i])
    return out


def decoded_bytes(sp, tokens: np.ndarray, bos: int, doc_hashes: np.ndarray | None = None,
                  last_complete: bool = False) -> tuple[int, int, int]:
    """:func:`recount_documents` without a transform or sidecar: (bytes, round trips, documents checked)."""
    r = recount_documents(sp, tokens, bos, doc_hashes, last_complete)
    return r.total, r.roundtrip, r.checked


def check_bpb(nll_sum: float, n_targets: int, n_bytes: int, reported_bpb: float, reported_bytes: int,
              rel_tolerance: float, sidecar_bytes: int | None = None, roundtrip: tuple[int, int] | None = None,
              mismatch: str | None = None, transform: str = "none") -> dict:
    """val_bpb recomputed from the per-token NLLs and bytes counted by decoding (and inverting the ``transform``);
    the counts must match exactly; ``mismatch``: the first document the recount and the sidecar disagree on."""
    recomputed = bits_per_byte(nll_sum, n_bytes)
    rel = abs(recomputed - reported_bpb) / abs(reported_bpb) if reported_bpb else float("inf")
    how = "decoded from the documents" + (f" and inverted ({transform})" if transform != "none" else "")
    evidence = (f"{n_targets:,} token NLLs (sum {nll_sum:.6f} nats) / {n_bytes:,} bytes {how} "
                f"= {recomputed:.10f}; eval reported {reported_bpb:.10f} over {reported_bytes:,} bytes "
                f"(relative difference {rel:.1e})")
    ok = n_bytes == reported_bytes and rel <= rel_tolerance
    if sidecar_bytes is not None:
        evidence += f"; tokenize's byte sidecar gives {sidecar_bytes:,}"
        ok = ok and sidecar_bytes == n_bytes
    warning = None
    if roundtrip is not None:
        evidence += f"; {roundtrip[0]:,} of {roundtrip[1]:,} complete documents decode to their original text"
        if roundtrip[0] != roundtrip[1]:
            warning = (f"bpb_recomputed: {roundtrip[1] - roundtrip[0]} val documents do not decode to their original "
                       f"text (the tokenizer normalizes): bytes are those of the normalized text")
    if mismatch is not None:
        ok = False
        evidence += f"; FIRST MISMATCH: {mismatch}"
    return result("bpb_recomputed", passed(ok), evidence, warning)


def read_sidecar(ds: Dataset, n_tokens: int) -> tuple[np.ndarray, str | None]:
    """The tokenize stage's byte sidecar, and what is wrong with it before any document is decoded: a length other
    than the val split's, or challenge-layout byte shards (fineweb_val_bytes_*.bin) that are not the same counts."""
    sidecar = ds.val_token_bytes()
    if len(sidecar) != n_tokens:
        return np.zeros(n_tokens, np.uint16), (f"the byte sidecar has {len(sidecar):,} counts for the {n_tokens:,} "
                                               f"val tokens")
    names = ds.info.get("byte_shards") or []
    if names:
        shards = load_split([ds.artifact.file(n) for n in names])
        if not np.array_equal(shards, sidecar):
            return sidecar, f"{', '.join(names)} do not hold the same byte counts as val_token_bytes.npy"
    return sidecar, None


# --- boundary leak -------------------------------------------------------------------------------------------
def boundary_shift(model, tokens: np.ndarray, bos: int, normal_ids: np.ndarray, seq_len: int, stride: int,
                   pairs: int, seed: int, doc_isolation: bool, device: str = "cpu") -> dict | None:
    """Score document B after document A, then after A' (A's tokens replaced at random, same length), the way
    eval scores the stream; return how far B's per-token NLLs moved. None when there are not two documents."""
    spans = document_spans(tokens, bos)
    rng = np.random.default_rng(seed)
    shifts, first, n_tokens, used = [], [], 0, 0
    for k in range(min(pairs, len(spans) // 2)):
        (a0, a1), (b0, b1) = spans[2 * k], spans[2 * k + 1]
        la = min(a1 - a0, seq_len // 2)        # both documents in one window: A fully in B's context
        lb = min(b1 - b0, seq_len + 1 - la)
        if la < 2 or lb < 2:
            continue
        a, b = tokens[a0:a0 + la], tokens[b0:b0 + lb]
        a_alt = a.copy()
        a_alt[1:] = rng.choice(normal_ids, size=la - 1)
        # targets la .. la+lb-2 predict B's tokens after its BOS (target la-1, B's BOS itself, belongs to A)
        nll = [score_stream(model, np.concatenate([x, b]), seq_len, stride, device=device,
                            doc_isolation=doc_isolation)[la:la + lb - 1]
               for x in (a, a_alt)]
        d = np.abs(nll[0] - nll[1])
        shifts.append(d)
        first.append(float(d[0]))
        n_tokens += len(d)
        used += 1
    if not used:
        return None
    d = np.concatenate(shifts)
    return {"pairs": used, "tokens": n_tokens, "max_shift": float(d.max()), "mean_shift": float(d.mean()),
            "first_token_shift": max(first)}


def check_boundary(shift: dict | None, doc_isolation: bool, tolerance: float) -> dict:
    """A claimed document isolation must hold: B's scores may not depend on the document before it."""
    if shift is None:
        return result("boundary_leak", SKIP, "fewer than two val documents: nothing to perturb")
    measured = (f"replacing the previous document with random tokens moved the next document's NLLs by at most "
                f"{shift['max_shift']:.3g} nats (mean {shift['mean_shift']:.3g}, "
                f"first token {shift['first_token_shift']:.3g}) over {shift['tokens']:,} tokens in "
                f"{shift['pairs']} pairs")
    if not doc_isolation:
        return result("boundary_leak", PASS, "documents not isolated: cross-document context is allowed by the rules, "
                                             "as in the baseline; " + measured)
    ok = shift["max_shift"] <= tolerance
    return result("boundary_leak", passed(ok), f"eval claims document isolation; {measured}; tolerance {tolerance:g}"
                  + ("" if ok else ": information crosses the document boundary"))


# --- the stage ---------------------------------------------------------------------------------------------
def _optional_json(art: Artifact, name: str) -> dict | None:
    if name not in art.manifest.get("files", {}):
        return None
    try:
        return json.loads(art.file(name).read_text())
    except json.JSONDecodeError as e:
        raise ComplianceInputError(f"{art.key}/{name}: not valid JSON ({e.msg})") from None


def train_ledger(tr: Artifact, avg: Artifact, calibration: CalibrationRecord | None) -> tuple[dict, dict]:
    """(counted, not counted) seconds of the training side."""
    counted = {"training loop": tr.metrics["train_seconds"]}
    if calibration is not None:
        counted["GPTQ calibration"] = calibration.seconds
    if avg.metrics.get("selection_seconds") is not None:
        counted["held-out selection"] = avg.metrics["selection_seconds"]
    elif avg.config.get("method") == "best" and sum(k.startswith("heldout_loss_") for k in avg.metrics) > 1:
        # candidates were scored on training data after training: that access must fit in the budget
        counted["average stage (bounds held-out selection)"] = avg.manifest.get("duration_s", 0.0)
    excluded = {"compile warm-up": tr.metrics.get("warmup_seconds", 0.0)}
    if avg.metrics.get("heldout_diagnostic_seconds") is not None:  # scored, but the choice did not use it
        excluded["held-out diagnostic"] = avg.metrics["heldout_diagnostic_seconds"]
    return counted, excluded


def eval_ledger(ev: Artifact) -> tuple[dict, dict]:
    m = ev.metrics
    counted = {"weights decode": m.get("load_seconds", 0.0), "scoring": m["eval_seconds"]}
    if m.get("ttt_seconds") is not None:
        counted["test-time training"] = m["ttt_seconds"]
    excluded = {"pre-quantization diagnostic": m["pre_quant_eval_seconds"]} if "pre_quant_eval_seconds" in m else {}
    return counted, excluded


def write_report(checks: list[dict], out: Path, extra: dict) -> dict:
    warnings = sorted({c["warning"] for c in checks if c["warning"]})
    verdict = FAIL if any(c["status"] == FAIL for c in checks) else PASS
    report = {"verdict": verdict, "checks": checks, "warnings": warnings, **extra}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Compliance: {verdict}", "", "| check | status | evidence |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['status']} | {c['evidence'].replace('|', '/')} |" for c in checks]
    if warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in warnings]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report


def write_html_report(inputs: Mapping[str, Artifact], report: dict, key: str, out: Path) -> None:
    """report.html, the run's page (reporting/: the same as `golf report` on this key), read from the inputs and
    the report just made. A page that cannot be drawn costs a warning, never the verdict: the checks are the
    stage's result, the page only shows them."""
    from reporting.build import FILE, write_stage_report
    try:
        if write_stage_report(inputs, report, key, out / FILE):
            log.info("wrote %s", FILE)
    except Exception as e:  # noqa: BLE001  (a plotting failure of any kind; the message names it)
        (out / FILE).unlink(missing_ok=True)
        log.warning("no %s: %s: %s", FILE, type(e).__name__, e)


def build(cfg: ComplianceConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    import sentencepiece as spm
    from gpt.shipped_eval import load_model

    q, tr, avg, ev, tok = (inputs[r] for r in ("quantize", "train", "average", "eval", "tokenize"))
    ds = Dataset.open(tok)
    checks = []

    # size: measured from the files that ship
    checks.append(check_size(q.file("weights.bin").stat().st_size, q.file("shipped_code.py").stat().st_size,
                             cfg.cap_bytes, _optional_json(q, "size.json")))

    # time ledger
    train_hw, train_ok = hardware(tr.manifest.get("environment", {}), tr.metrics.get("world_size", 1))
    try:
        calibration = read_calibration(q)
    except CalibrationFileError as e:
        raise ComplianceInputError(str(e)) from None
    counted, excluded = train_ledger(tr, avg, calibration)
    checks.append(check_time("train_time", counted, cfg.train_limit_s, train_hw, train_ok, excluded))
    eval_hw, eval_ok = hardware(ev.manifest.get("environment", {}), ev.metrics.get("world_size", 1))
    counted, excluded = eval_ledger(ev)
    checks.append(check_time("eval_time", counted, cfg.eval_limit_s, eval_hw, eval_ok, excluded))

    # data
    val_hashes = np.load(tok.file("doc_hashes_val.npy"))
    checks.append(check_val_not_in_train(val_hashes, np.load(tok.file("doc_hashes_train.npy"))))
    checks.append(check_calibration(calibration, ds.info["shards"]["val"], calibrates(q.config)))
    all_tokens = load_split(ds.shard_paths("val"))
    nll = np.load(ev.file("token_nll.npy"))
    tokenizer_sha = hashlib.sha256(ds.tokenizer_path.read_bytes()).hexdigest()
    checks.append(check_val_split(tok.config.get("source") == "embedded", ds.info["docs"]["val"], len(all_tokens),
                                  len(nll), tokenizer_sha, expected_tokens=cfg.expected_val_tokens))

    # test-time training order
    eval_info = _optional_json(ev, "eval.json") or {}
    events = read_ttt_log(ev.file("ttt_log.jsonl")) if "ttt_log.jsonl" in ev.manifest.get("files", {}) else None
    checks.append(check_ttt_order(events, len(nll), bool(eval_info.get("ttt")) or "ttt_seconds" in ev.metrics))

    # val_bpb recomputed: NLLs from the eval stage, bytes by decoding the documents (and undoing the transform)
    bos = ds.info["bos_id"]
    tokens = all_tokens[:len(nll) + 1]
    sp = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    sidecar, mismatch = read_sidecar(ds, len(all_tokens))
    inverse = transforms.get(ds.transform).inverse if ds.transform != "none" else None
    rc = recount_documents(sp, tokens, bos, val_hashes, len(tokens) == len(all_tokens), inverse, sidecar)
    checks.append(check_bpb(float(nll.sum()), len(nll), rc.total, ev.metrics["val_bpb"], ev.metrics["val_bytes"],
                            cfg.bpb_rel_tolerance, int(sidecar[1:len(tokens)].sum(dtype=np.int64)),
                            (rc.roundtrip, rc.checked), mismatch or rc.mismatch, ds.transform))

    # boundary leak: the artifact's own model, scored as eval scores
    isolated = bool(eval_info.get("doc_isolation", False))
    device = resolve_device(cfg.device, "compliance.device")
    model = load_model(q.file("weights.bin").read_bytes()).to(device)
    _, _, boundary = piece_tables(sp)
    shift = boundary_shift(model, all_tokens, bos, np.flatnonzero(~boundary), int(ev.metrics.get("seq_len", 1024)),
                           int(ev.metrics.get("stride", 0)), cfg.leak_pairs, cfg.leak_seed, isolated, device)
    checks.append(check_boundary(shift, isolated, cfg.leak_tolerance_nats))

    report = write_report(checks, ctx.dir, {"val_bpb": ev.metrics["val_bpb"],
                                            "artifact_bytes": q.metrics.get("artifact_bytes"),
                                            "boundary_shift": shift, "tokenizer_sha256": tokenizer_sha})
    for c in checks:
        log.info("%-16s %s  %s", c["check"], c["status"], c["evidence"])
    if cfg.html_report:
        write_html_report(inputs, report, ctx.key, ctx.dir)
    return {"verdict": report["verdict"], "failed": [c["check"] for c in checks if c["status"] == FAIL],
            "warnings": len(report["warnings"]), "artifact_bytes": q.metrics.get("artifact_bytes"),
            "val_bpb": ev.metrics["val_bpb"], **{f"{c['check']}_status": c["status"] for c in checks}}


STAGE = Stage(name="compliance", config=ComplianceConfig, inputs=("tokenize", "train", "average", "quantize", "eval"),
              build=build, module=__name__,
              headline=("verdict",))
