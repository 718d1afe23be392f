"""Token + position embedding, forward (llm.c's dev/cuda/encoder_forward.cu).

    out[b, t] = wte[inputs[b, t]] + wpe[t]

A gather: each output row is one row of wte (chosen by the token) plus one row of wpe.
Memory-bound; all rows bf16, inputs int32.

    version 1  one element per lane over the flat (N*C) output: each lane finds its row by
               division and its token by its own load; scattered 2-byte accesses
    version 2  production: one program per row; the token is loaded once and the row moves
               as wide contiguous vectors

Dimension legend: B batch, T time, C channels, N = B*T, Vp padded vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import encoder as engine

from .common import Op, generator, np_rel, randn, to_dtype, tokens, versions_of


@triton.jit
def _encoder_flat_kernel(inp_ptr, wte_ptr, wpe_ptr, out_ptr, n, T, C, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    row = i // C
    c = i % C
    tok = tl.load(inp_ptr + row, mask=m, other=0).to(tl.int64)
    t = row % T
    e = tl.load(wte_ptr + tok * C + c, mask=m, other=0.0).to(tl.float32)
    p = tl.load(wpe_ptr + t * C + c, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, to_dtype(e + p, out_ptr.dtype.element_ty), mask=m)


def version1(inputs, wte, wpe):
    """flat: one output element per lane, row and token found per element

    llm.c's version 2 (one thread per element): simple, all lanes busy. But each element
    divides its index by C to find its row, loads the token id itself (a broadcast of the
    same 4 bytes to C lanes), and because the compiler cannot prove that neighbouring
    lanes read neighbouring wte addresses (the token can change at any element), every
    gather is a separate 2-byte access instead of a 16-byte vector."""
    B, T = inputs.shape
    C = wte.shape[1]
    out = torch.empty(B, T, C, dtype=wte.dtype, device=wte.device)
    n = out.numel()
    BLOCK = 1024
    _encoder_flat_kernel[(triton.cdiv(n, BLOCK),)](inputs, wte, wpe, out, n, T, C, BLOCK=BLOCK,
                                                  num_warps=4)
    return dict(out=out)


def production(inputs, wte, wpe):
    """production (llmpy/engines/triton/encoder.py): one program per row, whole-row vectors

    The engine's kernel: the program loads its token once, then the wte row, the wpe row
    and the output row are contiguous (BLOCK_C,) vectors, moved 16 bytes per lane (llm.c's
    version 3 gets the same with its x128 packed loads). No per-element index math."""
    B, T = inputs.shape
    out = torch.empty(B, T, wte.shape[1], dtype=wte.dtype, device=wte.device)
    engine.encoder_forward(inputs, wte, wpe, out)
    return dict(out=out)


def unit(inputs, wte, wpe):
    """torch: embedding(wte, inputs) + wpe[:T] (the unit: two kernels)"""
    T = inputs.shape[1]
    return dict(out=torch.nn.functional.embedding(inputs, wte) + wpe[:T])


def make(dims, device, seed):
    g = generator(device, seed)
    B, T, C = dims["B"], dims["T"], dims["C"]
    return dict(inputs=tokens(g, B * T, dims["V"]).view(B, T),
                wte=randn(g, dims["Vp"], C, scale=0.02), wpe=randn(g, dims["maxT"], C, scale=0.01))


def reference(inputs, wte, wpe):
    T = inputs.shape[1]
    return dict(out=wte.double()[inputs.long()] + wpe.double()[:T])


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    wte, wpe = (inputs[k].double().cpu().numpy() for k in ("wte", "wpe"))
    out, _ = nl.encoder_forward(inputs["inputs"].cpu().numpy(), wte, wpe)
    return np_rel(out, ref["out"].cpu())


def cost(dims, inputs):
    N, T, C = dims["B"] * dims["T"], dims["T"], dims["C"]
    return "bytes", N * 4 + 2 * N * C * 2 + T * C * 2


OP = Op(
    name="encoder_forward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    tol=dict(out=1e-2),  # bf16 output, one rounding of an exact fp32 sum
    cost=cost, numpy_check=numpy_check, llmc="dev/cuda/encoder_forward.cu")
