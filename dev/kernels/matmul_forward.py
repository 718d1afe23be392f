"""Matmul with bias, forward (llm.c's dev/cuda/matmul_forward.cu).

    out = x @ w^T + b        x (N, C), w (OC, C) as in nn.Linear and llm.c's files

bf16 in and out, fp32 accumulation; sized as GPT-2's fc layer (N = 8192, C = 768,
OC = 3072: 38.7 GFLOP), the largest matmul of a block. Compute-bound: measured in TFLOP/s
against cuBLAS (torch's F.linear), as llm.c does. The triton engine itself calls cuBLAS
through torch for every matmul (DESIGN.md), so there is no production version.

    version 1  a plain tiled kernel: one (64 x 64) output tile per program, K in steps of
               32, tl.dot on tensor cores, tiles launched in row-major order, no pipelining
    version 2  (128 x 128) tiles, K steps of 64, grouped launch order for L2 reuse, 3-stage
               software pipeline, no masks when the shape allows
    version 3  version 2's kernel autotuned: the best of six tile / pipeline / warp
               configurations for this shape, measured on first use

Dimension legend: M = N rows (B*T), K = C (input width), Nc = OC (output width).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import Op, dot, generator, interpreting, np_rel, randn, to_dtype, versions_of


@triton.jit
def _matmul_simple_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, UPCAST: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :],
                    mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)
        b = tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None],
                    mask=(cols < N)[None, :] & (ks < K)[:, None], other=0.0)     # (BK, BN)
        acc = dot(a, b, acc, UPCAST)
    acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :],
             to_dtype(acc, out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _matmul_grouped_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, UPCAST: tl.constexpr,
                           EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row-tiles advance together along the columns, so the w tiles
    # they share (and their x tiles) are still in L2 when the neighbours need them
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    # rows and columns past the edge wrap around (their results are never stored), so the
    # loads need no row/column masks
    rows = (pid_m * BM + tl.arange(0, BM)) % M
    cols = (pid_n * BN + tl.arange(0, BN)) % N
    ks = tl.arange(0, BK)
    a_ptrs = x_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    b_ptrs = w_ptr + cols.to(tl.int64)[None, :] * K + ks[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + ks < K)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + ks < K)[:, None], other=0.0)
        acc = dot(a, b, acc, UPCAST)
        a_ptrs += BK
        b_ptrs += BK
    acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    out_rows = pid_m * BM + tl.arange(0, BM)
    out_cols = pid_n * BN + tl.arange(0, BN)
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * N + out_cols[None, :],
             to_dtype(acc, out_ptr.dtype.element_ty),
             mask=(out_rows < M)[:, None] & (out_cols < N)[None, :])


def _config(BM, BN, BK, stages, warps):
    return triton.Config(dict(BM=BM, BN=BN, BK=BK, GROUP_M=8), num_stages=stages,
                         num_warps=warps)


TUNE_CONFIGS = [_config(128, 256, 64, 3, 8), _config(256, 128, 64, 3, 8),
                _config(128, 128, 64, 4, 4), _config(128, 128, 64, 3, 8),
                _config(128, 64, 64, 4, 4), _config(64, 256, 64, 4, 4)]

_matmul_tuned = triton.autotune(configs=TUNE_CONFIGS, key=["M", "N", "K"])(
    triton.heuristics(dict(EVEN_K=lambda a: a["K"] % a["BK"] == 0))(_matmul_grouped_kernel))


def _out(x, w):
    return torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)


def version1(x, w, b):
    """simple tiles: one 64 x 64 output tile per program, K in steps of 32

    The textbook tiled matmul (llm.c's version 1 is one thread per output; a Triton program
    is already a tile): each program loads a (64, 32) tile of x and a (32, 64) tile of w^T
    per step and multiplies them with tl.dot on the tensor cores. Small tiles mean each
    byte loaded feeds few FLOPs (16 per bf16 element), nothing is prefetched while the
    tensor cores work (num_stages=1), and the row-major launch order walks all of w for
    every row of tiles, evicting it from L2 in between."""
    M, K = x.shape
    N = w.shape[0]
    out = _out(x, w)
    BM, BN, BK = 64, 64, 32
    _matmul_simple_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        x, w, b, out, M, N, K, UPCAST=interpreting(), BM=BM, BN=BN, BK=BK, num_warps=4,
        num_stages=1)
    return dict(out=out)


def version2(x, w, b):
    """big tiles, grouped order, 3-stage pipeline, unmasked loads

    (128 x 128) tiles with K steps of 64 double the FLOPs per byte loaded; num_stages=3
    has the next two k-steps' tiles loading (cp.async) while the tensor cores multiply the
    current ones; the grouped launch order (GROUP_M=8, Triton's matmul tutorial) keeps the
    w tiles a group shares in L2; rows and columns past the edge wrap instead of being
    masked, and the K mask is compiled out when BK divides K."""
    M, K = x.shape
    N = w.shape[0]
    out = _out(x, w)
    BM, BN, BK = 128, 128, 64
    _matmul_grouped_kernel[(triton.cdiv(M, BM) * triton.cdiv(N, BN),)](
        x, w, b, out, M, N, K, UPCAST=interpreting(), EVEN_K=K % BK == 0, BM=BM, BN=BN, BK=BK,
        GROUP_M=8, num_warps=8, num_stages=3)
    return dict(out=out)


def version3(x, w, b):
    """version 2's kernel, autotuned over six tile/pipeline/warp configurations

    triton.autotune times each configuration on the first call for a shape (M, N, K) and
    keeps the fastest: larger (128 x 256) tiles raise the FLOPs per byte further, and the
    best stage and warp counts depend on the tile. Under TRITON_INTERPRET=1 (no timing
    possible) the first configuration runs."""
    M, K = x.shape
    N = w.shape[0]
    out = _out(x, w)
    if interpreting():
        cfg = TUNE_CONFIGS[0].kwargs
        _matmul_grouped_kernel[(triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)](
            x, w, b, out, M, N, K, UPCAST=True, EVEN_K=K % cfg["BK"] == 0, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
        _matmul_tuned[grid](x, w, b, out, M, N, K, UPCAST=False)
    return dict(out=out)


def unit(x, w, b):
    """torch.nn.functional.linear: cuBLAS(Lt) with the bias in its epilogue (the unit)"""
    return dict(out=torch.nn.functional.linear(x, w, b))


def make(dims, device, seed):
    g = generator(device, seed)
    N, C = dims["B"] * dims["T"], dims["C"]
    return dict(x=randn(g, N, C), w=randn(g, 4 * C, C, scale=0.02), b=randn(g, 4 * C, scale=0.1))


def reference(x, w, b):
    return dict(out=x.double() @ w.double().T + b.double())


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    out, _ = nl.matmul_forward(*(inputs[k].double().cpu().numpy() for k in ("x", "w", "b")))
    return np_rel(out, ref["out"].cpu())


def cost(dims, inputs):
    (M, K), N = inputs["x"].shape, inputs["w"].shape[0]
    return "flops", 2 * M * N * K


OP = Op(
    name="matmul_forward", make=make, reference=reference,
    versions=versions_of(globals(), None, unit),
    tol=dict(out=1e-2),  # bf16 output of an fp32 accumulation, rounded once
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/matmul_forward.cu")
