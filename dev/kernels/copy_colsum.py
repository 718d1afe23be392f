"""Copy with column sums: dst = src and the per-block column sums of it, fp32 partials
(the bias gradient of a matmul backward, fused with a copy: llm.c's matmul_backward bias
reduction). A variant the engine no longer uses (its bias sums come from the layernorm and
head-pack kernels' partials); kept here as an example of the deterministic partial-sum
pattern. Tested in tests/test_triton_kernels.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton.common import check_device, interpreting, pow2, to_dtype


@triton.jit
def _copy_colsum_kernel(src_ptr, src_stride, dst_ptr, dst_stride, partial_ptr, partial_stride,
                        N, K, ROWS_PER_PROG, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = pid_r * ROWS_PER_PROG + r + tl.arange(0, BLOCK_R)
        rmask = (rows < N) & (r + tl.arange(0, BLOCK_R) < ROWS_PER_PROG)
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(src_ptr + rows64 * src_stride + cols[None, :], mask=mask, other=0.0)
        xr = to_dtype(x.to(tl.float32), dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + rows64 * dst_stride + cols[None, :], xr, mask=mask)
        acc += tl.sum(xr.to(tl.float32), axis=0)
    tl.store(partial_ptr + pid_r * partial_stride + cols, acc, mask=cmask)


def colsum_rows_per_prog(N: int) -> int:
    return max(1, N) if interpreting() else 256


def copy_colsum(src: torch.Tensor, dst: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """dst (N, K) = src (N, K) (any row stride, unit column stride) and the column sums of
    dst per block of rows into partial (P, K) fp32 (a view with unit column stride).
    Returns the (P, K) partial rows used."""
    N, K = src.shape
    if dst.shape != (N, K) or src.stride(1) != 1 or dst.stride(1) != 1:
        raise ValueError(f"copy_colsum: src {tuple(src.shape)} and dst {tuple(dst.shape)} must "
                         f"match, with unit column stride")
    check_device(src, dst, partial)
    rows_per_prog = colsum_rows_per_prog(N)
    P = triton.cdiv(N, rows_per_prog)
    if partial.shape[0] < P or partial.shape[1] != K or partial.stride(1) != 1:
        raise ValueError(f"copy_colsum: partial must be at least ({P}, {K}) with unit column "
                         f"stride, got {tuple(partial.shape)}")
    if interpreting():
        BLOCK_R, BLOCK_K = pow2(min(N, 16384 // pow2(K))), pow2(K)
    else:
        BLOCK_R, BLOCK_K = 16, 128
    grid = (P, triton.cdiv(K, BLOCK_K))
    _copy_colsum_kernel[grid](src, src.stride(0), dst, dst.stride(0), partial,
                              partial.stride(0), N, K, rows_per_prog, BLOCK_R=BLOCK_R,
                              BLOCK_K=BLOCK_K)
    return partial[:P]
