"""Causal self-attention, forward (llm.c's dev/cuda/attention_forward.cu).

    q, k, v = split(qkv) into heads,   y = softmax(q k^T / sqrt(HS), causal) v

qkv is the (B, T, 3C) bf16 output of the qkv matmul, read in place (q, k, v of head h are
strided column blocks of it); y is (B, T, C) bf16, heads side by side, ready for the
attproj matmul. Compute-bound once the T x T matrix is never stored: FLOPs counted as
4 B NH T^2 HS / 2 (two matmuls, half of them skipped by the causal mask).

    version 1  naive, three kernels: scores q k^T (fp32, all T x T), the softmax kernel of
               softmax_forward.py (version 3), probs @ v: the (B, NH, T, T) matrices make
               a round trip through memory
    version 2  flash attention (Dao et al. 2022): one program per block of queries walks
               the key blocks up to the diagonal with an online softmax; nothing T x T is
               ever written
    version 3  flash, tuned: bigger query tiles, the causal mask only on the diagonal
               blocks, exp2 with the scale folded in, software pipelining, longest
               programs first

The triton engine itself calls torch's fused kernels (cuDNN or FlashAttention-2, see
llmpy/engines/triton/attention.py): that is the unit here, torch's SDPA, so there is no
separate production version.

Dimension legend: B batch, T time, C channels, NH heads, HS head size, BM query rows and
BN key rows of a tile, D = BLOCK_D >= HS.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import Op, dot, dot_min, generator, interpreting, np_rel, randn, to_dtype, \
    versions_of
from .softmax_forward import _softmax_row_kernel


@triton.jit
def _scores_kernel(qkv_ptr, s_ptr, T, C, NH, HS, scale, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    # s[b, h, i, j] = scale * q_i . k_j for one (BM, BN) tile, all of T x T
    bh = tl.program_id(0)
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    d = tl.arange(0, D)
    base = qkv_ptr + b * T * 3 * C + h * HS
    q = tl.load(base + rows[:, None] * 3 * C + d[None, :],
                mask=(rows < T)[:, None] & (d < HS)[None, :], other=0.0)
    kt = tl.load(base + C + cols[None, :] * 3 * C + d[:, None],
                 mask=(cols < T)[None, :] & (d < HS)[:, None], other=0.0)   # (D, BN)
    s = dot(q, kt, tl.zeros([BM, BN], dtype=tl.float32), UPCAST) * scale
    out = s_ptr + bh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :]
    tl.store(out, s, mask=(rows < T)[:, None] & (cols < T)[None, :])


@triton.jit
def _pv_kernel(p_ptr, qkv_ptr, y_ptr, T, C, NH, HS, UPCAST: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    # y[b, i, h] = sum_j p[b, h, i, j] v_j over all T keys (the zeros above the diagonal too)
    bh = tl.program_id(0)
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    for n0 in range(0, T, BN):
        cols = n0 + tl.arange(0, BN)
        p = tl.load(p_ptr + bh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :],
                    mask=(rows < T)[:, None] & (cols < T)[None, :], other=0.0)
        v = tl.load(qkv_ptr + b * T * 3 * C + 2 * C + h * HS + cols[:, None] * 3 * C + d[None, :],
                    mask=(cols < T)[:, None] & (d < HS)[None, :], other=0.0)
        acc = dot(p, v, acc, UPCAST)
    y = y_ptr + b * T * C + h * HS + rows[:, None] * C + d[None, :]
    tl.store(y, to_dtype(acc, y_ptr.dtype.element_ty), mask=(rows < T)[:, None] & (d < HS)[None, :])


@triton.jit
def _flash_kernel(qkv_ptr, y_ptr, T, C, NH, HS, scale, UPCAST: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    rows = start_m + tl.arange(0, BM)
    d = tl.arange(0, D)
    dmask = d < HS
    base = qkv_ptr + b * T * 3 * C + h * HS
    q = tl.load(base + rows[:, None] * 3 * C + d[None, :],
                mask=(rows < T)[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BM], -1e30, dtype=tl.float32)     # running max of each query row
    l_i = tl.zeros([BM], dtype=tl.float32)           # running sum of exp(s - m_i)
    acc = tl.zeros([BM, D], dtype=tl.float32)        # running sum of exp(s - m_i) v
    for n0 in range(0, tl.minimum(start_m + BM, T), BN):
        cols = n0 + tl.arange(0, BN)
        kt = tl.load(base + C + cols[None, :] * 3 * C + d[:, None],
                     mask=(cols < T)[None, :] & dmask[:, None], other=0.0)
        s = dot(q, kt, tl.zeros([BM, BN], dtype=tl.float32), UPCAST) * scale
        s = tl.where((cols[None, :] <= rows[:, None]) & (cols < T)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(base + 2 * C + cols[:, None] * 3 * C + d[None, :],
                    mask=(cols < T)[:, None] & dmask[None, :], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    y = y_ptr + b * T * C + h * HS + rows[:, None] * C + d[None, :]
    tl.store(y, to_dtype(acc / l_i[:, None], y_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & dmask[None, :])


@triton.jit
def _flash_inner(acc, l_i, m_i, q, base, rows, lo, hi, T, C, qk_scale, HS: tl.constexpr,
                 DIAGONAL: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, D: tl.constexpr):
    # keys [lo, hi) in BN steps; the causal and length masks only on DIAGONAL blocks (below
    # the diagonal every key is visible and < T). HS is a constexpr: with D == HS the head
    # mask folds away.
    d = tl.arange(0, D)
    dmask = d < HS
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        if DIAGONAL:
            kt = tl.load(base + C + cols[None, :] * 3 * C + d[:, None],
                         mask=(cols < T)[None, :] & dmask[:, None], other=0.0)
            v = tl.load(base + 2 * C + cols[:, None] * 3 * C + d[None, :],
                        mask=(cols < T)[:, None] & dmask[None, :], other=0.0)
        else:
            kt = tl.load(base + C + cols[None, :] * 3 * C + d[:, None], mask=dmask[:, None],
                         other=0.0)
            v = tl.load(base + 2 * C + cols[:, None] * 3 * C + d[None, :], mask=dmask[None, :],
                        other=0.0)
        s = dot(q, kt, tl.zeros([BM, BN], dtype=tl.float32), UPCAST) * qk_scale
        if DIAGONAL:
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < T)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_tuned_kernel(qkv_ptr, y_ptr, T, C, NH, qk_scale, HS: tl.constexpr,
                        UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        D: tl.constexpr):
    # query blocks in reverse: the longest programs (most keys) start first
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BM
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    rows = start_m + tl.arange(0, BM)
    d = tl.arange(0, D)
    base = qkv_ptr + b * T * 3 * C + h * HS
    q = tl.load(base + rows[:, None] * 3 * C + d[None, :],
                mask=(rows < T)[:, None] & (d < HS)[None, :], other=0.0)
    m_i = tl.full([BM], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    acc, l_i, m_i = _flash_inner(acc, l_i, m_i, q, base, rows, 0, start_m, T, C, qk_scale,
                                 HS, False, UPCAST, BM, BN, D)
    acc, l_i, m_i = _flash_inner(acc, l_i, m_i, q, base, rows, start_m,
                                 tl.minimum(start_m + BM, T), T, C, qk_scale, HS, True, UPCAST,
                                 BM, BN, D)
    y = y_ptr + b * T * C + h * HS + rows[:, None] * C + d[None, :]
    tl.store(y, to_dtype(acc / l_i[:, None], y_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & (d < HS)[None, :])


def _tile(T: int, want: int) -> int:
    """A tile edge: `want` at real sizes, smaller at tiny T so that several tiles run."""
    return min(want, max(16, triton.next_power_of_2(T) // 4))


def _shapes(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    return B, T, C, C // NH


def version1(qkv, NH):
    """naive: scores kernel (fp32 T x T), softmax kernel, probs @ v kernel

    Attention as three separate steps, the way the math reads (llm.c's version 1/2 with
    matmuls for the products): q k^T for every (query, key) pair, also the masked half,
    written as fp32 (B, NH, T, T); the whole-row softmax of softmax_forward.py rewrites it
    as bf16 probabilities; a third kernel multiplies by v, zeros included. At B=8, T=1024
    that is ~600 MB through memory and twice the FLOPs needed."""
    B, T, C, HS = _shapes(qkv, NH)
    y = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
    scores = torch.empty(B * NH * T, T, dtype=torch.float32, device=qkv.device)
    probs = torch.empty(B * NH * T, T, dtype=qkv.dtype, device=qkv.device)
    BM = BN = _tile(T, 64)
    D = dot_min(HS)
    up = interpreting()
    grid = (B * NH, triton.cdiv(T, BM), triton.cdiv(T, BN))
    _scores_kernel[grid](qkv, scores, T, C, NH, HS, 1.0 / math.sqrt(HS), UPCAST=up, BM=BM, BN=BN,
                         D=D, num_warps=4)
    BLOCK_T = triton.next_power_of_2(T)
    _softmax_row_kernel[(B * NH * T,)](scores, probs, T, BLOCK_T=BLOCK_T,
                                       num_warps=4 if BLOCK_T <= 1024 else 8)
    _pv_kernel[(B * NH, triton.cdiv(T, BM))](probs, qkv, y, T, C, NH, HS, UPCAST=up, BM=BM, BN=BN,
                                             D=D, num_warps=4)
    return dict(y=y)


def version2(qkv, NH):
    """flash attention: tiles of queries, online softmax over key tiles, no T x T in memory

    One program owns BM=64 query rows of one head and walks the key/value tiles up to the
    diagonal, keeping for each row a running max, a running sum and the running weighted
    sum of v (rescaled by exp(old max - new max) as the max grows: the online softmax of
    softmax_forward.py version 2). q, k, v are read once per query tile and y written once:
    memory traffic drops from O(T^2) to O(T HS), and the masked half is skipped. Every tile
    pays for the causal mask, even those far below the diagonal."""
    B, T, C, HS = _shapes(qkv, NH)
    y = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
    BM = BN = _tile(T, 64)
    _flash_kernel[(triton.cdiv(T, BM), B * NH)](qkv, y, T, C, NH, HS, 1.0 / math.sqrt(HS),
                                                UPCAST=interpreting(), BM=BM, BN=BN,
                                                D=dot_min(HS), num_warps=4)
    return dict(y=y)


def version3(qkv, NH):
    """flash, tuned: 128-query tiles, mask only on the diagonal, exp2, pipelined, longest first

    Same algorithm as version 2, with the changes that FlashAttention-2 and Triton's fused
    attention tutorial make: BM=128 query rows per program (8 warps) halve the k/v reads
    per query; blocks wholly below the diagonal skip the mask (only the one or two tiles on
    the diagonal need it); the softmax uses exp2 with log2(e)/sqrt(HS) folded into one
    multiply; num_stages=3 lets the next k/v tiles load while tensor cores work; and the
    programs with the most key tiles are launched first so the last wave is not one long
    straggler."""
    B, T, C, HS = _shapes(qkv, NH)
    y = torch.empty(B, T, C, dtype=qkv.dtype, device=qkv.device)
    BM, BN = _tile(T, 128), _tile(T, 64)
    _flash_tuned_kernel[(triton.cdiv(T, BM), B * NH)](
        qkv, y, T, C, NH, 1.4426950408889634 / math.sqrt(HS), HS=HS, UPCAST=interpreting(),
        BM=BM, BN=BN, D=dot_min(HS), num_warps=8, num_stages=3)
    return dict(y=y)


def unit(qkv, NH):
    """torch scaled_dot_product_attention(is_causal=True) (the unit: cuDNN/flash)"""
    B, T, C, HS = _shapes(qkv, NH)
    q, k, v = qkv.view(B, T, 3, NH, HS).permute(2, 0, 3, 1, 4)    # each (B, NH, T, HS)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return dict(y=y.transpose(1, 2).reshape(B, T, C))


def make(dims, device, seed):
    g = generator(device, seed)
    B, T, C = dims["B"], dims["T"], dims["C"]
    return dict(qkv=randn(g, B, T, 3 * C), NH=dims["NH"])


def reference(qkv, NH):
    B, T, C, HS = _shapes(qkv, NH)
    q, k, v = qkv.double().view(B, T, 3, NH, HS).permute(2, 0, 3, 1, 4)
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HS)            # (B, NH, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
    p = torch.softmax(s.masked_fill(future, float("-inf")), dim=-1)
    return dict(y=torch.matmul(p, v).transpose(1, 2).reshape(B, T, C))


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    out, _ = nl.attention_forward(inputs["qkv"].double().cpu().numpy(), inputs["NH"])
    return np_rel(out, ref["y"].cpu())


def cost(dims, inputs):
    B, T, C = inputs["qkv"].shape[0], inputs["qkv"].shape[1], inputs["qkv"].shape[2] // 3
    return "flops", 4 * B * T * T * C / 2     # = 4 B NH T^2 HS / 2


OP = Op(
    name="attention_forward", make=make, reference=reference,
    versions=versions_of(globals(), None, unit),
    # bf16 output; the probabilities are rounded to bf16 before the product with v
    tol=dict(y=2e-2),
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/attention_forward.cu")
