"""Does FP8 (-f8 1: the lm head; -f8 2: the head and the MLP) train like bf16?
`llmpy train` runs as a user types them, from one init on the same data, -f8 0 and each
-f8 of --fp8; then the train losses step by step and the val losses side by side.

    python bench/fp8_loss.py --model d12 -b 16 -t 1024 -d 65536 -x 200 [--fp8 1,2]

Data: tinyshakespeare from the cache (`llmpy data tinyshakespeare` builds it), or -i/-j
(bench/code_shards.py makes shards that a 200-step run does not repeat).
Prints a table every --every steps, the largest and the mean |difference| over the last
quarter, and exits 1 if a mean over the last quarter exceeds --tol (0.02 by default; bf16
runs of different kernels differ by ~0.005 there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, args, fp8: int) -> tuple[list[float], list[tuple[int, float]]]:
    cmd = [sys.executable, "-m", "llmpy", "train", "--engine", "triton", "-e", args.model,
           "-b", str(args.batch), "-t", str(args.seq_len), "-d", str(args.total),
           "-x", str(args.steps), "-v", str(args.val_every), "-m", "1", "-s", "0",
           "-o", str(out), "-f8", str(fp8), "--seed", "1337"]
    if args.train:
        cmd += ["-i", args.train, "-j", args.val]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        sys.exit(f"fp8_loss: -f8 {fp8} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [(row["train_loss"], row["norm"]) for row in rows if "train_loss" in row]
    val = [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
    print(f"-f8 {fp8}: {len(train)} steps in {time.time() - t0:.0f} s", flush=True)
    return train, val


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("-b", dest="batch", type=int, default=16)
    ap.add_argument("-t", dest="seq_len", type=int, default=1024)
    ap.add_argument("-d", dest="total", type=int, default=65536)
    ap.add_argument("-x", dest="steps", type=int, default=200)
    ap.add_argument("-v", dest="val_every", type=int, default=50)
    ap.add_argument("-i", dest="train", default=None)
    ap.add_argument("-j", dest="val", default=None)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--tol", type=float, default=0.02)
    ap.add_argument("--fp8", default="1", help="the -f8 setting(s) to compare with -f8 0, "
                    "comma-separated (1; 1,2 runs three trainings)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    fp8s = args.fp8.split(",")
    if not fp8s or any(f not in ("1", "2") for f in fp8s) or len(set(fp8s)) < len(fp8s):
        print(f"fp8_loss: --fp8 {args.fp8!r}: expected 1, 2 or 1,2", file=sys.stderr)
        return 2
    fp8s = [int(f) for f in fp8s]
    if (args.train is None) != (args.val is None):
        print(f"fp8_loss: -i {args.train} -j {args.val}: expected both (train and val shards) "
              f"or neither (tinyshakespeare)", file=sys.stderr)
        return 2
    if args.steps < 4:
        print(f"fp8_loss: -x {args.steps}: expected at least 4 steps (the comparison is over "
              f"the last quarter)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(Path(tmp) / f"f8_{f}", args, f) for f in [0] + fp8s]
    (b_train, b_val), others = runs[0], runs[1:]
    n = min(len(r[0]) for r in runs)
    print(f"{args.model}, B={args.batch} T={args.seq_len}, {args.total} tokens/step, {n} "
          f"steps, -f8 0 against -f8 {args.fp8}")
    print(f"{'step':>5s} {'bf16 loss':>10s} {'bf16 norm':>10s}" +
          "".join(f" {f'f8 {f} loss':>10s} {'diff':>8s} {'norm':>8s}" for f in fp8s))
    for s in list(range(0, n, args.every)) + [n - 1]:
        print(f"{s:5d} {b_train[s][0]:10.4f} {b_train[s][1]:10.4f}" +
              "".join(f" {t[s][0]:10.4f} {t[s][0] - b_train[s][0]:+8.4f} {t[s][1]:8.4f}"
                      for t, _ in others))
    for i, (s, bv) in enumerate(b_val):
        print(f"val at step {s}: bf16 {bv:.4f}" +
              "".join(f"  -f8 {f} {v[i][1]:.4f} ({v[i][1] - bv:+.4f})"
                      for f, (_, v) in zip(fp8s, others)))
    tail = range(n - n // 4, n)
    worst = 0.0
    for f, (f_train, _) in zip(fp8s, others):
        diffs = [f_train[s][0] - b_train[s][0] for s in tail]
        mean_abs = sum(abs(x) for x in diffs) / len(diffs)
        worst = max(worst, mean_abs)
        whole = max(abs(f_train[s][0] - b_train[s][0]) for s in range(n))
        print(f"-f8 {f}, last {len(diffs)} steps: mean |diff| {mean_abs:.4f}, mean diff "
              f"{sum(diffs) / len(diffs):+.4f}, max |diff| {max(abs(x) for x in diffs):.4f} "
              f"(whole run max |diff| {whole:.4f})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
