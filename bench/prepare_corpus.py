"""Lay out benchmark documents for the tokenize stage: the FineWeb sample first (it becomes the val split
with tokenize.val_docs=902, token for token the official val prefix), then bench_corpus parts as train.

    python bench/prepare_corpus.py --corpus ../shared/data/bench_corpus --parts 0,1,2 --out /tmp/bench_docs
    golf run --preset baseline --set tokenize.source=/tmp/bench_docs --set tokenize.val_docs=902

bench_corpus is for benchmarks only (research licences): it is read from where it lies, never copied here.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

FINEWEB_SAMPLE = Path(__file__).resolve().parent.parent / "golf" / "data" / "fineweb_sample" / "docs.jsonl"


def decompress(src: Path, dst: Path) -> None:
    try:
        import zstandard
    except ImportError:  # no python package: the zstd command line does the same
        with open(dst, "wb") as out:
            subprocess.run(["zstd", "-dc", str(src)], stdout=out, check=True)
        return
    with open(src, "rb") as f, open(dst, "wb") as out:
        zstandard.ZstdDecompressor().copy_stream(f, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True, help="folder with part_N.jsonl.zst")
    p.add_argument("--parts", default="0", help="comma-separated part numbers")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FINEWEB_SAMPLE, a.out / "00_fineweb_val.jsonl")
    for i, part in enumerate(a.parts.split(","), 1):
        dst = a.out / f"{i:02d}_bench_part_{part}.jsonl"
        if not dst.exists():
            decompress(a.corpus / f"part_{part}.jsonl.zst", dst)
        print(f"{dst}: {dst.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
