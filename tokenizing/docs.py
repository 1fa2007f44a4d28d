"""Document sources for the tokenize stage: jsonl (plain or zstd) and parquet files, streamed in chunks.

The main process cuts the input into chunks (raw jsonl lines, or parquet row batches as Arrow arrays)
without parsing them; workers parse and validate a chunk with :func:`parse_chunk`. So a corpus of any
size is read with bounded memory, and JSON decoding runs in parallel with the encoding.

    python -c "from tokenizing.docs import *; print(sum(1 for _ in iter_documents(resolve_source('docs.jsonl'))))"
"""

from __future__ import annotations

import contextlib
import glob as _glob
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet")
CHUNK_BYTES = 512 << 10   # jsonl bytes per chunk: ~150 FineWeb documents, ~0.1 s of encoding
PARQUET_ROWS = 256        # parquet rows per chunk


class DataError(ValueError):
    """Input documents that cannot be tokenized, with the file and line or row."""


def doc_format(path: Path) -> str | None:
    name = path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


def resolve_source(source: str | Path) -> list[Path]:
    """The document files of a file, a directory (its .jsonl/.jsonl.zst/.parquet files) or a glob, sorted."""
    source = str(source)
    p = Path(source)
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.is_file() and doc_format(x))
    elif any(c in source for c in "*?["):
        files = sorted(Path(x) for x in _glob.glob(source))
    else:
        files = [p]
    if not files:
        raise DataError(f"no .jsonl, .jsonl.zst or .parquet documents found at {source!r}")
    for f in files:
        if not f.is_file():
            raise DataError(f"document file {f} does not exist")
        if not doc_format(f):
            raise DataError(f"{f}: unsupported document format (use .jsonl, .jsonl.zst or .parquet)")
    return files


@contextlib.contextmanager
def open_binary(path: Path) -> Iterator[BinaryIO]:
    """A binary stream of the file's bytes; .zst is decompressed by the zstandard package or the zstd CLI."""
    if not path.name.endswith(".zst"):
        with open(path, "rb") as fh:
            yield fh
        return
    try:
        import zstandard
    except ImportError:
        zstandard = None
    if zstandard is not None:
        with open(path, "rb") as raw:
            yield ZstdFrames(raw, path, zstandard)
        return
    exe = shutil.which("zstd")
    if exe is None:
        raise DataError(f"{path}: reading .zst needs the zstandard package or the zstd command; "
                        "neither is installed (or decompress the file first)")
    proc = subprocess.Popen([exe, "-dc", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc.stdout  # the reader reads to the end unless it stops with an exception
        if proc.wait() != 0:
            raise DataError(f"{path}: zstd -d failed: {proc.stderr.read().decode(errors='replace').strip()}")
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


class ZstdFrames:
    """The decompressed bytes of a .zst file, frame after frame, read like a file (``read(n)``).

    zstandard's ``stream_reader`` ends quietly where a cut file ends, and the documents before the cut would be
    tokenized as if they were all: here a file that ends inside a frame, or whose data or checksum is corrupt,
    is a DataError naming it (as ``zstd -d`` fails on it)."""

    RAW_BYTES = 128 << 10

    def __init__(self, raw: BinaryIO, path: Path, zstandard):
        self.raw, self.path, self.zstandard = raw, path, zstandard
        self.dctx = zstandard.ZstdDecompressor()
        self.frame = None      # the decompressor of the frame being read, None between frames
        self.pending = b""     # compressed bytes after the end of the last frame: the next frame's start
        self.out = bytearray()
        self.frames = 0
        self.done = False

    def read(self, n: int = -1) -> bytes:
        while not self.done and (n < 0 or len(self.out) < n):
            self._more()
        n = len(self.out) if n < 0 else n
        data = bytes(self.out[:n])
        del self.out[:n]
        return data

    def _more(self) -> None:
        data, self.pending = self.pending or self.raw.read(self.RAW_BYTES), b""
        if not data:
            if self.frame is not None:
                raise DataError(f"{self.path}: truncated zstd file (it ends inside frame {self.frames}): "
                                f"the file was cut short; fetch or write it again")
            if self.frames == 0:
                raise DataError(f"{self.path}: empty file, not zstd data")
            self.done = True
            return
        if self.frame is None:
            self.frame = self.dctx.decompressobj()
            self.frames += 1
        try:
            self.out += self.frame.decompress(data)
        except self.zstandard.ZstdError as e:
            raise DataError(f"{self.path}: corrupt zstd data in frame {self.frames} ({e})") from None
        if self.frame.eof:  # the frame is complete (its checksum, if it has one, verified)
            self.pending = self.frame.unused_data
            self.frame = None


@dataclass
class Chunk:
    """A slice of one input file, cut but not parsed."""

    file: str
    kind: str          # 'jsonl' (payload: bytes of whole lines) or 'arrow' (payload: an Arrow array of texts)
    first: int         # 1-based line number (jsonl) or 0-based row (arrow) of the payload's first item
    before: int        # lines/rows of all inputs before this chunk: an upper bound on its first document's index
    payload: Any


def iter_chunks(files: list[Path], chunk_bytes: int = 0, parquet_rows: int = 0) -> Iterator[Chunk]:
    chunk_bytes, parquet_rows = chunk_bytes or CHUNK_BYTES, parquet_rows or PARQUET_ROWS
    before = 0
    for f in files:
        if doc_format(f) == "parquet":
            for chunk in _parquet_chunks(f, parquet_rows, before):
                yield chunk
                before += len(chunk.payload)
        else:
            for chunk in _jsonl_chunks(f, chunk_bytes, before):
                yield chunk
                before += chunk.payload.count(b"\n") + (not chunk.payload.endswith(b"\n"))


def _jsonl_chunks(f: Path, chunk_bytes: int, before: int) -> Iterator[Chunk]:
    line = 1
    rest = b""
    with open_binary(f) as fh:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                break
            data = rest + block if rest else block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                rest = data
                continue
            payload, rest = data[:cut], data[cut:]
            yield Chunk(str(f), "jsonl", line, before, payload)
            n = payload.count(b"\n")
            line += n
            before += n
    if rest:  # the last line has no newline
        yield Chunk(str(f), "jsonl", line, before, rest)


def _parquet_chunks(f: Path, rows: int, before: int) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{f}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"{f}: parquet file has no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise DataError(f"{f}: column 'text' has type {kind}, expected string")
    row = 0
    # iter_batches decodes one row group at a time: memory stays bounded by the file's row-group size
    batches = pf.iter_batches(batch_size=rows, columns=["text"])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:  # a corrupt page or a cut file (its footer read, its data not)
            raise DataError(f"{f}: corrupt parquet data after row {row} ({e})") from None
        if batch is None:
            break
        arr = batch.column(0)
        yield Chunk(str(f), "arrow", row, before + row, arr)
        row += len(arr)


def parse_chunk(chunk: Chunk) -> list[str]:
    """The chunk's document texts; a clear DataError for anything that is not a document."""
    if chunk.kind == "jsonl":
        texts = []
        for i, raw in enumerate(chunk.payload.split(b"\n")):
            if not raw.strip():
                continue
            where = f"{chunk.file}:{chunk.first + i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{where}: no string field 'text'")
            texts.append(obj["text"])
        return texts
    return _parse_arrow(chunk)


def _parse_arrow(chunk: Chunk) -> list[str]:
    import pyarrow as pa
    arr = chunk.payload
    if arr.null_count:
        i = arr.is_null().to_pylist().index(True)
        raise DataError(f"{chunk.file}: row {chunk.first + i}: 'text' is null")
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        values, out = arr.to_pylist(), []
        for i, raw in enumerate(values):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{chunk.file}: row {chunk.first + i}: invalid UTF-8 "
                                f"({e.reason} at byte {e.start})") from None
        return out
    try:
        return arr.to_pylist()
    except UnicodeDecodeError:
        for i in range(len(arr)):  # find the row to name it
            try:
                arr[i].as_py()
            except UnicodeDecodeError as e:
                raise DataError(f"{chunk.file}: row {chunk.first + i}: invalid UTF-8 "
                                f"({e.reason} at byte {e.start})") from None
        raise


def iter_documents(files: list[Path]) -> Iterator[str]:
    """Stream document texts in input order (in this process)."""
    for chunk in iter_chunks(files):
        yield from parse_chunk(chunk)
