"""GELU, tanh approximation, forward and backward (llm.c's llmc/gelu.cuh).

    gelu(x) = 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
    gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

The backward works in place on the incoming gradient (like llm.c's gelu_backward_inplace)
and, in the same pass, sums its columns per block of rows: that is the bias gradient of the
fc matmul whose output fed the GELU (fcb), finished by reduce.add_partials.

Dimension legend: N rows (B*T), OC columns (4C).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, pow2, to_dtype
from .fp8 import delayed_scale, fp8_args, fp8_epilogue, fp8_store

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBE = 0.044715
# GPU launch configurations (bench/triton_kernels.py sweeps them). ROWS (rows per program)
# and BLOCK_R fix the order of the bias-gradient sums, so changing them changes bits.
# Measured on an H200 at d12 (N=65536, 4C=3072): forward 3.9 TB/s, backward 2.8 TB/s.
# The backward's configuration also serves its column sums alone (-ge 2, x None): 0.25 ms at
# d12, 1.6 TB/s, and no configuration swept did better.
GPU = {"forward": dict(BLOCK=4096, num_warps=4),
       "backward": dict(ROWS=128, BLOCK_R=32, BLOCK_C=128, num_warps=4)}


@triton.jit
def _tanh(u):
    # tanh through exp (no tanh in every Triton version); exp(-2|u|) never overflows
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def gelu_grad(x):
    """gelu'(x) on fp32 x (the formula above; dev/kernels/gelu_backward.py uses it too)."""
    x2 = x * x
    th = _tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
    dudx = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dudx


@triton.jit
def _gelu_forward_kernel(x_ptr, out_ptr, out8_ptr, amax_ptr, part_ptr, scale_ptr, n,
                         STORE: tl.constexpr, OUT8: tl.constexpr, MAXV: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), exp(-2u) = 2^(-2 log2(e) u): one exp2 and
    # one division (the tanh form took an exp, a division, a select and more: the kernel is
    # ALU-bound once it writes FP8). exp2 -> inf for x < ~-10 gives -0, the limit.
    e = tl.exp2(-2.302208198144325 * x * (1.0 + 0.044715 * x * x))
    y = to_dtype(x / (1.0 + e), out_ptr.dtype.element_ty)
    if STORE:
        tl.store(out_ptr + offs, y, mask=mask)
    if OUT8:  # the same values in FP8 for the fcproj matmul (-f8 2), with a delayed scale
        fp8_epilogue(out8_ptr, amax_ptr, part_ptr, scale_ptr, offs, mask, y.to(tl.float32),
                     tl.program_id(0), MAXV)


@triton.jit
def _gelu_backward_kernel(dout_ptr, x_ptr, partial_ptr, out8_ptr, amax_ptr, part_ptr,
                          scale_ptr, N, OC, ROWS_PER_PROG,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          APPLY_GELU: tl.constexpr, OUT8: tl.constexpr, MAXV: tl.constexpr):
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < OC
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    peak = tl.zeros([BLOCK_C], dtype=tl.float32)  # this program's max |dx| so far (OUT8)
    if OUT8:
        scale = delayed_scale(amax_ptr, MAXV)
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = pid_r * ROWS_PER_PROG + r + tl.arange(0, BLOCK_R)
        rmask = (rows < N) & (r + tl.arange(0, BLOCK_R) < ROWS_PER_PROG)
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * OC + cols[None, :]
        if APPLY_GELU:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dx = to_dtype(d * gelu_grad(x), dout_ptr.dtype.element_ty)
            tl.store(dout_ptr + offs, dx, mask=mask)
        else:  # column sums of dout only (its GELU' came from cuBLASLt's DGELU epilogue)
            dx = tl.load(dout_ptr + offs, mask=mask, other=0.0)
        acc += tl.sum(dx.to(tl.float32), axis=0)
        if OUT8:  # the result in FP8 for fc's input gradient (-f8 2), delayed scale
            peak = tl.maximum(peak, fp8_store(out8_ptr, offs, mask, dx.to(tl.float32), scale,
                                              MAXV))
    tl.store(partial_ptr + pid_r * OC + cols, acc, mask=cmask)
    if OUT8:
        tl.store(part_ptr + pid_r * tl.num_programs(1) + tl.program_id(1), tl.max(peak, axis=0))
        tl.store(scale_ptr, scale, mask=(pid_r == 0) & (tl.program_id(1) == 0))


def gelu_forward(x: torch.Tensor, out: torch.Tensor | None, fp8=None) -> torch.Tensor:
    """out = gelu(x), elementwise; both contiguous, same shape. fp8 (an fp8.Fp8Out): the
    values (rounded to x's dtype) also written in FP8 with the delayed scale of
    fp8.amax, each program's max |.| into fp8.partial (gelu_forward_programs(n)); out may
    then be None (only FP8)."""
    if out is None and fp8 is None:
        raise ValueError("gelu_forward: nothing to write (out and fp8 both None)")
    store = out is not None
    out = x if out is None else out  # stands in for the pointer; its dtype rounds
    if x.shape != out.shape or not (x.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"gelu_forward: x {tuple(x.shape)} and out {tuple(out.shape)} must be "
                         f"contiguous and the same shape")
    check_device(x, out)
    n = x.numel()
    cfg = _forward_cfg(n)
    grid = (triton.cdiv(n, cfg["BLOCK"]),)
    out8, amax, part, scale, out8_on, maxv = fp8_args(fp8, x, grid[0])
    _gelu_forward_kernel[grid](x, out, out8, amax, part, scale, n, STORE=store,
                               OUT8=out8_on, MAXV=maxv, **cfg)
    return out


# Under the interpreter the kernels still run as a few programs (about 4 for the forward,
# 3 x 2 for the backward), so that the CPU tests reach every program's partial maxima and
# the masks of the last ones.
def _forward_cfg(n: int) -> dict:
    return dict(BLOCK=pow2(triton.cdiv(n, 4)), num_warps=1) if interpreting() else GPU["forward"]


def gelu_forward_programs(n: int) -> int:
    """Programs of gelu_forward over n elements (an Fp8Out's partials)."""
    return triton.cdiv(n, _forward_cfg(n)["BLOCK"])


def _backward_block_c(N: int, OC: int) -> tuple[int, int, int]:
    if interpreting():
        BLOCK_C = pow2(triton.cdiv(OC, 2))
        return pow2(min(N, 16384 // BLOCK_C)), BLOCK_C, 1
    c = GPU["backward"]
    return c["BLOCK_R"], c["BLOCK_C"], c["num_warps"]


def gelu_backward_programs(N: int, OC: int) -> int:
    """Programs of gelu_backward over (N, OC) (an Fp8Out's partials)."""
    return triton.cdiv(N, gelu_backward_rows_per_prog(N)) * \
        triton.cdiv(OC, _backward_block_c(N, OC)[1])


def gelu_backward_rows_per_prog(N: int) -> int:
    return max(1, triton.cdiv(N, 3)) if interpreting() else GPU["backward"]["ROWS"]


def gelu_backward(dout: torch.Tensor, x: torch.Tensor | None, partial: torch.Tensor,
                  fp8=None) -> torch.Tensor:
    """dout (N, OC) becomes dout * gelu'(x) in place; writes the column sums of the result per
    block of rows into partial (a flat fp32 buffer); returns that (P, OC) view. With x None,
    dout is left alone and only its column sums are written (fcb's gradient under -ge 2).
    fp8 (an fp8.Fp8Out): the result also written in FP8 with the delayed scale of
    fp8.amax, each program's max |.| into fp8.partial (gelu_backward_programs(N, OC))."""
    N, OC = dout.shape
    apply = x is not None
    x = dout if x is None else x
    if x.shape != (N, OC) or not (x.is_contiguous() and dout.is_contiguous()):
        raise ValueError(f"gelu_backward: dout {tuple(dout.shape)} and x {tuple(x.shape)} must "
                         f"be contiguous and the same shape")
    check_device(dout, x, partial)
    rows_per_prog = gelu_backward_rows_per_prog(N)
    P = triton.cdiv(N, rows_per_prog)
    if partial.numel() < P * OC or partial.dtype != torch.float32:
        raise ValueError(f"gelu_backward: partial needs {P}x{OC} fp32")
    partial = partial.view(-1)[:P * OC].view(P, OC)
    BLOCK_R, BLOCK_C, num_warps = _backward_block_c(N, OC)
    grid = (P, triton.cdiv(OC, BLOCK_C))
    out8, amax, part, scale, out8_on, maxv = fp8_args(fp8, dout, grid[0] * grid[1])
    _gelu_backward_kernel[grid](dout, x, partial, out8, amax, part, scale, N, OC,
                                rows_per_prog, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                                APPLY_GELU=apply, OUT8=out8_on, MAXV=maxv,
                                num_warps=num_warps)
    return partial
