"""The tokenize stage: inputs (jsonl, zst, parquet, dir, glob), parallel encoding, tokenizer training,
the byte sidecar, import of published shards, download from a (local) Hugging Face Hub, bad input."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from artifacts import run_stage
from tokenizing import docs as docs_mod
from stages import tokenize
from gpt.bpb import piece_tables, token_bytes
from gpt.shards import HEADER_BYTES, ShardError, load_split, read_header
from tokenizing.sptrain import check_vocab
from tests.conftest import DATA

TC = tokenize.TokenizeConfig


@pytest.fixture(scope="module")
def texts():
    return list(tokenize.iter_documents([tokenize.EMBEDDED_DOCS]))


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def files_of(art) -> dict[str, bytes]:
    """The artifact's data files (everything but the run's log and its own description)."""
    return {n: art.file(n).read_bytes() for n in art.files() if n not in ("log.txt", "dataset.json")}


def build(store, **kw):
    return run_stage(tokenize.STAGE, TC(**kw), {}, store).artifact


def stream_docs(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == bos)
    return [tokens[a:b] for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


# --- inputs ----------------------------------------------------------------------------------------
def test_parquet_with_row_groups_gives_the_same_shards_as_jsonl(store, tmp_path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    sample = texts[:150]
    pq.write_table(pa.table({"id": list(range(150)), "text": sample}), tmp_path / "docs.parquet", row_group_size=40)
    assert pq.ParquetFile(tmp_path / "docs.parquet").num_row_groups == 4
    a = build(store, source=str(tmp_path / "docs.parquet"), val_docs=20)
    b = build(store, source=str(write_jsonl(tmp_path / "docs.jsonl", sample)), val_docs=20)
    assert files_of(a) == files_of(b)
    assert a.metrics["val_docs"] == 20 and a.metrics["train_docs"] == 130


def test_directory_and_glob_read_files_in_name_order(store, tmp_path, texts):
    sample = texts[:120]
    single = build(store, source=str(write_jsonl(tmp_path / "all.jsonl", sample)), val_docs=30)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "b.jsonl", sample[40:80])
    write_jsonl(parts / "a.jsonl", sample[:40])
    zst = parts / "c.jsonl.zst"
    raw = "".join(json.dumps({"text": t}) + "\n" for t in sample[80:]).encode()
    try:
        import zstandard
        zst.write_bytes(zstandard.ZstdCompressor().compress(raw))
    except ImportError:
        import subprocess
        zst.write_bytes(subprocess.run(["zstd", "-c"], input=raw, capture_output=True, check=True).stdout)
    (parts / "notes.txt").write_text("not a document file")
    by_dir = build(store, source=str(parts), val_docs=30)
    by_glob = build(store, source=str(parts / "*.jsonl*"), val_docs=30)
    assert files_of(single) == files_of(by_dir) == files_of(by_glob)
    assert json.loads(by_dir.file("dataset.json").read_text())["source"] == [str(parts / n) for n in
                                                                             ("a.jsonl", "b.jsonl", "c.jsonl.zst")]


def test_parallel_encoding_reproduces_the_official_shard(store, monkeypatch):
    """Two processes, many small chunks in flight: still byte-identical to fineweb_val_000000.bin."""
    monkeypatch.setattr(docs_mod, "CHUNK_BYTES", 64 << 10)  # ~40 chunks, so order really is at stake
    art = build(store, val_docs=901, workers=2)
    ds = tokenize.Dataset.open(art)
    ours = np.concatenate([load_split(ds.shard_paths("val")), load_split(ds.shard_paths("train"))])
    official = (DATA / "fineweb_val_000000.bin").read_bytes()
    assert official[HEADER_BYTES:] == ours.astype("<u2").tobytes()
    # workers is not part of the key (the output cannot depend on it): rebuild the same key serially
    parallel_files = files_of(art)
    serial = run_stage(tokenize.STAGE, tokenize.TokenizeConfig(val_docs=901, workers=1), {}, store, force=True).artifact
    assert serial.key == art.key and files_of(serial) == parallel_files


def test_max_docs_and_shard_size(store, texts):
    art = build(store, val_docs=10, max_docs=50, tokens_per_shard=5_000, workers=2)
    ds = tokenize.Dataset.open(art)
    assert art.metrics["val_docs"] == 10 and art.metrics["train_docs"] == 40
    train = ds.shard_paths("train")
    assert len(train) > 2 and all(read_header(p) == 5_000 for p in train[:-1]) and read_header(train[-1]) <= 5_000
    sp = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    want = [1 + len(ids) for ids in sp.encode(texts[10:50])]
    assert [len(d) for d in stream_docs(load_split(train), 1)] == want


# --- the byte sidecar and the split ------------------------------------------------------------------
def test_sidecar_follows_the_piece_table_rule_and_the_decoded_text(store):
    art = build(store, val_docs=200)
    ds = tokenize.Dataset.open(art)
    val = load_split(ds.shard_paths("val"))
    side = np.load(art.file("val_token_bytes.npy"))
    assert side.dtype == np.uint16 and len(side) == len(val)
    sp = spm.SentencePieceProcessor(model_file=str(ds.tokenizer_path))
    assert np.array_equal(side.astype(np.int64), token_bytes(val, piece_tables(sp)))
    pos = 0
    for doc in stream_docs(val, sp.bos_id()):  # per document: the UTF-8 length of its decoded text
        assert side[pos] == 0 and int(side[pos:pos + len(doc)].sum()) == len(sp.decode(doc[1:].tolist()).encode())
        pos += len(doc)
    assert art.metrics["val_bytes"] == int(side.sum())


def test_validation_documents_never_reach_training(store, tmp_path, texts):
    sample = texts[:40] + [texts[3], texts[7], texts[3]]  # three training copies of two val documents
    src = str(write_jsonl(tmp_path / "dup.jsonl", sample))
    art = build(store, source=src, val_docs=10)
    val_h, train_h = np.load(art.file("doc_hashes_val.npy")), np.load(art.file("doc_hashes_train.npy"))
    assert len(val_h) == 10 and len(train_h) == 30 and not np.isin(train_h, val_h).any()
    assert art.metrics["train_docs_dropped"] == 3
    want = [hashlib.sha256(t.encode()).digest()[:8] for t in texts[:10]]
    assert val_h.astype("<u8").tobytes() == b"".join(want)
    with pytest.raises(tokenize.DataError, match=r"document 40 .* same text as a validation document"):
        build(store, source=src, val_docs=10, overlap="error")
    assert len(store.keys()) == 1 and store.incomplete() == []


# --- tokenizer training ------------------------------------------------------------------------------
def test_tokenizer_is_trained_on_training_documents_only(store, monkeypatch, texts):
    seen = []
    real = tokenize.train_sentencepiece

    def spy(sample, *a, **k):
        return real((seen.append(t) or t for t in sample), *a, **k)

    monkeypatch.setattr(tokenize, "train_sentencepiece", spy)
    art = build(store, tokenizer="train", sp_vocab_size=512, sp_train_docs=300, val_docs=100, max_docs=600)
    assert seen == texts[100:400]
    assert not set(seen) & set(texts[:100])
    sp = spm.SentencePieceProcessor(model_file=str(art.file("tokenizer.model")))
    assert sp.vocab_size() == 512 == art.metrics["vocab_size"]
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<0x00>"]
    assert sp.encode("31415", out_type=str) == list("31415")               # split digits
    assert sp.encode("\uff46\uff55\uff4c\uff4c") == sp.encode("full")      # nmt_nfkc folds full-width forms
    assert sp.encode("\u00e9\u4e2d", out_type=str)[-1].startswith("<0x")   # byte fallback for unseen chars
    assert sp.decode(sp.encode(texts[500])) == sp.decode(sp.encode(sp.normalize(texts[500])))
    ds = tokenize.Dataset.open(art)
    assert int(load_split(ds.shard_paths("train")).max()) < 512
    info = json.loads(art.file("dataset.json").read_text())
    assert info["tokenizer_training"]["docs"] == 300 and info["tokenizer_training"]["first_doc"] == 100


def test_vocab_must_fit_uint16():
    check_vocab(65536)
    with pytest.raises(tokenize.DataError, match="uint16"):
        check_vocab(65537)


# --- import --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A folder laid out like data/datasets/fineweb10B_sp1024: 1 val + 3 train shards, documents crossing
    shard boundaries, exported from the bundled sample with the official tokenizer."""
    from artifacts import ArtifactStore
    store = ArtifactStore(tmp_path_factory.mktemp("pubstore"))
    art = build(store, val_docs=40, max_docs=300, tokens_per_shard=100_000)  # 56K val / 284K train tokens
    folder = tmp_path_factory.mktemp("published") / "fineweb10B_sp1024"
    folder.mkdir()
    ds = tokenize.Dataset.open(art)
    names = [p.name for p in ds.shard_paths("val") + ds.shard_paths("train")]
    assert len(ds.shard_paths("val")) == 1 and len(ds.shard_paths("train")) == 3, names
    for n in names:
        shutil.copyfile(art.file(n), folder / n)
    return folder, art


@pytest.fixture(scope="module")
def other_tokenizers(tmp_path_factory, texts):
    """Two tokenizers that did not make the published shards: 512 pieces, and 1100 (> every id there)."""
    from tokenizing.sptrain import train_sentencepiece
    paths = {n: tmp_path_factory.mktemp("tok") / f"bpe{n}.model" for n in (512, 1100)}
    for n, p in paths.items():
        train_sentencepiece(texts[100:500], p, n)
    return paths


def test_import_takes_published_shards_as_they_are(store, published):
    folder, exported = published
    art = build(store, mode="import", source=str(folder), workers=2)
    assert art.metrics["val_docs"] == 40 and art.metrics["train_docs"] == 260
    for n in exported.files("fineweb_"):
        assert art.file(n).read_bytes() == exported.file(n).read_bytes()
    assert np.array_equal(np.load(art.file("val_token_bytes.npy")), np.load(exported.file("val_token_bytes.npy")))
    info = json.loads(art.file("dataset.json").read_text())
    assert info["mode"] == "import" and info["doc_hash"].startswith("sha256(uint16 token ids)")
    # document hashes: the token ids of each document, also for the ones that cross shard boundaries
    for split in ("val", "train"):
        toks = load_split(tokenize.Dataset.open(art).shard_paths(split))
        want = [hashlib.sha256(d.astype("<u2").tobytes()).digest()[:8] for d in stream_docs(toks, 1)]
        assert np.load(art.file(f"doc_hashes_{split}.npy")).astype("<u8").tobytes() == b"".join(want)
    assert build(store, mode="import", source=str(folder), train_shards=2).metrics["train_shards"] == 2


def corrupt(folder: Path, tmp_path: Path, name: str, fn) -> Path:
    bad = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, bad)
    fn(bad / name)
    return bad


def test_import_refuses_bad_shards_and_mismatched_tokenizers(store, tmp_path, published, other_tokenizers):
    folder, _ = published

    def set_header(word: int, value: int):
        def fn(p: Path):
            b = bytearray(p.read_bytes())
            b[4 * word:4 * word + 4] = int(value).to_bytes(4, "little")
            p.write_bytes(bytes(b))
        return fn

    def poke_token(pos: int, value: int):
        def fn(p: Path):
            b = bytearray(p.read_bytes())
            b[HEADER_BYTES + 2 * pos:HEADER_BYTES + 2 * pos + 2] = value.to_bytes(2, "little")
            p.write_bytes(bytes(b))
        return fn

    def truncate(p: Path):
        p.write_bytes(p.read_bytes()[:-2])

    cases = [
        ("fineweb_train_000001.bin", set_header(0, 20240521), ShardError, r"fineweb_train_000001\.bin: magic 20240521"),
        ("fineweb_val_000000.bin", truncate, ShardError, r"fineweb_val_000000\.bin: header says \d+ tokens"),
        ("fineweb_train_000002.bin", poke_token(77, 4000), tokenize.DataError,
         r"fineweb_train_000002\.bin: token 77 has id 4000, but the tokenizer has only 1024 pieces"),
        ("fineweb_train_000000.bin", poke_token(0, 5), ShardError, "does not start with BOS"),
        ("fineweb_train_000001.bin", lambda p: p.unlink(), tokenize.DataError, "fineweb_train_000001.bin is missing"),
    ]
    for name, fn, err, message in cases:
        bad = corrupt(folder, tmp_path, name, fn)
        with pytest.raises(err, match=message):
            build(store, mode="import", source=str(bad), workers=1)
    with pytest.raises(tokenize.DataError, match=r"has id \d+, but the tokenizer has only 512 pieces"):
        build(store, mode="import", source=str(folder), tokenizer=str(other_tokenizers[512]))
    assert spm.SentencePieceProcessor(model_file=str(other_tokenizers[1100])).vocab_size() == 1100
    with pytest.raises(tokenize.DataError, match=r"does not match the data: only 0 of 32 documents"):
        build(store, mode="import", source=str(folder), tokenizer=str(other_tokenizers[1100]))
    assert store.keys() == [] and store.incomplete() == []


# --- download from a local stand-in for the Hugging Face Hub --------------------------------------------
class FakeHub(http.server.ThreadingHTTPServer):
    """Serves <root>/<path> as https://huggingface.co/datasets/<repo>/resolve/<rev>/<path> does, with
    the headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length, Range). Logs each request."""

    def __init__(self, root: Path, repo: str):
        self.root, self.repo, self.requests, self.forbidden = root, repo, [], set()
        super().__init__(("127.0.0.1", 0), FakeHubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self) -> list[str]:
        return [p for m, p in self.requests if m == "GET"]


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(body=False)

    def do_GET(self):
        self.serve(body=True)

    def reply(self, code: int, headers: dict, data: bytes = b"", body: bool = True):
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def serve(self, body: bool):
        hub: FakeHub = self.server
        m = re.match(r"^/datasets/(.+?)/resolve/([^/]+)/(.+)$", urllib.parse.unquote(self.path.split("?")[0]))
        rel = m.group(3) if m else None
        hub.requests.append((self.command, rel or self.path))
        if not m or m.group(1) != hub.repo:
            return self.reply(404, {"X-Error-Code": "RepoNotFound"}, b"no such repo", body)
        if rel in hub.forbidden:
            return self.reply(403, {"X-Repo-Commit": self.COMMIT}, b"forbidden", body)
        f = hub.root / rel
        if not f.is_file():
            return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": self.COMMIT},
                              b"no such file", body)
        data = f.read_bytes()
        headers = {"X-Repo-Commit": self.COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes"}
        rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if rng and body:
            a = int(rng.group(1))
            b = int(rng.group(2)) + 1 if rng.group(2) else len(data)
            headers["Content-Range"] = f"bytes {a}-{b - 1}/{len(data)}"
            return self.reply(206, headers, data[a:b], body)
        if not body:  # HEAD: the size of the whole file, no body
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            return
        return self.reply(200, headers, data, body)


@pytest.fixture
def hub(tmp_path, published, monkeypatch):
    """The challenge repo's layout: datasets/manifest.json, datasets/datasets/fineweb10B_sp1024/*.bin,
    datasets/tokenizers/fineweb_1024_bpe.model."""
    folder, _ = published
    root = tmp_path / "hub"
    data = root / "datasets" / "datasets" / "fineweb10B_sp1024"
    shutil.copytree(folder, data)
    (root / "datasets" / "tokenizers").mkdir()
    shutil.copyfile(tokenize.EMBEDDED_TOKENIZER, root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "fineweb_1024_bpe",
                              "stats": {"files_train": 3, "files_val": 1}}],
                "tokenizers": [{"name": "fineweb_1024_bpe", "model_path": "tokenizers/fineweb_1024_bpe.model",
                                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    server = FakeHub(root, "willdepueoai/parameter-golf")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no user cache or token is read
    yield server
    server.shutdown()
    server.server_close()


def test_download_fetches_what_is_asked_and_imports_it(store, hub, published):
    _, exported = published
    art = build(store, mode="download", train_shards=2)
    assert art.metrics["train_shards"] == 2 and art.metrics["files_fetched"] == 5
    assert art.metrics["train_shards_available"] == 3
    for n in ("fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"):
        assert art.file(n).read_bytes() == exported.file(n).read_bytes()
    assert "fineweb_train_000002.bin" not in art.files()
    assert art.file("tokenizer.model").read_bytes() == tokenize.EMBEDDED_TOKENIZER.read_bytes()
    got = sorted(p.rsplit("/", 1)[-1] for p in hub.gets())
    assert got == ["fineweb_1024_bpe.model", "fineweb_train_000000.bin", "fineweb_train_000001.bin",
                   "fineweb_val_000000.bin", "manifest.json"]
    info = json.loads(art.file("dataset.json").read_text())
    assert info["mode"] == "download" and info["repo_id"] == "willdepueoai/parameter-golf"
    with pytest.raises(tokenize.DataError, match="has 3 train shards"):
        build(store, mode="download", train_shards=4)


def test_download_resumes_skipping_complete_files_and_refetching_partial_ones(store, hub, tmp_path):
    dl = tmp_path / "dl"
    shard1 = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    hub.forbidden.add(shard1)  # the connection fails on this file
    with pytest.raises(tokenize.DataError, match=r"fineweb_train_000001\.bin .* failed after 3 attempts"):
        build(store, mode="download", download_dir=str(dl))
    assert store.keys() == [] and store.incomplete() == []
    assert (dl / "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()
    # a partial copy of the next shard (say, from an interrupted copy) must not be trusted
    partial = dl / "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin"
    partial.write_bytes(bytes(100))
    hub.forbidden.clear()
    hub.requests.clear()
    art = build(store, mode="download", download_dir=str(dl))
    fetched = sorted(p.rsplit("/", 1)[-1] for p in hub.gets())
    assert fetched == ["fineweb_1024_bpe.model", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert not any(p.endswith(("val_000000.bin", "train_000000.bin", "manifest.json")) for _, p in hub.requests)
    assert art.metrics["train_shards"] == 3 and art.metrics["files_fetched"] == 3  # of 6
    read_header(partial)  # now complete


def test_download_resumes_in_the_build_scratch_by_default(store, hub):
    hub.forbidden.add("datasets/tokenizers/fineweb_1024_bpe.model")
    with pytest.raises(tokenize.DataError, match="fineweb_1024_bpe.model"):
        build(store, mode="download", train_shards=1)
    hub.forbidden.clear()
    hub.requests.clear()
    art = build(store, mode="download", train_shards=1)
    assert [p.rsplit("/", 1)[-1] for p in hub.gets()] == ["fineweb_1024_bpe.model"]
    assert not (store.root / "work" / art.key).exists()  # the scratch goes once committed


# --- bad input ----------------------------------------------------------------------------------------
def test_bad_parquet_fails_clearly_and_leaves_nothing(store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    cases = {
        "notext.parquet": (pa.table({"body": ["a", "b"]}), "no 'text' column"),
        "badutf8.parquet": (pa.table({"text": pa.array([b"fine", b"caf\xe9"], pa.binary())}),
                            r"row 1: invalid UTF-8"),
        "badutf8str.parquet": (pa.table({"text": pa.array([b"ok", b"ok", b"caf\xe9"], pa.binary()).view(pa.string())}),
                               r"row 2: invalid UTF-8"),
        "null.parquet": (pa.table({"text": ["a", None]}), r"row 1: 'text' is null"),
        "number.parquet": (pa.table({"text": [1, 2]}), "has type int64, expected string"),
        "empty.parquet": (pa.table({"text": pa.array([], pa.string())}), "no documents"),
    }
    for name, (table, message) in cases.items():
        pq.write_table(table, tmp_path / name)
        with pytest.raises(tokenize.DataError, match=message):
            build(store, source=str(tmp_path / name))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(tokenize.DataError, match="not a readable parquet file"):
        build(store, source=str(tmp_path / "junk.parquet"))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(tokenize.DataError, match="no .jsonl, .jsonl.zst or .parquet documents"):
        build(store, source=str(empty_dir))
    assert store.keys() == [] and store.incomplete() == []


def test_bad_jsonl_in_a_worker_names_file_and_line(store, tmp_path, texts):
    p = tmp_path / "late.jsonl"
    p.write_bytes(write_jsonl(tmp_path / "x.jsonl", texts[:50]).read_bytes() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(tokenize.DataError, match=r"late\.jsonl:51: invalid UTF-8"):
        build(store, source=str(p), workers=2)
    assert store.keys() == [] and store.incomplete() == []


def test_config_errors_are_caught_before_running():
    from golf.config import ConfigError, apply_overrides, preset
    with pytest.raises(ConfigError, match="mode must be one of documents, import, download"):
        apply_overrides(preset("tiny"), ["tokenize.mode=imprt"])
    with pytest.raises(ConfigError, match="tokenizer=train needs mode=documents"):
        apply_overrides(preset("tiny"), ["tokenize.mode=import", "tokenize.tokenizer=train"])


def test_download_errors_name_what_is_missing(store, hub):
    with pytest.raises(tokenize.DataError, match="lists no dataset 'fineweb10B_sp4096'"):
        build(store, mode="download", variant="sp4096")
    with pytest.raises(tokenize.DataError, match=r"someone/else@main: datasets/manifest.json is not there"):
        build(store, mode="download", repo_id="someone/else")
    (hub.root / "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin").unlink()
    with pytest.raises(tokenize.DataError, match=r"fineweb_train_000000.bin is not there \(RemoteEntryNotFoundError\)"):
        build(store, mode="download", train_shards=1)
    assert store.keys() == [] and store.incomplete() == []


def test_parallel_map_keeps_order_and_a_bounded_number_of_tasks_in_flight():
    from tokenizing.encoding import ordered_map
    pulled = []

    def tasks():
        for i in range(40):
            pulled.append(i)
            yield -i

    got = []
    for r in ordered_map(abs, tasks(), workers=2, in_flight=3):
        assert len(pulled) - len(got) <= 3  # never more than 3 submitted and not yet handed back
        got.append(r)
    assert got == list(range(40))


def test_bundled_documents_are_the_challenge_files():
    """The acceptance test's inputs: golf/data/fineweb_sample/docs.jsonl is val_docs_901.jsonl (902 docs)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "fineweb_sample"
    if not shared.is_dir():
        pytest.skip("../shared is not beside this checkout")
    assert tokenize.EMBEDDED_DOCS.read_bytes() == (shared / "val_docs_901.jsonl").read_bytes()
    assert (DATA / "fineweb_val_000000.bin").read_bytes() == (shared / "fineweb_val_000000.bin").read_bytes()
    assert tokenize.EMBEDDED_TOKENIZER.read_bytes() == (shared / "fineweb_1024_bpe.model").read_bytes()
