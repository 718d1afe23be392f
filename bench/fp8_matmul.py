"""Would FP8 pay for GPT-2's large matmuls? Validate, then time, bf16 cuBLAS against FP8
(e4m3, one scale per tensor, torch._scaled_mm) at the MLP and lm-head shapes of a model.

    python bench/fp8_matmul.py --model d12 -b 64 -t 1024
    python bench/fp8_matmul.py --model d48 -b 16 -t 1024

For each forward matmul out (N, OC) = x (N, C_in) @ w.T (w (OC, C_in)): the bf16 time, the FP8
matmul alone (inputs already in FP8), and FP8 with the quantization an engine would pay for
the activation at every call (its amax, the scale and the cast; the weight is quantized once
per step, so its cost is not counted). The relative error of each against an fp32 matmul of
the same bf16 inputs is checked first: FP8's ~6% per-element rounding must stay near the
expected few percent of the output's scale. Medians of triton.testing.do_bench.

This measures the upper bound of what FP8 could save, not an FP8 training path: the
backward's matmuls (the input and weight gradients, in e5m2 for the gradient) would need
the same and were not measured here.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

E4M3_MAX = 448.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="d12", help="descriptor (d12)")
    ap.add_argument("-b", dest="batch", type=int, default=64, help="micro-batch B (64)")
    ap.add_argument("-t", dest="seq_len", type=int, default=1024, help="sequence length T (1024)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    import triton
    from llmpy.config import from_descriptor
    if not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        print("fp8_matmul: needs a CUDA GPU with FP8 (sm89+) and torch._scaled_mm",
              file=sys.stderr)
        return 2
    cfg = from_descriptor(args.model)
    N, C, Vp = args.batch * args.seq_len, cfg.channels, cfg.padded_vocab_size
    shapes = {"fc (C -> 4C)": (C, 4 * C), "fcproj (4C -> C)": (4 * C, C),
              "lm head (C -> Vp)": (C, Vp)}
    dev, f8 = "cuda", torch.float8_e4m3fn
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{cfg.describe()}  N = B*T = {N}  ({torch.cuda.get_device_name()})")
    print(f"{'matmul':18s} {'bf16 ms':>8s} {'fp8 ms':>8s} {'+quant ms':>9s} {'speedup':>8s} "
          f"{'w/ quant':>8s} {'err bf16':>9s} {'err fp8':>8s}")
    for name, (cin, oc) in shapes.items():
        x = torch.randn(N, cin, device=dev, generator=g).to(torch.bfloat16)
        w = (torch.randn(oc, cin, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        ref = x.float() @ w.float().t()

        def quant(t):
            scale = t.abs().amax().float().clamp_min(1e-12) / E4M3_MAX
            return (t / scale).to(f8), scale

        wq, ws = quant(w)
        wq_t = wq.t()  # column-major (cin, oc), as _scaled_mm wants its second operand

        def fp8(xq, xs):
            return torch._scaled_mm(xq, wq_t, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16)

        xq, xs = quant(x)
        err_bf16 = float((x @ w.t()).float().sub(ref).abs().max() / ref.abs().max())
        err_fp8 = float(fp8(xq, xs).float().sub(ref).abs().max() / ref.abs().max())
        if not err_fp8 < 0.1:
            print(f"{name}: FP8 relative error {err_fp8:.3f}: not timing a wrong result")
            return 1
        t_bf16 = triton.testing.do_bench(lambda: x @ w.t(), return_mode="median")
        t_fp8 = triton.testing.do_bench(lambda: fp8(xq, xs), return_mode="median")
        t_q = triton.testing.do_bench(lambda: fp8(*quant(x)), return_mode="median")
        print(f"{name:18s} {t_bf16:8.3f} {t_fp8:8.3f} {t_q:9.3f} {t_bf16 / t_fp8:7.2f}x "
              f"{t_bf16 / t_q:7.2f}x {err_bf16:9.1e} {err_fp8:8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
