"""Time full training steps of the torch and triton engines on one GPU, in one process.

DESIGN.md's target: the triton engine on one H200, d12, B=64, T=1024, 524,288 tokens per
step, at least 1.15x the tokens/s of the torch engine (torch.compile + flash attention), with
no higher peak memory. llm.c measured here: about 518K tokens/s (27.9 GB); its PyTorch
reference with compile and flash about 513K (36.0 GB).

    python bench/gpu_train.py --engines torch,triton --model d12 -b 64 -t 1024
    python bench/gpu_train.py --device cpu --model L=2,C=64,NH=4,T=64 -b 2 -t 32 \
        --total-batch 128 --steps 2 --warmup 1 --no-compile          (smoke run)

Each engine is built in turn (the previous one freed), from the same seed, and validated
before anything is timed: its first loss at init must be finite and near ln(V), and every
engine must agree with the first one on it within bf16 tolerance. Then `--warmup` untimed
and `--steps` timed full optimizer steps: zero_grad, forward/backward over the micro-batches
of one total batch, grad norm, AdamW with clipping to 1.0 folded in, synchronize. Data are
random tokens (the same for every engine, handed over as NumPy arrays, the engine
interface's input). Reports the median ms/step, tokens/s, model TFLOP/s (6N + 6LTC flops per
token, nanoGPT's estimate) against --peak-tflops, peak memory
(torch.cuda.max_memory_allocated) and the ratio of tokens/s to the first engine.

--profile K profiles K more steps of each engine with torch.profiler and splits the GPU
time per step into matmuls, attention, optimizer and other kernels (plus the idle gap to
the wall time), then lists the largest kernels.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llmpy.config import from_descriptor  # noqa: E402
from llmpy.errors import LlmpyError  # noqa: E402

# |first loss - first engine's first loss| allowed between engines: bf16 activations (and
# bf16 parameters in the triton engine) move the loss at init by ~1e-2 at most.
AGREE_TOL = 0.05
# relative difference of the first step's grad norm allowed between engines: bf16 moves it by a
# few percent (tests/test_gpu_train_configs.py); wrong gradients move it by far more (issue
# 14: the compiled torch engine's layernorm gradients were garbage while its loss agreed).
NORM_AGREE = 0.10
# |first loss - ln V| allowed at init: GPT-2's init gives logits of std ~0.02*sqrt(C).
INIT_TOL = 1.0


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="torch",
                    help="comma-separated: torch[,triton] (torch); triton:r0 / triton:flash / "
                         "triton:ge0 / triton:f8 (-f8 1) / triton:f82 (-f8 2) override that "
                         "entry's settings, and combine (triton:f82:r0)")
    ap.add_argument("--model", default="d12", help="descriptor: d12, gpt3:c768, L=..,C=..,NH=.. (d12)")
    ap.add_argument("-b", dest="batch", type=int, default=64, help="micro-batch size B (64)")
    ap.add_argument("-t", dest="seq_len", type=int, default=1024, help="sequence length T (1024)")
    ap.add_argument("--total-batch", type=int, default=524288, help="tokens per step (524288)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (5)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the torch engine (default: on for CUDA)")
    ap.add_argument("--dtype", default=None, help="torch engine dtype: bf16|fp32 (bf16 on CUDA)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--lr", type=float, default=6e-4, help="AdamW learning rate (6e-4)")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (0.1)")
    ap.add_argument("--seed", type=int, default=1337, help="init and data seed (1337)")
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="bf16 matmul ceiling for the utilization column (790: H200, measured)")
    ap.add_argument("--recompute", type=int, default=1, help="triton engine -r: 0, 1, 2 (1)")
    ap.add_argument("--attention", default="auto",
                    help="triton engine attention: auto|cudnn|flash (auto)")
    ap.add_argument("--profile", type=int, default=0,
                    help="profile this many extra steps per engine: time per kernel class (0)")
    return ap.parse_args(argv)


def engine_options(spec: str, args) -> dict:
    name, _, variant = spec.partition(":")
    opts = {"seed": args.seed, "device": args.device}
    if name == "torch":
        cuda = args.device.startswith("cuda")
        opts["dtype"] = args.dtype or ("bf16" if cuda else "fp32")
        opts["compile"] = cuda if args.compile is None else args.compile
    if name == "triton":
        opts.update(recompute=args.recompute, attention=args.attention)
        for v in filter(None, variant.split(":")):
            if v in ("r0", "r1", "r2"):
                opts["recompute"] = int(v[1])
            elif v in ("ge0", "ge1", "ge2"):
                opts["gelu_fusion"] = int(v[2])
            elif v in ("f8", "f82"):
                opts["fp8_head"] = 2 if v == "f82" else 1
            else:
                opts["attention"] = v
    return opts


# kernel name fragments -> class, first match wins (cuBLAS: nvjet/xmma/gemm/cutlass;
# attention: flash/fmha/cudnn sdpa; optimizer: ours, torch's fused AdamW)
KERNEL_CLASSES = [
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("optimizer", ("adamw", "adam", "multi_tensor")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "splitk", "s16816",
                "s1688", "wgmma")),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_engine(engine, batches, step0: int, args, sync, torch) -> str:
    """Profile args.profile steps; return a table of GPU ms per step by kernel class."""
    from torch.profiler import ProfilerActivity, profile
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for step in range(step0, step0 + args.profile):
            train_step(engine, batches, step, args)
        sync()
        wall = (time.perf_counter() - t0) / args.profile * 1e3
    per_class, per_kernel = {}, {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        if t <= 0:
            continue
        ms = t / 1e3 / args.profile
        cls = kernel_class(evt.key)
        per_class[cls] = per_class.get(cls, 0.0) + ms
        per_kernel[evt.key] = (per_kernel.get(evt.key, (0.0, 0))[0] + ms, evt.count)
    busy = sum(per_class.values())
    lines = [f"  {'class':10s} {'ms/step':>9s} {'share':>6s}"]
    for cls in ("matmul", "attention", "other", "optimizer"):
        ms = per_class.get(cls, 0.0)
        lines.append(f"  {cls:10s} {ms:9.1f} {100 * ms / wall:5.1f}%")
    lines.append(f"  {'idle':10s} {max(0.0, wall - busy):9.1f} {100 * max(0.0, wall - busy) / wall:5.1f}%"
                 f"   (wall {wall:.1f} ms/step under the profiler)")
    lines.append("  largest kernels (ms/step, calls over the profiled steps):")
    for name, (ms, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:14]:
        lines.append(f"    {ms:8.2f} {n:6d}  [{kernel_class(name)}] {name[:90]}")
    return "\n".join(lines)


def train_step(engine, batches, step: int, args) -> tuple[float, float]:
    """One optimizer step over the micro-batches; returns the mean loss and the grad norm."""
    engine.zero_grad()
    total = 0.0
    for x, y in batches:
        total += engine.forward(x, y)
        engine.backward(grad_scale=1.0 / len(batches))
    norm = engine.grad_norm()
    engine.step(args.lr, step + 1, args.weight_decay, grad_scale=min(1.0, 1.0 / norm))
    return total / len(batches), norm


def run_engine(name: str, config, batches, args, sync, torch) -> dict:
    from llmpy.engines import make_engine
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        left = torch.cuda.memory_allocated()
        if left > 2**20:  # the peak counts everything allocated: say so if anything is left
            print(f"{name}: {left / 1e9:.2f} GB still allocated before it is built (counted "
                  f"in its peak)")
    engine = make_engine(name.partition(":")[0], config, **engine_options(name, args))
    first_loss = engine.forward(*batches[0])
    lnV = math.log(config.vocab_size)
    if not math.isfinite(first_loss) or abs(first_loss - lnV) > INIT_TOL:
        raise SystemExit(f"{name}: first loss {first_loss:.4f} at init, expected finite and "
                         f"within {INIT_TOL} of ln(V) = {lnV:.4f}: not timing a broken engine")
    first_norm = None
    for step in range(args.warmup):
        _, norm = train_step(engine, batches, step, args)  # includes torch.compile's compilation
        first_norm = first_norm if first_norm is not None else norm
    sync()
    times = []
    for step in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, norm = train_step(engine, batches, step, args)
        first_norm = first_norm if first_norm is not None else norm
        sync()
        times.append(time.perf_counter() - t0)
    if not math.isfinite(loss):
        raise SystemExit(f"{name}: loss became {loss} during timing")
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    breakdown = None
    if args.profile and cuda:
        breakdown = profile_engine(engine, batches, args.warmup + args.steps, args, sync, torch)
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"engine": name, "first_loss": first_loss, "first_norm": first_norm,
            "last_loss": loss,
            "ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "peak": peak,
            "breakdown": breakdown}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import torch
    except ImportError:
        print("gpu_train: needs torch (pip install torch)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_train: no CUDA device here; this benchmark is for GPUs "
              "(use --device cpu with a tiny --model for a smoke run)", file=sys.stderr)
        return 2
    try:
        config = from_descriptor(args.model)
    except LlmpyError as e:
        print(f"gpu_train: {e}", file=sys.stderr)
        return 2
    B, T = args.batch, args.seq_len
    if T > config.max_seq_len or args.total_batch % (B * T) or args.steps < 1:
        print(f"gpu_train: need T <= maxT {config.max_seq_len}, --total-batch a multiple of "
              f"B*T = {B * T}, and --steps >= 1", file=sys.stderr)
        return 2
    accum = args.total_batch // (B * T)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True   # llm.c's default (-f 1)
        torch.backends.cudnn.allow_tf32 = True
        sync = torch.cuda.synchronize
    else:
        def sync():
            pass

    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, config.vocab_size, size=(accum, B, T + 1), dtype=np.int64)
    batches = [(np.ascontiguousarray(t[:, :-1]), np.ascontiguousarray(t[:, 1:])) for t in tokens]
    print(f"{config.describe()}\nB={B} T={T} total batch {args.total_batch} tokens "
          f"({accum} micro-steps), {args.warmup} warmup + {args.steps} timed steps, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})"
                                     if args.device.startswith("cuda") else ""))

    results = []
    for name in engines:
        r = run_engine(name, config, batches, args, sync, torch)
        if results and abs(r["first_loss"] - results[0]["first_loss"]) > AGREE_TOL:
            raise SystemExit(f"{name}: first loss {r['first_loss']:.4f} disagrees with "
                             f"{results[0]['engine']}'s {results[0]['first_loss']:.4f} "
                             f"(tolerance {AGREE_TOL}): not comparing timings")
        if results and abs(r["first_norm"] - results[0]["first_norm"]) > \
                NORM_AGREE * results[0]["first_norm"]:
            raise SystemExit(f"{name}: grad norm of the first step {r['first_norm']:.4f} "
                             f"disagrees with {results[0]['engine']}'s "
                             f"{results[0]['first_norm']:.4f} (relative tolerance "
                             f"{NORM_AGREE}): its gradients are wrong; not comparing timings")
        results.append(r)
        print(f"{name}: {r['ms']:.1f} ms/step (min {r['min_ms']:.1f}), peak "
              f"{r['peak'] / 1e9:.2f} GB, loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}",
              flush=True)

    flops_per_token = 6 * config.num_params + 6 * config.num_layers * T * config.channels
    print(f"\n{'engine':12s} {'first loss':>10s} {'ms/step':>9s} {'min ms':>8s} {'tokens/s':>11s} "
          f"{'TFLOP/s':>8s} {'util':>6s} {'peak GB':>8s} {'ratio':>6s}")
    base = args.total_batch / results[0]["ms"] * 1e3
    for r in results:
        tps = args.total_batch / r["ms"] * 1e3
        tflops = tps * flops_per_token / 1e12
        print(f"{r['engine']:12s} {r['first_loss']:10.4f} {r['ms']:9.1f} {r['min_ms']:8.1f} "
              f"{tps:11,.0f} {tflops:8.1f} {100 * tflops / args.peak_tflops:5.1f}% "
              f"{r['peak'] / 1e9:8.2f} {tps / base:6.3f}")
    for r in results:
        if r["breakdown"]:
            print(f"\n{r['engine']}: GPU time per step by kernel class (torch.profiler)\n"
                  f"{r['breakdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
