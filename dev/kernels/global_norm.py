"""Global gradient norm: the sum of squares of every gradient (llm.c's
dev/cuda/global_norm.cu); the training loop takes its square root and clips.

    out = sum_i g_i^2   over the flat (P,) bf16 gradient buffer, accumulated in fp32

A reduction of 249 MB (GPT-2 124M in bf16) to one number: memory-bound, and the question is
how the partial sums come together.

    version 1  each program sums a block and atomically adds it into the one result:
               ~120k atomics on one address, in a different order every run
    version 2  each program writes its block's partial sum; a second kernel adds the
               ~120k partials in order: deterministic, but the second kernel is one
               program walking a long list
    version 3  production: a fixed grid of 1024 programs, each striding over its chunk with
               a vector accumulator; the second kernel adds only 1024 partials

Dimension legend: P parameters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import reduce as engine

from .common import Op, generator, pow2, randn, versions_of

BLOCK = 1024


@triton.jit
def _sumsq_atomic_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr, tl.sum(x * x, axis=0))


@triton.jit
def _sumsq_block_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(x * x, axis=0))


@triton.jit
def _sum_in_order_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def version1(grad):
    """block sums added into one fp32 result by atomics (nondeterministic)

    llm.c's version 1 idea: every program reduces its 1024 values in registers, then one
    atomicAdd into the result. Simple and one launch, but all the atomics hit one address
    (serialized in L2) and their order, hence the rounding of the result, varies per run."""
    n = grad.numel()
    out = torch.zeros(1, device=grad.device)
    _sumsq_atomic_kernel[(triton.cdiv(n, BLOCK),)](grad, out, n, BLOCK=BLOCK, num_warps=4)
    return dict(sumsq=out)


def version2(grad):
    """one partial sum per block, then one program adds the partials in order

    No atomics: the result is the same bits every run (STYLE.md item 6). But there are
    P/1024 = 122k partials, and the second kernel is a single program walking 486 KB of
    them: a serial tail after the parallel part."""
    n = grad.numel()
    P = triton.cdiv(n, BLOCK)
    partial = torch.empty(P, device=grad.device)
    out = torch.empty(1, device=grad.device)
    _sumsq_block_kernel[(P,)](grad, partial, n, BLOCK=BLOCK, num_warps=4)
    _sum_in_order_kernel[(1,)](partial, out, P, BLOCK=min(4096, pow2(P)), num_warps=8)
    return dict(sumsq=out)


def production(grad):
    """production (llmpy/engines/triton/reduce.py sum_of_squares): 1024 programs, 2 passes

    The engine's kernels (llm.c's global_norm_squared uses a fixed grid too): a grid of
    1024 programs, about 8 per SM, each looping over a contiguous chunk with a 2048-wide
    fp32 accumulator, so the loads of one program stay in flight back to back; then one
    program adds the 1024 partials in order. Deterministic, no long serial tail."""
    return dict(sumsq=engine.sum_of_squares(grad))


def unit(grad):
    """torch.linalg.vector_norm(dtype=float32) squared (the unit)"""
    return dict(sumsq=torch.linalg.vector_norm(grad, dtype=torch.float32).square().view(1))


def make(dims, device, seed):
    return dict(grad=randn(generator(device, seed), dims["P"], scale=0.01))


def reference(grad):
    return dict(sumsq=grad.double().square().sum().view(1))


def cost(dims, inputs):
    return "bytes", 2 * dims["P"]


OP = Op(
    name="global_norm", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    # fp32 sums of up to 124M squares: blocked summation keeps the error near 1e-6; the
    # atomics of version 1 add 122k block sums into one running total (worse, still ~1e-5)
    tol=dict(sumsq=1e-4),
    cost=cost, llmc="dev/cuda/global_norm.cu")
