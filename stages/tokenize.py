"""tokenize: documents (jsonl or parquet) -> challenge-format train/val shards, tokenizer included.

The validation split is the first ``val_docs`` documents in input order, the training split the rest.
Every document is encoded with the SentencePiece model and written as [BOS] + ids.

Run it alone:  python -m stages.tokenize --set val_docs=60
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import logging
import multiprocessing as mp
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from artifacts import Artifact, Stage, StageContext
from .bpb import piece_tables
from .shards import MAX_VOCAB, ShardWriter

log = logging.getLogger("golf.tokenize")

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "golf" / "data" / "fineweb_sample"
EMBEDDED_DOCS = EMBEDDED_DIR / "docs.jsonl"
EMBEDDED_TOKENIZER = EMBEDDED_DIR / "fineweb_1024_bpe.model"
BATCH_DOCS = 256  # documents per encode call / per worker task


@dataclass(frozen=True)
class TokenizeConfig:
    source: str = "embedded"          # 'embedded' (bundled FineWeb sample) or a .jsonl/.parquet file, dir or glob
    tokenizer: str = "embedded"       # 'embedded' (official sp1024), 'embedded-sp8192', or a SentencePiece .model path
    val_docs: int = 60                # the first N documents are the validation split (challenge: 50,000)
    max_docs: int = 0                 # stop after this many documents in all (0 = no limit)
    tokens_per_shard: int = 100_000_000  # the official export's shard size
    workers: int = 1                  # encoding processes


class DataError(ValueError):
    """Input documents that cannot be tokenized, with the file and line or row."""


def resolve_source(source: str) -> list[Path]:
    if source == "embedded":
        return [EMBEDDED_DOCS]
    p = Path(source)
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix in (".jsonl", ".parquet"))
    elif any(c in source for c in "*?["):
        files = sorted(Path(x) for x in _glob.glob(source))
    else:
        files = [p]
    if not files:
        raise DataError(f"no .jsonl or .parquet documents found at {source!r}")
    for f in files:
        if not f.is_file():
            raise DataError(f"document file {f} does not exist")
        if f.suffix not in (".jsonl", ".parquet"):
            raise DataError(f"{f}: unsupported document format {f.suffix!r} (use .jsonl or .parquet)")
    return files


EMBEDDED_TOKENIZERS = {"embedded": EMBEDDED_TOKENIZER, "embedded-sp8192": EMBEDDED_DIR / "fineweb_8192_bpe.model"}


def resolve_tokenizer(tokenizer: str) -> Path:
    p = EMBEDDED_TOKENIZERS.get(tokenizer) or Path(tokenizer)
    if not p.is_file():
        raise DataError(f"tokenizer model {p} does not exist")
    return p


def iter_documents(files: list[Path]) -> Iterator[str]:
    """Stream document texts: jsonl line by line, parquet row group by row group."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.strip():
                        continue
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{f}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise DataError(f"{f}:{lineno}: no string field 'text'")
                    yield obj["text"]
        else:
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(f)
            if "text" not in pf.schema_arrow.names:
                raise DataError(f"{f}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
            for g in range(pf.num_row_groups):
                for text in pf.read_row_group(g, columns=["text"]).column("text").to_pylist():
                    if not isinstance(text, str):
                        raise DataError(f"{f}: row group {g} has a non-string 'text' value")
                    yield text


def batched(it: Iterator[str], n: int, limit: int) -> Iterator[list[str]]:
    batch, count = [], 0
    for text in it:
        if limit and count >= limit:
            break
        batch.append(text)
        count += 1
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


_SP = None


def _init_worker(model_path: str) -> None:
    global _SP
    import sentencepiece as spm
    _SP = spm.SentencePieceProcessor(model_file=model_path)


def _encode_batch(texts: list[str]) -> tuple[list[np.ndarray], list[bytes], int]:
    """[BOS] + ids per document, a 64-bit content hash per document, and the batch's UTF-8 bytes."""
    bos = _SP.bos_id()
    out, hashes, nbytes = [], [], 0
    for text, ids in zip(texts, _SP.encode(texts, out_type=int)):
        arr = np.empty(len(ids) + 1, dtype=np.uint16)
        arr[0] = bos
        arr[1:] = ids
        out.append(arr)
        raw = text.encode("utf-8")
        nbytes += len(raw)
        hashes.append(hashlib.sha256(raw).digest()[:8])
    return out, hashes, nbytes


def build(cfg: TokenizeConfig, inputs: Mapping[str, Artifact], ctx: StageContext) -> dict:
    import sentencepiece as spm
    from tqdm import tqdm

    files = resolve_source(cfg.source)
    model_path = resolve_tokenizer(cfg.tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = sp.vocab_size()
    if vocab > MAX_VOCAB:
        raise DataError(f"tokenizer has {vocab} pieces; shard ids are uint16 (at most {MAX_VOCAB})")
    if sp.bos_id() < 0:
        raise DataError(f"tokenizer {model_path} has no BOS piece; the challenge format needs one")
    if cfg.val_docs <= 0:
        raise DataError("val_docs must be at least 1")
    shutil.copyfile(model_path, ctx.dir / "tokenizer.model")

    writers = {s: ShardWriter(ctx.dir, s, cfg.tokens_per_shard) for s in ("val", "train")}
    hashes: dict[str, list[bytes]] = {"val": [], "train": []}
    docs = {"val": 0, "train": 0}
    text_bytes = 0
    t0 = time.perf_counter()
    batches = batched(iter_documents(files), BATCH_DOCS, cfg.max_docs)
    pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (str(model_path),)) if cfg.workers > 1 else None
    if pool is None:
        _init_worker(str(model_path))
    encoded = pool.imap(_encode_batch, batches, chunksize=1) if pool else map(_encode_batch, batches)
    bar = tqdm(desc="tokenize", unit="doc", mininterval=1.0, disable=None)
    try:
        for arrays, doc_hashes, nbytes in encoded:
            text_bytes += nbytes
            for arr, h in zip(arrays, doc_hashes):
                split = "val" if docs["val"] < cfg.val_docs else "train"
                writers[split].add(arr)
                hashes[split].append(h)
                docs[split] += 1
            bar.update(len(arrays))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    seconds = time.perf_counter() - t0
    if docs["val"] == 0:
        raise DataError(f"no documents in {cfg.source!r}")
    if docs["train"] == 0:
        raise DataError(f"only {docs['val']} documents: nothing left for training after val_docs={cfg.val_docs}")

    shards = {s: [p.name for p in w.close()] for s, w in writers.items()}
    val_set = set(hashes["val"])
    overlap = sum(h in val_set for h in hashes["train"])
    if overlap:
        # identical texts in both splits would let training see validation content
        raise DataError(f"{overlap} training documents have the same text as a validation document")
    for split in ("val", "train"):
        np.save(ctx.dir / f"doc_hashes_{split}.npy", np.frombuffer(b"".join(hashes[split]), dtype="<u8"))

    # per-token UTF-8 byte counts of the val split: BPB can be computed from them directly
    from .shards import load_split
    val_tokens = load_split([ctx.dir / n for n in shards["val"]])
    base, space, boundary = piece_tables(sp)
    prev_boundary = np.concatenate([[True], boundary[val_tokens[:-1]]])
    val_bytes = base[val_tokens] + (space[val_tokens] & ~prev_boundary)
    np.save(ctx.dir / "val_token_bytes.npy", val_bytes.astype(np.uint16))

    info = {"vocab_size": vocab, "bos_id": sp.bos_id(), "shards": shards, "docs": docs,
            "tokenizer_file": "tokenizer.model", "source": [str(f) for f in files]}
    (ctx.dir / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("tokenized %d docs (%.1f MB) in %.1f s: %d val / %d train tokens", sum(docs.values()),
             text_bytes / 1e6, seconds, writers["val"].total, writers["train"].total)
    return {"vocab_size": vocab, "val_docs": docs["val"], "train_docs": docs["train"],
            "val_tokens": writers["val"].total, "train_tokens": writers["train"].total,
            "val_bytes": int(val_bytes.sum()), "text_mb": round(text_bytes / 1e6, 3),
            "mb_per_s": round(text_bytes / 1e6 / max(seconds, 1e-9), 3), "workers": cfg.workers}


def external_inputs(cfg: TokenizeConfig) -> dict[str, Path]:
    files = resolve_source(cfg.source)
    out = {f"documents[{i}]": f for i, f in enumerate(files)}
    out["tokenizer"] = resolve_tokenizer(cfg.tokenizer)
    return out


STAGE = Stage(name="tokenize", config=TokenizeConfig, inputs=(), build=build, module=__name__,
              external=external_inputs)


# --- reading a tokenize artifact ---------------------------------------------------------------
@dataclass
class Dataset:
    """A tokenize artifact seen from downstream stages."""

    artifact: Artifact
    info: dict

    @classmethod
    def open(cls, artifact: Artifact) -> "Dataset":
        if artifact.stage != "tokenize":
            raise DataError(f"artifact {artifact.key} is a {artifact.stage} artifact, not tokenize")
        return cls(artifact, json.loads(artifact.file("dataset.json").read_text()))

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.artifact.file(n) for n in self.info["shards"][split]]

    @property
    def tokenizer_path(self) -> Path:
        return self.artifact.file(self.info["tokenizer_file"])


if __name__ == "__main__":
    from golf.stage_cli import stage_main
    stage_main(STAGE)
