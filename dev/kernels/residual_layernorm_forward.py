"""Residual add fused with the next LayerNorm (llm.c's dev/cuda/fused_residual_forward.cu).

    xsum = bf16(residual + delta)          the new residual stream (kept: the next layer and
                                           the backward read it)
    out  = layernorm(xsum) with w, b       mean and rstd (fp32) kept for the backward

GPT-2 does this twice per layer (after attention and after the MLP). All tensors bf16 but
the statistics. Memory-bound: two (N, C) reads and two (N, C) writes at best.

    version 1  two kernels: the add writes xsum, the layernorm reads it back (3 reads)
    version 2  production: one kernel, the sum stays in registers and is normalized there
    version 3  production into e4m3 (-f8 2): version 2 also writing out in e4m3 (ln2 for the
               FP8 fc matmul), with a delayed power-of-two scale and one max |out| per program

Dimension legend: N rows (B*T), C channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import layernorm as engine

from .common import (Op, delayed_amax, e4m3_out, e4m3_version, generator, np_rel, pow2_scale,
                     randn, to_dtype, to_top, versions_of)

EPS = 1e-5


@triton.jit
def _residual_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32) + \
        tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_dtype(s, out_ptr.dtype.element_ty), mask=m)


def _outputs(residual):
    N, C = residual.shape
    return (torch.empty_like(residual), torch.empty_like(residual),
            torch.empty(N, device=residual.device), torch.empty(N, device=residual.device))


def version1(residual, delta, w, b, amax):
    """two kernels: residual add (writes xsum), then layernorm (reads it back)

    Each op on its own, as an unfused model runs them: the elementwise add writes the
    (N, C) sum to memory and the layernorm (the engine's single-read kernel) immediately
    reads it back: 3 reads + 2 writes of (N, C) where 2 + 2 would do, and two launches."""
    xsum, out, mean, rstd = _outputs(residual)
    n = residual.numel()
    BLOCK = 2048
    _residual_kernel[(triton.cdiv(n, BLOCK),)](residual, delta, xsum, n, BLOCK=BLOCK,
                                              num_warps=8)
    engine.layernorm_forward(xsum, w, b, out, mean, rstd)
    return dict(xsum=xsum, out=out, mean=mean, rstd=rstd)


def production(residual, delta, w, b, amax):
    """production (llmpy/engines/triton/layernorm.py, fused form): add and normalize in one

    The engine's kernel with delta given: the sum is rounded to bf16 and stored (that is the
    residual stream), and the rounded value, still in registers, is normalized. The read-back
    of xsum and one launch are gone (llm.c's fused_residual_forward5 does the same)."""
    xsum, out, mean, rstd = _outputs(residual)
    engine.layernorm_forward(residual, w, b, out, mean, rstd, delta=delta, xsum=xsum)
    return dict(xsum=xsum, out=out, mean=mean, rstd=rstd)


def production_e4m3(residual, delta, w, b, amax):
    """production into e4m3 (-f8 2): v2 plus out in e4m3, delayed pow2 scale

    -f8 2 runs the fc matmul on ln2 in e4m3 (fp8.Fp8Mlp), and ln2 is this fused kernel's
    output (residual2 = residual + attproj's output, then ln2w/ln2b): the bf16 out stays
    (fcw's gradient reads it), and in the same pass each value times 1/scale is stored in
    e4m3, saturating at 448: one more byte per element (9 per (N, C) entry, the op's cost
    counts 8). The scale is delayed, a power of two from amax, and each program stores the
    max |out| of its rows (common.py's FP8 block says why)."""
    xsum, out, mean, rstd = _outputs(residual)
    N, C = residual.shape
    f = e4m3_out((N, C), engine.layernorm_forward_programs(N, C), amax)
    engine.layernorm_forward(residual, w, b, out, mean, rstd, delta=delta, xsum=xsum, fp8=f)
    return dict(xsum=xsum, out=out, mean=mean, rstd=rstd, out8=f.out, scale=f.scale,
                part=f.partial)


def unit(residual, delta, w, b, amax):
    """torch: residual + delta, then torch.native_layer_norm (the unit)"""
    xsum = residual + delta
    C = xsum.shape[1]
    if xsum.device.type == "cpu":  # torch keeps bf16 statistics on the CPU
        out, mean, rstd = torch.native_layer_norm(xsum.float(), (C,), w.float(), b.float(), EPS)
        out = out.to(xsum.dtype)
    else:
        out, mean, rstd = torch.native_layer_norm(xsum, (C,), w, b, EPS)
    return dict(xsum=xsum, out=out, mean=mean.view(-1), rstd=rstd.view(-1))


def _out32(residual, delta, w, b):
    xsum = (residual.float() + delta.float()).to(torch.bfloat16).float()
    return torch.nn.functional.layer_norm(xsum, (xsum.shape[1],), w.float(), b.float(), EPS)


def make(dims, device, seed):
    g = generator(device, seed)
    N, C = dims["B"] * dims["T"], dims["C"]
    residual, delta = randn(g, N, C, scale=2.0, shift=0.5), randn(g, N, C)
    w = randn(g, C, dtype=torch.float32, scale=0.5, shift=1.0)
    b = randn(g, C, dtype=torch.float32, scale=0.1)
    # the largest |out| at -FP8_TOP (out linear in w and b), so that amax saturates (common.py)
    k = to_top(_out32(residual, delta, w, b))
    w, b = (w * k).to(torch.bfloat16), (b * k).to(torch.bfloat16)
    return dict(residual=residual, delta=delta, w=w, b=b,
                amax=delayed_amax(_out32(residual, delta, w, b)))


def reference(residual, delta, w, b, amax):
    xsum = (residual.double() + delta.double()).to(torch.bfloat16).double()  # rounded once
    w, b = w.double(), b.double()
    mean = xsum.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(((xsum - mean) ** 2).mean(-1, keepdim=True) + EPS)
    out = (xsum - mean) * rstd * w + b
    return dict(xsum=xsum, out=out, mean=mean[:, 0], rstd=rstd[:, 0], out8=out,
                amax=out.abs().max().reshape(1), scale=pow2_scale(amax))


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    r, d, w, b = (inputs[k].double().cpu().numpy() for k in ("residual", "delta", "w", "b"))
    xsum, _ = nl.residual_forward(r, d)
    xsum = torch.from_numpy(xsum).to(torch.bfloat16).double().numpy()
    out, _ = nl.layernorm_forward(xsum, w, b)
    return max(np_rel(xsum, ref["xsum"].cpu()), np_rel(out, ref["out"].cpu()))


def cost(dims, inputs):
    N, C = dims["B"] * dims["T"], dims["C"]
    return "bytes", 4 * N * C * 2 + 2 * C * 2 + 2 * N * 4


OP = Op(
    name="residual_layernorm_forward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit)[:-1]
    + (e4m3_version("3", production_e4m3, "out8"),) + versions_of(globals(), None, unit)[-1:],
    # xsum, out: bf16 rounded once (xsum bit-exact in practice); mean/rstd: fp32 sums
    tol=dict(xsum=1e-2, out=1e-2, mean=1e-4, rstd=1e-4),
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/fused_residual_forward.cu")
