"""GELU backward, tanh approximation (llm.c's dev/cuda/gelu_backward.cu).

    dx = dout * gelu'(x),   th = tanh(sqrt(2/pi) (x + 0.044715 x^3))
    gelu'(x) = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

In place on dout (llm.c's gelu_backward_inplace): two reads and one write per element,
all bf16. The production kernel also sums the columns of the result per block of rows: the
bias gradient of the fc matmul whose output fed the GELU (checked here as dbias).

    version 1  128 elements per program: one 2-byte element per lane
    version 2  1024 elements per program, 4 warps: 8 elements per lane, 16-byte vectors
    version 3  production: 2-D (rows x columns) tiles, and the fc bias gradient (column
               sums of dx) in the same pass
    version 4  production into e4m3 (-f8 2): version 3 also writing dx in e4m3, with a
               delayed power-of-two scale and one max |dx| per program

Dimension legend: N rows (B*T), OC = 4C columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import gelu as engine
from llmpy.engines.triton import reduce as engine_reduce

from .common import (Op, delayed_amax, e4m3_out, e4m3_version, generator, np_rel, pow2_scale,
                     randn, to_dtype, to_top, versions_of)

_gelu_grad = engine.gelu_grad  # gelu'(x), the engine's jit helper


@triton.jit
def _gelu_backward_kernel(dout_ptr, x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dout_ptr + offs, to_dtype(d * _gelu_grad(x), dout_ptr.dtype.element_ty),
             mask=m)


def _launch(dout, x, block, warps):
    n = dout.numel()
    BLOCK = block
    _gelu_backward_kernel[(triton.cdiv(n, BLOCK),)](dout, x, n, BLOCK=BLOCK, num_warps=warps)
    return dict(dx=dout)


def version1(dout, x, amax):
    """one element per lane: 128 elements per program, 4 warps

    llm.c's version 1: one thread per element, 2-byte accesses, 3 memory instructions per
    element, and 74k tiny programs to schedule at GPT-2 size."""
    return _launch(dout, x, 128, 4)


def version2(dout, x, amax):
    """8 elements per lane: 1024 elements per program, 4 warps

    Each lane now owns 8 contiguous bf16 and moves them as one 16-byte vector per tensor
    (llm.c's version 2 packs x128 by hand): 8x fewer memory instructions and programs for
    the same bytes, so the loads stay in flight back to back."""
    return _launch(dout, x, 1024, 4)


def production(dout, x, amax):
    """production (llmpy/engines/triton/gelu.py): 2-D tiles, fc bias gradient fused

    The engine's kernel: each program walks a block of rows of one column strip in 2-D tiles
    (sizes: the engine's GPU["backward"]) and keeps the column sums of the dx it writes;
    reduce.add_partials finishes the fc bias gradient. The same bytes as version 2, and the
    separate pass over dx that the bias gradient would otherwise need is saved."""
    return _production(dout, x)


def _production(dout, x, fp8=None):
    N, OC = dout.shape
    P = triton.cdiv(N, engine.gelu_backward_rows_per_prog(N))
    partial = torch.empty(P * OC, device=dout.device)
    sums = engine.gelu_backward(dout, x, partial, fp8=fp8)
    dbias = torch.zeros(OC, device=dout.device)
    engine_reduce.add_partials(sums, dbias)
    return dict(dx=dout, dbias=dbias)


def production_e4m3(dout, x, amax):
    """production into e4m3 (-f8 2): v3 plus dx in e4m3, delayed pow2 scale

    -f8 2 computes fc's input gradient dln2 = dfch @ fcw in FP8 (fp8.Fp8Mlp), with dfch, this
    kernel's dx, in e4m3 (3 mantissa bits kept the engine's worst gradient nearer fp32 than
    e5m2's 2). The kernel still writes dx in bf16 in place (fcw's gradient reads it) and its
    column sums, and in the same pass each value times 1/scale in e4m3, saturating at 448:
    one more byte per element (7 in all; the op's cost counts 6). The scale is delayed,
    a power of two from amax, and each program stores its own max |dx| (common.py's FP8
    block says why)."""
    N, OC = dout.shape
    f = e4m3_out((N, OC), engine.gelu_backward_programs(N, OC), amax)
    return dict(_production(dout, x, f), dx8=f.out, scale=f.scale, part=f.partial)


def unit(dout, x, amax):
    """torch.ops.aten.gelu_backward(approximate="tanh") (the unit)"""
    return dict(dx=torch.ops.aten.gelu_backward(dout, x, approximate="tanh"))


def _dx32(dout, x):
    return torch.ops.aten.gelu_backward(dout.float(), x.float(), approximate="tanh")


def make(dims, device, seed):
    g = generator(device, seed)
    N, OC = dims["B"] * dims["T"], 4 * dims["C"]
    x = randn(g, N, OC, scale=2.0)
    dout = randn(g, N, OC, dtype=torch.float32)
    # the largest |dx| at -FP8_TOP (dx linear in dout), so that amax saturates (common.py)
    dout = (dout * to_top(_dx32(dout, x))).to(torch.bfloat16)
    return dict(dout=dout, x=x, amax=delayed_amax(_dx32(dout, x)))


def reference(dout, x, amax):
    xr = x.double().requires_grad_(True)
    with torch.enable_grad():
        torch.nn.functional.gelu(xr, approximate="tanh").backward(dout.double())
    dx = xr.grad
    return dict(dx=dx, dbias=dx.sum(0), dx8=dx, amax=dx.abs().max().reshape(1),
                scale=pow2_scale(amax))


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    _, cache = nl.gelu_forward(inputs["x"].double().cpu().numpy())
    dx = nl.gelu_backward(inputs["dout"].double().cpu().numpy(), cache)
    return np_rel(dx, ref["dx"].cpu())


def cost(dims, inputs):
    return "bytes", 3 * inputs["x"].numel() * 2


OP = Op(
    name="gelu_backward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit)[:-1]
    + (e4m3_version("4", production_e4m3, "dx8"),) + versions_of(globals(), None, unit)[-1:],
    # dx: bf16 rounded once; dbias (production only): fp32 column sums of the bf16 dx,
    # whose rounding (2^-9 each, random) the float64 reference does not have
    tol=dict(dx=1e-2), optional_tol=dict(dbias=1e-2),
    cost=cost, inplace=True, numpy_check=numpy_check, llmc="dev/cuda/gelu_backward.cu")
