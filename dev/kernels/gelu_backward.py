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

Dimension legend: N rows (B*T), OC = 4C columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import gelu as engine
from llmpy.engines.triton import reduce as engine_reduce

from .common import Op, generator, np_rel, randn, to_dtype, versions_of

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


def version1(dout, x):
    """one element per lane: 128 elements per program, 4 warps

    llm.c's version 1: one thread per element, 2-byte accesses, 3 memory instructions per
    element, and 74k tiny programs to schedule at GPT-2 size."""
    return _launch(dout, x, 128, 4)


def version2(dout, x):
    """8 elements per lane: 1024 elements per program, 4 warps

    Each lane now owns 8 contiguous bf16 and moves them as one 16-byte vector per tensor
    (llm.c's version 2 packs x128 by hand): 8x fewer memory instructions and programs for
    the same bytes, so the loads stay in flight back to back."""
    return _launch(dout, x, 1024, 4)


def production(dout, x):
    """production (llmpy/engines/triton/gelu.py): 2-D tiles, fc bias gradient fused

    The engine's kernel: each program walks a block of rows of one column strip in 2-D tiles
    (sizes: the engine's GPU["backward"]) and keeps the column sums of the dx it writes;
    reduce.add_partials finishes the fc bias gradient. The same bytes as version 2, and the
    separate pass over dx that the bias gradient would otherwise need is saved."""
    N, OC = dout.shape
    P = triton.cdiv(N, engine.gelu_backward_rows_per_prog(N))
    partial = torch.empty(P * OC, device=dout.device)
    part = engine.gelu_backward(dout, x, partial)
    dbias = torch.zeros(OC, device=dout.device)
    engine_reduce.add_partials(part, dbias)
    return dict(dx=dout, dbias=dbias)


def unit(dout, x):
    """torch.ops.aten.gelu_backward(approximate="tanh") (the unit)"""
    return dict(dx=torch.ops.aten.gelu_backward(dout, x, approximate="tanh"))


def make(dims, device, seed):
    g = generator(device, seed)
    N, OC = dims["B"] * dims["T"], 4 * dims["C"]
    return dict(dout=randn(g, N, OC), x=randn(g, N, OC, scale=2.0))


def reference(dout, x):
    xr = x.double().requires_grad_(True)
    with torch.enable_grad():
        torch.nn.functional.gelu(xr, approximate="tanh").backward(dout.double())
    return dict(dx=xr.grad, dbias=xr.grad.sum(0))


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    _, cache = nl.gelu_forward(inputs["x"].double().cpu().numpy())
    dx = nl.gelu_backward(inputs["dout"].double().cpu().numpy(), cache)
    return np_rel(dx, ref["dx"].cpu())


def cost(dims, inputs):
    return "bytes", 3 * inputs["x"].numel() * 2


OP = Op(
    name="gelu_backward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    # dx: bf16 rounded once; dbias (production only): fp32 column sums of the bf16 dx,
    # whose rounding (2^-9 each, random) the float64 reference does not have
    tol=dict(dx=1e-2), optional_tol=dict(dbias=1e-2),
    cost=cost, inplace=True, numpy_check=numpy_check, llmc="dev/cuda/gelu_backward.cu")
