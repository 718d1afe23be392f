"""Residual add fused with the next LayerNorm (llm.c's dev/cuda/fused_residual_forward.cu).

    xsum = bf16(residual + delta)          the new residual stream (kept: the next layer and
                                           the backward read it)
    out  = layernorm(xsum) with w, b       mean and rstd (fp32) kept for the backward

GPT-2 does this twice per layer (after attention and after the MLP). All tensors bf16 but
the statistics. Memory-bound: two (N, C) reads and two (N, C) writes at best.

    version 1  two kernels: the add writes xsum, the layernorm reads it back (3 reads)
    version 2  production: one kernel, the sum stays in registers and is normalized there

Dimension legend: N rows (B*T), C channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import layernorm as engine

from .common import Op, generator, np_rel, randn, to_dtype, versions_of

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


def version1(residual, delta, w, b):
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


def production(residual, delta, w, b):
    """production (llmpy/engines/triton/layernorm.py, fused form): add and normalize in one

    The engine's kernel with delta given: the sum is rounded to bf16 and stored (that is the
    residual stream), and the rounded value, still in registers, is normalized. The read-back
    of xsum and one launch are gone (llm.c's fused_residual_forward5 does the same)."""
    xsum, out, mean, rstd = _outputs(residual)
    engine.layernorm_forward(residual, w, b, out, mean, rstd, delta=delta, xsum=xsum)
    return dict(xsum=xsum, out=out, mean=mean, rstd=rstd)


def unit(residual, delta, w, b):
    """torch: residual + delta, then torch.native_layer_norm (the unit)"""
    xsum = residual + delta
    C = xsum.shape[1]
    if xsum.device.type == "cpu":  # torch keeps bf16 statistics on the CPU
        out, mean, rstd = torch.native_layer_norm(xsum.float(), (C,), w.float(), b.float(), EPS)
        out = out.to(xsum.dtype)
    else:
        out, mean, rstd = torch.native_layer_norm(xsum, (C,), w, b, EPS)
    return dict(xsum=xsum, out=out, mean=mean.view(-1), rstd=rstd.view(-1))


def make(dims, device, seed):
    g = generator(device, seed)
    N, C = dims["B"] * dims["T"], dims["C"]
    return dict(residual=randn(g, N, C, scale=2.0, shift=0.5), delta=randn(g, N, C),
                w=randn(g, C, scale=0.5, shift=1.0), b=randn(g, C, scale=0.1))


def reference(residual, delta, w, b):
    xsum = (residual.double() + delta.double()).to(torch.bfloat16).double()  # rounded once
    w, b = w.double(), b.double()
    mean = xsum.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(((xsum - mean) ** 2).mean(-1, keepdim=True) + EPS)
    return dict(xsum=xsum, out=(xsum - mean) * rstd * w + b, mean=mean[:, 0], rstd=rstd[:, 0])


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
    versions=versions_of(globals(), production, unit),
    # xsum, out: bf16 rounded once (xsum bit-exact in practice); mean/rstd: fp32 sums
    tol=dict(xsum=1e-2, out=1e-2, mean=1e-4, rstd=1e-4),
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/fused_residual_forward.cu")
