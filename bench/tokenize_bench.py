"""Tokenize throughput: MB of document text per second through the stage's encoder, per process count.

Cuts the first --mb MB (whole lines) of a jsonl or jsonl.zst corpus into a plain jsonl file (untimed;
.zst is read with the zstandard package or the zstd command), then runs the tokenize stage's encoding
path (stages.tokenize.tokenize_documents: parse, encode, hash, shard writing) on it for each process
count. 'cold' includes starting the worker processes, as one stage run does; 'warm' reuses a started
pool, which is what a multi-GB corpus sees. The outputs of every run must be byte-identical.

    python bench/tokenize_bench.py --corpus ../shared/data/bench_corpus/part_0.jsonl.zst --mb 30 \
        --procs 1 2 --out /tmp/tokbench
    # GPU machine (16 cores, torch image: no zstandard needed if the zstd command or a .jsonl is there)
    python3 bench/tokenize_bench.py --corpus /path/part_0.jsonl.zst --procs 1 2 4 8 16 --out $OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.docs import open_binary  # noqa: E402
from stages.encoding import init_worker, make_pool  # noqa: E402
from stages.tokenize import EMBEDDED_TOKENIZER, tokenize_documents  # noqa: E402


def cut_corpus(src: Path, dst: Path, mb: float) -> int:
    """The first ``mb`` MB of ``src`` (0 = all), whole lines, as plain jsonl; returns the bytes written."""
    limit = int(mb * 1e6) if mb else float("inf")
    written, rest = 0, b""
    with open_binary(src) as fh, open(dst, "wb") as out:
        while written < limit:
            block = fh.read(1 << 20)
            if not block:
                if len(rest) <= limit - written:  # the last line, without a newline
                    out.write(rest)
                    written += len(rest)
                break
            data = rest + block
            room = limit - written
            cut = data.rfind(b"\n", 0, int(min(room, len(data)))) + 1
            out.write(data[:cut])
            written += cut
            rest = data[cut:]
            if room <= len(data):
                break
        while fh.read(1 << 20):  # read to the end: a zstd child process then exits cleanly
            pass
    return written


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cpu(who: int) -> float:
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def run_once(corpus: Path, model: Path, procs: int, tmp: Path, val_docs: int, pool=None) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp))
    c_self, c_kids = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = tokenize_documents([corpus], model, out, val_docs, workers=procs, progress=False, pool=pool)
    wall = time.perf_counter() - t0
    main_cpu = cpu(resource.RUSAGE_SELF) - c_self
    # workers are reaped when a run's own pool ends, so their CPU time is known for cold runs only
    kids_cpu = cpu(resource.RUSAGE_CHILDREN) - c_kids if pool is None else None
    d = digest(out)
    shutil.rmtree(out)
    mb = r["text_bytes"] / 1e6
    row = {"wall_s": round(wall, 3), "mb_per_s": round(mb / wall, 3), "main_cpu_s": round(main_cpu, 3),
           "text_bytes": r["text_bytes"], "docs": sum(r["docs"].values()),
           "tokens": r["tokens"]["val"] + r["tokens"]["train"], "digest": d}
    if kids_cpu is not None:
        row["cpu_s"] = round(main_cpu + kids_cpu, 3)
        row["mb_per_cpu_s"] = round(mb / (main_cpu + kids_cpu), 3)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, type=Path, help="a .jsonl or .jsonl.zst file of {'text': ...} lines")
    p.add_argument("--mb", type=float, default=0, help="use the first MB of jsonl (0 = the whole file)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3, help="warm runs per process count (median reported)")
    p.add_argument("--tokenizer", type=Path, default=EMBEDDED_TOKENIZER)
    p.add_argument("--val-docs", type=int, default=100)
    p.add_argument("--out", required=True, type=Path, help="folder for tokenize_bench.json")
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: the system's)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tokbench-", dir=a.tmp))
    try:
        corpus = tmp / "corpus.jsonl"
        t0 = time.perf_counter()
        size = cut_corpus(a.corpus, corpus, a.mb)
        print(f"corpus: {size / 1e6:.1f} MB of jsonl from {a.corpus} in {time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        load0 = list(os.getloadavg())
        for procs in a.procs:
            cold = run_once(corpus, a.tokenizer, procs, tmp, a.val_docs)
            pool = make_pool(procs, init_worker, (str(a.tokenizer),)) if procs > 1 else None
            try:
                warm = [run_once(corpus, a.tokenizer, procs, tmp, a.val_docs, pool) for _ in range(a.repeat)]
            finally:
                if pool is not None:
                    pool.terminate()
            row = {"procs": procs, "cold_mb_per_s": cold["mb_per_s"], "cold_wall_s": cold["wall_s"],
                   # CPU cost of the text, all processes: equal across procs = no parallel overhead
                   "cold_mb_per_cpu_s": cold["mb_per_cpu_s"],
                   # the main process alone (reading, ordering, writing) could keep up with this much
                   "main_ceiling_mb_per_s": round(cold["text_bytes"] / 1e6 / max(cold["main_cpu_s"], 1e-9), 1)
                   if procs > 1 else None,
                   "warm_mb_per_s": statistics.median(r["mb_per_s"] for r in warm),
                   "warm_runs_mb_per_s": [r["mb_per_s"] for r in warm], "digest": cold["digest"],
                   "identical": all(r["digest"] == cold["digest"] for r in warm)}
            results.append(row)
            print(f"procs {procs:3d}: cold {row['cold_mb_per_s']:8.2f} MB/s  warm {row['warm_mb_per_s']:8.2f} MB/s "
                  f"(runs {row['warm_runs_mb_per_s']})  {row['cold_mb_per_cpu_s']:.2f} MB per CPU-s  "
                  f"main-process ceiling {row['main_ceiling_mb_per_s']} MB/s", flush=True)
        base = results[0]["warm_mb_per_s"]
        for row in results:
            row["speedup_warm"] = round(row["warm_mb_per_s"] / base, 2)
        identical = len({r["digest"] for r in results}) == 1 and all(r["identical"] for r in results)
        import sentencepiece
        report = {"bench": "tokenize", "corpus": str(a.corpus), "jsonl_mb": round(size / 1e6, 3),
                  "text_mb": round(cold["text_bytes"] / 1e6, 3), "docs": cold["docs"], "tokens": cold["tokens"],
                  "tokenizer": a.tokenizer.name, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(), "sentencepiece": sentencepiece.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "load_avg_before_after": [load0, list(os.getloadavg())], "outputs_identical": identical, "results": results}
        (a.out / "tokenize_bench.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)
        if not identical:
            sys.exit("outputs differ between process counts")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
