"""Quantized weight format: per-row integer quantization, packing, compression, and the way back.

Shipped with the artifact (the evaluator needs ``decode_weights``), so it depends on torch, numpy
and the standard library, plus zstandard or brotli only when the blob was made with them.

Blob layout: b"GOLFQ1" | u32 header length | JSON header | compressed payload. The header names the
compressor and, per tensor, its shape, scheme ("int" with bits, or "float16"/"float32") and the byte
ranges of its values and scales inside the decompressed payload.
"""

from __future__ import annotations

import json
import lzma
import struct
import zlib

import numpy as np
import torch

BLOB_MAGIC = b"GOLFQ1"


class BlobError(ValueError):
    """A weights blob that cannot be decoded (truncated, corrupted or of another format)."""


def quantize_rows(w: torch.Tensor, bits: int, clip_percentile: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D tensor: int8 values in [-qmax, qmax] and fp16 scales."""
    assert w.ndim == 2, w.shape
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    a = w.abs()
    if clip_percentile >= 100.0:
        clip = a.amax(dim=1)
    else:
        clip = torch.quantile(a, clip_percentile / 100.0, dim=1)
    scale = (clip / qmax).clamp_min(1e-12).to(torch.float16)
    q = torch.round(w / scale.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def compress(data: bytes, method: str, level: int) -> bytes:
    if method == "zlib":
        return zlib.compress(data, level)
    if method == "lzma":
        return lzma.compress(data, preset=min(level, 9) | lzma.PRESET_EXTREME)
    if method == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=level).compress(data)
    if method == "brotli":
        import brotli
        return brotli.compress(data, quality=min(level, 11))
    if method == "none":
        return data
    raise ValueError(f"unknown compressor {method!r} (zlib, lzma, zstd, brotli, none)")


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


def encode_weights(tensors: dict[str, dict], meta: dict, method: str, level: int) -> bytes:
    """Pack {name: {"q": int8, "scale": fp16} or {"float": tensor}} and compress into one blob."""
    chunks, index, offset = [], {}, 0

    def put(arr: np.ndarray) -> list[int]:
        nonlocal offset
        raw = np.ascontiguousarray(arr).tobytes()
        chunks.append(raw)
        span = [offset, len(raw)]
        offset += len(raw)
        return span

    for name, t in tensors.items():
        if "q" in t:
            index[name] = {"scheme": "int", "bits": t["bits"], "shape": list(t["q"].shape),
                           "values": put(t["q"].numpy()), "scales": put(t["scale"].numpy())}
        else:
            f = t["float"]
            dtype = "float16" if f.dtype == torch.float16 else "float32"
            index[name] = {"scheme": dtype, "shape": list(f.shape), "values": put(f.numpy())}
    header = json.dumps({"compressor": method, "meta": meta, "tensors": index}).encode()
    payload = compress(b"".join(chunks), method, level)
    return BLOB_MAGIC + struct.pack("<I", len(header)) + header + payload


def decode_weights(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """The dequantized float32 state dict and the metadata stored with it."""
    if blob[:6] != BLOB_MAGIC:
        raise BlobError("not a golf weights blob (bad magic)")
    try:
        (hlen,) = struct.unpack("<I", blob[6:10])
        header = json.loads(blob[10:10 + hlen])
        payload = decompress(blob[10 + hlen:], header["compressor"])
    except BlobError:
        raise
    except Exception as e:  # truncated or corrupted: every decoder raises its own type
        raise BlobError(f"weights blob is corrupt ({type(e).__name__}: {e})") from None
    out = {}
    for name, t in header["tensors"].items():
        lo, n = t["values"]
        if lo + n > len(payload):
            raise BlobError(f"weights blob is truncated at tensor {name}")
        if t["scheme"] == "int":
            q = torch.from_numpy(np.frombuffer(payload, dtype=np.int8, count=n, offset=lo).reshape(t["shape"]).copy())
            slo, sn = t["scales"]
            s = torch.from_numpy(np.frombuffer(payload, dtype=np.float16, count=sn // 2, offset=slo).copy())
            out[name] = dequantize_rows(q, s)
        else:
            dt = np.float16 if t["scheme"] == "float16" else np.float32
            arr = np.frombuffer(payload, dtype=dt, count=n // np.dtype(dt).itemsize, offset=lo)
            out[name] = torch.from_numpy(arr.reshape(t["shape"]).astype(np.float32))
    return out, header["meta"]
