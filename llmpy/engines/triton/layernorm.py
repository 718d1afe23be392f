"""LayerNorm forward and backward, fused with the residual add (llm.c's layernorm_forward,
fused_residual_forward5 and layernorm_backward in llmc/layernorm.cuh).

Forward: out = (x - mean) * rstd * w + b over the last axis (eps 1e-5), keeping mean and
rstd (fp32, one per row) for the backward. The fused form first adds the residual,
x = residual + delta, rounds it to bf16 (that is the residual stream the next layer and the
backward read) and normalizes the rounded value.

Backward: dx = rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)) with dnorm = dout * w,
ADDED into the residual-stream gradient dres (the residual add's backward is a copy, so the
two gradient paths meet here). dw and db are column sums over the rows; each program sums
its rows into one fp32 partial, and reduce.add_partials adds the partials into the bf16
gradients. The same pass also sums the columns of the new dres: that is the bias gradient
of the projection (attproj or fcproj) whose output fed this residual.

Dimension legend: N rows (B*T), C channels, P programs (partial sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, row_tile, to_dtype
from .fp8 import fp8_args, fp8_epilogue

LN_EPS = 1e-5
# GPU launch configurations (bench/triton_kernels.py sweeps them); num_warps 0 picks by C.
# The backward's ROWS and BLOCK_R fix the order of the dw/db sums.
# Measured on an H200 at d12 (N=65536, C=768): forward 3.9 TB/s, backward 2.5 TB/s.
GPU = {"forward": dict(BLOCK_R=2, num_warps=4), "backward": dict(ROWS=128, BLOCK_R=2, num_warps=4)}


@triton.jit
def _layernorm_forward_kernel(x_ptr, delta_ptr, xsum_ptr, out_ptr, w_ptr, b_ptr, mean_ptr,
                              rstd_ptr, out8_ptr, amax_ptr, part_ptr, scale_ptr,
                              N, C, eps, FUSED: tl.constexpr, OUT8: tl.constexpr,
                              MAXV: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FUSED:
        x = x + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xr = to_dtype(x, xsum_ptr.dtype.element_ty)
        tl.store(xsum_ptr + offs, xr, mask=mask)
        x = xr.to(tl.float32)  # normalize the residual as stored
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = to_dtype(xc * rstd[:, None] * w[None, :] + b[None, :], out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, y, mask=mask)
    if OUT8:  # the same values in FP8 for an FP8 matmul (-f8 2), with a delayed scale
        fp8_epilogue(out8_ptr, amax_ptr, part_ptr, scale_ptr, offs, mask, y.to(tl.float32),
                     tl.program_id(0), MAXV)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _layernorm_backward_kernel(dout_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dres_ptr,
                               partial_ptr, N, C, ROWS_PER_PROG, ACCUM: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    ds_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    row0 = pid * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        rmask = (rows < N) & (r + tl.arange(0, BLOCK_R) < ROWS_PER_PROG)
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dnorm = dout * w[None, :]
        c1 = tl.sum(dnorm * xhat, axis=1) / C
        c2 = tl.sum(dnorm, axis=1) / C
        dx = (dnorm - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if ACCUM:
            dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dxr = to_dtype(dx, dres_ptr.dtype.element_ty)
        tl.store(dres_ptr + offs, dxr, mask=mask)
        dw_acc += tl.sum(dout * xhat, axis=0)
        db_acc += tl.sum(dout, axis=0)
        ds_acc += tl.sum(tl.where(mask, dxr.to(tl.float32), 0.0), axis=0)
    base = partial_ptr + pid * 3 * C
    tl.store(base + cols, dw_acc, mask=cmask)
    tl.store(base + C + cols, db_acc, mask=cmask)
    tl.store(base + 2 * C + cols, ds_acc, mask=cmask)


def _rows(x: torch.Tensor, C: int, what: str) -> int:
    if x.shape[-1] != C or not x.is_contiguous():
        raise ValueError(f"layernorm: {what} must be contiguous (..., {C}), got "
                         f"{tuple(x.shape)} contiguous={x.is_contiguous()}")
    return x.numel() // C


def layernorm_forward(x, w, b, out, mean, rstd, delta=None, xsum=None, fp8=None):
    """out = layernorm(x) with w, b (C,); x, out (..., C); mean, rstd (N,) fp32 written.

    Fused residual form (delta given): xsum = bf16(x + delta) is written and normalized.
    fp8 (an fp8.Fp8Out): out's values also written in FP8 with the delayed scale of
    fp8.amax, each program's max |.| into fp8.partial (layernorm_forward_programs(N))."""
    C = w.numel()
    N = _rows(x, C, "x")
    _rows(out, C, "out")
    fused = delta is not None
    if fused:
        _rows(delta, C, "delta")
        _rows(xsum, C, "xsum")
    if mean.numel() != N or rstd.numel() != N:
        raise ValueError(f"layernorm: mean/rstd must hold {N} rows")
    check_device(x, out)
    BLOCK_R, BLOCK_C, num_warps = row_tile(C, GPU["forward"]["BLOCK_R"])
    num_warps = (GPU["forward"]["num_warps"] or num_warps) if not interpreting() else num_warps
    grid = (triton.cdiv(N, BLOCK_R),)
    out8, amax, part, scale, out8_on, maxv = fp8_args(fp8, out, grid[0])
    _layernorm_forward_kernel[grid](x, delta if fused else x, xsum if fused else x, out, w, b,
                                    mean, rstd, out8, amax, part, scale, N, C,
                                    LN_EPS, FUSED=fused, OUT8=out8_on, MAXV=maxv,
                                    BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps)
    return out


def layernorm_forward_programs(N: int, C: int) -> int:
    """Programs of layernorm_forward over N rows of C (an Fp8Out's partials)."""
    return triton.cdiv(N, row_tile(C, GPU["forward"]["BLOCK_R"])[0])


def layernorm_backward_rows_per_prog(N: int) -> int:
    return max(1, N) if interpreting() else GPU["backward"]["ROWS"]


def layernorm_backward(dout, x, w, mean, rstd, dres, partial, accumulate=True):
    """dres (N, C) += dx (written instead if not accumulate). Writes partial (P, 3, C) fp32:
    per program, the column sums of dout * xhat (dw), dout (db) and the new dres (the
    upstream projection's bias gradient). Returns the partial view actually used."""
    C = w.numel()
    N = _rows(dout, C, "dout")
    for t, what in ((x, "x"), (dres, "dres")):
        if _rows(t, C, what) != N:
            raise ValueError(f"layernorm backward: {what} has {t.numel() // C} rows, dout {N}")
    check_device(dout, x, dres)
    rows_per_prog = layernorm_backward_rows_per_prog(N)
    P = triton.cdiv(N, rows_per_prog)
    if partial.numel() < P * 3 * C or partial.dtype != torch.float32:
        raise ValueError(f"layernorm backward: partial needs {P}x3x{C} fp32")
    partial = partial.view(-1)[:P * 3 * C].view(P, 3, C)
    BLOCK_R, BLOCK_C, num_warps = row_tile(C, GPU["backward"]["BLOCK_R"])
    num_warps = (GPU["backward"]["num_warps"] or num_warps) if not interpreting() else num_warps
    _layernorm_backward_kernel[(P,)](dout, x, w, mean, rstd, dres, partial, N, C,
                                     rows_per_prog, ACCUM=accumulate, BLOCK_R=BLOCK_R,
                                     BLOCK_C=BLOCK_C, num_warps=num_warps)
    return partial
