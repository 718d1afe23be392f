"""Fused classifier: softmax, cross-entropy and dlogits in one kernel over the logits, in
place (llm.c's fused_classifier3 in llmc/fused_classifier.cuh).

Per row: a first pass over the V real columns keeps a running max and sum of exponentials
(online softmax) and gives lse = log sum exp; loss = lse - logit[target]. Training then
overwrites the row with dlogits = (softmax - onehot(target)) * dloss, and with zeros in the
padded columns V..Vp, so the (N, Vp) logits buffer becomes its own gradient and no second
buffer of that size (the largest activation) exists.

Arranged for L2: as in llm.c's fused_classifier_kernel5, rows go from the last (the logits
matmul wrote those last), the first pass walks a row backwards so that the second pass
starts on what was read most recently, and the writes are streamed; here the second
pass's reads are streamed too (evict_first).

The FP8 lm head (fp8.py, -f8 1) passes `out`: the logits are left alone and
(softmax - onehot) * 2^15 goes to an e5m2 buffer.

Dimension legend: N rows (B*T), V vocabulary, Vp padded vocabulary (the row stride).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, pow2, to_dtype

# GPU launch configuration (bench/triton_kernels.py sweeps it). PER_SM > 0 launches that
# many programs per multiprocessor, each walking over rows; 0 is one program per row.
# GROUP: the first pass keeps a running max and sum per group of GROUP adjacent columns
# of its tile (a thread's own 16-byte vector at 8), merged once per row at the end;
# GROUP = BLOCK_V is one max per tile, a reduction across the program at every step.
# H200, 8192 rows of d12 logits, ms in place (bf16) / into e5m2 (-f8 1): BLOCK_V=2048
# with 8 warps 0.734 / 0.629; 4096, 8 warps 0.729 / 0.686; GROUP=4096 0.810 / 0.780;
# PER_SM=4 0.857 / 0.740; a whole row in registers 1.4-10.6 ms (it spills; PERF.md run 7).
# Which program takes a row changes no result bit.
GPU = dict(BLOCK_V=2048, num_warps=8, PER_SM=0, GROUP=8)


@triton.jit
def _classifier_kernel(logits_ptr, targets_ptr, losses_ptr, out_ptr, N, V, Vp, stride,
                       out_stride, dloss, row_step, WRITE_DLOGITS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    for row0 in range(tl.program_id(0) * BLOCK_R, N, row_step):
        _classifier_rows(logits_ptr, targets_ptr, losses_ptr, out_ptr, row0, N, V, Vp, stride,
                         out_stride, dloss, WRITE_DLOGITS, BLOCK_R, BLOCK_V, GROUP)


@triton.jit
def _row_losses(logits_ptr, targets_ptr, losses_ptr, rows, rmask, V, stride,
                BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    """First pass over rows' V real columns (online softmax): stores the losses, returns
    (lse, target) per row. It walks the row from its end to its start and asks L2 to keep
    what it read (evict_last), so that the second pass, which starts at the row's start,
    finds its first tiles, the most recently read, still there (llm.c's
    prepare_softmax_blockwide3 also runs backwards)."""
    base = logits_ptr + rows.to(tl.int64)[:, None, None] * stride
    # a tile as (BLOCK_V // GROUP, GROUP): max and sum per group, no reduction across
    # threads inside the loop
    offs = tl.arange(0, BLOCK_V // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = tl.full([BLOCK_R, BLOCK_V // GROUP], -1e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK_V // GROUP], dtype=tl.float32)
    tiles = tl.cdiv(V, BLOCK_V)
    for i in range(0, tiles):
        cols = (tiles - 1 - i) * BLOCK_V + offs
        mask = rmask[:, None, None] & (cols < V)[None, :, :]
        x = tl.load(base + cols[None, :, :], mask=mask, other=float("-inf"),
                    eviction_policy="evict_last").to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=2))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, :, None]), axis=2)
        m = m_new
    mx = tl.max(m, axis=1)
    total = tl.sum(s * tl.exp(m - mx[:, None]), axis=1)
    lse = tl.where(rmask, mx + tl.log(tl.maximum(total, 1e-30)), 0.0)  # total >= 1 on real rows
    tgt = tl.load(targets_ptr + rows, mask=rmask, other=0).to(tl.int64)
    xt = tl.load(logits_ptr + rows.to(tl.int64) * stride + tgt, mask=rmask, other=0.0)
    tl.store(losses_ptr + rows, lse - xt.to(tl.float32), mask=rmask)
    return lse, tgt


@triton.jit
def _row_dlogits(x, cols, lse, tgt, V, scale):
    """(softmax - onehot(target)) * scale on a tile of logits, 0 in the padding."""
    p = tl.exp(x - lse[:, None])
    d = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * scale
    return tl.where((cols < V)[None, :], d, 0.0)


@triton.jit
def _classifier_rows(logits_ptr, targets_ptr, losses_ptr, out_ptr, row0, N, V, Vp, stride,
                     out_stride, dloss, WRITE_DLOGITS: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_V: tl.constexpr, GROUP: tl.constexpr):
    # rows from the last: the logits matmul wrote those last, so some are still in L2
    rows = N - 1 - row0 - tl.arange(0, BLOCK_R)
    rmask = rows >= 0
    rows = tl.where(rmask, rows, 0)
    lse, tgt = _row_losses(logits_ptr, targets_ptr, losses_ptr, rows, rmask, V, stride,
                           BLOCK_R, BLOCK_V, GROUP)
    if WRITE_DLOGITS:
        base = logits_ptr + rows.to(tl.int64)[:, None] * stride
        obase = out_ptr + rows.to(tl.int64)[:, None] * out_stride
        for v0 in range(0, Vp, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = rmask[:, None] & (cols < Vp)[None, :]
            # the last read of these logits, and a write nobody reads soon: streamed
            x = tl.load(base + cols[None, :], mask=mask & (cols < V)[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            d = _row_dlogits(x, cols, lse, tgt, V, dloss)
            tl.store(obase + cols[None, :], to_dtype(d, out_ptr.dtype.element_ty), mask=mask,
                     cache_modifier=".cs")


def fused_classifier(logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor, V: int,
                     dloss: float | None, programs: int | None = None,
                     block_rows: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """logits (N, Vp) with unit column stride; targets (N,) int; losses (N,) fp32 written.
    With dloss (the gradient of the reduced loss per row, 1/N for the mean), the logits are
    overwritten with dlogits, or `out` (N, Vp) is written with them in its own dtype (the
    FP8 head: e5m2, dloss = 2^15); with None they are only read. programs / block_rows
    override the launch (tests use them to walk the row loop)."""
    N, Vp = logits.shape
    out = logits if out is None else out
    if logits.stride(1) != 1 or V > Vp or out.shape != (N, Vp) or out.stride(1) != 1:
        raise ValueError(f"fused_classifier: logits {tuple(logits.shape)} (and out) need "
                         f"unit column stride and V={V} <= Vp")
    if targets.numel() != N or losses.numel() != N or losses.dtype != torch.float32:
        raise ValueError(f"fused_classifier: targets and losses must have {N} entries "
                         f"(losses fp32)")
    check_device(logits, targets, losses, out)
    if interpreting():
        BLOCK_R, BLOCK_V, num_warps, group = pow2(min(N, 64)), pow2(min(Vp, 2048)), 1, 8
    else:
        BLOCK_R, BLOCK_V, num_warps, group = 1, GPU["BLOCK_V"], GPU["num_warps"], GPU["GROUP"]
    BLOCK_R = block_rows or BLOCK_R
    write = dloss is not None
    if programs is not None:
        programs = min(programs, triton.cdiv(N, BLOCK_R))
    elif interpreting() or not GPU["PER_SM"]:
        programs = triton.cdiv(N, BLOCK_R)
    else:
        sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
        programs = min(triton.cdiv(N, BLOCK_R), GPU["PER_SM"] * sms)
    _classifier_kernel[(programs,)](
        logits, targets, losses, out, N, V, Vp, logits.stride(0), out.stride(0),
        dloss if write else 0.0,
        programs * BLOCK_R, WRITE_DLOGITS=write, BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V,
        GROUP=min(group, BLOCK_V), num_warps=num_warps)
    return losses

