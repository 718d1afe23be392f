"""Validate, then time, the triton engine's memory-bound kernels at d12 training shapes, over
a few launch configurations each (llm.c's dev/cuda mains do this for every kernel).

    python bench/triton_kernels.py [--rows 65536] [--channels 768] [--quick]

For every kernel and configuration: check the output against a float64/torch reference on
fresh random data, then time it with triton.testing.do_bench (median) and report achieved
bandwidth (bytes each input read once + each output written once) against --peak-gbs.
The current default configuration of each kernel is marked with '*'; the fastest gets '<'.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=65536, help="N = B*T (65536: B=64, T=1024)")
    ap.add_argument("--channels", type=int, default=768, help="C (768: d12)")
    ap.add_argument("--vocab", type=int, default=50257, help="V (50257)")
    ap.add_argument("--peak-gbs", type=float, default=4300.0, help="copy bandwidth, GB/s")
    ap.add_argument("--quick", action="store_true", help="defaults only")
    ap.add_argument("--only", default="", help="comma-separated kernel names to sweep (all)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    import torch
    import triton
    if not torch.cuda.is_available():
        print("triton_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    from llmpy.engines.triton import attention, classifier, gelu, layernorm
    from llmpy.engines.triton import reduce as red

    N, C, V = args.rows, args.channels, args.vocab
    Vp = (V + 127) // 128 * 128
    dev = "cuda"
    bf = torch.bfloat16
    torch.manual_seed(0)

    def rnd(*shape, dtype=bf, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    rows = []

    def bench(kernel, cfg_name, is_default, run, check, nbytes):
        try:
            err = check()
            ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # a configuration that does not compile or fit
            rows.append((kernel, cfg_name, is_default, float("nan"), float("nan"),
                         f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
            return
        gbs = nbytes / ms / 1e6
        rows.append((kernel, cfg_name, is_default, ms, gbs, f"err {err:.1e}"))

    def sweep(kernel, table, key, configs, run, check, nbytes):
        if args.only and kernel not in args.only.split(","):
            return
        default = dict(table[key]) if key else dict(table)
        for cfg in ([default] if args.quick else [default] + [c for c in configs if c != default]):
            (table[key] if key else table).update(cfg)
            bench(kernel, " ".join(f"{k}={v}" for k, v in cfg.items()), cfg == default, run,
                  check, nbytes)
        (table[key] if key else table).update(default)

    # GELU forward / backward (N, 4C)
    x = rnd(N, 4 * C, scale=2.0)
    out = torch.empty_like(x)
    ref = torch.nn.functional.gelu(x.float(), approximate="tanh")
    sweep("gelu_forward", gelu.GPU, "forward",
          [dict(BLOCK=b, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)],
          lambda: gelu.gelu_forward(x, out), lambda: (gelu.gelu_forward(x, out),
                                                      rel(out, ref))[1], 2 * x.numel() * 2)
    d = rnd(N, 4 * C)
    part = torch.empty(N * 4 * C // 16, device=dev)
    xr = x.float().requires_grad_(True)
    torch.nn.functional.gelu(xr, approximate="tanh").backward(d.float())
    d2 = d.clone()

    def gb_run():
        d2.copy_(d)
        gelu.gelu_backward(d2, x, part)

    sweep("gelu_backward", gelu.GPU, "backward",
          [dict(ROWS=r, BLOCK_R=br, BLOCK_C=bc, num_warps=w)
           for r, br, bc, w in ((256, 16, 256, 4), (128, 16, 256, 4), (256, 8, 512, 4),
                                (256, 32, 256, 8), (512, 16, 256, 8), (128, 32, 128, 4),
                                (64, 16, 512, 8), (256, 16, 128, 4))],
          lambda: gelu.gelu_backward(d2, x, part), lambda: (gb_run(), rel(d2, xr.grad))[1],
          3 * x.numel() * 2)

    # pack (cuDNN's dq layout (B, NH, T, HS)) into (N, 3C) with column sums
    B, T = N // 1024, 1024
    NH = C // 64
    src = rnd(B, NH, T, 64)
    dst = torch.empty(N, 3 * C, dtype=bf, device=dev)[:, C:2 * C]
    pp = torch.empty(N, 3 * C, device=dev)[:, C:2 * C]
    sweep("pack_heads", attention.PACK_GPU, None,
          [dict(ROWS_T=r, BLOCK_T=bt, num_warps=w)
           for r, bt, w in ((256, 64, 4), (128, 64, 4), (256, 32, 4), (512, 64, 8),
                            (256, 128, 8), (1024, 64, 4))],
          lambda: attention.pack_heads(src, dst, pp),
          lambda: (attention.pack_heads(src, dst, pp),
                   rel(dst, src.transpose(1, 2).reshape(N, C)))[1], 2 * src.numel() * 2)

    # layernorm forward (fused residual) and backward
    r_, dl = rnd(N, C), rnd(N, C)
    w, b = rnd(C, dtype=torch.float32).to(bf), rnd(C).to(bf)
    o, xs = torch.empty(N, C, dtype=bf, device=dev), torch.empty(N, C, dtype=bf, device=dev)
    mean, rstd = torch.empty(N, device=dev), torch.empty(N, device=dev)
    lnref = torch.nn.functional.layer_norm((r_.float() + dl.float()).to(bf).float(), (C,),
                                           w.float(), b.float(), 1e-5)
    sweep("layernorm_fwd", layernorm.GPU, "forward",
          [dict(BLOCK_R=r, num_warps=wp) for r, wp in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 8))],
          lambda: layernorm.layernorm_forward(r_, w, b, o, mean, rstd, delta=dl, xsum=xs),
          lambda: (layernorm.layernorm_forward(r_, w, b, o, mean, rstd, delta=dl, xsum=xs),
                   rel(o, lnref))[1], 4 * N * C * 2)
    dout, dres0 = rnd(N, C), rnd(N, C)
    dres = dres0.clone()
    lpart = torch.empty(N * 3 * C, device=dev)
    xr = xs.float().requires_grad_(True)
    torch.nn.functional.layer_norm(xr, (C,), w.float(), b.float(), 1e-5).backward(dout.float())

    def lnb_check():
        dres.copy_(dres0)
        layernorm.layernorm_backward(dout, xs, w, mean, rstd, dres, lpart)
        return rel(dres, dres0.float() + xr.grad)
    sweep("layernorm_bwd", layernorm.GPU, "backward",
          [dict(ROWS=r, BLOCK_R=br, num_warps=wp)
           for r, br, wp in ((64, 2, 4), (64, 4, 8), (128, 2, 4), (128, 4, 8), (32, 1, 4),
                             (32, 2, 4), (64, 1, 4))],
          lambda: layernorm.layernorm_backward(dout, xs, w, mean, rstd, dres, lpart),
          lnb_check, 4 * N * C * 2)

    # fused classifier, a quarter of the rows (the logits are the largest buffer)
    Nc = N // 4
    logits = rnd(Nc, Vp, scale=2.0)
    tg = torch.randint(0, V, (Nc,), device=dev)
    losses = torch.empty(Nc, device=dev)
    lref = torch.nn.functional.cross_entropy(logits[:, :V].float(), tg, reduction="none")
    lg = logits.clone()
    configs = [dict(BLOCK_V=bv, num_warps=wp, PER_SM=ps, GROUP=g)
               for bv, wp, ps, g in ((4096, 8, 0, 8), (4096, 8, 0, 4096), (2048, 8, 0, 16),
                                     (2048, 4, 0, 8), (4096, 16, 0, 8), (1024, 4, 0, 8),
                                     (8192, 16, 0, 8), (2048, 8, 4, 8))]
    dref = torch.softmax(logits[:, :V].float(), dim=-1)
    dref[torch.arange(Nc, device=dev), tg] -= 1.0

    def classifier_check(out, scale):
        lg.copy_(logits)
        classifier.fused_classifier(lg, tg, losses, V, scale, out=out)
        d = (lg if out is None else out)[:, :V].float() / scale
        pad = (lg if out is None else out)[:, V:].float().abs().max().item()
        return max(rel(losses, lref), rel(d, dref), pad)
    sweep("classifier", classifier.GPU, None, configs,
          lambda: classifier.fused_classifier(lg, tg, losses, V, 1.0 / Nc),
          lambda: classifier_check(None, 1.0 / Nc), 2 * Nc * Vp * 2)
    # the FP8 head's call (-f8 1): logits read, (softmax - onehot) * 2^15 written in e5m2
    d8 = torch.empty(Nc, Vp, device=dev, dtype=torch.float8_e5m2)
    sweep("classifier_e5m2", classifier.GPU, None, configs,
          lambda: classifier.fused_classifier(lg, tg, losses, V, 2.0 ** 15, out=d8),
          lambda: classifier_check(d8, 2.0 ** 15), Nc * Vp * 3)

    # the fc matmul's GELU in cuBLASLt's epilogues (-ge) against matmul + our kernels; the
    # bandwidth column counts the matmul's inputs and outputs only
    from llmpy.engines.triton import cublaslt
    if cublaslt.available() and (not args.only or "gelu_fusion" in args.only.split(",")):
        xin, wfc, bfc = rnd(N, C), rnd(4 * C, C, scale=0.02), rnd(4 * C, scale=0.02)
        pre, post = torch.empty(N, 4 * C, device=dev, dtype=bf), torch.empty(N, 4 * C, device=dev, dtype=bf)
        pre_ref = torch.addmm(bfc, xin, wfc.t())
        post_ref = torch.nn.functional.gelu(pre_ref.float(), approximate="tanh")
        fwd_bytes = (N * C + 4 * C * C + 2 * N * 4 * C) * 2
        bench("fc_forward", "addmm + gelu_forward", True,
              lambda: (torch.addmm(bfc, xin, wfc.t(), out=pre), gelu.gelu_forward(pre, post)),
              lambda: (torch.addmm(bfc, xin, wfc.t(), out=pre), gelu.gelu_forward(pre, post),
                       rel(post, post_ref))[2], fwd_bytes)
        bench("fc_forward", "cublaslt GELU_AUX_BIAS", False,
              lambda: cublaslt.linear(xin, wfc, post, bfc, aux=pre),
              lambda: (cublaslt.linear(xin, wfc, post, bfc, aux=pre), rel(post, post_ref))[1],
              fwd_bytes)
        dres_, wproj = rnd(N, C), rnd(C, 4 * C, scale=0.02)
        dpre, dfcb = torch.empty(N, 4 * C, device=dev, dtype=bf), torch.empty(4 * C, device=dev, dtype=bf)
        gpart = torch.empty(4 * C * -(-N // gelu.gelu_backward_rows_per_prog(N)), device=dev)
        u = pre.float().requires_grad_(True)
        torch.nn.functional.gelu(u, approximate="tanh").backward((dres_ @ wproj).float())
        dref = u.grad

        def unfused():
            torch.mm(dres_, wproj, out=dpre)
            red.add_partials(gelu.gelu_backward(dpre, pre, gpart), dfcb)
        bench("fc_dgelu", "mm + gelu_backward + bias sums", True, unfused,
              lambda: (dfcb.zero_(), unfused(), rel(dpre, dref))[2], fwd_bytes)
        bench("fc_dgelu", "cublaslt DGELU_BGRAD", False,
              lambda: cublaslt.mm_dgelu(dres_, wproj, pre, dpre, dbias=dfcb),
              lambda: (cublaslt.mm_dgelu(dres_, wproj, pre, dpre, dbias=dfcb),
                       max(rel(dpre, dref), rel(dfcb, dref.sum(0))))[1], fwd_bytes)

        def fused():  # what the engine runs with -ge 2
            cublaslt.mm_dgelu(dres_, wproj, pre, dpre)
            red.add_partials(gelu.gelu_backward(dpre, None, gpart), dfcb)
        bench("fc_dgelu", "cublaslt DGELU + bias sums", False, fused,
              lambda: (dfcb.zero_(), fused(), max(rel(dpre, dref), rel(dfcb, dref.sum(0))))[2],
              fwd_bytes)

    # grad norm over 124M bf16
    g = rnd(124_475_904)
    nb = torch.empty(4096, device=dev)
    bench("grad_norm", "default", True, lambda: red.sum_of_squares(g, nb),
          lambda: rel(red.sum_of_squares(g, nb), (g.double() ** 2).sum()), g.numel() * 2)

    print(f"\n{'kernel':14s} {'config':46s} {'ms':>8s} {'GB/s':>7s} {'peak':>5s}  check")
    best = {}
    for k, cfg, dflt, ms, gbs, note in rows:
        if ms == ms and (k not in best or ms < best[k]):
            best[k] = ms
    for k, cfg, dflt, ms, gbs, note in rows:
        mark = ("*" if dflt else " ") + ("<" if best.get(k) == ms else " ")
        print(f"{k:14s} {cfg:46s} {ms:8.4f} {gbs:7.0f} {100 * gbs / args.peak_gbs:4.0f}% "
              f"{mark} {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
