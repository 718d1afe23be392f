"""The kernel library's one harness (llm.c's dev/cuda mains, all in one): for every op and
every version, validate against the reference, THEN time, then report.

    python -m dev.kernels.harness [--ops layernorm_forward,...] [--csv out.csv] [--check-only]

For each op: inputs at GPT-2 124M size (B=8, T=1024, C=768, V=50257, 124M parameters) on
the GPU, or at tiny odd sizes with --check-only (on a machine without CUDA the kernels run
in Triton's CPU interpreter, TRITON_INTERPRET=1, and only --check-only makes sense). The
float64 reference is computed first; each version's outputs must be within the op's
declared tolerance (max|out - ref| / max|ref|) or it is not timed. On CUDA a version also
runs twice more to see whether it is deterministic (bitwise equal outputs), and is timed:
the median of up to 50 runs after a warm-up, each between CUDA events, after a 1 GiB
memset that flushes the L2 (as triton.testing.do_bench does with 256 MB) and keeps the GPU
busy for ~0.3 ms while Python launches the version's kernels, so that host launch latency
(tens of microseconds per Triton launch) is not measured as kernel time.

Reported: GB/s for memory-bound ops (the bytes one call must move at least, over the
median time) or TFLOP/s, against the H200's ceilings (copy bandwidth 4.27 TB/s measured,
4.8 nominal; dense bf16 matmul 790 TFLOP/s measured), and speed relative to the torch or
cuBLAS version of the same op ("80%" = 0.8x its speed). At tiny sizes with --check-only
the torch references are also checked against the NumPy engine (llmpy/engines/
numpy_layers.py) where it has the layer: row "numpy".
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import os
import statistics
import sys
import time

OPS = ("encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
       "residual_layernorm_forward", "gelu_forward", "gelu_backward", "softmax_forward",
       "attention_forward", "fused_classifier", "adamw", "global_norm", "matmul_forward",
       "quantize_e4m3", "transpose_bytes")

HBM_COPY = 4.27e12      # B/s, H200 device-to-device copy measured (KINDS.md), read + write
HBM_NOMINAL = 4.8e12    # B/s, H200 datasheet
BF16_DENSE = 790e12     # FLOP/s, H200 8192^3 bf16 matmul through torch, measured (KINDS.md)
LAW_TOL = 1e-9          # torch float64 reference vs NumPy float64: rounding order only

COLUMNS = ("op", "version", "kind", "status", "err_over_tol", "errors", "deterministic",
           "time_us", "metric", "achieved", "pct_of_ceiling", "pct_of_unit", "summary",
           "device", "dims")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m dev.kernels.harness", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS),
                   help=f"comma-separated ops (default: all): {', '.join(OPS)}")
    p.add_argument("--csv", help="write the table to this CSV file")
    p.add_argument("--check-only", action="store_true",
                   help="tiny odd shapes, validate only (no timing)")
    p.add_argument("--reps", type=int, default=0, help="timed runs per version (default: "
                   "as many as fit 0.25 s, 5..50)")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    args.ops = ops
    return args


FLUSH_BYTES = 2 ** 30


def bench(fn, inputs, reps):
    """Median milliseconds of fn(**inputs) between CUDA events, after a FLUSH_BYTES memset."""
    import torch
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn(**inputs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn(**inputs)
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) / 3
    n = reps or int(min(50, max(5, 0.25 / max(est, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn(**inputs)
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth():
    """Device-to-device copy of 2 GiB, bytes read + written per second (a sanity check of
    the ceiling used in the table)."""
    import torch
    a = torch.empty(2 ** 31, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return 2 * a.numel() / (statistics.median(times) * 1e-3)


def fmt_row(r):
    t = f"{r['time_us']:.1f}" if r["time_us"] != "" else "-"
    ach = f"{r['achieved']:.1f} {r['metric']}" if r["achieved"] != "" else "-"
    pc = f"{r['pct_of_ceiling']:.0f}%" if r["pct_of_ceiling"] != "" else "-"
    pu = f"{r['pct_of_unit']:.0f}%" if r["pct_of_unit"] != "" else "-"
    err = r["err_over_tol"]
    err = f"{err:.2f}" if isinstance(err, float) and math.isfinite(err) else str(err)
    return (f"{r['op']:<27} {r['version']:>5} {r['kind']:<10} {r['status']:<5} {err:>6} "
            f"{r['deterministic']:>4} {t:>10} {ach:>16} {pc:>6} {pu:>6}  {r['summary'][:70]}")


HEADER = (f"{'op':<27} {'v':>5} {'kind':<10} {'check':<5} {'e/tol':>6} {'det':>4} "
          f"{'time us':>10} {'achieved':>16} {'%peak':>6} {'%unit':>6}  what")


def run_op(op, dims, device, args, cuda, device_name):
    import torch
    rows = []
    base = dict(device=device_name, dims=" ".join(f"{k}={v}" for k, v in dims.items()),
                time_us="", metric="", achieved="", pct_of_ceiling="", pct_of_unit="",
                deterministic="-")
    inputs = op.make(dims, device, args.seed)
    with torch.no_grad():
        ref = op.reference(**inputs)
    if args.check_only and op.numpy_check is not None:
        err = op.numpy_check(inputs, ref)
        rows.append(dict(base, op=op.name, version="numpy", kind="law",
                         status="ok" if err <= LAW_TOL else "FAIL", err_over_tol=err / LAW_TOL,
                         errors=f"ref-vs-numpy={err:.1e}",
                         summary="the torch float64 reference against numpy_layers"))
    metric, amount = op.cost(dims, inputs)

    def fresh():
        # in-place versions get copies of the inputs the reference saw: re-made from the
        # seed on an H200 (torch 2.11) they came out different (every classifier version,
        # torch's too, failed its check by the same amount, as if the targets differed;
        # tokens() draws with multinomial and randperm on the CUDA generator; not pinned
        # down further)
        if not op.inplace:
            return inputs
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    for ver in op.versions:
        row = dict(base, op=op.name, version=ver.name, kind=ver.kind, summary=ver.summary,
                   errors="", err_over_tol="")
        try:
            inp = fresh()
            out = ver.fn(**inp)
            if cuda:
                torch.cuda.synchronize()
            vals = ver.decode(out) if ver.decode else out
            missing = [k for k in op.tol if k not in vals]
            if missing:
                raise RuntimeError(f"outputs {missing} missing")
            tol = {**op.tol, **op.optional_tol, **ver.tol}
            errs = {k: _err(vals[k], ref[k]) for k in vals if k in tol}
            ratio = max(_over(e, tol[k]) for k, e in errs.items())
            row.update(status="ok" if ratio <= 1.0 else "FAIL", err_over_tol=ratio,
                       errors=";".join(f"{k}={e:.1e}" for k, e in errs.items()))
            _poison(out, inp)
            del out, vals
            if cuda:
                inp2 = fresh()
                a = {k: v.clone() for k, v in ver.fn(**inp2).items()}
                inp2 = fresh()
                b = ver.fn(**inp2)
                same = all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
                row["deterministic"] = "yes" if same else "no"
                del a, b
                if row["status"] == "ok" and not args.check_only:
                    ms = bench(ver.fn, inp2, args.reps)
                    del inp2
                    row["time_us"] = ms * 1e3
                    if metric == "bytes":
                        row.update(metric="GB/s", achieved=amount / (ms * 1e-3) / 1e9,
                                   pct_of_ceiling=100 * amount / (ms * 1e-3) / HBM_COPY)
                    else:
                        row.update(metric="TFLOP/s", achieved=amount / (ms * 1e-3) / 1e12,
                                   pct_of_ceiling=100 * amount / (ms * 1e-3) / BF16_DENSE)
        except Exception as e:  # noqa: BLE001 (one broken version must not hide the others)
            row.update(status="error", errors=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                       if str(e) else type(e).__name__)
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    units = [r for r in rows if r["kind"] == "unit" and r["time_us"] != ""]
    if units:
        for r in rows:
            if r["time_us"] != "":
                r["pct_of_unit"] = 100 * units[0]["time_us"] / r["time_us"]
    for r in rows:  # printed once the unit is timed, so that %unit is known
        print(fmt_row(r) + (f"\n    {r['errors']}" if r["status"] != "ok" else ""), flush=True)
    return rows


def _poison(out, inputs):
    """Fill a version's checked outputs with 0xFF bytes (NaN in every float type) before
    they are freed: the next torch.empty of the same size gets the same memory back (the
    CUDA caching allocator's freed block; on the CPU, malloc's), and a version that fails
    to write part of its output would find the previous version's right answer there.
    Outputs that share memory with the inputs are left alone."""
    import torch
    held = {t.untyped_storage().data_ptr() for t in inputs.values()
            if isinstance(t, torch.Tensor)}
    for t in out.values():
        if t.untyped_storage().data_ptr() not in held and t.is_contiguous():
            t.reshape(-1).view(torch.uint8).fill_(0xFF)


def _over(err, tol):
    """err / tol; a tolerance of 0 (exact outputs) gives 0 or inf."""
    return err / tol if tol else (0.0 if err == 0 else math.inf)


def _bits(t):
    """1-byte floats (FP8) as uint8, so that their bits are compared (torch has no equal
    for every FP8 dtype on every device)."""
    import torch
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _err(out, ref):
    from .common import rel_err
    return rel_err(out, ref.to(out.device))


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        # must happen before the op modules import (and jit-decorate with) triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if not args.check_only:
            print("no CUDA device: validating only, at tiny shapes, in Triton's CPU interpreter "
                  "(TRITON_INTERPRET=1)", flush=True)
            args.check_only = True
    from .common import FULL, TINY
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)"
    dims = dict(TINY if args.check_only else FULL)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import triton
    print(f"device: {device_name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{'check only' if args.check_only else 'check, then time'}; "
          f"dims {' '.join(f'{k}={v}' for k, v in dims.items())}", flush=True)
    if cuda and not args.check_only:
        print(f"ceilings: copy bandwidth {HBM_COPY / 1e12:.2f} TB/s (measured now: "
              f"{copy_bandwidth() / 1e12:.2f}; nominal {HBM_NOMINAL / 1e12:.1f}), "
              f"bf16 dense {BF16_DENSE / 1e12:.0f} TFLOP/s", flush=True)
    print(HEADER, flush=True)
    rows = []
    t0 = time.time()
    for name in args.ops:
        op = importlib.import_module(f"{__package__}.{name}").OP
        try:
            rows += run_op(op, dims, device, args, cuda, device_name)
        except Exception as e:  # noqa: BLE001 (inputs or reference failed: report, go on)
            rows.append(dict(op=name, version="-", kind="-", status="error",
                             err_over_tol="", errors=f"{type(e).__name__}: {e}"[:200],
                             deterministic="-", time_us="", metric="", achieved="",
                             pct_of_ceiling="", pct_of_unit="", summary="inputs/reference",
                             device=device_name, dims=""))
            print(fmt_row(rows[-1]) + f"\n    {rows[-1]['errors']}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        if args.csv:
            write_csv(args.csv, rows)
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(bad)}/{len(rows)} ok in {time.time() - t0:.1f} s"
          + (f"; failed: {', '.join(r['op'] + ' v' + r['version'] for r in bad)}" if bad else ""),
          flush=True)
    return 1 if bad else 0


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v)
                        for k, v in r.items() if k in COLUMNS})


if __name__ == "__main__":
    sys.exit(main())
