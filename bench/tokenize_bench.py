"""Tokenize throughput: MB of document text per second through the stage's encoder, per process count.

Cuts the first --mb MB (whole lines) of a jsonl or jsonl.zst corpus into a plain jsonl file (untimed;
.zst is read with the zstandard package or the zstd command), then runs the tokenize stage's encoding
path (stages.tokenize.tokenize_documents: parse, encode, hash, shard writing) on it for each process
count. 'cold' includes starting the worker processes, as one stage run does; 'warm' reuses a started
pool, which is what a multi-GB corpus sees. The outputs of every run must be byte-identical.

``--ceiling`` also measures what the machine allows at all: N processes, each encoding its own share of
the same documents already parsed in memory (no reading, no inter-process traffic, no ordering), started
together behind a barrier. Its speed-up at N is the most any pipeline could get from N processes there.

    python bench/tokenize_bench.py --corpus ../shared/data/bench_corpus/part_0.jsonl.zst --mb 30 \
        --procs 1 2 --out /tmp/tokbench
    # GPU machine (16 cores, torch image: no zstandard needed if the zstd command or a .jsonl is there)
    python3 bench/tokenize_bench.py --corpus /path/part_0.jsonl.zst --procs 1 2 4 8 16 --out $OUT
    # with a text transform: its tokenizer and --transform (the documents go through it before encoding)
    python bench/tokenize_bench.py --corpus golf/data/fineweb_sample/docs.jsonl --procs 1 --out /tmp/tokbench \
        --tokenizer golf/data/fineweb_sample/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \
        --transform caseops_v1
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

from tokenizing.docs import CHUNK_BYTES, open_binary  # noqa: E402
from tokenizing.encoding import init_worker, make_pool  # noqa: E402
from stages.tokenize import EMBEDDED_TOKENIZER, tokenize_documents  # noqa: E402


def cut_corpus(sources: list[Path], dst: Path, mb: float) -> int:
    """The first ``mb`` MB (0 = all) of the sources one after another, whole lines, as plain jsonl; returns
    the bytes written."""
    written = 0
    with open(dst, "wb") as out:
        for src in sources:
            written += _cut_one(src, out, int(mb * 1e6) - written if mb else float("inf"))
            if mb and written >= int(mb * 1e6) * 0.999:
                break
    return written


def _cut_one(src: Path, out, limit) -> int:
    written, rest = 0, b""
    with open_binary(src) as fh:
        while written < limit:
            block = fh.read(1 << 20)
            if not block:
                if rest and len(rest) + 1 <= limit - written:  # the last line, without a newline
                    out.write(rest + b"\n")
                    written += len(rest) + 1
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


TRANSFORM = "none"  # tokenize.transform of every run (--transform)


def run_once(corpus: Path, model: Path, procs: int, tmp: Path, val_docs: int, pool=None, chunk_bytes: int = 0) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp))
    c_self, c_kids = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = tokenize_documents([corpus], model, out, val_docs, workers=procs, progress=False, pool=pool,
                           chunk_bytes=chunk_bytes, transform=TRANSFORM)
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


def measure(corpus: Path, model: Path, procs: int, tmp: Path, val_docs: int, repeat: int, chunk_bytes: int) -> dict:
    """Cold and warm throughput of the stage's encoding path at one process count and chunk size."""
    cold = run_once(corpus, model, procs, tmp, val_docs, chunk_bytes=chunk_bytes)
    pool = make_pool(procs, init_worker, (str(model), TRANSFORM)) if procs > 1 else None
    try:
        if pool is not None:  # a spawned pool starts its workers in the background: one untimed pass first
            run_once(corpus, model, procs, tmp, val_docs, pool, chunk_bytes)
        warm = [run_once(corpus, model, procs, tmp, val_docs, pool, chunk_bytes) for _ in range(repeat)]
    finally:
        if pool is not None:
            pool.terminate()
    row = {"procs": procs, "chunk_kb": (chunk_bytes or CHUNK_BYTES) >> 10, "text_bytes": cold["text_bytes"],
           "docs": cold["docs"], "tokens": cold["tokens"], "cold_mb_per_s": cold["mb_per_s"],
           "cold_wall_s": cold["wall_s"],
           # CPU cost of the text, all processes: equal across procs = no parallel overhead
           "cold_mb_per_cpu_s": cold["mb_per_cpu_s"],
           # the main process alone (reading, ordering, writing) could keep up with this much
           "main_ceiling_mb_per_s": round(cold["text_bytes"] / 1e6 / max(cold["main_cpu_s"], 1e-9), 1)
           if procs > 1 else None,
           "warm_mb_per_s": statistics.median(r["mb_per_s"] for r in warm),
           "warm_runs_mb_per_s": [r["mb_per_s"] for r in warm], "digest": cold["digest"],
           "identical": all(r["digest"] == cold["digest"] for r in warm)}
    print(f"procs {procs:3d} chunk {row['chunk_kb']} KiB: cold {row['cold_mb_per_s']:8.2f} MB/s  "
          f"warm {row['warm_mb_per_s']:8.2f} MB/s "
          f"(runs {row['warm_runs_mb_per_s']})  {row['cold_mb_per_cpu_s']:.2f} MB per CPU-s  "
          f"main-process ceiling {row['main_ceiling_mb_per_s']} MB/s", flush=True)
    return row


def _ceiling_worker(corpus: str, model: str, rank: int, procs: int, barrier, results) -> None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    with open(corpus, "rb") as fh:
        texts = [json.loads(line)["text"] for i, line in enumerate(fh) if i % procs == rank]
    barrier.wait()
    t0 = time.perf_counter()
    sp.encode(texts, out_type=int, num_threads=1)
    results.put((rank, t0, time.perf_counter(), sum(len(t.encode("utf-8")) for t in texts)))


def ceiling(corpus: Path, model: Path, procs: int) -> dict:
    """Wall time of ``procs`` processes encoding disjoint shares of the corpus, all started together."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_ceiling_worker, args=(str(corpus), str(model), r, procs, barrier, results))
          for r in range(procs)]
    for p in ps:
        p.start()
    rows = [results.get() for _ in ps]
    for p in ps:
        p.join()
    wall = max(r[2] for r in rows) - min(r[1] for r in rows)
    mb = sum(r[3] for r in rows) / 1e6
    return {"procs": procs, "wall_s": round(wall, 3), "mb_per_s": round(mb / wall, 3),
            "slowest_over_fastest": round(max(r[2] - r[1] for r in rows) / min(r[2] - r[1] for r in rows), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, type=Path, nargs="+",
                   help=".jsonl or .jsonl.zst files of {'text': ...} lines, used in this order")
    p.add_argument("--mb", type=float, default=0, help="use the first MB of jsonl (0 = the whole file)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3, help="warm runs per process count (median reported)")
    p.add_argument("--chunk-kb", type=int, nargs="+", default=[0],
                   help="jsonl KiB per worker task, one row per value for each process count > 1 (0 = the stage's)")
    p.add_argument("--ceiling", action="store_true", help="also measure the no-IPC encoding ceiling per process count")
    p.add_argument("--tokenizer", type=Path, default=EMBEDDED_TOKENIZER)
    p.add_argument("--val-docs", type=int, default=100)
    p.add_argument("--transform", default="none", help="text transform before encoding (tokenize.transform)")
    p.add_argument("--out", required=True, type=Path, help="folder for tokenize_bench.json")
    p.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: the system's)")
    a = p.parse_args()
    global TRANSFORM
    TRANSFORM = a.transform
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tokbench-", dir=a.tmp))
    try:
        corpus = tmp / "corpus.jsonl"
        t0 = time.perf_counter()
        size = cut_corpus(a.corpus, corpus, a.mb)
        print(f"corpus: {size / 1e6:.1f} MB of jsonl from {[str(c) for c in a.corpus]} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        results = []
        load0 = list(os.getloadavg())
        for procs in a.procs:
            for chunk_kb in (a.chunk_kb if procs > 1 else [0]):
                results.append(measure(corpus, a.tokenizer, procs, tmp, a.val_docs, a.repeat, chunk_kb << 10))
        base = results[0]["warm_mb_per_s"]
        for row in results:
            row["speedup_warm"] = round(row["warm_mb_per_s"] / base, 2)
        ceilings = []
        if a.ceiling:
            for procs in a.procs:
                ceilings.append(ceiling(corpus, a.tokenizer, procs))
                ceilings[-1]["speedup"] = round(ceilings[-1]["mb_per_s"] / ceilings[0]["mb_per_s"], 2)
                print(f"ceiling, {procs:3d} processes: {ceilings[-1]}", flush=True)
        identical = len({r["digest"] for r in results}) == 1 and all(r["identical"] for r in results)
        import sentencepiece
        report = {"bench": "tokenize", "transform": TRANSFORM, "corpus": [str(c) for c in a.corpus], "jsonl_mb": round(size / 1e6, 3),
                  "text_mb": round(results[0]["text_bytes"] / 1e6, 3), "docs": results[0]["docs"],
                  "tokens": results[0]["tokens"],
                  "tokenizer": a.tokenizer.name, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                  "python": platform.python_version(), "sentencepiece": sentencepiece.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "load_avg_before_after": [load0, list(os.getloadavg())], "outputs_identical": identical, "results": results,
                  "ceiling": ceilings}
        (a.out / "tokenize_bench.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "results"}), flush=True)
        if not identical:
            sys.exit("outputs differ between process counts")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
