"""GELU forward, tanh approximation (llm.c's dev/cuda/gelu_forward.cu).

    out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

Elementwise over the (N, 4C) output of the fc matmul, bf16 in and out: one read and one
write per element, so the only question is how close to the copy bandwidth it gets.

    version 1  128 elements per program, 4 warps: one 2-byte element per lane
    version 2  production: thousands of elements per program: 8+ elements per lane, moved
               as 16-byte vectors
    version 3  production into e4m3 (-f8 2): version 2 writing only an e4m3 copy of the
               output, with a delayed power-of-two scale and one max |out| per program

Dimension legend: N rows (B*T), OC = 4C columns.
"""

from __future__ import annotations

import torch
import triton

from llmpy.engines.triton import gelu as engine

from .common import (FP8_TOP, Op, delayed_amax, e4m3_out, e4m3_version, generator, np_rel,
                     pow2_scale, randn, versions_of)


# The kernel is the engine's (one element per lane of a block); what version 1 and the
# production version differ in is only the launch: how many elements each program owns.
_gelu_kernel = engine._gelu_forward_kernel


def version1(x, amax):
    """one element per lane: 128 elements per program, 4 warps

    llm.c's version 1: one thread per element. Every lane moves a single 2-byte bf16 each
    way, so a warp issues 64-byte transactions and the GPU needs very many programs in
    flight (49k here) to keep enough bytes moving to hide the memory latency."""
    out = torch.empty_like(x)
    n = x.numel()
    BLOCK = 128
    # x stands in for the FP8 output's pointers (-f8 2), which OUT8=False leaves unused
    _gelu_kernel[(triton.cdiv(n, BLOCK),)](x, out, x, x, x, x, n, STORE=True, OUT8=False,
                                           MAXV=1.0, BLOCK=BLOCK, num_warps=4)
    return dict(out=out)


def production(x, amax):
    """production (llmpy/engines/triton/gelu.py): many elements per lane, 16-byte vectors

    The engine's kernel with its swept launch configuration (GPU["forward"]: thousands of
    elements per program over a few warps), so each lane owns 8 or more contiguous bf16 and
    moves them with 128-bit loads and stores (llm.c's version 2 packs x128 by hand for the
    same reason): 8x fewer memory instructions per byte, and fewer, longer programs."""
    out = torch.empty_like(x)
    engine.gelu_forward(x, out)
    return dict(out=out)


def production_e4m3(x, amax):
    """production into e4m3 (-f8 2): only e4m3 written, delayed pow2 scale

    -f8 2 runs fcproj's matmul on gelu(fch) in e4m3 (fp8.Fp8Mlp), and at -r 1 and 2 (the
    GELU recomputed in the backward) the engine writes only that copy: 1 byte per element
    instead of 2 (the op's cost counts the bf16 write: 4 bytes per element where 3 move,
    so its GB/s reads 4/3 of the true rate). Each value is rounded to bf16 as before, then
    stored times 1/scale in e4m3, saturating at 448, with a delayed power-of-two scale
    from amax and one max |out| per program (common.py's FP8 block says why: an exact
    multiply instead of a division per element, no atomics)."""
    f = e4m3_out(x.shape, engine.gelu_forward_programs(x.numel()), amax)
    engine.gelu_forward(x, None, fp8=f)
    return dict(out=f.out, scale=f.scale, part=f.partial)


def unit(x, amax):
    """torch.nn.functional.gelu(approximate="tanh") (the unit)"""
    return dict(out=torch.nn.functional.gelu(x, approximate="tanh"))


def make(dims, device, seed):
    g = generator(device, seed)
    x = randn(g, dims["B"] * dims["T"], 4 * dims["C"], dtype=torch.float32, scale=2.0)
    # largest x (and gelu(x), ~x there) at FP8_TOP, so that amax saturates (common.py)
    x = (x * (FP8_TOP / x.max())).to(torch.bfloat16)
    out = torch.nn.functional.gelu(x.float(), approximate="tanh")
    return dict(x=x, amax=delayed_amax(out))


def reference(x, amax):
    out = torch.nn.functional.gelu(x.double(), approximate="tanh")
    return dict(out=out, amax=out.abs().max().reshape(1), scale=pow2_scale(amax))


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    out, _ = nl.gelu_forward(inputs["x"].double().cpu().numpy())
    return np_rel(out, ref["out"].cpu())


def cost(dims, inputs):
    return "bytes", 2 * inputs["x"].numel() * 2


OP = Op(
    name="gelu_forward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit)[:-1]
    + (e4m3_version("3", production_e4m3, "out"),) + versions_of(globals(), None, unit)[-1:],
    tol=dict(out=1e-2),  # bf16 output, rounded once
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/gelu_forward.cu")
