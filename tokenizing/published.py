"""The challenge's published shards: validate and import a local folder, or download it from the Hub first.

Import takes a folder such as data/datasets/fineweb10B_sp1024 (fineweb_val_NNNNNN.bin and
fineweb_train_NNNNNN.bin, numbered from 0) and the tokenizer it was made with. Every shard's header and
size is checked, every token id must be below the tokenizer's vocab size, and the documents (split at
BOS) are hashed, so the result is a tokenize artifact like one made from text. Shards are hard-linked
into the store where possible, else copied.

Download fetches ``<remote_root>/manifest.json`` of the dataset repo (willdepueoai/parameter-golf), then
the variant's val shards, the first N train shards and its tokenizer, with huggingface_hub. A file that
is already complete (a valid shard, or any manifest/tokenizer file: huggingface_hub writes those only
once whole) is skipped without a request; anything else is fetched again.

    python -m stages.tokenize --set mode=import --set source=data/datasets/fineweb10B_sp1024 \
        --set tokenizer=data/tokenizers/fineweb_1024_bpe.model
    python -m stages.tokenize --set mode=download --set train_shards=10 --set workers=16
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt.bpb import piece_tables, token_bytes
from .docs import DataError
from gpt.shards import ShardError, load_tokens, read_header

log = logging.getLogger("golf.tokenize")

SHARD_RE = re.compile(r"^fineweb_(val|train)_(\d{6})\.bin$")
SCAN_TOKENS = 1 << 24  # tokens per step when scanning a shard for out-of-vocab ids


def find_shards(folder: Path, train_shards: int = 0) -> dict[str, list[Path]]:
    """The folder's val and train shards in order (the first ``train_shards`` train ones if > 0)."""
    if not folder.is_dir():
        raise DataError(f"shard folder {folder} does not exist")
    found: dict[str, dict[int, Path]] = {"val": {}, "train": {}}
    for p in folder.iterdir():
        m = SHARD_RE.match(p.name)
        if m and p.is_file():
            found[m.group(1)][int(m.group(2))] = p
    out = {}
    for split, by_index in found.items():
        if not by_index:
            raise DataError(f"{folder}: no fineweb_{split}_NNNNNN.bin shards")
        missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
        if missing:
            raise DataError(f"{folder}: {split} shards are not numbered 0..{max(by_index)}: "
                            f"fineweb_{split}_{missing[0]:06d}.bin is missing")
        out[split] = [by_index[i] for i in sorted(by_index)]
    if train_shards:
        if train_shards > len(out["train"]):
            raise DataError(f"{folder}: train_shards={train_shards} but the folder has {len(out['train'])} train shards")
        out["train"] = out["train"][:train_shards]
    return out


@dataclass
class ShardScan:
    """What one worker learns about one shard."""

    tokens: int
    bos_count: int
    first_bos: int          # position of the first BOS, -1 if none
    last_bos: int           # position of the last BOS, -1 if none
    hashes: np.ndarray      # uint64 per document lying wholly between two BOS of this shard


def scan_shard(task: tuple[str, int, int]) -> ShardScan:
    """Validate one shard (header, size, ids < vocab) and hash its inner documents (token bytes)."""
    path, vocab, bos = task
    path = Path(path)
    tok = load_tokens(path)  # ShardError for a bad header or size
    n = len(tok)
    for start in range(0, n, SCAN_TOKENS):
        block = np.asarray(tok[start:start + SCAN_TOKENS])
        if block.size and int(block.max()) >= vocab:
            i = int(np.argmax(block >= vocab))
            raise DataError(f"{path}: token {start + i:,} has id {int(block[i])}, but the tokenizer has only "
                            f"{vocab} pieces (ids 0..{vocab - 1}): the tokenizer does not match the data")
    bos_pos = np.flatnonzero(np.asarray(tok) == bos)
    data = memoryview(np.ascontiguousarray(tok).view(np.uint8))
    hashes = [hashlib.sha256(data[2 * a:2 * b]).digest()[:8] for a, b in zip(bos_pos[:-1], bos_pos[1:])]
    return ShardScan(n, len(bos_pos), int(bos_pos[0]) if len(bos_pos) else -1,
                     int(bos_pos[-1]) if len(bos_pos) else -1,
                     np.frombuffer(b"".join(hashes), dtype="<u8"))


@dataclass
class SplitSummary:
    tokens: int = 0
    docs: int = 0
    hashes: list = field(default_factory=list)  # uint64 arrays in document order


def summarise_split(paths: list[Path], scans: list[ShardScan], split: str) -> SplitSummary:
    """Stitch the per-shard scans: documents that cross shard boundaries are hashed here."""
    out = SplitSummary()
    open_doc = None  # sha256 of the document still running at the end of the previous shard
    for path, scan in zip(paths, scans):
        if open_doc is None and scan.first_bos != 0:
            where = f"first BOS at token {scan.first_bos}" if scan.first_bos > 0 else "no BOS in the shard"
            raise ShardError(f"{path}: the {split} split does not start with BOS ({where}): "
                             "not a document boundary")
        tok = load_tokens(path)
        if scan.first_bos < 0:  # a document longer than the whole shard
            open_doc.update(np.ascontiguousarray(tok).tobytes())
        else:
            if open_doc is not None:
                open_doc.update(np.ascontiguousarray(tok[:scan.first_bos]).tobytes())
                out.hashes.append(np.frombuffer(open_doc.digest()[:8], dtype="<u8"))
            out.hashes.append(scan.hashes)
            open_doc = hashlib.sha256(np.ascontiguousarray(tok[scan.last_bos:]).tobytes())
        out.tokens += scan.tokens
        out.docs += scan.bos_count
    if open_doc is not None:
        out.hashes.append(np.frombuffer(open_doc.digest()[:8], dtype="<u8"))
    return out


def check_round_trip(path: Path, sp, bos: int, docs: int = 32) -> None:
    """A tokenizer that made the shard re-encodes its decoded documents to the same ids; another one,
    even with a large enough vocab, practically never does. Checks the shard's first complete documents."""
    tok = load_tokens(path)
    starts = np.flatnonzero(np.asarray(tok[:1 << 22]) == bos)[:docs + 1]
    pieces = [np.asarray(tok[a + 1:b]).tolist() for a, b in zip(starts[:-1], starts[1:])]
    same = sum(sp.encode(sp.decode(ids)) == ids for ids in pieces)
    if pieces and same < len(pieces) / 2:
        raise DataError(f"{path}: the tokenizer does not match the data: only {same} of {len(pieces)} documents "
                        "decode and re-encode to the same ids")


def val_byte_counts(paths: list[Path], sp, step: int = SCAN_TOKENS) -> np.ndarray:
    """The per-token byte sidecar of the val split by the piece-table rule, in bounded-size steps."""
    tables = piece_tables(sp)
    out, prev = [], sp.bos_id()  # the split starts after a boundary (it starts with BOS)
    for p in paths:
        tok = load_tokens(p)
        for start in range(0, len(tok), step):
            block = np.asarray(tok[start:start + step]).astype(np.int64)
            prevs = np.concatenate([[prev], block[:-1]])
            out.append(token_bytes(block, tables, prev=prevs).astype(np.uint16))
            prev = int(block[-1])
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def byte_shard_paths(folder: Path, val_paths: list[Path]) -> list[Path]:
    """The published per-token byte sidecar beside each val shard (fineweb_val_bytes_NNNNNN.bin), all present."""
    out = [p.with_name(p.name.replace("fineweb_val_", "fineweb_val_bytes_")) for p in val_paths]
    missing = [p.name for p in out if not p.is_file()]
    if missing:
        raise DataError(f"{folder}: transformed shards need their byte sidecar, and {missing[0]} is missing "
                        f"(the published CaseOps data has one fineweb_val_bytes_NNNNNN.bin per val shard)")
    return out


def published_byte_counts(val_paths: list[Path], byte_paths: list[Path], sp, inverse) -> np.ndarray:
    """The published sidecar, checked: token for token as long as its val shard, and each document's sum the
    UTF-8 length of its decoded text after the transform's ``inverse`` (its original text)."""
    parts = []
    for vp, bp in zip(val_paths, byte_paths):
        n_tok, n_bytes = read_header(vp), read_header(bp)
        if n_tok != n_bytes:
            raise DataError(f"{bp}: {n_bytes:,} byte counts for the {n_tok:,} tokens of {vp.name}: not its sidecar")
        parts.append(np.asarray(load_tokens(bp)))
    sidecar = np.concatenate(parts)
    tokens = np.concatenate([np.asarray(load_tokens(p)) for p in val_paths])
    starts = np.flatnonzero(tokens == sp.bos_id())
    ends = np.append(starts[1:], len(tokens))
    texts = sp.decode([tokens[a + 1:b].tolist() for a, b in zip(starts, ends)])
    sums = np.add.reduceat(sidecar.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    for i, (text, got) in enumerate(zip(texts, sums)):
        try:
            want = len(inverse(text).encode("utf-8"))
        except ValueError as e:  # tokens that no transformed text gives: the tokenizer or transform is not the data's
            raise DataError(f"{val_paths[0].parent}: val document {i} (0-based) does not invert ({e})") from None
        if got != want:
            raise DataError(f"{byte_paths[0].parent}: the byte sidecar gives val document {i} (0-based) {int(got):,} "
                            f"bytes, its decoded original text has {want:,}: the sidecar does not match the data")
    return sidecar.astype(np.uint16)


def place(src: Path, dst: Path, link: bool) -> str:
    """Put a file (a shard, a checkpoint) into an artifact: a hard link when allowed and possible, else a copy."""
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copied"


# --- download -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Remote:
    repo_id: str
    revision: str
    root: str       # the repo folder holding manifest.json, datasets/ and tokenizers/
    variant: str    # sp1024 -> datasets/fineweb10B_sp1024

    @property
    def dataset_name(self) -> str:
        return f"fineweb10B_{self.variant}"

    @property
    def dataset_dir(self) -> str:
        return f"{self.root}/datasets/{self.dataset_name}"


def _complete(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix == ".bin":
        try:
            read_header(path)
        except ShardError:
            return False
    return path.stat().st_size > 0


def _not_there(e: Exception) -> bool:
    """The server answered that the repo, revision or file does not exist (not: it could not be reached)."""
    from huggingface_hub import errors
    if isinstance(e, errors.LocalEntryNotFoundError):  # huggingface_hub's word for "could not ask"
        return False
    return isinstance(e, (errors.EntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError))


def fetch(remote: Remote, rel: str, dest: Path, endpoint: str | None, retries: int = 3) -> tuple[Path, bool]:
    """One repo file into ``dest/rel``; (path, True) if it was downloaded, (path, False) if already complete."""
    local = dest / rel
    if _complete(local):
        return local, False
    local.unlink(missing_ok=True)  # a partial or corrupt file: huggingface_hub must not trust it
    from huggingface_hub import hf_hub_download
    for attempt in range(1, retries + 1):
        try:
            got = Path(hf_hub_download(remote.repo_id, rel, repo_type="dataset", revision=remote.revision,
                                       local_dir=dest, endpoint=endpoint))
            break
        except Exception as e:
            if _not_there(e):
                raise DataError(f"{remote.repo_id}@{remote.revision}: {rel} is not there "
                                f"({type(e).__name__})") from None
            if attempt == retries:  # network trouble: tried again, now give up naming the file
                why = str(e).splitlines()[0] if str(e) else ""
                raise DataError(f"downloading {rel} from {remote.repo_id} failed after {retries} attempts "
                                f"({type(e).__name__}: {why})") from None
            log.warning("download of %s failed (%s), retrying", rel, e)
    if got.resolve() != local.resolve() or not _complete(local):
        raise ShardError(f"{rel}: downloaded file {got} is not a complete shard")
    return local, True


def download(remote: Remote, train_shards: int, dest: Path, endpoint: str | None = None) -> dict:
    """Fetch manifest, val shards, the first ``train_shards`` train shards (0 = all) and the tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    manifest_path, manifest_new = fetch(remote, f"{remote.root}/manifest.json", dest, endpoint)
    try:
        manifest = json.loads(manifest_path.read_text())
        entry = next(d for d in manifest.get("datasets", []) if d.get("name") == remote.dataset_name)
        n_train = int(entry["stats"]["files_train"])
        n_val = int(entry["stats"]["files_val"])
        tok_entry = next(t for t in manifest.get("tokenizers", []) if t.get("name") == entry["tokenizer_name"])
        tok_rel = tok_entry["model_path"]
    except StopIteration:
        raise DataError(f"{remote.repo_id}: manifest.json lists no dataset {remote.dataset_name!r} "
                        "with a tokenizer (check variant)") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{remote.repo_id}: manifest.json is not in the expected format ({e!r})") from None
    if train_shards > n_train:
        raise DataError(f"{remote.dataset_name} has {n_train} train shards on {remote.repo_id}; "
                        f"train_shards={train_shards} asked for more")
    n_take = train_shards or n_train
    files = ([f"{remote.dataset_dir}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
             + [f"{remote.dataset_dir}/fineweb_train_{i:06d}.bin" for i in range(n_take)]
             + [f"{remote.root}/{tok_rel}"])
    fetched = int(manifest_new)
    for i, rel in enumerate(files, 1):
        _, new = fetch(remote, rel, dest, endpoint)
        fetched += new
        log.info("download [%d/%d] %s %s", i, len(files), "fetched" if new else "already complete", rel)
    return {"folder": dest / remote.dataset_dir, "tokenizer": dest / remote.root / tok_rel,
            "files": len(files) + 1, "fetched": fetched, "train_shards_available": n_train}
