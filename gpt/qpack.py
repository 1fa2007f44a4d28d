"""The weights blob, encoding side: sections, byte shuffle, compressors, and exact assembly.

Arrays are laid out in sections by (tensor group, dtype): the int8 values of the MLP matrices in one
section, their float16 scales in another, and so on. Each section is compressed on its own with its own
compressor, so the cap-fit search can price one group's option once and add sections up exactly, and a
group can use whichever compressor suits its bytes best. ``gpt.quant.decode_weights`` reads what
``assemble`` writes.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .quant import BLOB_MAGIC, DTYPES

COMPRESSORS = ("zlib", "zstd", "lzma", "brotli")
NP_CODE = {np.dtype(np.int8): "i8", np.dtype(np.float16): "f16", np.dtype(np.float32): "f32",
           np.dtype(np.int32): "i32"}


def available_compressors() -> list[str]:
    """The compressors this Python can run (zstandard and brotli are optional packages)."""
    out = []
    for m in COMPRESSORS:
        try:
            compress(b"x", m)
            out.append(m)
        except ImportError:
            pass
    return out


def compress(data: bytes, method: str) -> bytes:
    """Each compressor at its strongest setting (zlib 9, zstd 22, lzma 9e, brotli 11)."""
    if method == "zlib":
        return zlib.compress(data, 9)
    if method == "lzma":
        # .lzma ("alone") format: 13 bytes of header instead of .xz's ~60; pb=0/lp=0 because our
        # elements are single bytes or byte-shuffled planes, with no 2- or 4-byte alignment to exploit
        return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[
            {"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}])
    if method == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=22).compress(data)
    if method == "brotli":
        import brotli
        return brotli.compress(data, quality=11, lgwin=24)
    if method == "none":
        return data
    raise ValueError(f"unknown compressor {method!r} ({', '.join(COMPRESSORS)}, none)")


def shuffle(data: bytes, width: int) -> bytes:
    """Byte shuffle: all first bytes of the width-byte elements, then all second bytes, ..."""
    if width <= 1:
        return data
    n = len(data) // width * width
    return np.frombuffer(data, np.uint8, n).reshape(-1, width).T.tobytes() + data[n:]


@dataclass(frozen=True)
class Packed:
    """One compressed section."""
    method: str
    width: int   # byte-shuffle element width (1 = not shuffled)
    data: bytes


class SectionCache:
    """Compressed sections by content: the cap-fit search prices the same bytes many times."""

    def __init__(self):
        self._done: dict[tuple, Packed] = {}

    def get(self, raw: bytes, method: str, width: int) -> Packed:
        key = (hashlib.sha1(raw).digest(), len(raw), method, width)
        if key not in self._done:
            self._done[key] = Packed(method, width, compress(shuffle(raw, width), method))
        return self._done[key]

    def best(self, raw: bytes, methods: list[str], shuffle_widths: list[int]) -> Packed:
        """The smallest of every method x shuffle choice (ties: the earlier compressor in COMPRESSORS)."""
        results = [self.get(raw, m, w) for m in methods for w in shuffle_widths]
        return min(results, key=lambda p: (len(p.data), COMPRESSORS.index(p.method) if p.method in COMPRESSORS else 9))

    def warm(self, jobs: list[tuple[bytes, str, int]]) -> None:
        """Compress many (raw, method, width) at once in threads: the codecs release the GIL."""
        todo = [j for j in jobs if (hashlib.sha1(j[0]).digest(), len(j[0]), j[1], j[2]) not in self._done]
        if len(todo) > 1:
            with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as ex:
                list(ex.map(lambda j: self.get(*j), todo))


# --- layout ------------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())


class Layout:
    """Raw sections keyed by (group, dtype code) and the header's per-tensor index into them."""

    def __init__(self):
        self.raw: dict[tuple[str, str], bytearray] = {}
        self.index: dict[str, dict] = {}

    def put(self, group: str, arr: np.ndarray) -> list:
        key = (group, NP_CODE[arr.dtype])
        buf = self.raw.setdefault(key, bytearray())
        ref = [key, len(buf), arr.nbytes]
        buf += arr.tobytes()
        return ref

    def put_int(self, group: str, t: dict) -> dict:
        e = {"s": "int", "b": t["bits"], "shape": list(t["q"].shape), "q": self.put(group, _np(t["q"])),
             "sc": self.put(group, _np(t["scale"]))}
        if t.get("perm") is not None:
            e["perm"] = self.put(group, _np(t["perm"]).astype(np.int32))
        if t.get("lqer") is not None:
            e["lqer"] = [self.put_int(group, f) for f in t["lqer"]]
        return e

    def add(self, name: str, group: str, t: dict) -> None:
        if "q" in t:
            self.index[name] = self.put_int(group, t)
        else:
            arr = _np(t["float"])
            self.index[name] = {"s": NP_CODE[arr.dtype], "shape": list(arr.shape), "v": self.put(group, arr)}


def layout(entries: dict[str, dict], groups: dict[str, str]) -> Layout:
    lay = Layout()
    for name, t in entries.items():
        lay.add(name, groups[name], t)
    return lay


def _resolve(e, order: dict):
    if isinstance(e, dict):
        return {k: _resolve(v, order) for k, v in e.items()}
    if isinstance(e, list) and len(e) == 3 and isinstance(e[0], tuple):
        return [order[e[0]], e[1], e[2]]
    if isinstance(e, list):
        return [_resolve(v, order) for v in e]
    return e


def assemble(index: dict[str, dict], packed: dict[tuple[str, str], Packed], meta: dict) -> bytes:
    """The blob: magic, header length, checksum, compressed header, sections in a fixed order."""
    keys = sorted(packed)
    order = {k: i for i, k in enumerate(keys)}
    header = {"sections": [[packed[k].method, packed[k].width, len(packed[k].data)] for k in keys],
              "tensors": _resolve(index, order), "meta": meta}
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = head + b"".join(packed[k].data for k in keys)
    return BLOB_MAGIC + struct.pack("<I", len(head)) + hashlib.sha256(body).digest()[:8] + body


def pack_sections(lay: Layout, cache: SectionCache, methods: list[str], shuffle: bool | None) -> dict:
    """Compress every section: one method, or the smallest of several; byte shuffle on, off, or tried (None)."""
    choices = {}
    for key, raw in lay.raw.items():
        width = np.dtype(DTYPES[key[1]]).itemsize
        widths = [1] if width == 1 or shuffle is False else ([width] if shuffle else [1, width])
        choices[key] = (bytes(raw), widths)
    cache.warm([(raw, m, w) for raw, widths in choices.values() for m in methods for w in widths])
    return {key: cache.best(raw, methods, widths) for key, (raw, widths) in choices.items()}
