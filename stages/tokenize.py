"""tokenize: FineWeb documents (or the challenge's published shards) -> challenge-format train/val shards.

Three modes, one artifact format:
- ``documents``: jsonl / jsonl.zst / parquet files (a file, a directory or a glob). The validation split
  is the first ``val_docs`` documents in input order (the challenge: the first 50,000 of its shuffled
  list), training the rest. Each document is written as [BOS] + ids with a given SentencePiece model, or
  one trained here on training documents only. Encoding runs on ``workers`` processes, byte-identical
  to one process.
- ``import``: a folder of published shards (data/datasets/fineweb10B_sp1024) and its tokenizer,
  validated and taken as they are.
- ``download``: fetch the published shards from the Hugging Face Hub, then import them.

Files: dataset.json, fineweb_{val,train}_NNNNNN.bin, tokenizer.model, val_token_bytes.npy (UTF-8 bytes per
val token), doc_hashes_{val,train}.npy (uint64 per document).

With ``transform`` (tokenizing/transforms.py, e.g. caseops_v1) each document is tokenized transformed, and
everything that scores or compares documents stays on the ORIGINAL text: val_token_bytes.npy holds the original
bytes each token stands for (operator tokens 0; each document's sum is the UTF-8 length of its original,
normalised text), the hashes are the original texts', and the sidecar is also written in the challenge's
layout, fineweb_val_bytes_NNNNNN.bin beside each val shard (header + one uint16 per token), so the records'
scripts read golf's data. Import then takes the published fineweb_val_bytes_*.bin, checked document by document
against the decoded and inverted text.

Run it alone:  golf stage tokenize --set val_docs=60 --set workers=2
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from artifacts import Artifact, Stage, StageContext
from gpt import checks
from tokenizing.docs import DataError, iter_chunks, iter_documents, resolve_source
from tokenizing.encoding import encode_chunk, init_worker, ordered_map
from tokenizing.published import Remote, SplitSummary, byte_shard_paths, check_round_trip, download, find_shards, \
    place, published_byte_counts, scan_shard, summarise_split, val_byte_counts
from tokenizing.dataset import Dataset  # noqa: F401  (re-exported for callers of the old location)
from gpt.progress import progress_bar
from gpt.shards import MAX_VOCAB, ShardWriter, read_header, write_shard
from tokenizing.sptrain import check_vocab, train_sentencepiece
from tokenizing import transforms

__all__ = ["TokenizeConfig", "DataError", "Dataset", "STAGE", "iter_documents", "EMBEDDED_DOCS",
           "EMBEDDED_TOKENIZER", "tokenize_documents"]

log = logging.getLogger("golf.tokenize")

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "golf" / "data" / "fineweb_sample"
EMBEDDED_DOCS = EMBEDDED_DIR / "docs.jsonl"
EMBEDDED_TOKENIZER = EMBEDDED_DIR / "fineweb_1024_bpe.model"
MODES = ("documents", "import", "download")
OVERLAP = ("drop", "error")


@dataclass(frozen=True)
class TokenizeConfig:
    mode: str = "documents"           # 'documents' (tokenize text), 'import' (a folder of published shards), 'download' (fetch them, then import)
    source: str = "embedded"          # documents: 'embedded' (bundled sample), a .jsonl/.jsonl.zst/.parquet file, dir or glob; import: the shard folder
    tokenizer: str = "embedded"       # 'embedded' (official sp1024), 'embedded-sp8192', a SentencePiece .model path, or 'train' (documents: train one here)
    val_docs: int = 60                # documents: the first N documents are the validation split (challenge: 50,000)
    max_docs: int = 0                 # documents: stop after this many documents in all (0 = no limit)
    tokens_per_shard: int = 100_000_000  # documents: shard size (the official export's: 100M tokens)
    workers: int = 1                  # processes for encoding / shard scanning (output is identical for any number)
    overlap: str = "drop"             # training docs equal to a val doc: 'drop' them (import: report only) or 'error'
    sp_vocab_size: int = 1024         # tokenizer=train: pieces of the trained BPE model (challenge: 1024, 4096, 8192)
    sp_train_docs: int = 20_000       # tokenizer=train: train it on the first N training documents (never val ones)
    sp_max_doc_bytes: int = 4192      # tokenizer=train: longer documents are left out of training (SentencePiece's and the official default)
    train_shards: int = 0             # import/download: only the first N training shards (0 = all)
    link: bool = True                 # import/download: hard-link shards into the store (else copy); source files must not then be edited in place
    repo_id: str = "willdepueoai/parameter-golf"  # download: the Hugging Face dataset repo of the published shards
    revision: str = "main"            # download: branch, tag or commit; pin a commit for a reproducible artifact
    remote_root: str = "datasets"     # download: repo folder holding manifest.json, datasets/ and tokenizers/
    variant: str = "sp1024"           # download: which tokenization (<remote_root>/datasets/fineweb10B_<variant>)
    download_dir: str = ""            # download: where files go and stay ('' = the build's resumable scratch, removed after commit)
    transform: str = "none"           # reversible text transform before tokenizing: 'none' or 'caseops_v1' (capitals as operators; tokenizer 'embedded-caseops-sp8192'); bytes stay the original text's

    NOT_IN_KEY = ("workers",)  # the shards are byte-identical for any number of encoding processes

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.overlap not in OVERLAP:
            raise DataError(f"overlap must be one of {', '.join(OVERLAP)}, got {self.overlap!r}")
        checks.ints(self, "tokenize", ("val_docs", "workers", "tokens_per_shard", "sp_max_doc_bytes"), 1, DataError)
        checks.ints(self, "tokenize", ("max_docs", "train_shards", "sp_train_docs"), 0, DataError)
        checks.need(isinstance(self.sp_vocab_size, int) and 1 <= self.sp_vocab_size <= MAX_VOCAB,
                    f"tokenize.sp_vocab_size must be in 1..{MAX_VOCAB} (shard ids are uint16), not {self.sp_vocab_size!r}",
                    DataError)
        checks.need(self.mode != "documents" or not 0 < self.max_docs <= self.val_docs,
                    f"tokenize.max_docs={self.max_docs} leaves no training documents after val_docs={self.val_docs} "
                    f"(0 = no limit)", DataError)
        for name in ("source", "tokenizer", "repo_id", "variant"):
            checks.need(isinstance(getattr(self, name), str) and getattr(self, name).strip() != "",
                        f"tokenize.{name} must not be empty", DataError)
        transforms.get(self.transform)  # an unknown name: a TransformError listing the known ones
        if self.tokenizer == "train" and self.mode != "documents":
            raise DataError("tokenizer=train needs mode=documents (published shards come with their tokenizer)")


EMBEDDED_TOKENIZERS = {"embedded": EMBEDDED_TOKENIZER, "embedded-sp8192": EMBEDDED_DIR / "fineweb_8192_bpe.model",
                       # the records' tokenizer of caseops_v1 text (openai/parameter-golf, MIT)
                       "embedded-caseops-sp8192": EMBEDDED_DIR / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"}


def resolve_tokenizer(tokenizer: str) -> Path:
    p = EMBEDDED_TOKENIZERS.get(tokenizer) or Path(tokenizer)
    if not p.is_file():
        raise DataError(f"tokenizer model {p} does not exist")
    return p


def load_tokenizer(path: Path, transform: str = "none"):
    """The SentencePiece model, refused unless it suits the challenge format and the text transform."""
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path}: not a SentencePiece model ({e})") from None
    check_vocab(sp.vocab_size(), f"tokenizer {path.name}")
    if sp.bos_id() < 0:
        raise DataError(f"tokenizer {path} has no BOS piece; the challenge format needs one")
    transforms.operator_ids(sp, transforms.get(transform), f"tokenizer {path.name}")
    return sp


# --- documents -----------------------------------------------------------------------------------
def tokenize_documents(files: list[Path], model_path: Path, out_dir: Path, val_docs: int, max_docs: int = 0,
                       tokens_per_shard: int = 100_000_000, workers: int = 1, overlap: str = "drop",
                       progress: bool = True, pool=None, chunk_bytes: int = 0, transform: str = "none") -> dict:
    """Encode the documents into shards, hashes and the val byte sidecar in ``out_dir``; return statistics.

    ``pool``: an already started pool of :func:`tokenizing.encoding.init_worker` processes (benchmarks);
    ``chunk_bytes``: jsonl bytes per worker task (0: :data:`tokenizing.docs.CHUNK_BYTES`; the output is the same
    for any value); ``transform``: the text transform documents go through (its name), the pool's too."""
    sp = load_tokenizer(model_path, transform)
    writers = {s: ShardWriter(out_dir, s, tokens_per_shard) for s in ("val", "train")}
    hashes: dict[str, list[np.ndarray]] = {"val": [], "train": []}
    docs = {"val": 0, "train": 0}
    val_bytes: list[np.ndarray] = []
    val_sorted = None  # the val hashes, sorted, once the split is complete
    dropped = text_bytes = 0
    # a chunk may hold val documents only if fewer than val_docs lines/rows came before it
    tasks = ((chunk, chunk.before < val_docs) for chunk in iter_chunks(files, chunk_bytes))
    results = ordered_map(encode_chunk, tasks, workers, init_worker, (str(model_path), transform), pool=pool)
    bar = progress_bar(log, "tokenize", unit="B", enabled=progress, unit_scale=True, mininterval=1.0)
    t0 = time.perf_counter()
    try:
        for enc in results:
            n = len(enc.lengths)
            if max_docs:
                n = min(n, max_docs - docs["val"] - docs["train"] - dropped)
            ends = np.concatenate([[0], np.cumsum(enc.lengths[:n])])
            n_val = min(max(val_docs - docs["val"], 0), n)
            if n_val:
                assert enc.token_bytes is not None, "val documents arrived without byte counts"
                writers["val"].add(enc.tokens[:ends[n_val]])
                val_bytes.append(enc.token_bytes[:ends[n_val]])
                hashes["val"].append(enc.hashes[:n_val])
                docs["val"] += n_val
            if n > n_val:
                if val_sorted is None:
                    val_sorted = np.sort(np.concatenate(hashes["val"]))
                h = enc.hashes[n_val:n]
                keep = ~_member(h, val_sorted)
                if keep.all():
                    writers["train"].add(enc.tokens[ends[n_val]:ends[n]])
                else:
                    first = docs["val"] + docs["train"] + dropped + int(np.argmin(keep))
                    if overlap == "error":
                        raise DataError(f"document {first} (0-based, training split) has the same text as a "
                                        "validation document (set overlap=drop to leave such documents out)")
                    for j in np.flatnonzero(keep):
                        writers["train"].add(enc.tokens[ends[n_val + j]:ends[n_val + j + 1]])
                    dropped += int((~keep).sum())
                hashes["train"].append(h[keep])
                docs["train"] += int(keep.sum())
            text_bytes += int(enc.doc_bytes[:n].sum())
            bar.update(int(enc.doc_bytes[:n].sum()))
            if max_docs and docs["val"] + docs["train"] + dropped >= max_docs:
                break
    finally:
        results.close()  # stops the pool when leaving early
        bar.close()
    seconds = time.perf_counter() - t0
    if docs["val"] == 0:
        raise DataError(f"no documents in {', '.join(map(str, files))}")
    if docs["train"] == 0:
        raise DataError(f"only {docs['val']} documents: nothing left for training after val_docs={val_docs}")
    if dropped:
        log.warning("left out %d training documents whose text equals a validation document's", dropped)
    shards = {s: [p.name for p in w.close()] for s, w in writers.items()}
    sidecar = np.concatenate(val_bytes)
    _write_common(out_dir, hashes, sidecar)
    byte_shards = write_byte_shards(out_dir, sidecar, writers["val"].paths) if transform != "none" else []
    return {"shards": shards, "byte_shards": byte_shards, "docs": docs, "tokens": {s: w.total for s, w in writers.items()},
            "dropped": dropped, "text_bytes": text_bytes, "seconds": seconds, "vocab_size": sp.vocab_size(),
            "bos_id": sp.bos_id(), "val_bytes": int(sidecar.sum(dtype=np.int64))}


def _member(h: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not len(sorted_set):
        return np.zeros(len(h), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_set, h), len(sorted_set) - 1)
    return sorted_set[i] == h


def write_byte_shards(out_dir: Path, sidecar: np.ndarray, val_paths: list[Path]) -> list[str]:
    """The sidecar in the challenge's layout: fineweb_val_bytes_NNNNNN.bin, token for token beside each val shard
    (what the records' CaseOps scripts read)."""
    names, pos = [], 0
    for p in val_paths:
        n = read_header(p)
        name = p.name.replace("fineweb_val_", "fineweb_val_bytes_")
        write_shard(out_dir / name, sidecar[pos:pos + n])
        names.append(name)
        pos += n
    assert pos == len(sidecar), "the byte sidecar is not token for token the val shards"
    return names


def _write_common(out_dir: Path, hashes: dict[str, list[np.ndarray]], sidecar: np.ndarray) -> None:
    for split in ("val", "train"):
        arr = np.concatenate(hashes[split]) if hashes[split] else np.zeros(0, dtype="<u8")
        np.save(out_dir / f"doc_hashes_{split}.npy", arr.astype("<u8"))
    np.save(out_dir / "val_token_bytes.npy", sidecar.astype(np.uint16))


def build_documents(cfg: TokenizeConfig, ctx: StageContext) -> dict:
    files = resolve_source(EMBEDDED_DOCS if cfg.source == "embedded" else cfg.source)
    model = ctx.dir / "tokenizer.model"
    transform = transforms.get(cfg.transform)
    info: dict = {"mode": "documents", "source": [str(f) for f in files], "doc_hash": "sha256(utf-8 text)[:8]",
                  "transform": transform.name}
    if cfg.tokenizer == "train":
        n = cfg.sp_train_docs if not cfg.max_docs else min(cfg.sp_train_docs, max(cfg.max_docs - cfg.val_docs, 0))
        # the documents after the validation split, in input order: never a val document; transformed, as the
        # tokenizer will see them, with the operators reserved as pieces of their own
        sample = map(transform.forward, itertools.islice(iter_documents(files), cfg.val_docs, cfg.val_docs + n))
        t0 = time.perf_counter()
        stats = train_sentencepiece(sample, model, cfg.sp_vocab_size, cfg.sp_max_doc_bytes, threads=cfg.workers,
                                    user_symbols=transform.operators)
        info["tokenizer_training"] = {**stats, "first_doc": cfg.val_docs, "seconds": round(time.perf_counter() - t0, 3)}
        log.info("trained a %d-piece BPE tokenizer on %d training documents (%d too long, left out)",
                 cfg.sp_vocab_size, stats["docs"], stats["docs_too_long"])
    else:
        load_tokenizer(resolve_tokenizer(cfg.tokenizer), transform.name)  # refused here under its own name
        shutil.copyfile(resolve_tokenizer(cfg.tokenizer), model)
    r = tokenize_documents(files, model, ctx.dir, cfg.val_docs, cfg.max_docs, cfg.tokens_per_shard,
                           cfg.workers, cfg.overlap, transform=transform.name)
    info.update({"vocab_size": r["vocab_size"], "bos_id": r["bos_id"], "shards": r["shards"], "docs": r["docs"],
                 "byte_shards": r["byte_shards"],
                 "tokens": r["tokens"], "tokenizer_file": "tokenizer.model", "val_train_overlap": 0,
                 "train_docs_dropped": r["dropped"]})
    (ctx.dir / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    mb_s = r["text_bytes"] / 1e6 / max(r["seconds"], 1e-9)
    log.info("tokenized %d docs (%.1f MB) in %.1f s (%.2f MB/s on %d processes): %d val / %d train tokens",
             sum(r["docs"].values()), r["text_bytes"] / 1e6, r["seconds"], mb_s, cfg.workers,
             r["tokens"]["val"], r["tokens"]["train"])
    return {"vocab_size": r["vocab_size"], "val_docs": r["docs"]["val"], "train_docs": r["docs"]["train"],
            "val_tokens": r["tokens"]["val"], "train_tokens": r["tokens"]["train"], "val_bytes": r["val_bytes"],
            "train_docs_dropped": r["dropped"], "text_mb": round(r["text_bytes"] / 1e6, 3),
            "mb_per_s": round(mb_s, 3), "workers": cfg.workers}


# --- import / download ---------------------------------------------------------------------------
def build_import(cfg: TokenizeConfig, folder: Path, tokenizer: Path, ctx: StageContext, info: dict) -> dict:
    """Validate a folder of published shards and take it as the artifact (no re-tokenizing). With a transform the
    folder's byte sidecar is taken too, once checked against the decoded text; document hashes are of token ids,
    which for a transform also tell original texts apart (the transform is one-to-one)."""
    from tqdm import tqdm
    transform = transforms.get(cfg.transform)
    sp = load_tokenizer(tokenizer, transform.name)
    vocab, bos = sp.vocab_size(), sp.bos_id()
    shards = find_shards(folder, cfg.train_shards)
    t0 = time.perf_counter()
    tasks = [(str(p), vocab, bos) for split in ("val", "train") for p in shards[split]]
    scans = list(tqdm(ordered_map(scan_shard, tasks, cfg.workers), total=len(tasks), desc="import",
                      unit="shard", disable=None))
    n_val = len(shards["val"])
    summary: dict[str, SplitSummary] = {"val": summarise_split(shards["val"], scans[:n_val], "val"),
                                        "train": summarise_split(shards["train"], scans[n_val:], "train")}
    check_round_trip(shards["val"][0], sp, bos)  # ids < vocab is not enough to tell tokenizers apart
    hashes = {s: summary[s].hashes for s in summary}
    val_h = np.sort(np.concatenate(hashes["val"]))
    train_h = np.concatenate(hashes["train"])
    overlap = int(_member(train_h, val_h).sum())
    if overlap and cfg.overlap == "error":
        raise DataError(f"{folder}: {overlap} training documents have the same tokens as a validation document")
    if overlap:
        log.warning("%d training documents of %s equal a validation document (published shards are "
                    "taken as they are)", overlap, folder)
    byte_paths = byte_shard_paths(folder, shards["val"]) if transform.operators else []
    sidecar = published_byte_counts(shards["val"], byte_paths, sp, transform.inverse) if byte_paths \
        else val_byte_counts(shards["val"], sp)
    how = {place(p, ctx.dir / p.name, cfg.link) for p in shards["val"] + shards["train"] + byte_paths}
    shutil.copyfile(tokenizer, ctx.dir / "tokenizer.model")
    _write_common(ctx.dir, hashes, sidecar)
    docs = {s: summary[s].docs for s in summary}
    tokens = {s: summary[s].tokens for s in summary}
    info.update({"vocab_size": vocab, "bos_id": bos,
                 "shards": {s: [p.name for p in shards[s]] for s in shards}, "docs": docs, "tokens": tokens,
                 "transform": transform.name, "byte_shards": [p.name for p in byte_paths],
                 "tokenizer_file": "tokenizer.model", "doc_hash": "sha256(uint16 token ids)[:8]",
                 "val_train_overlap": overlap, "train_docs_dropped": 0,
                 "source": str(folder), "tokenizer_source": str(tokenizer)})
    (ctx.dir / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    log.info("imported %d val + %d train shards from %s (%s) in %.1f s: %d val / %d train tokens",
             len(shards["val"]), len(shards["train"]), folder, "/".join(sorted(how)), seconds,
             tokens["val"], tokens["train"])
    return {"vocab_size": vocab, "val_docs": docs["val"], "train_docs": docs["train"], "val_tokens": tokens["val"],
            "train_tokens": tokens["train"], "val_bytes": int(sidecar.sum(dtype=np.int64)),
            "val_train_overlap": overlap, "val_shards": len(shards["val"]), "train_shards": len(shards["train"]),
            "import_seconds": round(seconds, 3), "workers": cfg.workers}


def build_download(cfg: TokenizeConfig, ctx: StageContext) -> dict:
    remote = Remote(cfg.repo_id, cfg.revision, cfg.remote_root, cfg.variant)
    # the default destination, the build's work dir, survives a failed build: a rerun resumes there
    dest = Path(cfg.download_dir) if cfg.download_dir else ctx.work / "download"
    t0 = time.perf_counter()
    got = download(remote, cfg.train_shards, dest)
    seconds = time.perf_counter() - t0
    info = {"mode": "download", "repo_id": cfg.repo_id, "revision": cfg.revision, "variant": cfg.variant}
    metrics = build_import(cfg, got["folder"], got["tokenizer"], ctx, info)
    return {**metrics, "download_seconds": round(seconds, 3), "files_fetched": got["fetched"],
            "train_shards_available": got["train_shards_available"]}


def build(cfg: TokenizeConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    if cfg.mode == "import":
        return build_import(cfg, Path(cfg.source), resolve_tokenizer(cfg.tokenizer), ctx, {"mode": "import"})
    if cfg.mode == "download":
        return build_download(cfg, ctx)
    return build_documents(cfg, ctx)


def external_inputs(cfg: TokenizeConfig) -> dict[str, Path]:
    """Files outside the store the artifact depends on (their fingerprints are part of the key)."""
    if cfg.mode == "download":
        return {}  # identified by repo, revision and variant (config)
    if cfg.mode == "import":
        folder = Path(cfg.source)
        if not folder.is_dir():
            raise DataError(f"shard folder {folder} does not exist")
        return {"shards": folder, "tokenizer": resolve_tokenizer(cfg.tokenizer)}
    files = resolve_source(EMBEDDED_DOCS if cfg.source == "embedded" else cfg.source)
    out = {f"documents[{i}]": f for i, f in enumerate(files)}
    if cfg.tokenizer != "train":
        out["tokenizer"] = resolve_tokenizer(cfg.tokenizer)
    return out


STAGE = Stage(name="tokenize", config=TokenizeConfig, inputs=(), build=build, module=__name__,
              headline=("val_tokens", "train_tokens"),
              external=external_inputs)
