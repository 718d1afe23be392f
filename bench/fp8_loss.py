"""Does FP8 (-f8 1: the lm head; -f8 2: the head and the MLP) train like bf16? Two
`llmpy train` runs as a user types them, from one init on the same data, -f8 0 and -f8
--fp8; then the train losses step by step and the val losses side by side.

    python bench/fp8_loss.py --model d12 -b 16 -t 1024 -d 65536 -x 200 [--fp8 2]

Data: tinyshakespeare from the cache (`llmpy data tinyshakespeare` builds it), or -i/-j.
Prints a table every --every steps, the largest and the mean |difference| over the last
quarter, and exits 1 if the mean over the last quarter exceeds --tol (0.02 by default; bf16
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
    ap.add_argument("--fp8", type=int, default=1, choices=(1, 2), help="the -f8 to compare "
                    "with -f8 0 (1)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        (b_train, b_val), (f_train, f_val) = (run(Path(tmp) / f"f8_{f}", args, f)
                                              for f in (0, args.fp8))
    n = min(len(b_train), len(f_train))
    print(f"{args.model}, B={args.batch} T={args.seq_len}, {args.total} tokens/step, {n} "
          f"steps, -f8 0 against -f8 {args.fp8}")
    print(f"{'step':>5s} {'bf16 loss':>10s} {'fp8 loss':>10s} {'diff':>8s} {'bf16 norm':>10s} "
          f"{'fp8 norm':>9s}")
    for s in list(range(0, n, args.every)) + [n - 1]:
        print(f"{s:5d} {b_train[s][0]:10.4f} {f_train[s][0]:10.4f} "
              f"{f_train[s][0] - b_train[s][0]:+8.4f} {b_train[s][1]:10.4f} {f_train[s][1]:9.4f}")
    b_train, f_train = [x[0] for x in b_train], [x[0] for x in f_train]
    for (s, bv), (_, fv) in zip(b_val, f_val):
        print(f"val at step {s}: bf16 {bv:.4f}  fp8 {fv:.4f}  diff {fv - bv:+.4f}")
    tail = range(n - n // 4, n)
    diffs = [f_train[s] - b_train[s] for s in tail]
    mean_abs = sum(abs(x) for x in diffs) / len(diffs)
    print(f"last {len(diffs)} steps: mean |diff| {mean_abs:.4f}, mean diff "
          f"{sum(diffs) / len(diffs):+.4f}, max |diff| {max(abs(x) for x in diffs):.4f} "
          f"(whole run max |diff| {max(abs(f_train[s] - b_train[s]) for s in range(n)):.4f})")
    return 0 if mean_abs <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
