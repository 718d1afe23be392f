"""Time one training step of the NumPy engine against its matmuls alone (d12, B=4, T=64).

DESIGN.md's target: on a 2-core CPU, one step (forward + backward + AdamW) within 1.5x the
time of the same step's matmuls, measured in the same process. llm.c's train_gpt2.c takes
about 2.55 s per step on this configuration.

    python bench/cpu_step.py [--model d12] [--batch 4] [--seq 64] [--steps 9]

Validates first (loss at init is ~ln V and finite; it falls over a few steps on one batch),
then times. The matmuls are recorded from one real step (every np.matmul call the engine
makes, with its operands' shapes and memory layouts) and replayed with np.matmul on
preallocated arrays of their own (so no weight is warm in cache that the step would read
cold). Steps and replays alternate, so both see the same load from other jobs on the
machine. Reports medians and minimums; when they disagree much the machine was busy (the
two-thread BLAS suffers most when a core is taken), so re-run.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llmpy.config import from_descriptor  # noqa: E402
from llmpy.engines import numpy as engine_module  # noqa: E402
from llmpy.engines import numpy_layers  # noqa: E402
from llmpy.engines.numpy import NumpyEngine  # noqa: E402


LLMC_STEP_S = 2.55   # llm.c's train_gpt2.c, one step of this configuration on 2 cores


class MatmulRecorder:
    """Stands in for the numpy module inside the engine: records each np.matmul call's
    operand layouts (shape, strides, dtype), passes everything else through."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(np, name)

    def matmul(self, a, b, out=None):
        result = np.matmul(a, b, out=out)
        self.calls.append(tuple((x.shape, x.strides, x.dtype) for x in (a, b, result)))
        return result


def strided_like(shape, strides, dtype, rng):
    """A preallocated array with the given shape and (byte) strides, filled with N(0, 1)."""
    itemsize = np.dtype(dtype).itemsize
    span = 1 + sum((n - 1) * abs(s) // itemsize for n, s in zip(shape, strides))
    base = rng.standard_normal(span).astype(dtype)
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=strides)


class Trainer:
    """Runs training steps on one batch exactly as the training loop does."""

    def __init__(self, engine, inputs, targets):
        self.engine, self.inputs, self.targets, self.t = engine, inputs, targets, 1

    def step(self, lr=1e-4):
        """One step (zero_grad, forward, backward, clip, AdamW); returns (loss, phase times)."""
        e = self.engine
        t0 = time.perf_counter()
        e.zero_grad()
        loss = e.forward(self.inputs, self.targets)
        t1 = time.perf_counter()
        e.backward()
        t2 = time.perf_counter()
        norm = e.grad_norm()
        e.step(lr, self.t, weight_decay=0.1, grad_scale=min(1.0, 1.0 / norm))
        t3 = time.perf_counter()
        self.t += 1
        return loss, (t3 - t0, t1 - t0, t2 - t1, t3 - t2)

    def record_matmuls(self):
        """Run one step with the recorder standing in for numpy; return its matmul calls."""
        rec = MatmulRecorder()
        saved = engine_module.np, numpy_layers.np
        engine_module.np = numpy_layers.np = rec
        try:
            self.step()
        finally:
            engine_module.np, numpy_layers.np = saved
        return rec.calls


def matmul_flops(calls):
    total = 0
    for (ashape, _, _), (bshape, _, _), (oshape, _, _) in calls:
        total += 2 * math.prod(oshape) * ashape[-1]
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=9, help="timed steps (median reported)")
    args = ap.parse_args(argv)

    cfg = from_descriptor(args.model)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]                     # (B, T) each
    engine = NumpyEngine(cfg)
    trainer = Trainer(engine, inputs, targets)
    print(f"numpy engine, {args.model}: {cfg.describe()}")
    print(f"B={B} T={T}, {os.cpu_count()} cores, numpy {np.__version__}")

    # -- validate: loss near ln V at init, finite, falling on one batch (also the warm-up)
    losses = [trainer.step(lr=1e-3)[0] for _ in range(4)]
    ln_v = math.log(cfg.vocab_size)
    print("validation: losses " + " ".join(f"{x:.4f}" for x in losses) + f" (ln V = {ln_v:.4f})")
    # logits at init have std ~0.02 sqrt(C) (0.55 at d12), which lifts the loss ~0.15 above ln V
    ok = all(math.isfinite(x) for x in losses) and abs(losses[0] - ln_v) < 0.5 \
        and losses[-1] < losses[0] - 0.01
    if not ok:
        print("validation FAILED: expected finite losses, the first near ln V, then falling")
        return 1
    # the engine's memory is at its peak after the first step (same shapes every step)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

    # -- the same step's matmuls: record them once, preallocate operands of the same layouts
    calls = trainer.record_matmuls()
    operands = [tuple(strided_like(*layout, rng) for layout in call) for call in calls]
    flops = matmul_flops(calls)

    def replay():
        t0 = time.perf_counter()
        for a, b, out in operands:
            np.matmul(a, b, out=out)
        return time.perf_counter() - t0

    # -- time: steps and matmul replays alternate, so both see the same machine load
    replay()
    times, mm_times = [], []
    for _ in range(args.steps):
        times.append(trainer.step()[1])
        mm_times.append(replay())
    med = [statistics.median(col) for col in zip(*times)]
    best = [min(col) for col in zip(*times)]
    mm_med, mm_best = statistics.median(mm_times), min(mm_times)

    print()
    print(f"{'':34s}{'median':>10s}{'min':>10s}")
    rows = [("step (fwd + bwd + AdamW)", med[0], best[0]),
            ("  forward + loss", med[1], best[1]),
            ("  backward", med[2], best[2]),
            ("  grad norm + AdamW", med[3], best[3]),
            (f"matmuls alone ({len(calls)} calls)", mm_med, mm_best)]
    for name, a, b in rows:
        print(f"{name:34s}{a:9.3f}s{b:9.3f}s")
    print(f"{'matmul rate':34s}{flops / mm_med / 1e9:8.1f} GFLOP/s ({flops / 1e9:.1f} GFLOP)")
    print(f"{'ratio step / matmuls':34s}{med[0] / mm_med:10.2f}{best[0] / mm_best:10.2f}"
          "   (target <= 1.5)")
    print(f"{'peak memory (ru_maxrss)':34s}{peak_gb:9.2f} GB  (target < 3 GB)")
    print(f"{'llm.c train_gpt2.c, for scale':34s}{LLMC_STEP_S:9.2f}s  (fp32 C, this configuration)")
    print(f"{'speed-up over llm.c':34s}{LLMC_STEP_S / med[0]:9.2f}x {LLMC_STEP_S / best[0]:9.2f}x"
          "  (target >= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
