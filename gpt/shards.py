"""The challenge's token shard format, read and written with validation.

A shard is 256 little-endian int32 (magic 20240520, version 1, token count, then zeros) followed by
that many little-endian uint16 token ids. Every document starts with BOS; there is no EOS.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 1 << 16  # ids are stored as uint16


class ShardError(ValueError):
    """A shard that is not in the challenge format, described precisely."""


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard atomically (a .part file renamed into place)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
        raise ShardError(f"{path.name}: token ids must fit uint16, got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(part, path)


def read_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: magic {header[0]}, expected {MAGIC} (not a challenge shard)")
    if header[1] != VERSION:
        raise ShardError(f"{path}: version {header[1]}, expected {VERSION}")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        raise ShardError(f"{path}: header says {n} tokens ({expected} bytes) but the file has {size} bytes")
    return n


def load_tokens(path: Path) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap (validated first)."""
    n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def load_split(paths: list[Path]) -> np.ndarray:
    """All tokens of several shards, concatenated in order, as one in-memory array."""
    if not paths:
        raise ShardError("no shards given")
    return np.concatenate([np.asarray(load_tokens(p)) for p in paths])


class ShardWriter:
    """Streams documents into numbered shards of at most ``tokens_per_shard`` tokens.

    Documents are split across shard boundaries as the official export does: a shard is filled to
    exactly ``tokens_per_shard`` tokens before the next one starts.
    """

    def __init__(self, out_dir: Path, split: str, tokens_per_shard: int):
        if tokens_per_shard <= 0:
            raise ValueError("tokens_per_shard must be positive")
        self.out_dir, self.split, self.cap = out_dir, split, tokens_per_shard
        self.buf = np.empty(tokens_per_shard, dtype=np.uint16)
        self.fill = 0
        self.paths: list[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            take = min(self.cap - self.fill, len(tokens) - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.cap:
                self._flush()
        self.total += len(tokens)

    def _flush(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self.paths))
        write_shard(path, self.buf[:self.fill])
        self.paths.append(path)
        self.fill = 0

    def close(self) -> list[Path]:
        if self.fill or not self.paths:
            self._flush()
        return self.paths
