"""Encoding documents into challenge-format token streams, in one process or a pool, order preserved.

A worker parses a :class:`~tokenizing.docs.Chunk`, encodes its documents with SentencePiece (one thread per
process, so N processes use N cores and the 1-vs-N comparison is honest) and returns flat arrays:
[BOS] + ids per document, the documents' lengths and content hashes, and, for chunks that may hold
validation documents, the UTF-8 byte count of every token. With a text transform
(tokenizing/transforms.py) documents are encoded transformed, while hashes, document bytes and token bytes
are those of the ORIGINAL text (an operator token counts 0 bytes). :func:`ordered_map` keeps a bounded number
of chunks in flight and yields results in input order, so the output is byte-identical to one process
and memory does not grow with the corpus.

    python bench/tokenize_bench.py --corpus part_0.jsonl.zst --procs 1 2 --mb 30 --out /tmp/bench
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from gpt.bpb import piece_tables, token_bytes
from gpt.original_bytes import transformed_token_bytes
from .docs import Chunk, parse_chunk
from .transforms import get as get_transform, operator_ids

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Encoded:
    tokens: np.ndarray              # uint16: [BOS] + ids of each document, concatenated
    lengths: np.ndarray             # int64 per document: its token count including BOS
    hashes: np.ndarray              # uint64 per document: first 8 bytes (little-endian) of sha256(utf-8 text)
    token_bytes: np.ndarray | None  # uint16 per token: original UTF-8 bytes it stands for (BOS: 0), when asked for
    doc_bytes: np.ndarray           # int64 per document: UTF-8 bytes of its (original) text


class _Encoder:
    def __init__(self, model_path: str, transform: str = "none"):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.bos = self.sp.bos_id()
        self.tables = piece_tables(self.sp)
        self.transform = get_transform(transform)
        self.ops = operator_ids(self.sp, self.transform)  # refuses a tokenizer not made for the transform

    def encode(self, texts: list[str], want_bytes: bool) -> Encoded:
        forward = self.transform.forward
        coded = texts if self.transform.name == "none" else [forward(t) for t in texts]
        ids = self.sp.encode(coded, out_type=int, num_threads=1)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
        pos = 0
        for x in ids:
            tokens[pos] = self.bos
            tokens[pos + 1:pos + 1 + len(x)] = x
            pos += len(x) + 1
        raw = [t.encode("utf-8") for t in texts]  # the original texts: hashes (val/train overlap) and bytes
        hashes = np.frombuffer(b"".join(hashlib.sha256(r).digest()[:8] for r in raw), dtype="<u8")
        return Encoded(tokens, lengths, hashes, self.byte_counts(tokens) if want_bytes else None,
                       np.fromiter(map(len, raw), dtype=np.int64, count=len(raw)))

    def byte_counts(self, tokens: np.ndarray) -> np.ndarray:
        """Bytes per token by the piece-table rule. Every document starts with BOS, a boundary, so the
        rule applied to the concatenation equals the rule applied to each document alone (no escape crosses BOS)."""
        if self.transform.operators:
            return transformed_token_bytes(tokens, self.tables, *self.ops).astype(np.uint16)
        return token_bytes(tokens, self.tables).astype(np.uint16)


_WORKER: _Encoder | None = None


def init_worker(model_path: str, transform: str = "none") -> None:
    global _WORKER
    _WORKER = _Encoder(model_path, transform)


def encode_chunk(task: tuple[Chunk, bool]) -> Encoded:
    chunk, want_bytes = task
    return _WORKER.encode(parse_chunk(chunk), want_bytes)


def make_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    # spawn, not fork: the parent may hold threads (tqdm, pyarrow, sentencepiece) that fork does not copy safely
    return mp.get_context("spawn").Pool(workers, initializer, initargs)


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], workers: int, initializer: Callable | None = None,
                initargs: tuple = (), in_flight: int = 0, pool=None) -> Iterator[R]:
    """``map(fn, tasks)`` over ``workers`` processes with at most ``in_flight`` tasks submitted and not yet
    yielded (default 4 per worker), results in input order. Stopping the iteration stops the pool, unless
    the caller passed its own (already initialised) ``pool``.

    Results are taken in order, so one slow task holds back the window behind it: a deeper window (4 per
    worker, ~2 MB of jsonl each) leaves workers idle less often while the oldest task finishes."""
    if workers <= 1 and pool is None:
        if initializer:
            initializer(*initargs)
        yield from map(fn, tasks)
        return
    in_flight = in_flight or 4 * workers
    with contextlib.nullcontext(pool) if pool is not None else make_pool(workers, initializer, initargs) as pool:
        pending: deque = deque()
        it = iter(tasks)
        more = True
        while True:
            while more and len(pending) < in_flight:
                task = next(it, _END)
                if task is _END:
                    more = False
                else:
                    pending.append(pool.apply_async(fn, (task,)))
            if not pending:
                return
            yield pending.popleft().get()


_END = object()
