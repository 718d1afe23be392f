"""Transpose a matrix of bytes: the FP8 lm head's dlogits (-f8 1), e5m2 moved as uint8, so
that the weight gradient's FP8 matmul finds them contiguous along N. llm.c's master has no
FP8 kernel; its nearest is the permute kernels of dev/cuda/attention_forward.cu.

    dst[v, r] = src[r, v]      src (N, Vp) -> dst (Vp, N), 1-byte elements

The engine transposes 8192 x 50304 e5m2 (412 MB) per chunk of rows. Pure data movement:
one read and one write of every byte, so the versions are about how close to the copy
bandwidth the writes can get when consecutive source bytes go to addresses N apart.

    version 1  one source row per program: coalesced reads, but every byte of a warp's
               store lands in a different row of dst (a 32-byte sector written for 1 byte)
    version 2  32x32 tiles (the engine's kernel, small launch): a tile is read along its
               rows and written along its columns, so both sides move whole 32-byte runs
    version 3  production: 128x128 tiles, 8 warps: 128-byte runs each way, fewer programs

Dimension legend: N rows (B*T), Vp padded vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import fp8 as engine

from .common import Op, generator, versions_of

BLOCK = 1024  # bytes of a row per loop step of version 1


@triton.jit
def _row_kernel(src_ptr, dst_ptr, R, C, BLOCK: tl.constexpr):
    # src row r -> dst column r
    r = tl.program_id(0).to(tl.int64)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(src_ptr + r * C + cols, mask=cols < C)
        tl.store(dst_ptr + cols.to(tl.int64) * R + r, x, mask=cols < C)


def version1(src):
    """one source row per program: reads coalesced, every byte stored N bytes apart

    The first thing one writes: a program copies its row of Vp bytes into a column of dst.
    The loads are contiguous, but the 1024 bytes of one store go to 1024 rows of dst, so
    each 1-byte write costs a 32-byte sector (its neighbours are written by other programs
    at other times, if the line is still in L2 by then)."""
    N, Vp = src.shape
    dst = torch.empty(Vp, N, dtype=src.dtype, device=src.device)
    _row_kernel[(N,)](src, dst, N, Vp, BLOCK=BLOCK, num_warps=4)
    return dict(dst=dst)


def version2(src):
    """32x32 tiles: the engine's tile kernel with a small launch, 1 warp

    A program loads a 32x32 tile along its rows and stores it along its columns (Triton's
    coalescing pass gives the store a layout of its own and moves the tile between the
    two through shared memory), so each side of the copy moves 32 contiguous bytes, one
    full sector, instead of version 1's one byte per sector on the store side. Only 1 KB
    per program, though: 402k programs at 8192 x 50304, each with few bytes in flight to
    hide the memory latency."""
    N, Vp = src.shape
    dst = torch.empty(Vp, N, dtype=src.dtype, device=src.device)
    engine._transpose_kernel[(triton.cdiv(N, 32), triton.cdiv(Vp, 32))](
        src, dst, N, Vp, N, BLOCK_R=32, BLOCK_C=32, num_warps=1)
    return dict(dst=dst)


def production(src):
    """production (llmpy/engines/triton/fp8.py transpose_bytes): 128x128 tiles, 8 warps

    The engine's launch (TRANSPOSE: swept on the H200, 0.234 ms for 8192 x 50304, 3.5 TB/s
    read + write): 16 KB per program, so each row of a tile is a 128-byte line on both
    sides and 16x fewer programs than version 2 keep more bytes in flight per SM."""
    N, Vp = src.shape
    dst = torch.empty(Vp, N, dtype=src.dtype, device=src.device)
    engine.transpose_bytes(src, dst)
    return dict(dst=dst)


def unit(src):
    """torch: src.t().contiguous() (the unit)"""
    return dict(dst=src.t().contiguous())


def make(dims, device, seed):
    g = generator(device, seed)
    N = dims["B"] * dims["T"]
    # every byte value, as e5m2 bits would be (uint8: the engine moves FP8 as bytes, and
    # the bit patterns of NaN and inf stay plain numbers to compare)
    src = torch.randint(0, 256, (N, dims["Vp"]), generator=g, device=device,
                        dtype=torch.uint8)                                     # (N, Vp)
    return dict(src=src)


def reference(src):
    # in float64 from the start: a freed uint8 transpose of the right size would be what the
    # next torch.empty of a version returns, right answer included
    return dict(dst=src.double().t().contiguous())


def cost(dims, inputs):
    return "bytes", 2 * inputs["src"].numel()


OP = Op(
    name="transpose_bytes", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    # a transpose moves bytes without arithmetic: every byte must be in place (any wrong
    # byte is at least 1/255 of the largest)
    tol=dict(dst=0.0),
    cost=cost)
