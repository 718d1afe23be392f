"""Dataset preparation throughput and memory: a FineWeb-style build on a synthetic corpus.

Writes a synthetic corpus in FineWeb's schema (text, id, dump, url, date, file_path,
language, language_score, token_count) of about --chars characters, and again at twice
the size, then runs `llmpy data fineweb --input ...` on each in a fresh process and reports
tokens/s and the peak resident set of the main process (VmHWM on Linux, else getrusage
RUSAGE_SELF: ru_maxrss survives exec, so it would count the bench's own corpus writing) and
of the largest tokenizer worker (RUSAGE_CHILDREN). The builder streams documents and keeps a
bounded number of chunks in flight, so the peak RSS should stay well under 1 GB and not
grow with the input.

    python bench/data_prep.py [--chars 50e6] [--workers N] [--shard-size 1e8] [--format parquet]

Validates before it reports: the shards hold exactly one EOT per document, their first
tokens equal the GPT-2 encoding of the first documents, and the token count is the same
for any number of workers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llmpy.formats import open_shard  # noqa: E402
from llmpy.tokenizer import get_tokenizer  # noqa: E402

# English-ish words with the punctuation, digits and the odd non-ASCII that web text has
WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his "
         "from at which but have an they you were her she there been one all we their has "
         "would when if so no will more can out about time people year new first other "
         "government history science data model city water school market health music "
         "Rome Paris 2013 1,200 3.5% (see below) e.g. U.S. café naïve — “quoted” don't "
         "we'll it's #tags http://example.com/page?id=42 @user 東京 🙂").split(" ")
# and made-up words, so that BPE has merges to do (real text is not all whole-word tokens)
SYLLABLES = ("ka ron ti ble ment ex pro sta tion ver al in der qua zo lu phy graph ic ous "
             "ness ing ed er ly un re co mis tra vel dom ique schw ach yr").split()


def random_word(rng: random.Random) -> str:
    if rng.random() < 0.75:
        return rng.choice(WORDS)
    w = "".join(rng.choices(SYLLABLES, k=rng.randint(1, 4)))
    return w.capitalize() if rng.random() < 0.2 else w


def write_corpus(path: Path, chars: float, fmt: str, seed: int = 0) -> tuple[int, int]:
    """About `chars` characters of documents (lengths like web pages: lognormal, median
    ~2,000 characters); returns (documents, characters)."""
    rng = random.Random(seed)
    ndocs = nchars = 0
    batch: list[dict] = []
    writer = None
    f = None
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
    else:
        f = open(path, "w", encoding="utf-8")

    def flush():
        nonlocal writer
        if fmt == "parquet":
            table = pa.Table.from_pylist(batch)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)
        batch.clear()

    while nchars < chars:
        n_words = max(5, int(rng.lognormvariate(5.8, 0.9)))
        words = [random_word(rng) for _ in range(n_words)]
        # sentences and paragraphs
        for i in range(12, n_words, 15):
            words[i] += "." if i % 90 else ".\n\n"
        text = " ".join(words)
        batch.append({"text": text, "id": f"<urn:uuid:{ndocs:032x}>", "dump": "CC-MAIN-2013-20",
                      "url": f"http://example.com/{ndocs}", "date": "2013-05-18T07:24:47Z",
                      "file_path": "s3://commoncrawl/crawl-data/x.warc.gz", "language": "en",
                      "language_score": 0.93, "token_count": 0})
        ndocs += 1
        nchars += len(text)
        if len(batch) == 2000:
            flush()
    if batch:
        flush()
    if writer is not None:
        writer.close()
    if f is not None:
        f.close()
    return ndocs, nchars


RUNNER = """
import json, resource, sys, time
from llmpy.data.fineweb import build_fineweb
inp, out, shard_size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
res = build_fineweb("fineweb", "10B", out, [inp], shard_size=shard_size, workers=workers,
                    progress=False)
dt = time.perf_counter() - t
me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:  # ru_maxrss survives exec (it would include the bench's own peak); VmHWM does not
    me = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
except (OSError, StopIteration):
    pass
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": dt, "tokens": res["tokens"], "shards": len(res["shards"]),
                  "docs": res["docs"], "rss_main_kb": me, "rss_worker_kb": kids}))
"""


def run_build(inp: Path, out: Path, shard_size: int, workers: int) -> dict:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(inp), str(out), str(shard_size),
                           str(workers)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"build failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def validate(out: Path, inp: Path, ndocs: int, fmt: str) -> np.ndarray:
    shards = sorted(out.glob("fineweb_*.bin"), key=lambda p: p.name.rsplit("_", 1)[-1])
    eots = sum(int((open_shard(p) == 50256).sum()) for p in shards)
    assert eots == ndocs, f"{eots} EOTs for {ndocs} documents"
    # the first documents, encoded here, are the first tokens of shard 0
    if fmt == "parquet":
        import pyarrow.parquet as pq
        texts = pq.ParquetFile(inp).read_row_group(0, columns=["text"]).column(0).to_pylist()
    else:
        with open(inp, encoding="utf-8") as f:
            texts = [json.loads(next(f))["text"] for _ in range(500)]
    tok = get_tokenizer()
    ref = []
    for t in texts[:500]:
        ref += [50256] + tok.encode(t)
    np.testing.assert_array_equal(open_shard(shards[0])[:len(ref)], ref)
    return shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chars", type=float, default=50e6, help="characters of the first corpus")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--shard-size", type=float, default=1e8)
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    p.add_argument("--scales", default="1,2", help="corpus sizes as multiples of --chars")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    a = p.parse_args()
    if a.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            a.format = "jsonl"
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="llmpy_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"# cpus {os.cpu_count()}, workers {a.workers}, shard size {int(a.shard_size):,}, "
          f"{a.format} input, scratch {tmp}")
    print(f"{'corpus chars':>14} {'docs':>8} {'tokens':>12} {'shards':>6} {'seconds':>8} "
          f"{'tok/s':>10} {'Mchar/s':>7} {'RSS main MB':>11} {'RSS worker MB':>13}")
    rows = []
    scales = [float(x) for x in a.scales.split(",")]
    for scale in scales:
        inp = tmp / f"corpus_{scale:g}.{a.format}"
        ndocs, nchars = write_corpus(inp, a.chars * scale, a.format, seed=int(scale * 10))
        out = tmp / f"out_{scale:g}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_build(inp, out, int(a.shard_size), a.workers)
        validate(out, inp, ndocs, a.format)
        rows.append(r)
        print(f"{nchars:>14,} {ndocs:>8,} {r['tokens']:>12,} {r['shards']:>6} "
              f"{r['seconds']:>8.1f} {r['tokens'] / r['seconds']:>10,.0f} "
              f"{nchars / r['seconds'] / 1e6:>7.2f} {r['rss_main_kb'] / 1024:>11.0f} "
              f"{r['rss_worker_kb'] / 1024:>13.0f}", flush=True)
    peak = max(max(r["rss_main_kb"], r["rss_worker_kb"]) for r in rows) / 1024
    total = max(r["rss_main_kb"] + a.workers * r["rss_worker_kb"] for r in rows) / 1024
    growth = rows[-1]["rss_main_kb"] / rows[0]["rss_main_kb"]
    print(f"# peak RSS {peak:.0f} MB in one process, <= {total:.0f} MB main + workers "
          f"(< 1024: {total < 1024}); input x{scales[-1] / scales[0]:g} -> main RSS "
          f"x{growth:.2f}")


if __name__ == "__main__":
    main()
