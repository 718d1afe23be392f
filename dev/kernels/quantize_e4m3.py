"""Quantize to FP8 e4m3 with one amax scale per tensor, and the transposed copy: the FP8 lm
head's quantization of lnf and wte (-f8 1). llm.c's master has no FP8 kernel; the nearest
is copy_and_cast_kernel in llmc/cuda_utils.cuh, a cast without a scale.

    scale = max |x| / 448      (1 if x is all zero; 448 is e4m3's largest finite value)
    q     = x / scale rounded to nearest even in e4m3, clamped to +-448     (N, C)
    qT    = q transposed, byte for byte                                     (C, N)

x is bf16. cuBLASLt's FP8 matmuls want both operands contiguous along the reduced axis,
so the engine needs q and qT (FP8 dot products run along K only). A reduction over the
whole tensor, then an elementwise pass: memory-bound, one read of x and two 1-byte writes
at best; the scale must be known before the first element is cast, so x is read twice.

    version 1  four kernels: one max per 1024-element block (6144 partials), one program
               folds them into the scale, a flat cast, then the byte transpose reads q back
    version 2  production: 512 grid-stride partials, then one kernel that folds them in
               every program and writes q and qT from the same registers

Dimension legend: N rows (B*T), C channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import fp8 as engine

from .common import Op, generator, pow2, randn, to_dtype, versions_of

BLOCK = 1024  # elements per program of version 1's partials and cast
E4M3 = engine.E4M3


@triton.jit
def _scale_kernel(part_ptr, scale_ptr, P, BLOCK: tl.constexpr):
    # one program walks the partial maxima in order
    m = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, P, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(part_ptr + offs, mask=offs < P, other=0.0))
    amax = tl.max(m, axis=0)
    tl.store(scale_ptr, tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0))  # rounded once


@triton.jit
def _flat_cast_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    tl.store(out_ptr + offs, to_dtype(q, out_ptr.dtype.element_ty), mask=offs < n)


def version1(x):
    """four kernels: block maxima, one-program scale, flat cast, then transpose q

    The unfused pipeline. The engine's amax kernel launched one block per program gives
    N*C/1024 = 6144 partial maxima (no atomics, as global_norm.py version 2), which a single
    program then walks into the scale; a flat kernel casts x; the byte transpose
    (transpose_bytes.py) reads q back to write qT. Besides two more launches, q crosses
    the memory bus three times (written, read, written transposed) instead of twice."""
    N, C = x.shape
    n = x.numel()
    P = triton.cdiv(n, BLOCK)
    partial = torch.empty(P, dtype=torch.float32, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    q = torch.empty(N, C, dtype=E4M3, device=x.device)
    qT = torch.empty(C, N, dtype=E4M3, device=x.device)
    engine._amax_kernel[(P,)](x, partial, n, P * BLOCK, BLOCK=BLOCK, num_warps=4)
    _scale_kernel[(1,)](partial, scale, P, BLOCK=min(4096, pow2(P)), num_warps=8)
    _flat_cast_kernel[(P,)](x, scale, q, n, BLOCK=BLOCK, num_warps=4)
    engine.transpose_bytes(q.view(torch.uint8), qT.view(torch.uint8))
    return dict(q=q, qT=qT, scale=scale)


def production(x):
    """production (llmpy/engines/triton/fp8.py quantize_e4m3): 512 partials, one fused cast

    The engine's two kernels: a grid of at most 512 programs, each striding over its chunk
    of x with a 2048-wide running max, so there are 512 partials instead of 6144; then one
    2-D cast kernel whose every program folds those 512 partials itself (2 KB, from L2),
    so no scale kernel runs in between, and stores its 64x64 tile of q twice, row-major
    into q and transposed into qT: q is never read back. Two launches, x read twice,
    q and qT written once each."""
    N, C = x.shape
    q = torch.empty(N, C, dtype=E4M3, device=x.device)
    qT = torch.empty(C, N, dtype=E4M3, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    partial = torch.empty(engine.AMAX_PROGRAMS, dtype=torch.float32, device=x.device)
    engine.quantize_e4m3(x, q, qT, scale, partial)
    return dict(q=q, qT=qT, scale=scale)


def unit(x):
    """torch: abs().max(), then (x / scale).clamp(+-448).to(e4m3) and .t().contiguous()"""
    amax = x.abs().max().float()
    # in float64, rounded once to fp32: torch's CUDA fp32 division by a number multiplies
    # by its reciprocal (21 / 448 one ulp above 3/64 on an H200)
    scale = torch.where(amax > 0, (amax.double() / 448.0).float(), torch.ones_like(amax))
    q = (x.float() / scale).clamp(-448.0, 448.0).to(E4M3)
    return dict(q=q, qT=q.t().contiguous(), scale=scale.view(1))


def make(dims, device, seed):
    x = randn(generator(device, seed), dims["B"] * dims["T"], dims["C"], scale=3.0)  # (N, C)
    # The amax, negative (so |x| is what is taken) and last (in the tail block of every
    # reduction, where a mask is off by one if any is): 21 = 448 * 3/64 gives the scale 3/64,
    # whose x / scale are exact e4m3 ties for about 1 x in 16 (x = 3/64 times a midpoint:
    # 468 of them at TINY, 404k at FULL), which must round to even; its reciprocal is not
    # exact, so a division that is not correctly rounded (Triton's fp32 `/` on the GPU)
    # breaks ties. |3 randn| stays below 21: 15.7 at most over the 6.3M values of FULL.
    x[-1, -1] = -21.0
    return dict(x=x)


def reference(x):
    amax = x.double().abs().max()
    scale = amax / 448.0 if amax > 0 else torch.ones_like(amax)
    # q is the e4m3 of x over the fp32 scale the op returns (what q is dequantized with).
    # torch casts float64 to e4m3 through float32 (1.0625 + 2^-30 -> 1.0, not 1.125), and
    # fp32 division rounds once, so this is the bytes of the fp32 quotient x / scale,
    # rounded to nearest even: what every version must write.
    q8 = (x.double() / scale.float().double()).clamp(-448.0, 448.0).to(E4M3)
    q = q8.double()
    # freed next, and a version's torch.empty of q gets the same memory back: not with the
    # right answer in it
    q8.view(torch.uint8).fill_(0xFF)
    return dict(q=q, qT=q.t().contiguous(), scale=scale.view(1))


def cost(dims, inputs):
    return "bytes", inputs["x"].numel() * (2 + 1 + 1)


OP = Op(
    name="quantize_e4m3", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    # q and qT: the same bytes as the reference. No fp32 quotient of these bf16 inputs
    # lies near enough a rounding boundary for division rounding to move a byte (measured:
    # torch's cast equals an exact float64 round-to-nearest-even of x / scale everywhere,
    # and even x * (1/scale), off in 2M fp32 quotients at FULL, changes none). What is let
    # through: under TRITON_INTERPRET=1 the interpreter's cast rounds e4m3 subnormals
    # (|q| < 2^-6) once more (to_dtype in llmpy/engines/triton/common.py), one step of
    # 2^-9 there, 4.4e-6 of the largest |q| (448); measured on the CPU: 0 at TINY (no
    # subnormal in these inputs), 4.4e-6 at FULL (379 of 1202 subnormals, versions 1 and
    # 2 alike). 6e-6 allows one step below |q| = 2^-5 and nothing above: one step of a
    # larger |q| is >= 2^-8 (8.7e-6), a tie broken away from even at |q| ~ 1 is 2.8e-4.
    # scale: fp32 amax / 448 against float64, one rounding: <= 2^-24 = 6e-8.
    tol=dict(q=6e-6, qT=6e-6, scale=1e-7),
    cost=cost)
