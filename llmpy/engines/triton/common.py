"""Helpers shared by the triton engine's kernel launchers: interpreter detection and block
sizes.

Every kernel file in this package has the same anatomy (STYLE.md item 6): private
`@triton.jit` kernels first, then the Python launchers that check shapes and pick block
sizes. Kernels accumulate in fp32, and reductions go through per-block partial sums (never
atomics), so every result is deterministic.

With TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors in
Triton's interpreter, one program at a time in NumPy; the launchers then pick large tiles so
that few programs run (tests use tiny shapes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# for kernels: to_dtype's rounding by bit tricks is kept to the interpreter, whose own
# conversions need it. On the GPU it costs time (below), and FP8 values written out by it
# and stored twice (a tile and its transpose) came out wrong on an H200 (triton 3.6)
INTERPRETED = tl.constexpr(interpreting())


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"triton kernel got a {t.device.type} tensor: run on CUDA, or "
                               f"set TRITON_INTERPRET=1 before importing triton for the CPU")


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def row_tile(C: int, gpu_rows: int = 1) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for kernels that hold whole rows of C channels."""
    BLOCK_C = pow2(C)
    if interpreting():
        return max(1, 16384 // BLOCK_C), BLOCK_C, 1
    num_warps = 4 if BLOCK_C * gpu_rows <= 2048 else 8
    return gpu_rows, BLOCK_C, num_warps


@triton.jit
def _round_fp8(x, MANT: tl.constexpr, MIN_NORMAL: tl.constexpr):
    # fp32 x rounded to nearest even as an FP8 value with MANT mantissa bits whose smallest
    # normal number is MIN_NORMAL: normal numbers by the bit trick, smaller ones to
    # multiples of MIN_NORMAL / 2^MANT by adding and taking away 1.5 * 2^23 times that
    DROP: tl.constexpr = 23 - MANT
    BIG: tl.constexpr = 1.5 * 8388608.0 * MIN_NORMAL / (1 << MANT)
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) >> DROP) << DROP
    sub = (x + BIG) - BIG
    sub = tl.where(sub == 0.0, x * 0.0, sub)  # zero keeps x's sign
    return tl.where(tl.abs(x) < MIN_NORMAL, sub, bits.to(tl.float32, bitcast=True))


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even. The GPU's conversions (cvt.rn) do that
    themselves (to FP8 on sm90; on sm89 Triton up to 3.6 goes through f16 rounded toward
    zero first, so an fp32 value that is not an f16 one can round twice). Triton's CPU
    interpreter rounds otherwise in its own conversions, so under it bf16 and the two FP8
    types are rounded here first and the value handed to the final cast is exact. (The bit
    ops cost the ALU-bound GELU kernel 0.014 ms per call at d12 on an H200, 0.03 when it
    writes FP8, so the GPU goes without.) FP8 callers keep x inside the type's finite range
    (fp8.to_fp8 clamps, or leaves it to e4m3's saturating conversion on the GPU). Below
    FP8's smallest normal number the spacing is fixed (2^-9 for e4m3, 2^-16 for e5m2):
    adding and taking away 1.5 * 2^23 times that spacing rounds to it, to nearest even, in
    fp32 itself."""
    if dtype == tl.bfloat16 and INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    elif dtype == tl.float8e5 and INTERPRETED:  # e5m2: 2 mantissa bits kept (the
        # interpreter's FP8 conversion loses the carry when rounding up crosses a power of 2)
        return _round_fp8(x, 2, 2.0 ** -14).to(tl.float8e5)
    elif dtype == tl.float8e4nv and INTERPRETED:  # e4m3fn: 3 mantissa bits kept
        return _round_fp8(x, 3, 2.0 ** -6).to(tl.float8e4nv)
    else:  # the GPU rounds to nearest even itself (FP8 on sm89: see above)
        return x.to(dtype)
