"""Causal softmax over attention scores (llm.c's dev/cuda/softmax_forward.cu).

    probs[r, j] = exp(att[r, j] - max) / sum   for j <= t,   0 for j > t

att holds the (already scaled) pre-softmax scores of all B*NH*T query rows, row r being
query t = r % T, so only its first t+1 entries count. bf16 in and out, fp32 inside. This is
the middle kernel of naive attention (attention_forward.py, version 1); flash attention
never writes these rows at all.

    version 1  three loops over the row (max, sum of exp, write): the row is read 3 times
    version 2  online softmax: one loop keeps a running max and a sum rescaled to it
               (Milakov & Gimelshein 2018), then one loop writes: 2 reads
    version 3  the whole row (T <= a few thousand) in registers: one read, one write

Dimension legend: R = B*NH*T rows, T columns (keys).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import Op, generator, pow2, randn, to_dtype, versions_of

CHUNK = 256  # columns per loop step of versions 1 and 2


@triton.jit
def _softmax_three_loop_kernel(x_ptr, out_ptr, T, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = r % T + 1  # valid columns of this row
    base = r * T
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, x)
    mx = tl.max(m, axis=0)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        s += tl.exp(x - mx)
    inv = 1.0 / tl.sum(s, axis=0)
    for c0 in range(0, T, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        tl.store(out_ptr + base + cols, to_dtype(tl.exp(x - mx) * inv, out_ptr.dtype.element_ty),
                 mask=cols < T)


@triton.jit
def _softmax_online_kernel(x_ptr, out_ptr, T, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = r % T + 1
    base = r * T
    # per lane: a running max and a sum of exp(x - that max), rescaled when the max grows
    m = tl.full([BLOCK], -1e30, dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, n, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=0)
    inv = 1.0 / tl.sum(s * tl.exp(m - mx), axis=0)
    for c0 in range(0, T, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
        tl.store(out_ptr + base + cols, to_dtype(tl.exp(x - mx) * inv, out_ptr.dtype.element_ty),
                 mask=cols < T)


@triton.jit
def _softmax_row_kernel(x_ptr, out_ptr, T, BLOCK_T: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = r % T + 1
    cols = tl.arange(0, BLOCK_T)
    x = tl.load(x_ptr + r * T + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    p = e / tl.sum(e, axis=0)
    tl.store(out_ptr + r * T + cols, to_dtype(p, out_ptr.dtype.element_ty), mask=cols < T)


def version1(att):
    """three loops over the row: max, then sum of exp, then write

    The textbook stable softmax, one program per row, CHUNK columns per step: three
    passes over the row, each a separate read of it (only the causal part is loaded: masked
    lanes move no bytes). The second and third reads mostly come from L2."""
    R, T = att.shape
    out = torch.empty_like(att)
    _softmax_three_loop_kernel[(R,)](att, out, T, BLOCK=CHUNK, num_warps=4)
    return dict(probs=out)


def version2(att):
    """online softmax: running max and rescaled sum in one loop, then the write loop

    When the max grows from m to m', the sum so far is multiplied by exp(m - m'), so max
    and sum come from a single pass (llm.c's softmax_forward online variants; the trick at
    the heart of flash attention). One read fewer than version 1."""
    R, T = att.shape
    out = torch.empty_like(att)
    _softmax_online_kernel[(R,)](att, out, T, BLOCK=CHUNK, num_warps=4)
    return dict(probs=out)


def version3(att):
    """the whole row in registers: one read, one write

    With BLOCK_T = next power of two >= T (1024 here: 8 values per lane over 4 warps) the
    row is loaded once with 16-byte vectors, max and sum are in-register reductions, and
    the probabilities are stored once. Only works while a row fits in registers (T up to a
    few thousand); beyond that, version 2."""
    R, T = att.shape
    out = torch.empty_like(att)
    BLOCK_T = pow2(T)
    _softmax_row_kernel[(R,)](att, out, T, BLOCK_T=BLOCK_T, num_warps=4 if BLOCK_T <= 1024 else 8)
    return dict(probs=out)


@functools.lru_cache(maxsize=4)
def _future(R, T, device):
    t = torch.arange(R, device=device) % T
    return torch.arange(T, device=device)[None, :] > t[:, None]   # (R, T) True above diagonal


def unit(att):
    """torch: masked_fill(future, -inf) then softmax (the unit: two kernels)"""
    R, T = att.shape
    return dict(probs=torch.softmax(att.masked_fill(_future(R, T, att.device), float("-inf")),
                                    dim=-1))


def make(dims, device, seed):
    g = generator(device, seed)
    T = dims["T"]
    return dict(att=randn(g, dims["B"] * dims["NH"] * T, T, scale=2.0))


def reference(att):
    R, T = att.shape
    x = att.double().masked_fill(_future(R, T, att.device), float("-inf"))
    return dict(probs=torch.softmax(x, dim=-1))


def cost(dims, inputs):
    R, T = inputs["att"].shape
    rows = R // T                       # B*NH blocks of T query rows
    return "bytes", rows * T * (T + 1) // 2 * 2 + R * T * 2


OP = Op(
    name="softmax_forward", make=make, reference=reference,
    versions=versions_of(globals(), None, unit),
    tol=dict(probs=1e-2),  # bf16 probabilities, rounded once
    cost=cost, llmc="dev/cuda/softmax_forward.cu")
