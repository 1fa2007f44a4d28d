"""Text transforms (CaseOps): the round trip, original-byte sidecars on the bundled sample, eval and compliance
on them, a wrong sidecar, import of published CaseOps shards, and tokenizer training on transformed text."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from artifacts import run_stage
from gpt.bpb import bits_per_byte, piece_tables
from gpt.original_bytes import transformed_token_bytes
from gpt.shards import load_split, read_header
from stages import compliance as C
from stages import tokenize
from tokenizing import transforms
from tokenizing.encoding import _Encoder

CASEOPS = transforms.get("caseops_v1")
T, A, N, E = transforms.CASEOPS_OPERATORS
CASEOPS_MODEL = tokenize.EMBEDDED_TOKENIZERS["embedded-caseops-sp8192"]
SAMPLE_BYTES = 2_504_867  # the 902 documents' normalised UTF-8 bytes, as the plain sp1024 tokenizer counts them


@pytest.fixture(scope="module")
def texts():
    return list(tokenize.iter_documents([tokenize.EMBEDDED_DOCS]))


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))


def build(store, **kw):
    return run_stage(tokenize.STAGE, tokenize.TokenizeConfig(**kw), {}, store).artifact


# --- the transform ---------------------------------------------------------------------------------------------
def test_caseops_examples_follow_the_rules():
    f = CASEOPS.forward
    assert f("the NASA Launch") == f"the {A}nasa {T}launch"
    assert f("A I") == f"{T}a {T}i"                            # a single capital is a title word
    assert f("McDonald iPhone ABc") == f"{T}mc{N}donald i{N}phone {T}a{N}bc"
    assert f("x2Y café É") == f"x2{T}y café É"                 # only ASCII letters are touched
    assert f(f"{T}{E}\ue000") == f"{E}{T}{E}{E}\ue000"          # operators in the input are escaped; U+E000 is not one
    assert CASEOPS.inverse(f"{T}caf{N}é") == "CafÉ"             # a letter normalisation merged ('e' + U+0301)
    for bad in (f"{T}", f"{T}1", f"{A}É", f"{E}x", f"ab{N} c"):
        with pytest.raises(transforms.TransformError, match="not CaseOps text"):
            CASEOPS.inverse(bad)
    assert CASEOPS.inverse(f"ab {T}", partial=True) == "ab "     # a document cut short after an operator
    with pytest.raises(transforms.TransformError, match="unknown text transform 'caseops'; transforms: none, caseops_v1"):
        transforms.get("caseops")


def test_round_trip_is_the_identity_on_the_sample_and_on_random_unicode(texts):
    assert len(texts) == 902
    changed = 0
    for t in texts:
        coded = CASEOPS.forward(t)
        assert CASEOPS.inverse(coded) == t
        changed += coded != t
    assert changed > 850  # the sample really is transformed (nearly every document has a capital)
    # random strings over an alphabet dense in what the transform treats specially: ASCII letters of both
    # cases, the operators themselves and their neighbours, combining marks, other scripts, astral characters
    rng = random.Random(17)
    special = "AZaz" + "".join(transforms.CASEOPS_OPERATORS) + "\ue000\ue005 \n\u0301ßÉé\u0130ǅ\U0001f600"
    for _ in range(20_000):
        n = rng.randint(0, 24)
        s = "".join(rng.choice(special) if rng.random() < 0.3 else
                    chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0xE010),
                                    rng.randint(0x10000, 0x10FFFF)])) for _ in range(n))
        coded = CASEOPS.forward(s)
        assert CASEOPS.inverse(coded) == s, ascii(s)
        assert not any("A" <= c <= "Z" for c in coded)  # no ASCII capital survives


# --- the sidecar ---------------------------------------------------------------------------------------------------
def test_original_bytes_of_the_whole_sample_equal_the_plain_count(texts, sp):
    enc = _Encoder(str(CASEOPS_MODEL), "caseops_v1").encode(texts, want_bytes=True)
    plain = _Encoder(str(tokenize.EMBEDDED_TOKENIZER)).encode(texts, want_bytes=True)
    assert int(enc.token_bytes.sum(dtype=np.int64)) == SAMPLE_BYTES == int(plain.token_bytes.sum(dtype=np.int64))
    assert np.array_equal(enc.hashes, plain.hashes) and np.array_equal(enc.doc_bytes, plain.doc_bytes)
    ops = np.isin(enc.tokens, [4, 5, 6, 7])
    assert ops.sum() > 10_000 and not enc.token_bytes[ops].any()  # operator tokens count 0 (no escapes here)
    # independently of the rule: each document's sum is the UTF-8 length of its decoded, inverted text
    ends = np.cumsum(enc.lengths)
    for text, a, b in zip(texts, ends - enc.lengths, ends):
        assert CASEOPS.inverse(sp.decode(enc.tokens[a + 1:b].tolist())) == text
        assert int(enc.token_bytes[a:b].sum()) == len(text.encode())


def test_escaped_operators_count_their_own_bytes(sp):
    tables = piece_tables(sp)
    for text in (f"x{E}y", f"{E}{E}{T}Ab", f"{T}{T}z", f"Q{A}{A}{A}"):
        ids = [sp.bos_id()] + sp.encode(CASEOPS.forward(text))
        got = transformed_token_bytes(np.array(ids), tables, [4, 5, 6, 7], 7)
        assert int(got.sum()) == len(text.encode()), ascii(text)


@pytest.fixture(scope="module")
def caseops_art(tmp_path_factory):
    from artifacts import ArtifactStore
    store = ArtifactStore(tmp_path_factory.mktemp("caseops") / "store")
    return build(store, val_docs=900, tokenizer="embedded-caseops-sp8192", transform="caseops_v1", workers=2)


def test_tokenize_writes_original_bytes_in_the_challenge_layout(caseops_art, texts):
    art = caseops_art
    ds = tokenize.Dataset.open(art)
    assert ds.transform == "caseops_v1" and ds.transform_ids() == ([4, 5, 6, 7], 7)
    side = np.load(art.file("val_token_bytes.npy"))
    val = load_split(ds.shard_paths("val"))
    want = sum(len(t.encode()) for t in texts[:900])
    assert len(side) == len(val) and int(side.sum(dtype=np.int64)) == want == art.metrics["val_bytes"]
    # fineweb_val_bytes_000000.bin: the challenge's header, then the same uint16 counts, token for token
    names = json.loads(art.file("dataset.json").read_text())["byte_shards"]
    assert names == ["fineweb_val_bytes_000000.bin"]
    raw = art.file(names[0]).read_bytes()
    assert np.frombuffer(raw[:12], "<i4").tolist() == [20240520, 1, len(val)]
    assert np.array_equal(np.frombuffer(raw[1024:], "<u2"), side)
    # the hashes (val/train overlap) are of the original texts
    import hashlib
    assert np.load(art.file("doc_hashes_val.npy"))[5] == np.frombuffer(
        hashlib.sha256(texts[5].encode()).digest()[:8], "<u8")[0]


def test_overlap_is_judged_on_original_texts(store, tmp_path, texts):
    """A training copy of a val document is dropped; a copy differing only in case is another text, kept (its
    transformed text differs as well: the transform is one-to-one)."""
    sample = texts[:30] + [texts[3], texts[4].swapcase()]
    src = tmp_path / "dup.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample))
    art = build(store, source=str(src), val_docs=10, tokenizer="embedded-caseops-sp8192", transform="caseops_v1")
    assert art.metrics["train_docs_dropped"] == 1 and art.metrics["train_docs"] == 21
    val_h, train_h = np.load(art.file("doc_hashes_val.npy")), np.load(art.file("doc_hashes_train.npy"))
    assert not np.isin(train_h, val_h).any()


def test_tokenizer_and_transform_must_match(store):
    with pytest.raises(tokenize.DataError, match="holds the operators of transform caseops_v1.*transform=caseops_v1"):
        build(store, val_docs=10, max_docs=20, tokenizer="embedded-caseops-sp8192")
    with pytest.raises(tokenize.DataError, match="no piece for the caseops_v1 operator U\\+E001"):
        build(store, val_docs=10, max_docs=20, tokenizer="embedded-sp8192", transform="caseops_v1")
    from golf.config import ConfigError, apply_overrides, preset
    with pytest.raises(ConfigError, match="unknown text transform 'caps'"):
        apply_overrides(preset("tiny"), ["tokenize.transform=caps"])
    assert store.keys() == []


# --- eval and compliance ----------------------------------------------------------------------------------------
def test_eval_bytes_come_from_the_sidecar_and_a_wrong_one_is_refused(caseops_art, tmp_path):
    from gpt.evaluation import EvalError, EvalInputs, val_bytes
    ds = tokenize.Dataset.open(caseops_art)
    tokens = load_split(ds.shard_paths("val"))
    side = np.load(caseops_art.file("val_token_bytes.npy"))
    data = EvalInputs(tokens, ds.vocab_size, ds.bos_id, ds.tokenizer_path, caseops_art.file("val_token_bytes.npy"),
                      None, None, ds.transform_ids())
    assert val_bytes(data) == int(side[1:].sum(dtype=np.int64))
    wrong = side.copy()
    where = int(np.flatnonzero(tokens == ds.bos_id)[7]) + 3  # a token of document 7
    wrong[where] += 1
    np.save(tmp_path / "wrong.npy", wrong)
    with pytest.raises(EvalError, match="on val document 7"):
        val_bytes(EvalInputs(tokens, ds.vocab_size, ds.bos_id, ds.tokenizer_path, tmp_path / "wrong.npy",
                             None, None, ds.transform_ids()))
    # without the transform the same sidecar is not the piece table's
    with pytest.raises(EvalError, match="piece table disagree"):
        val_bytes(EvalInputs(tokens, ds.vocab_size, ds.bos_id, ds.tokenizer_path,
                             caseops_art.file("val_token_bytes.npy"), None, None, None))


def test_val_bpb_on_original_bytes_and_compliance_recount(caseops_art, texts, sp):
    """val_bpb from per-token NLLs over the sidecar, against a recomputation here from the texts alone; and
    compliance's recount passes it, and fails a sidecar one byte off, naming the document."""
    ds = tokenize.Dataset.open(caseops_art)
    tokens = load_split(ds.shard_paths("val"))
    side = np.load(caseops_art.file("val_token_bytes.npy"))
    nll = np.random.default_rng(0).uniform(0.5, 6.0, len(tokens) - 1)  # any model's per-target losses
    golf_bpb = bits_per_byte(nll.sum(), ds.val_stream()[1])
    independent = nll.sum() / np.log(2) / sum(len(t.encode("utf-8")) for t in texts[:900])
    assert golf_bpb == pytest.approx(independent, rel=1e-13)
    hashes = np.load(caseops_art.file("doc_hashes_val.npy"))
    rc = C.recount_documents(sp, tokens, ds.bos_id, hashes, True, CASEOPS.inverse, side)
    assert rc.mismatch is None and rc.total == int(side[1:].sum(dtype=np.int64)) and rc.roundtrip == rc.checked == 900
    ok = C.check_bpb(nll.sum(), len(nll), rc.total, golf_bpb, rc.total, 1e-12, rc.total, (rc.roundtrip, rc.checked),
                     rc.mismatch, "caseops_v1")
    assert ok["status"] == "PASS" and "inverted (caseops_v1)" in ok["evidence"]
    # one token's count off by one (the totals then disagree too; the recount names where)
    wrong = side.copy()
    start = int(np.flatnonzero(tokens == ds.bos_id)[123])
    wrong[start + 5] += 1
    rc = C.recount_documents(sp, tokens, ds.bos_id, hashes, True, CASEOPS.inverse, wrong)
    assert rc.mismatch.startswith("val document 123 (0-based")
    bad = C.check_bpb(nll.sum(), len(nll), rc.total, golf_bpb, rc.total, 1e-12, rc.total, (rc.roundtrip, rc.checked),
                      rc.mismatch, "caseops_v1")
    assert bad["status"] == "FAIL" and "FIRST MISMATCH: val document 123" in bad["evidence"]
    # a byte moved to another token of the same document keeps its sum: per document, not a mismatch
    moved = side.copy()
    donor = start + 1 + int(np.flatnonzero(side[start + 1:start + 50])[-1])
    moved[start + 5 if donor != start + 5 else start + 6] += 1
    moved[donor] -= 1
    assert C.recount_documents(sp, tokens, ds.bos_id, None, True, CASEOPS.inverse, moved).mismatch is None
    # tokens that do not decode to CaseOps text (an operator with no letter after it) FAIL, named
    broken = tokens.copy()
    broken[start + 1:start + 3] = [4, sp.piece_to_id("▁")]
    rc = C.recount_documents(sp, broken, ds.bos_id, hashes, True, CASEOPS.inverse, side)
    assert rc.mismatch.startswith("val document 123 (0-based) does not invert")


def test_compliance_refuses_byte_shards_that_disagree(caseops_art, tmp_path):
    from artifacts import Artifact
    from gpt.shards import write_shard
    ds = tokenize.Dataset.open(caseops_art)
    n = len(load_split(ds.shard_paths("val")))
    side, problem = C.read_sidecar(ds, n)
    assert problem is None and len(side) == n
    assert "has 806,729 counts for the 806,730 val tokens" in C.read_sidecar(ds, n + 1)[1]
    # the challenge-layout copy edited, val_token_bytes.npy not: the records' scripts would score other bytes
    copy = tmp_path / "tok"
    shutil.copytree(caseops_art.path, copy)
    other = side.copy()
    other[10] += 1
    write_shard(copy / "fineweb_val_bytes_000000.bin", other)
    problem = C.read_sidecar(tokenize.Dataset(Artifact(copy, caseops_art.manifest), ds.info), n)[1]
    assert problem == "fineweb_val_bytes_000000.bin do not hold the same byte counts as val_token_bytes.npy"


# --- import ------------------------------------------------------------------------------------------------------
def test_import_takes_published_caseops_shards_with_their_sidecar(caseops_art, store, tmp_path):
    folder = tmp_path / "fineweb10B_sp8192_caseops"
    folder.mkdir()
    for n in caseops_art.files("fineweb_"):
        shutil.copyfile(caseops_art.file(n), folder / n)
    kw = dict(mode="import", source=str(folder), tokenizer="embedded-caseops-sp8192", transform="caseops_v1")
    art = build(store, **kw)
    assert np.array_equal(np.load(art.file("val_token_bytes.npy")), np.load(caseops_art.file("val_token_bytes.npy")))
    assert art.file("fineweb_val_bytes_000000.bin").read_bytes() == folder.joinpath("fineweb_val_bytes_000000.bin").read_bytes()
    assert tokenize.Dataset.open(art).transform == "caseops_v1"
    # a sidecar one byte off in document 3, and one of the wrong length
    side = folder / "fineweb_val_bytes_000000.bin"
    good = side.read_bytes()
    starts = np.flatnonzero(load_split([folder / "fineweb_val_000000.bin"]) == 1)
    b = bytearray(good)
    pos = 1024 + 2 * (int(starts[3]) + 2)
    b[pos] += 1
    side.write_bytes(bytes(b))
    with pytest.raises(tokenize.DataError, match=r"val document 3 \(0-based\) \d[\d,]* bytes"):
        build(store, **kw)
    from gpt.shards import write_shard
    write_shard(side, np.frombuffer(good[1024:], "<u2")[:-1])
    with pytest.raises(tokenize.DataError, match="byte counts for the .* tokens of fineweb_val_000000.bin"):
        build(store, **kw)
    side.unlink()
    with pytest.raises(tokenize.DataError, match="fineweb_val_bytes_000000.bin is missing"):
        build(store, **kw)
    assert read_header(folder / "fineweb_val_000000.bin") > 0


# --- tokenizer training -------------------------------------------------------------------------------------------
def test_tokenizer_trained_on_transformed_documents(store, texts):
    art = build(store, tokenizer="train", transform="caseops_v1", sp_vocab_size=600, sp_train_docs=300, val_docs=50,
                max_docs=400)
    sp = spm.SentencePieceProcessor(model_file=str(art.file("tokenizer.model")))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(transforms.CASEOPS_OPERATORS)
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if not (sp.is_byte(i) or sp.is_control(i))]
    assert len(pieces) > 300 and not any("A" <= c <= "Z" for p in pieces for c in p)  # it never saw a capital
    ds = tokenize.Dataset.open(art)
    side = np.load(art.file("val_token_bytes.npy"))
    assert int(side.sum(dtype=np.int64)) == sum(len(t.encode()) for t in texts[:50])
    assert ds.transform_ids() == ([4, 5, 6, 7], 7)


# --- the whole pipeline --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caseops_run(tmp_path_factory):
    """The fast tiny pipeline on CaseOps data: the records' tokenizer on caseops_v1 text."""
    from artifacts import ArtifactStore
    from golf.config import apply_overrides, preset
    from golf.pipeline import run_pipeline
    from tests.conftest import FAST
    store = ArtifactStore(tmp_path_factory.mktemp("caseops-run") / "store")
    cfg = apply_overrides(preset("tiny"), FAST + ["tokenize.tokenizer=embedded-caseops-sp8192",
                                                  "tokenize.transform=caseops_v1"])
    return store, cfg, {r.artifact.stage: r.artifact for r in run_pipeline(cfg, store)}


def test_pipeline_scores_original_bytes_and_compliance_proves_them(caseops_run, tmp_path):
    import os
    import subprocess
    import sys
    from artifacts import Artifact
    from artifacts.runner import StageContext
    _, cfg, arts = caseops_run
    ev, tok, q = arts["eval"], arts["tokenize"], arts["quantize"]
    nll = np.load(ev.file("token_nll.npy"))
    side = np.load(tok.file("val_token_bytes.npy"))
    assert ev.metrics["val_bytes"] == int(side[1:len(nll) + 1].sum(dtype=np.int64))
    assert ev.metrics["val_bpb"] == pytest.approx(nll.sum() / np.log(2) / ev.metrics["val_bytes"], rel=1e-12)
    report = json.loads(arts["compliance"].file("report.json").read_text())
    bpb = next(c for c in report["checks"] if c["check"] == "bpb_recomputed")
    assert bpb["status"] == "PASS" and "inverted (caseops_v1)" in bpb["evidence"], bpb
    # the program that ships scores the same with the challenge-layout sidecar (and not without it)
    for name in ("shipped_code.py", "weights.bin"):
        (tmp_path / name).write_bytes(q.file(name).read_bytes())
    ds = tokenize.Dataset.open(tok)
    base = [sys.executable, "shipped_code.py", "--tokenizer", str(ds.tokenizer_path), "--val",
            *map(str, ds.shard_paths("val")), "--seq-len", str(cfg.eval.seq_len), "--max-tokens", str(len(nll) + 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = []
    for extra in (["--val-bytes", str(tok.file("fineweb_val_bytes_000000.bin"))], []):
        proc = subprocess.run(base + extra, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert outs[0]["val_bytes"] == ev.metrics["val_bytes"] and outs[0]["val_bpb"] == pytest.approx(ev.metrics["val_bpb"])
    assert outs[1]["val_bytes"] > ev.metrics["val_bytes"]  # the piece table counts the operators' bytes too

    # the same run with one token of val document 2 counted a byte too many, in both sidecar files
    bad = tmp_path / "tok"
    shutil.copytree(tok.path, bad)
    wrong = side.copy()
    wrong[int(np.flatnonzero(load_split(ds.shard_paths("val")) == ds.bos_id)[2]) + 4] += 1
    np.save(bad / "val_token_bytes.npy", wrong)
    from gpt.shards import write_shard
    write_shard(bad / "fineweb_val_bytes_000000.bin", wrong)
    inputs = {**{r: arts[r] for r in C.STAGE.inputs}, "tokenize": Artifact(bad, tok.manifest)}
    (tmp_path / "out").mkdir()
    got = C.build(C.ComplianceConfig(), inputs, StageContext("compliance-x", tmp_path / "out", tmp_path / "work"))
    assert got["verdict"] == "FAIL" and got["failed"] == ["bpb_recomputed"], got
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    bpb = next(c for c in report["checks"] if c["check"] == "bpb_recomputed")
    assert "FIRST MISMATCH: val document 2 (0-based" in bpb["evidence"], bpb["evidence"]
