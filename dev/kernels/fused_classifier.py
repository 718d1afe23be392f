"""Softmax + cross-entropy + dlogits, fused (llm.c's dev/cuda/classifier_fused.cu).

    lse = log sum_j exp(logits[r, j]) over the V real columns
    losses[r] = lse - logits[r, target[r]]
    dlogits[r, j] = (exp(logits[r, j] - lse) - [j == target]) * dloss,  0 in the padding V..Vp

The (N, Vp) bf16 logits are the largest activation of GPT-2 (8192 x 50304 = 824 MB), and
the gradient is written over them in place, as in llm.c and the triton engine; losses are
fp32, dloss = 1/N (the mean). Memory-bound: one read of N x V and one write of N x Vp at
best.

    version 1  three kernels: softmax into an fp32 probability buffer, the losses from it,
               then dlogits from it: the 1.6 GB buffer is written and read back
    version 2  one kernel per row, three passes over its logits (max, sum of exp, write):
               no probability buffer
    version 3  online softmax (max and sum in one pass), then the write pass: two reads
               of the row, one write
    version 4  the whole row in registers: one read, one write (on paper; it spills)
    version 5  production: the two passes of version 3 arranged for L2 (rows from the last, the
               first pass backwards, the last read and the write streamed) and a max per
               thread's vector instead of one per tile
    version 6  production into e5m2 (-f8 1): version 5 writing (softmax - onehot) * 2^15
               to an FP8 buffer, the logits left alone

Dimension legend: N rows (B*T), V vocabulary, Vp padded vocabulary (the row stride).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import classifier as engine

from .common import (Op, Version, generator, interpreting, np_rel, pow2, randn, to_dtype, tokens,
                     versions_of)

BLOCK_V = 4096  # columns per loop step
WHOLE_ROW_WARPS = 32
E5M2_SCALE = 2.0 ** 15   # the FP8 head's dlogits scale (fp8.D_SCALE)


@triton.jit
def _probs_kernel(logits_ptr, probs_ptr, V, Vp, BLOCK: tl.constexpr):
    # one row: max, sum, then probs (N, V) fp32 written
    r = tl.program_id(0).to(tl.int64)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(logits_ptr + r * Vp + cols, mask=cols < V,
                                  other=float("-inf")).to(tl.float32))
    mx = tl.max(m, axis=0)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + r * Vp + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        s += tl.exp(x - mx)
    inv = 1.0 / tl.sum(s, axis=0)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + r * Vp + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        tl.store(probs_ptr + r * V + cols, tl.exp(x - mx) * inv, mask=cols < V)


@triton.jit
def _loss_kernel(probs_ptr, targets_ptr, losses_ptr, N, V, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < N
    tgt = tl.load(targets_ptr + rows, mask=m, other=0).to(tl.int64)
    p = tl.load(probs_ptr + rows.to(tl.int64) * V + tgt, mask=m, other=1.0)
    tl.store(losses_ptr + rows, -tl.log(p), mask=m)


@triton.jit
def _dlogits_kernel(probs_ptr, targets_ptr, logits_ptr, V, Vp, dloss, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    tgt = tl.load(targets_ptr + r)
    for v0 in range(0, Vp, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        p = tl.load(probs_ptr + r * V + cols, mask=cols < V, other=0.0)
        d = tl.where(cols < V, (p - tl.where(cols == tgt, 1.0, 0.0)) * dloss, 0.0)
        tl.store(logits_ptr + r * Vp + cols, to_dtype(d, logits_ptr.dtype.element_ty),
                 mask=cols < Vp)


@triton.jit
def _loss_and_write(base, target_ptr, loss_ptr, lse, V, Vp, dloss, BLOCK: tl.constexpr):
    # a row's loss from its lse, then its logits overwritten with dlogits in a last pass
    tgt = tl.load(target_ptr).to(tl.int64)
    tl.store(loss_ptr, lse - tl.load(base + tgt).to(tl.float32))
    for v0 in range(0, Vp, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        d = (tl.exp(x - lse) - tl.where(cols == tgt, 1.0, 0.0)) * dloss
        tl.store(base + cols, to_dtype(tl.where(cols < V, d, 0.0), base.dtype.element_ty),
                 mask=cols < Vp)


@triton.jit
def _three_pass_kernel(logits_ptr, targets_ptr, losses_ptr, V, Vp, dloss, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    base = logits_ptr + r * Vp
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32))
    mx = tl.max(m, axis=0)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        s += tl.exp(tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) - mx)
    lse = mx + tl.log(tl.sum(s, axis=0))
    _loss_and_write(base, targets_ptr + r, losses_ptr + r, lse, V, Vp, dloss, BLOCK)


def version1(logits, targets, V):
    """three kernels around an fp32 probability buffer: softmax, losses, dlogits

    The unfused pipeline (llm.c's versions 1-2 are also separate kernels): kernel 1 reads
    each row three times and writes probs (N, V) in fp32 (1.6 GB at GPT-2 size); kernel 2
    picks -log probs[target]; kernel 3 reads probs back and writes dlogits over the
    logits. The buffer costs a write and a read of twice the logits' size, and memory."""
    N, Vp = logits.shape
    dloss = 1.0 / N
    probs = torch.empty(N, V, dtype=torch.float32, device=logits.device)
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    _probs_kernel[(N,)](logits, probs, V, Vp, BLOCK=BLOCK_V, num_warps=8)
    _loss_kernel[(triton.cdiv(N, 256),)](probs, targets, losses, N, V, BLOCK=256)
    _dlogits_kernel[(N,)](probs, targets, logits, V, Vp, dloss, BLOCK=BLOCK_V, num_warps=8)
    return dict(losses=losses, dlogits=logits)


@triton.jit
def _online_kernel(logits_ptr, targets_ptr, losses_ptr, V, Vp, dloss, BLOCK: tl.constexpr):
    # one row: running max and sum in one pass (a max over the tile at every step), write
    r = tl.program_id(0).to(tl.int64)
    base = logits_ptr + r * Vp
    m = tl.full([1], -1e30, dtype=tl.float32)
    s = tl.zeros([1], dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = tl.max(m + tl.log(s), axis=0)
    _loss_and_write(base, targets_ptr + r, losses_ptr + r, lse, V, Vp, dloss, BLOCK)


def version2(logits, targets, V):
    """one kernel per row: max pass, sum-of-exp pass, dlogits pass; no probability buffer

    Fusing the three kernels removes the fp32 buffer entirely: the loss is lse -
    logit[target] (no probability needs storing), and dlogits are recomputed from the
    logits in the last pass (exp(x - lse)). The row (100 KB) is read three times; the
    later reads are partly served by L2."""
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    _three_pass_kernel[(N,)](logits, targets, losses, V, Vp, 1.0 / N, BLOCK=BLOCK_V,
                             num_warps=8)
    return dict(losses=losses, dlogits=logits)


def version3(logits, targets, V):
    """online softmax: max and sum in one pass, then the write pass

    The max and the sum of exp come from one pass (the sum is rescaled whenever the max
    grows, softmax_forward.py version 2), so each row is read twice and written once
    (llm.c's fused_classifier3 does the same). Each step takes the tile's max, a reduction
    across the whole program (shuffles and shared memory) per 4096 columns."""
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    _online_kernel[(N,)](logits, targets, losses, V, Vp, 1.0 / N, BLOCK=BLOCK_V, num_warps=8)
    return dict(losses=losses, dlogits=logits)


def production(logits, targets, V):
    """production (llmpy/engines/triton/classifier.py): version 3 arranged for L2, a max per thread

    The same two passes, but (as llm.c's fused_classifier_kernel5) rows go from the last,
    which the logits matmul wrote last and L2 may still hold; the first pass walks the row
    backwards, keeping its reads in L2, so that the second pass, starting at the row's
    start, finds them there; the writes are streamed (llm.c's too) and so are the second
    pass's reads (evict first; llm.c's are plain). The running max and sum are kept per group of 8 adjacent columns (a thread's
    16-byte vector) and merged once per row, so the loop has no reduction across threads.
    Launch: the engine's GPU dict."""
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    engine.fused_classifier(logits, targets, losses, V, 1.0 / N)
    return dict(losses=losses, dlogits=logits)


@triton.jit
def _whole_row_kernel(logits_ptr, targets_ptr, losses_ptr, V, Vp, dloss, BLOCK: tl.constexpr):
    # one row, all of it loaded at once: max, sum and the write from registers
    r = tl.program_id(0).to(tl.int64)
    base = logits_ptr + r * Vp
    cols = tl.arange(0, BLOCK)
    xb = tl.load(base + cols, mask=cols < V, other=float("-inf"))     # kept in bf16
    mx = tl.max(xb.to(tl.float32), axis=0)
    lse = mx + tl.log(tl.sum(tl.exp(xb.to(tl.float32) - mx), axis=0))
    tgt = tl.load(targets_ptr + r).to(tl.int64)
    tl.store(losses_ptr + r, lse - tl.load(base + tgt).to(tl.float32))
    d = (tl.exp(xb.to(tl.float32) - lse) - tl.where(cols == tgt, 1.0, 0.0)) * dloss
    tl.store(base + cols, to_dtype(tl.where(cols < V, d, 0.0), logits_ptr.dtype.element_ty),
             mask=cols < Vp)


def version4(logits, targets, V):
    """whole row in registers: one read of the logits, one write

    The row (Vp bf16, 100 KB at GPT-2 size) is loaded once by a program of 32 warps and
    kept in registers for the max, the sum and the write (softmax_forward.py version 3 at
    a far longer row), so no second read can miss L2. Kept as the lesson it taught: 64
    values per thread (a quarter of them padding to the power of two) do not fit next to
    the temporaries, ptxas spills to local memory, and on an H200 it ran 10x slower than
    version 3 (6.98 ms at 32 warps, 5.30 at 16, against 0.716)."""
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    _whole_row_kernel[(N,)](logits, targets, losses, V, Vp, 1.0 / N, BLOCK=pow2(Vp),
                            num_warps=1 if interpreting() else WHOLE_ROW_WARPS)
    return dict(losses=losses, dlogits=logits)


def production_e5m2(logits, targets, V):
    """production into e5m2 (-f8 1): the same kernel writing (softmax - onehot) * 2^15 to an FP8 buffer

    The FP8 lm head (llmpy/engines/triton/fp8.py) keeps its logits and takes the gradient
    in e5m2 (2 mantissa bits) for its two FP8 gradient matmuls: a write of N x Vp bytes
    instead of 2 N x Vp. Scaled by 2^15 so that probabilities down to ~1e-9 stay normal
    numbers; 1/N and 2^-15 are folded into the matmuls' scales, and here into the check."""
    N, Vp = logits.shape
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    d8 = torch.empty(N, Vp, dtype=torch.float8_e5m2, device=logits.device)
    engine.fused_classifier(logits, targets, losses, V, E5M2_SCALE, out=d8)
    return dict(losses=losses, dlogits=d8)


def decode_e5m2(out):
    d8 = out["dlogits"]
    return dict(out, dlogits=d8.float() / (E5M2_SCALE * d8.shape[0]))


def unit(logits, targets, V):
    """torch: cross_entropy on the fp32 logits with autograd, grad copied back (the unit)"""
    N, Vp = logits.shape
    with torch.enable_grad():
        lf = logits[:, :V].float().requires_grad_(True)
        losses = torch.nn.functional.cross_entropy(lf, targets.long(), reduction="none")
        (dl,) = torch.autograd.grad(losses, lf, torch.full_like(losses, 1.0 / N))
    logits[:, :V] = dl
    logits[:, V:] = 0
    return dict(losses=losses.detach(), dlogits=logits)


def make(dims, device, seed):
    g = generator(device, seed)
    N = dims["B"] * dims["T"]
    logits = randn(g, N, dims["Vp"], scale=3.0)
    logits[:, dims["V"]:] = 7.0        # the padding must take no part
    return dict(logits=logits, targets=tokens(g, N, dims["V"]), V=dims["V"])


def reference(logits, targets, V):
    N = logits.shape[0]
    x = logits[:, :V].double()
    lse = torch.logsumexp(x, dim=-1)
    rows = torch.arange(N, device=logits.device)
    tgt = targets.long()
    d = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    d[:, :V] = torch.exp(x - lse[:, None])
    d[rows, tgt] -= 1.0
    return dict(losses=lse - x[rows, tgt], dlogits=d / N)


def numpy_check(inputs, ref):
    import numpy as np
    from llmpy.engines import numpy_layers as nl
    logits = inputs["logits"].double().cpu().numpy().copy()
    targets = inputs["targets"].cpu().numpy().astype(np.int64)
    N = logits.shape[0]
    losses, cache = nl.softmax_crossentropy_forward(logits, targets, inputs["V"])
    dlogits = nl.softmax_crossentropy_backward(np.full(N, 1.0 / N), cache)
    return max(np_rel(losses, ref["losses"].cpu()), np_rel(dlogits, ref["dlogits"].cpu()))


def cost(dims, inputs):
    N, Vp = inputs["logits"].shape
    return "bytes", N * inputs["V"] * 2 + N * Vp * 2 + N * 8


OP = Op(
    name="fused_classifier", make=make, reference=reference,
    versions=versions_of(globals(), production, unit)[:-1]
    # e5m2 rounds each value to 2 mantissa bits: at most 1/8 of it, of max |ref| at most
    + (Version("6", production_e5m2, "production", dict(dlogits=0.125), decode_e5m2),)
    + versions_of(globals(), None, unit)[-1:],
    # losses: fp32 log-sum-exp over V terms (summation order); dlogits: bf16, rounded once
    tol=dict(losses=1e-5, dlogits=1e-2),
    cost=cost, inplace=True, numpy_check=numpy_check, llmc="dev/cuda/classifier_fused.cu")
