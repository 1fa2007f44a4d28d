"""The weights blob, decoding side: checksum, per-section decompression, dequantization (shipped code).

Shipped with the artifact (the evaluator calls ``decode_weights``), so it depends on torch, numpy and
the standard library, plus zstandard or brotli only when a section of the blob was made with them.
The encoding side (compressors, clip search, GPTQ) lives in ``gpt.qpack`` and ``gpt.gptq``,
which do not ship.

Blob layout: b"GOLFQ2" | u32 header length | 8-byte sha256 prefix of everything after it |
zlib-compressed JSON header | sections. The header lists the sections (compressor, byte-shuffle
width, compressed length) and, per tensor, its scheme and where its arrays lie: ``[section, offset,
bytes]`` inside the decompressed section. Integer tensors hold per-row int8 values and float16
scales, optionally a stored row order and low-rank correction factors (themselves integer tensors).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import zlib

import numpy as np
import torch

BLOB_MAGIC = b"GOLFQ2"
DTYPES = {"i8": np.int8, "f16": np.float16, "f32": np.float32, "i32": np.int32}


class BlobError(ValueError):
    """A weights blob that cannot be decoded (truncated, corrupted or of another format)."""


def decompress(data: bytes, method: str) -> bytes:
    if method == "zlib":
        return zlib.decompress(data)
    if method == "lzma":
        return lzma.decompress(data)
    if method == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data)
    if method == "brotli":
        import brotli
        return brotli.decompress(data)
    if method == "none":
        return data
    raise BlobError(f"unknown compressor {method!r}")


def unshuffle(data: bytes, width: int) -> bytes:
    """Invert the byte shuffle: the k-th bytes of all elements were stored together, k = 0..width-1."""
    if width <= 1:
        return data
    n = len(data) // width * width
    return np.frombuffer(data, np.uint8, n).reshape(width, -1).T.tobytes() + data[n:]


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def dequantize_entry(t: dict) -> torch.Tensor:
    """One integer tensor back to float32: values x row scales, rows put back in order, plus A @ B."""
    w = dequantize_rows(t["q"], t["scale"])
    if t.get("perm") is not None:
        out = torch.empty_like(w)
        out[t["perm"].long()] = w
        w = out
    if t.get("lqer") is not None:
        at, b = (dequantize_entry(f) for f in t["lqer"])  # A is stored transposed: r rows, r scales
        w = w + at.T @ b.reshape(at.shape[0], -1)  # B may be stored as groups of values (asym LQER): back to r rows
    return w


def decode_weights(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """The dequantized float32 state dict and the metadata stored with it."""
    if blob[:6] != BLOB_MAGIC:
        raise BlobError("not a golf weights blob (bad magic" + (", an older GOLFQ1 blob)" if blob[:6] == b"GOLFQ1" else ")"))
    if len(blob) < 18:
        raise BlobError(f"weights blob is truncated ({len(blob)} bytes)")
    if hashlib.sha256(blob[18:]).digest()[:8] != blob[10:18]:
        raise BlobError("weights blob is corrupt (checksum mismatch: truncated or altered bytes)")
    try:
        (hlen,) = struct.unpack("<I", blob[6:10])
        header = json.loads(zlib.decompress(blob[18:18 + hlen]))
        pos, sections = 18 + hlen, []
        for method, width, n in header["sections"]:
            sections.append(unshuffle(decompress(blob[pos:pos + n], method), width))
            pos += n
    except BlobError:
        raise
    except Exception as e:  # every decoder raises its own type
        raise BlobError(f"weights blob is corrupt ({type(e).__name__}: {e})") from None

    def array(ref: list, dtype: str, shape) -> torch.Tensor:
        sec, lo, n = ref
        size = np.dtype(DTYPES[dtype]).itemsize
        if sec >= len(sections) or lo + n > len(sections[sec]) or n % size:
            raise BlobError(f"weights blob header points outside section {sec}")
        return torch.from_numpy(np.frombuffer(sections[sec], DTYPES[dtype], n // size, lo).reshape(shape).copy())

    def entry(t: dict) -> dict:
        rows = t["shape"][0]
        return {"q": array(t["q"], "i8", t["shape"]), "scale": array(t["sc"], "f16", [rows]),
                "perm": array(t["perm"], "i32", [rows]) if "perm" in t else None,
                "lqer": [entry(f) for f in t["lqer"]] if "lqer" in t else None}

    out = {}
    for name, t in header["tensors"].items():
        if t["s"] == "int":
            out[name] = dequantize_entry(entry(t))
        else:
            out[name] = array(t["v"], t["s"], t["shape"]).float()
    return out, header["meta"]
