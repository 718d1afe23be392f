"""LayerNorm forward, naive to fast (llm.c's dev/cuda/layernorm_forward.cu).

    out = (x - mean) * rstd * w + b over each row of C channels, eps 1e-5;
    mean and rstd (fp32, one per row) are kept for the backward.

x, w, b and out are bf16, as in the triton engine. The op is memory-bound: a row is read
and written once at best, so the versions are about how many times x crosses the memory
bus and how many kernels run.

    version 1  three kernels (mean, rstd, normalize): x read three times
    version 2  one kernel, two loops over the row in chunks: x read twice (2nd from cache)
    version 3  production: the whole row in registers, x read once

The engine's e4m3 copy of a layernorm output (-f8 2: ln2 for the FP8 fc matmul) comes from
the fused form: residual_layernorm_forward.py's version 3.

Dimension legend: N rows (B*T), C channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import layernorm as engine

from .common import Op, generator, np_rel, randn, to_dtype, versions_of

EPS = 1e-5
CHUNK = 256  # channels per loop step of versions 1 and 2


@triton.jit
def _mean_kernel(x_ptr, mean_ptr, C, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * C + cols, mask=cols < C, other=0.0).to(tl.float32)
    tl.store(mean_ptr + row, tl.sum(acc, axis=0) / C)


@triton.jit
def _rstd_kernel(x_ptr, mean_ptr, rstd_ptr, C, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + row)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * C + cols, mask=cols < C, other=0.0).to(tl.float32)
        acc += tl.where(cols < C, (x - mean) * (x - mean), 0.0)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps))


@triton.jit
def _normalize_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, out_ptr, C,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(x_ptr + row * C + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        tl.store(out_ptr + row * C + cols, to_dtype(y, out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _layernorm_two_loop_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, out_ptr, C, eps,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):   # loop 1: sum and sum of squares in one pass
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * C + cols, mask=cols < C, other=0.0).to(tl.float32)
        s += x
        ss += x * x
    mean = tl.sum(s, axis=0) / C
    var = tl.maximum(tl.sum(ss, axis=0) / C - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    for c0 in range(0, C, BLOCK):   # loop 2: x again (from L1/L2), normalize, store
        cols = c0 + tl.arange(0, BLOCK)
        m = cols < C
        x = tl.load(x_ptr + row * C + cols, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        tl.store(out_ptr + row * C + cols, to_dtype(y, out_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


def _buffers(x):
    N, C = x.shape
    return (torch.empty_like(x), torch.empty(N, device=x.device),
            torch.empty(N, device=x.device))


def version1(x, w, b):
    """three kernels, one program per row each: mean, then rstd, then normalize

    The textbook order of operations, one kernel per formula (llm.c's version 2 also
    splits mean and rstd into their own kernels). Each kernel walks the row in CHUNK-wide
    steps, so x is read from memory three times and mean/rstd make a round trip through
    memory between kernels. Three launches, three reads: the slow baseline."""
    N, C = x.shape
    out, mean, rstd = _buffers(x)
    _mean_kernel[(N,)](x, mean, C, BLOCK=CHUNK)
    _rstd_kernel[(N,)](x, mean, rstd, C, EPS, BLOCK=CHUNK)
    _normalize_kernel[(N,)](x, w, b, mean, rstd, out, C, BLOCK=CHUNK)
    return dict(out=out, mean=mean, rstd=rstd)


def version2(x, w, b):
    """one kernel, two loops over the row: sum and sum of squares, then normalize

    Faster than 1: one launch, and the statistics come from one pass, var = E[x^2] - mean^2
    (llm.c's version 4 uses the same identity; it is fine in fp32 for activations of
    moderate mean). The second loop reads x again, but a row is only 1.5 KB, so that read
    mostly hits L1/L2 instead of HBM."""
    N, C = x.shape
    out, mean, rstd = _buffers(x)
    _layernorm_two_loop_kernel[(N,)](x, w, b, mean, rstd, out, C, EPS, BLOCK=CHUNK,
                                     num_warps=4)
    return dict(out=out, mean=mean, rstd=rstd)


def production(x, w, b):
    """production (llmpy/engines/triton/layernorm.py): whole rows in registers

    The engine's kernel: BLOCK_C = next power of two >= C, so one load brings a row (or a
    few: the engine's GPU["forward"]) into registers, mean and the centred variance are two
    in-register reductions (no E[x^2] cancellation), and the row is written once. x
    crosses the bus exactly once; the price is the lanes masked off between C and BLOCK_C
    (768 of 1024 here)."""
    out, mean, rstd = _buffers(x)
    engine.layernorm_forward(x, w, b, out, mean, rstd)
    return dict(out=out, mean=mean, rstd=rstd)


def unit(x, w, b):
    """torch.native_layer_norm (the unit)

    On the CPU torch keeps bf16 statistics, so there (check-only) it runs in fp32."""
    if x.device.type == "cpu":
        out, mean, rstd = torch.native_layer_norm(x.float(), (x.shape[1],), w.float(),
                                                  b.float(), EPS)
        return dict(out=out.to(x.dtype), mean=mean.view(-1), rstd=rstd.view(-1))
    out, mean, rstd = torch.native_layer_norm(x, (x.shape[1],), w, b, EPS)
    return dict(out=out, mean=mean.view(-1), rstd=rstd.view(-1))


def make(dims, device, seed):
    g = generator(device, seed)
    N, C = dims["B"] * dims["T"], dims["C"]
    return dict(x=randn(g, N, C, scale=2.0, shift=0.5), w=randn(g, C, scale=0.5, shift=1.0),
                b=randn(g, C, scale=0.1))


def reference(x, w, b):
    x, w, b = x.double(), w.double(), b.double()
    mean = x.mean(-1, keepdim=True)
    rstd = 1.0 / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + EPS)
    return dict(out=(x - mean) * rstd * w + b, mean=mean[:, 0], rstd=rstd[:, 0])


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    out, _ = nl.layernorm_forward(*(inputs[k].double().cpu().numpy() for k in ("x", "w", "b")))
    return np_rel(out, ref["out"].cpu())


def cost(dims, inputs):
    N, C = dims["B"] * dims["T"], dims["C"]
    return "bytes", 2 * N * C * 2 + 2 * C * 2 + 2 * N * 4


OP = Op(
    name="layernorm_forward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    # out: bf16, rounded once (step 2^-8 relative); mean/rstd: fp32 sums of C bf16 values
    tol=dict(out=1e-2, mean=1e-4, rstd=1e-4),
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/layernorm_forward.cu")
