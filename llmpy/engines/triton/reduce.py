"""Deterministic reductions: partial sums into gradients, and the global gradient norm (llm.c's global_norm_squared in llmc/global_norm.cuh,
and the bias-gradient reduction of its matmul_backward).

No atomics anywhere: a reduction is split into programs that each write one fp32 partial
sum, then a second pass adds the partials in a fixed order. Same inputs, same bits.

Dimension legend: N rows, K columns, P partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, pow2, to_dtype


@triton.jit
def _add_partials_kernel(partial_ptr, t0_ptr, t1_ptr, t2_ptr, P, K, SEG, stride_p,
                         NT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    # column j of the partials belongs to target j // SEG, at its column j % SEG
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & cmask[None, :]
        tile = tl.load(partial_ptr + ps[:, None] * stride_p + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    for i in tl.static_range(NT):
        if i == 0:
            t_ptr = t0_ptr
        elif i == 1:
            t_ptr = t1_ptr
        else:
            t_ptr = t2_ptr
        m = cmask & (cols >= i * SEG) & (cols < (i + 1) * SEG)
        ptrs = t_ptr + (cols - i * SEG)
        t = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        tl.store(ptrs, to_dtype(t + acc, t_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sumsq_partial_kernel(x_ptr, partial_ptr, n, CHUNK, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        mask = (offs < n) & (i + tl.arange(0, BLOCK) < CHUNK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


# GPU launch configuration of add_partials
ADD_GPU = dict(BLOCK_K=64, BLOCK_P=64)


def add_partials(partial: torch.Tensor, *targets: torch.Tensor) -> None:
    """Add partial.sum(0) into the targets: partial (P, K) fp32 with unit column stride, and
    1 to 3 contiguous targets of K / len(targets) elements each, in column order."""
    P, K = partial.shape
    if partial.stride(1) != 1 or partial.dtype != torch.float32:
        raise ValueError("add_partials: partial must be fp32 with contiguous columns")
    if not 1 <= len(targets) <= 3 or K % len(targets):
        raise ValueError(f"add_partials: 1 to 3 targets splitting {K} columns evenly")
    seg = K // len(targets)
    for t in targets:
        if t.numel() != seg or not t.is_contiguous():
            raise ValueError(f"add_partials: targets must be contiguous ({seg},), got "
                             f"{tuple(t.shape)}")
    check_device(partial, *targets)
    if interpreting():
        BLOCK_K, BLOCK_P = pow2(K), pow2(min(P, 64))
    else:
        BLOCK_K, BLOCK_P = ADD_GPU["BLOCK_K"], ADD_GPU["BLOCK_P"]
    t = list(targets) + [targets[0]] * (3 - len(targets))
    _add_partials_kernel[(triton.cdiv(K, BLOCK_K),)](partial, t[0], t[1], t[2], P, K, seg,
                                                     partial.stride(0), NT=len(targets),
                                                     BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K)


NORM_PROGRAMS = 1024


def sum_of_squares(x: torch.Tensor, partial: torch.Tensor | None = None) -> torch.Tensor:
    """sum(x**2) over a flat contiguous tensor, in fp32, as a 1-element fp32 tensor:
    NORM_PROGRAMS partial sums, then one program adds them in order."""
    if not x.is_contiguous():
        raise ValueError("sum_of_squares: x must be contiguous")
    check_device(x)
    n = x.numel()
    programs = 4 if interpreting() else NORM_PROGRAMS
    BLOCK = 16384 if interpreting() else 2048
    chunk = triton.cdiv(triton.cdiv(n, programs), BLOCK) * BLOCK
    if partial is None or partial.numel() < programs + 1:
        partial = torch.empty(programs + 1, dtype=torch.float32, device=x.device)
    _sumsq_partial_kernel[(programs,)](x, partial, n, chunk, BLOCK=BLOCK, num_warps=8)
    out = partial[programs:programs + 1]
    _sum_kernel[(1,)](partial, out, programs, BLOCK=pow2(programs))
    return out


def total(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (1,) fp32 = sum of the small contiguous fp32 vector x, by one program, in order."""
    if not x.is_contiguous() or x.dtype != torch.float32 or out.numel() != 1:
        raise ValueError("total: x must be contiguous fp32 and out one element")
    check_device(x, out)
    _sum_kernel[(1,)](x, out, x.numel(), BLOCK=1024)
    return out
