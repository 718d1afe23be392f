"""Token + position embedding, forward and a deterministic backward (llm.c's
llmc/encoder.cuh).

Forward: out[b, t] = wte[inputs[b, t]] + wpe[pos + t].

Backward without atomics, as llm.c does: the positions are bucketed by token on the host
(the inputs come from the host anyway), each bucket split into sub-buckets of at most
SUB positions. One kernel sums each sub-bucket's rows of dout into an fp32 scratch row, a
second adds each token's sub-bucket sums, in order, into its wte gradient row. dwpe[t] gets
the sum over the batch of dout[:, t], in a fixed order too. Same inputs, same bits.

Dimension legend: B batch, T time, C channels, N = B*T, S sub-buckets, U distinct tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, pow2, row_tile, to_dtype

SUB = 64  # positions per sub-bucket: bounds the work of one program


@triton.jit
def _encoder_forward_kernel(inp_ptr, wte_ptr, wpe_ptr, out_ptr, N, T, C, pos0,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    mask = rmask[:, None] & (cols < C)[None, :]
    tok = tl.load(inp_ptr + rows, mask=rmask, other=0).to(tl.int64)
    t = (rows % T + pos0).to(tl.int64)
    e = tl.load(wte_ptr + tok[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    p = tl.load(wpe_ptr + t[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptr + offs, to_dtype(e + p, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bucket_sum_kernel(dout_ptr, order_ptr, sub_start_ptr, sub_len_ptr, scratch_ptr, S, C,
                       SPP: tl.constexpr, SUB: tl.constexpr, BLOCK_C: tl.constexpr):
    # SPP sub-buckets per program (1 on the GPU; many in the interpreter, where fewer and
    # larger programs run faster)
    subs = tl.program_id(0) * SPP + tl.arange(0, SPP)
    smask = subs < S
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = tl.load(sub_start_ptr + subs, mask=smask, other=0)
    count = tl.load(sub_len_ptr + subs, mask=smask, other=0)
    k = tl.arange(0, SUB)
    kmask = k[None, :] < count[:, None]                                   # (SPP, SUB)
    pos = tl.load(order_ptr + start[:, None] + k[None, :], mask=kmask, other=0).to(tl.int64)
    mask = kmask[:, :, None] & cmask[None, None, :]                       # (SPP, SUB, BLOCK_C)
    rows = tl.load(dout_ptr + pos[:, :, None] * C + cols[None, None, :], mask=mask, other=0.0)
    sums = tl.sum(rows.to(tl.float32), axis=1)                            # (SPP, BLOCK_C)
    tl.store(scratch_ptr + subs.to(tl.int64)[:, None] * C + cols[None, :], sums,
             mask=smask[:, None] & cmask[None, :])


@triton.jit
def _bucket_scatter_kernel(scratch_ptr, tok_ptr, tok_sub_ptr, dwte_ptr, U, C,
                           UPP: tl.constexpr, BLOCK_C: tl.constexpr):
    # UPP distinct tokens per program; each adds its sub-bucket sums in order
    us = tl.program_id(0) * UPP + tl.arange(0, UPP)
    umask = us < U
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s0 = tl.load(tok_sub_ptr + us, mask=umask, other=0)
    s1 = tl.load(tok_sub_ptr + us + 1, mask=umask, other=0)
    acc = tl.zeros([UPP, BLOCK_C], dtype=tl.float32)
    for j in range(0, tl.max(s1 - s0, axis=0)):
        s = s0 + j
        m = ((s < s1) & umask)[:, None] & cmask[None, :]
        acc += tl.load(scratch_ptr + s.to(tl.int64)[:, None] * C + cols[None, :], mask=m,
                       other=0.0)
    tok = tl.load(tok_ptr + us, mask=umask, other=0).to(tl.int64)
    ptrs = dwte_ptr + tok[:, None] * C + cols[None, :]
    m = umask[:, None] & cmask[None, :]
    old = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
    tl.store(ptrs, to_dtype(old + acc, dwte_ptr.dtype.element_ty), mask=m)


@triton.jit
def _wpe_backward_kernel(dout_ptr, dwpe_ptr, B, T, C, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (ts < T)[:, None] & (cols < C)[None, :]
    offs = ts.to(tl.int64)[:, None] * C + cols[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for b in range(0, B):
        acc += tl.load(dout_ptr + b * T * C + offs, mask=mask, other=0.0).to(tl.float32)
    old = tl.load(dwpe_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dwpe_ptr + offs, to_dtype(old + acc, dwpe_ptr.dtype.element_ty), mask=mask)


def encoder_forward(inputs: torch.Tensor, wte, wpe, out, pos: int = 0) -> torch.Tensor:
    """inputs (B, T) int -> out (B, T, C) = wte[inputs] + wpe[pos:pos+T]."""
    B, T = inputs.shape
    C = wte.shape[1]
    if out.shape != (B, T, C) or not out.is_contiguous() or not inputs.is_contiguous():
        raise ValueError(f"encoder_forward: out must be contiguous ({B}, {T}, {C}), got "
                         f"{tuple(out.shape)}")
    if pos + T > wpe.shape[0]:
        raise ValueError(f"encoder_forward: positions {pos}..{pos + T - 1} pass maxT {wpe.shape[0]}")
    check_device(out, wte)
    N = B * T
    BLOCK_R, BLOCK_C, num_warps = row_tile(C)
    _encoder_forward_kernel[(triton.cdiv(N, BLOCK_R),)](inputs, wte, wpe, out, N, T, C, pos,
                                                        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                                        num_warps=num_warps)
    return out


def bucket_plan(inputs: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Host-side plan of the wte backward: one int32 array holding, back to back,
    order (N) positions sorted by token (stable), sub_start (S), sub_len (S), tok (U),
    tok_sub (U + 1) the sub-bucket range of each distinct token; and (N, S, U)."""
    flat = np.asarray(inputs).reshape(-1).astype(np.int64)
    N = flat.size
    order = np.argsort(flat, kind="stable")
    toks = flat[order]
    bounds = np.flatnonzero(np.diff(toks)) + 1
    run_start = np.concatenate(([0], bounds))
    run_end = np.concatenate((bounds, [N]))
    nsub = (run_end - run_start + SUB - 1) // SUB                    # (U,)
    tok_sub = np.concatenate(([0], np.cumsum(nsub)))                 # (U + 1,)
    S = int(tok_sub[-1])
    run_of_sub = np.repeat(np.arange(run_start.size), nsub)          # (S,)
    sub_start = run_start[run_of_sub] + SUB * (np.arange(S) - tok_sub[:-1][run_of_sub])
    sub_len = np.minimum(sub_start + SUB, run_end[run_of_sub]) - sub_start
    plan = np.concatenate((order, sub_start, sub_len, toks[run_start], tok_sub))
    return plan.astype(np.int32), (N, S, int(run_start.size))


def encoder_backward(dout: torch.Tensor, plan: torch.Tensor, counts, dwte, dwpe, scratch=None):
    """dout (B, T, C); plan, counts = bucket_plan(inputs), plan copied to dout's device.
    ADDS into dwte (Vp, C) and dwpe rows [0:T]. scratch: optional fp32 buffer of at least
    S*C elements."""
    B, T, C = dout.shape
    if not dout.is_contiguous():
        raise ValueError("encoder_backward: dout must be contiguous")
    N, S, U = counts
    if plan.numel() != N + 2 * S + 2 * U + 1:
        raise ValueError(f"encoder_backward: plan has {plan.numel()} entries, expected "
                         f"{N + 2 * S + 2 * U + 1} for (N, S, U) = {counts}")
    if N != B * T:
        raise ValueError(f"encoder_backward: plan is for {N} positions, dout has {B * T}")
    check_device(dout, plan, dwte, dwpe)
    order = plan[:N]
    sub_start = plan[N:N + S]
    sub_len = plan[N + S:N + 2 * S]
    tok = plan[N + 2 * S:N + 2 * S + U]
    tok_sub = plan[N + 2 * S + U:]
    if scratch is None or scratch.numel() < S * C:
        scratch = torch.empty(S * C, dtype=torch.float32, device=dout.device)
    if interpreting():
        BLOCK_C = pow2(C)
        SPP, UPP = pow2(min(S, max(1, 65536 // (SUB * BLOCK_C)))), pow2(min(U, 256))
    else:
        BLOCK_C, SPP, UPP = 128, 1, 1
    grid_c = triton.cdiv(C, BLOCK_C)
    _bucket_sum_kernel[(triton.cdiv(S, SPP), grid_c)](dout, order, sub_start, sub_len, scratch,
                                                      S, C, SPP=SPP, SUB=SUB, BLOCK_C=BLOCK_C,
                                                      num_warps=4)
    _bucket_scatter_kernel[(triton.cdiv(U, UPP), grid_c)](scratch, tok, tok_sub, dwte, U, C,
                                                          UPP=UPP, BLOCK_C=BLOCK_C,
                                                          num_warps=1)
    BLOCK_T = pow2(T) if interpreting() else 4
    _wpe_backward_kernel[(triton.cdiv(T, BLOCK_T), grid_c)](dout, dwpe, B, T, C,
                                                            BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
