"""LayerNorm backward, naive to fast (llm.c's dev/cuda/layernorm_backward.cu).

    xhat = (x - mean) * rstd,  dnorm = dout * w
    dx = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))   (per row)
    dw = sum over rows of dout * xhat,  db = sum over rows of dout

dx is ADDED into dres, the residual stream's gradient (as in llm.c and the triton engine:
the residual add's backward is a copy, so the two gradient paths meet here). dout, x, w
and dres are bf16; mean and rstd are the forward's fp32 statistics; dw and db are fp32.

The row-wise part (dx) is easy; the column sums (dw, db) over all N rows are what the
versions differ in:

    version 1  one program per row, dw and db by atomic adds into fp32: N-way contention
               on the same 2C addresses, and a different summation order every run
    version 2  each program sums a block of rows into one partial (no atomics); a second
               tiny kernel adds the partials in a fixed order: deterministic
    version 3  production: version 2's plan with several rows per step, and a third
               partial (the column sums of the new dres: the upstream projection's bias
               gradient, which the engine needs anyway and gets from this same pass)

Dimension legend: N rows (B*T), C channels, P programs (partial sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import layernorm as engine
from llmpy.engines.triton import reduce as engine_reduce

from .common import Op, generator, np_rel, pow2, randn, to_dtype, versions_of

ROWS_PER_PROG = 64  # version 2: rows summed into one partial (N=8192 -> 128 programs)


@triton.jit
def _row_dx(dout_ptr, x_ptr, w, mean_ptr, rstd_ptr, dres_ptr, row, cols, cmask, C):
    # shared by versions 1 and 2: dres[row] += dx; returns (dout, xhat) for the column sums
    offs = row * C + cols
    dout = tl.load(dout_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
    dnorm = dout * w
    c1 = tl.sum(dnorm * xhat, axis=0) / C
    c2 = tl.sum(dnorm, axis=0) / C
    dx = (dnorm - c2 - xhat * c1) * rstd
    dx += tl.load(dres_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(dres_ptr + offs, to_dtype(dx, dres_ptr.dtype.element_ty), mask=cmask)
    return dout, xhat


@triton.jit
def _backward_atomic_kernel(dout_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dres_ptr, dw_ptr,
                            db_ptr, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dout, xhat = _row_dx(dout_ptr, x_ptr, w, mean_ptr, rstd_ptr, dres_ptr, row, cols, cmask, C)
    tl.atomic_add(dw_ptr + cols, dout * xhat, mask=cmask)
    tl.atomic_add(db_ptr + cols, dout, mask=cmask)


@triton.jit
def _backward_partial_kernel(dout_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dres_ptr,
                             partial_ptr, N, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(0, ROWS):
        row = pid.to(tl.int64) * ROWS + r
        if row < N:
            dout, xhat = _row_dx(dout_ptr, x_ptr, w, mean_ptr, rstd_ptr, dres_ptr, row, cols,
                                 cmask, C)
            dw += dout * xhat
            db += dout
    tl.store(partial_ptr + pid * 2 * C + cols, dw, mask=cmask)
    tl.store(partial_ptr + pid * 2 * C + C + cols, db, mask=cmask)


@triton.jit
def _sum_partials_kernel(partial_ptr, dw_ptr, db_ptr, P, C, BLOCK_P: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # one program per BLOCK_C columns of (dw, db); adds the P partials in order
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps < P)[:, None] & cmask[None, :]
        base = partial_ptr + ps[:, None] * 2 * C + cols[None, :]
        dw += tl.sum(tl.load(base, mask=m, other=0.0), axis=0)
        db += tl.sum(tl.load(base + C, mask=m, other=0.0), axis=0)
    tl.store(dw_ptr + cols, dw, mask=cmask)
    tl.store(db_ptr + cols, db, mask=cmask)


def version1(dout, x, w, mean, rstd, dres):
    """one program per row; dw, db by fp32 atomic adds (nondeterministic)

    The simplest complete kernel (llm.c's versions 1-2 also use atomicAdd): each row
    computes its dx and adds its C products into the shared dw and db. All N programs hit
    the same 2C addresses, so the atomics serialize in L2, and the order of the additions
    (hence the last bits of dw) changes from run to run."""
    N, C = x.shape
    dw = torch.zeros(C, device=x.device)
    db = torch.zeros(C, device=x.device)
    _backward_atomic_kernel[(N,)](dout, x, w, mean, rstd, dres, dw, db, C, BLOCK_C=pow2(C),
                                  num_warps=4)
    return dict(dres=dres, dw=dw, db=db)


def version2(dout, x, w, mean, rstd, dres):
    """a block of rows per program, one partial sum each, then a fixed-order reduction

    No atomics: program p sums dout*xhat and dout over its ROWS_PER_PROG rows in registers
    and writes one (2, C) partial; a second kernel adds the N/ROWS_PER_PROG partials in
    order. The column sums now cost registers instead of contended L2 atomics, and the
    result is the same bits every run (STYLE.md item 6)."""
    N, C = x.shape
    rows = ROWS_PER_PROG
    P = triton.cdiv(N, rows)
    partial = torch.empty(P, 2, C, device=x.device)
    dw = torch.empty(C, device=x.device)
    db = torch.empty(C, device=x.device)
    _backward_partial_kernel[(P,)](dout, x, w, mean, rstd, dres, partial, N, C, ROWS=rows,
                                   BLOCK_C=pow2(C), num_warps=4)
    BLOCK_C = 128
    _sum_partials_kernel[(triton.cdiv(C, BLOCK_C),)](partial, dw, db, P, C,
                                                      BLOCK_P=min(32, pow2(P)), BLOCK_C=BLOCK_C)
    return dict(dres=dres, dw=dw, db=db)


def production(dout, x, w, mean, rstd, dres):
    """production (llmpy/engines/triton/layernorm.py + reduce.add_partials)

    The engine's kernels, as its backward calls them: version 2's per-program partial sums
    with several rows per loop step (rows per program and per step: the engine's GPU dict,
    swept by bench/triton_kernels.py), plus a third partial, the column sums of the new
    dres: the bias gradient of the attproj/fcproj matmul that fed this residual (work this
    op does not ask for, done in the same pass; checked here as dbias). One add_partials
    launch then adds all three in order."""
    N, C = x.shape
    P = triton.cdiv(N, engine.layernorm_backward_rows_per_prog(N))
    partial = torch.empty(P * 3 * C, device=x.device)
    part = engine.layernorm_backward(dout, x, w, mean, rstd, dres, partial, accumulate=True)
    dw, db, dbias = (torch.zeros(C, device=x.device) for _ in range(3))
    engine_reduce.add_partials(part.view(P, 3 * C), dw, db, dbias)
    return dict(dres=dres, dw=dw, db=db, dbias=dbias)


def unit(dout, x, w, mean, rstd, dres):
    """torch.native_layer_norm_backward, then dres += dx (the unit)

    torch returns dw and db in w's dtype, bf16 (checked at bf16 tolerance). On the CPU
    (check-only) torch keeps mean and rstd in bf16 and wants them so."""
    N, C = x.shape
    stats = torch.float32 if x.device.type == "cuda" else x.dtype
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dout, x, (C,), mean.view(N, 1).to(stats), rstd.view(N, 1).to(stats), w, w,
        [True, True, True])
    dres += dx
    return dict(dres=dres, dw=dw.float(), db=db.float())


def make(dims, device, seed):
    g = generator(device, seed)
    N, C = dims["B"] * dims["T"], dims["C"]
    x = randn(g, N, C, scale=2.0, shift=0.5)
    xf = x.float()
    mean = xf.mean(-1)
    rstd = torch.rsqrt(((xf - mean[:, None]) ** 2).mean(-1) + 1e-5)
    return dict(dout=randn(g, N, C), x=x, w=randn(g, C, scale=0.5, shift=1.0), mean=mean,
                rstd=rstd, dres=randn(g, N, C))


def reference(dout, x, w, mean, rstd, dres):
    dout, x, w = dout.double(), x.double(), w.double()
    mu = x.mean(-1, keepdim=True)
    rs = 1.0 / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)
    xhat = (x - mu) * rs
    dnorm = dout * w
    dx = rs * (dnorm - dnorm.mean(-1, keepdim=True) - xhat * (dnorm * xhat).mean(-1, keepdim=True))
    dres = dres.double() + dx
    # dbias: the column sums of the new bf16 dres (the production version's extra output)
    return dict(dres=dres, dw=(dout * xhat).sum(0), db=dout.sum(0), dbias=dres.sum(0))


def numpy_check(inputs, ref):
    import numpy as np
    from llmpy.engines import numpy_layers as nl
    x, w, dout = (inputs[k].double().cpu().numpy() for k in ("x", "w", "dout"))
    _, cache = nl.layernorm_forward(x, w, np.zeros_like(w))
    dx, dw, db = nl.layernorm_backward(dout, cache)
    dres = inputs["dres"].double().cpu().numpy() + dx
    return max(np_rel(dres, ref["dres"].cpu()), np_rel(dw, ref["dw"].cpu()),
               np_rel(db, ref["db"].cpu()))


def cost(dims, inputs):
    N, C = dims["B"] * dims["T"], dims["C"]
    return "bytes", 4 * N * C * 2 + 2 * N * 4 + C * 2 + 2 * C * 4


OP = Op(
    name="layernorm_backward", make=make, reference=reference,
    # dres: bf16, rounded once; dw, db: fp32 sums over N rows (summation order only);
    # torch's dw, db are bf16 (and its CPU statistics too: 2e-2)
    versions=versions_of(globals(), production, unit, unit_tol=dict(dw=2e-2, db=2e-2)),
    tol=dict(dres=1e-2, dw=1e-4, db=1e-4), optional_tol=dict(dbias=1e-2),
    cost=cost, inplace=True, numpy_check=numpy_check, llmc="dev/cuda/layernorm_backward.cu")
