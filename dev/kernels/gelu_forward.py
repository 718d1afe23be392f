"""GELU forward, tanh approximation (llm.c's dev/cuda/gelu_forward.cu).

    out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

Elementwise over the (N, 4C) output of the fc matmul, bf16 in and out: one read and one
write per element, so the only question is how close to the copy bandwidth it gets.

    version 1  128 elements per program, 4 warps: one 2-byte element per lane
    version 2  production: thousands of elements per program: 8+ elements per lane, moved
               as 16-byte vectors

Dimension legend: N rows (B*T), OC = 4C columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import gelu as engine

from .common import Op, generator, np_rel, randn, to_dtype, versions_of


@triton.jit
def _tanh(u):
    # tanh through exp (tl has no tanh in every Triton version); exp(-2|u|) never overflows
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _gelu_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    th = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    tl.store(out_ptr + offs, to_dtype(0.5 * x * (1.0 + th), out_ptr.dtype.element_ty), mask=m)


def version1(x):
    """one element per lane: 128 elements per program, 4 warps

    llm.c's version 1: one thread per element. Every lane moves a single 2-byte bf16 each
    way, so a warp issues 64-byte transactions and the GPU needs very many programs in
    flight (49k here) to keep enough bytes moving to hide the memory latency."""
    out = torch.empty_like(x)
    n = x.numel()
    BLOCK = 128
    _gelu_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, BLOCK=BLOCK, num_warps=4)
    return dict(out=out)


def production(x):
    """production (llmpy/engines/triton/gelu.py): many elements per lane, 16-byte vectors

    The engine's kernel with its swept launch configuration (GPU["forward"]: thousands of
    elements per program over a few warps), so each lane owns 8 or more contiguous bf16 and
    moves them with 128-bit loads and stores (llm.c's version 2 packs x128 by hand for the
    same reason): 8x fewer memory instructions per byte, and fewer, longer programs."""
    out = torch.empty_like(x)
    engine.gelu_forward(x, out)
    return dict(out=out)


def unit(x):
    """torch.nn.functional.gelu(approximate="tanh") (the unit)"""
    return dict(out=torch.nn.functional.gelu(x, approximate="tanh"))


def make(dims, device, seed):
    g = generator(device, seed)
    return dict(x=randn(g, dims["B"] * dims["T"], 4 * dims["C"], scale=2.0))


def reference(x):
    return dict(out=torch.nn.functional.gelu(x.double(), approximate="tanh"))


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    out, _ = nl.gelu_forward(inputs["x"].double().cpu().numpy())
    return np_rel(out, ref["out"].cpu())


def cost(dims, inputs):
    return "bytes", 2 * inputs["x"].numel() * 2


OP = Op(
    name="gelu_forward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    tol=dict(out=1e-2),  # bf16 output, rounded once
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/gelu_forward.cu")
