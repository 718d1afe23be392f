"""Token + position embedding, backward (llm.c's dev/cuda/encoder_backward.cu).

    dwte[inputs[b, t]] += dout[b, t]        a scatter-add: a token that occurs k times
    dwpe[t] += sum over b of dout[b, t]     gets the sum of its k rows

Both gradients are ADDED into (bf16, as in the triton engine). Inputs are drawn with a
Zipf-like frequency, as in text: at B=8, T=1024 the commonest token occurs hundreds of times,
most only once, so the work per token is very uneven.

    version 1  atomics: every position adds its row into fp32 copies of the whole dwte and
               dwpe (zeroed first, folded into the bf16 gradients after): nondeterministic
    version 2  deterministic: positions sorted by token on the host; one program per
               distinct token sums its rows in order, then adds once into its dwte row
    version 3  production: version 2 with each token's positions split into sub-buckets of
               at most 64, summed in parallel, then added in order: balanced and
               deterministic (llm.c's encoder_backward in train_gpt2.cu does this)

The host-side plans of versions 2 and 3 are built once from the tokens in make() and not
timed (the engine builds them on the CPU while the GPU runs the forward).

Dimension legend: B batch, T time, C channels, N = B*T, U distinct tokens, S sub-buckets.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from llmpy.engines.triton import encoder as engine

from .common import Op, generator, np_rel, randn, to_dtype, tokens, versions_of

BLOCK_C = 256  # channels per program (GPU)


@triton.jit
def _atomic_scatter_kernel(dout_ptr, inp_ptr, dwte_ptr, dwpe_ptr, T, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = cols < C
    tok = tl.load(inp_ptr + row).to(tl.int64)
    t = row % T
    d = tl.load(dout_ptr + row.to(tl.int64) * C + cols, mask=m, other=0.0).to(tl.float32)
    tl.atomic_add(dwte_ptr + tok * C + cols, d, mask=m)
    tl.atomic_add(dwpe_ptr + t * C + cols, d, mask=m)


@triton.jit
def _fold_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    # dst (bf16) += src (fp32), elementwise
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = tl.load(src_ptr + offs, mask=m, other=0.0) + \
        tl.load(dst_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, to_dtype(s, dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _token_sum_kernel(dout_ptr, order_ptr, tok_ptr, start_ptr, dwte_ptr, C,
                      BLOCK_C: tl.constexpr):
    # one program: one distinct token, BLOCK_C of its columns; its positions in order
    u = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = cols < C
    s0 = tl.load(start_ptr + u)
    s1 = tl.load(start_ptr + u + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j in range(s0, s1):
        pos = tl.load(order_ptr + j).to(tl.int64)
        acc += tl.load(dout_ptr + pos * C + cols, mask=m, other=0.0).to(tl.float32)
    tok = tl.load(tok_ptr + u).to(tl.int64)
    old = tl.load(dwte_ptr + tok * C + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(dwte_ptr + tok * C + cols, to_dtype(old + acc, dwte_ptr.dtype.element_ty), mask=m)


@triton.jit
def _wpe_kernel(dout_ptr, dwpe_ptr, B, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # dwpe[t] += sum over b of dout[b, t], b in order
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (ts < T)[:, None] & (cols < C)[None, :]
    offs = ts.to(tl.int64)[:, None] * C + cols[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for b in range(0, B):
        acc += tl.load(dout_ptr + b * T * C + offs, mask=m, other=0.0).to(tl.float32)
    old = tl.load(dwpe_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dwpe_ptr + offs, to_dtype(old + acc, dwpe_ptr.dtype.element_ty), mask=m)


def _block_c(C):
    return BLOCK_C


def version1(dout, inputs, dwte, dwpe, plan2, plan3):
    """atomics: each position adds its row into fp32 scratch copies of dwte and dwpe

    The direct translation of the math (llm.c's version 1): N programs, each atomically
    adds its dout row into the rows of its token and its position. bf16 atomics would
    round at every addition, so they go into fp32 scratch, which must be zeroed first
    (the whole Vp x C table: 154 MB at GPT-2 size) and folded into the bf16 gradients after,
    although only a few thousand rows changed. Nondeterministic: the atomics land in any
    order."""
    B, T, C = dout.shape
    wte32 = torch.zeros(dwte.shape, dtype=torch.float32, device=dout.device)
    wpe32 = torch.zeros(dwpe.shape, dtype=torch.float32, device=dout.device)
    bc = _block_c(C)
    _atomic_scatter_kernel[(B * T, triton.cdiv(C, bc))](dout, inputs, wte32, wpe32, T, C,
                                                         BLOCK_C=bc)
    for src, dst in ((wte32, dwte), (wpe32, dwpe)):
        n = dst.numel()
        BLOCK = 2048
        _fold_kernel[(triton.cdiv(n, BLOCK),)](src, dst, n, BLOCK=BLOCK, num_warps=8)
    return dict(dwte=dwte, dwpe=dwpe)


def version2(dout, inputs, dwte, dwpe, plan2, plan3):
    """sorted by token: one program per distinct token, no atomics, no scratch

    The host sorts the N positions by token (stable). Program u sums the dout rows of
    token u in position order in fp32 registers and adds the sum into its dwte row once:
    only the rows that change are touched, nothing is zeroed, and the result is the same
    bits every run. dwpe: one program per block of positions sums over the batch in order.
    Its weakness: the commonest token's program walks hundreds of rows alone while the
    others finish after one."""
    B, T, C = dout.shape
    order, tok, start = plan2
    bc = _block_c(C)
    _token_sum_kernel[(tok.numel(), triton.cdiv(C, bc))](dout, order, tok, start, dwte, C,
                                                          BLOCK_C=bc, num_warps=2)
    BLOCK_T = 4
    _wpe_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(C, bc))](dout, dwpe, B, T, C,
                                                               BLOCK_T=BLOCK_T, BLOCK_C=bc)
    return dict(dwte=dwte, dwpe=dwpe)


def production(dout, inputs, dwte, dwpe, plan2, plan3):
    """production (llmpy/engines/triton/encoder.py): sub-buckets of <= 64 positions

    The engine's kernels: each token's sorted positions are cut into sub-buckets of at
    most 64; one kernel sums every sub-bucket in parallel into fp32 scratch (S rows), a
    second adds each token's sub-bucket sums in order into its dwte row. The commonest
    token is now spread over many programs, and the order is still fixed: deterministic."""
    plan, counts = plan3
    engine.encoder_backward(dout, plan, counts, dwte, dwpe)
    return dict(dwte=dwte, dwpe=dwpe)


def unit(dout, inputs, dwte, dwpe, plan2, plan3):
    """torch: embedding_dense_backward, added into dwte; dwpe[:T] += dout.sum(0) (the unit)

    What autograd runs for nn.Embedding: a sort-based kernel that sums each token's rows in
    fp32 into a dense (Vp, C) gradient, which is then added into dwte. (index_put_ with
    accumulate=True is cheaper but adds the duplicates in bf16: 3.1e-2 error on the H200,
    over the tolerance.)"""
    B, T, C = dout.shape
    dwte += torch.ops.aten.embedding_dense_backward(dout.view(B * T, C), inputs.view(-1).long(),
                                                    dwte.shape[0], -1, False)
    dwpe[:T] += dout.sum(0)
    return dict(dwte=dwte, dwpe=dwpe)


def plans(inputs: torch.Tensor):
    """Host plans of versions 2 and 3 from the (B, T) tokens (built on the CPU, untimed)."""
    flat = inputs.cpu().numpy().reshape(-1).astype(np.int64)
    order = np.argsort(flat, kind="stable")
    toks = flat[order]
    start = np.concatenate(([0], np.flatnonzero(np.diff(toks)) + 1, [flat.size]))
    dev = inputs.device
    plan2 = tuple(torch.from_numpy(a.astype(np.int32)).to(dev)
                  for a in (order, toks[start[:-1]], start))
    plan, counts = engine.bucket_plan(flat.reshape(inputs.shape))
    return plan2, (torch.from_numpy(plan).to(dev), counts)


def make(dims, device, seed):
    g = generator(device, seed)
    B, T, C = dims["B"], dims["T"], dims["C"]
    inputs = tokens(g, B * T, dims["V"]).view(B, T)
    plan2, plan3 = plans(inputs)
    return dict(dout=randn(g, B, T, C), inputs=inputs, dwte=randn(g, dims["Vp"], C),
                dwpe=randn(g, dims["maxT"], C), plan2=plan2, plan3=plan3)


def reference(dout, inputs, dwte, dwpe, plan2, plan3):
    B, T, C = dout.shape
    rw = dwte.double().index_add(0, inputs.view(-1).long(), dout.double().view(B * T, C))
    rp = dwpe.double().clone()
    rp[:T] += dout.double().sum(0)
    return dict(dwte=rw, dwpe=rp)


def numpy_check(inputs, ref):
    from llmpy.engines import numpy_layers as nl
    dwte, dwpe = (inputs[k].double().cpu().numpy() for k in ("dwte", "dwpe"))
    nl.encoder_backward(inputs["dout"].double().cpu().numpy(), (inputs["inputs"].cpu().numpy(), 0),
                        dwte, dwpe)
    return max(np_rel(dwte, ref["dwte"].cpu()), np_rel(dwpe, ref["dwpe"].cpu()))


def cost(dims, inputs):
    N, T, C = dims["B"] * dims["T"], dims["T"], dims["C"]
    U = int(inputs["plan2"][1].numel())  # dwte rows that change: read and written once
    return "bytes", N * 4 + N * C * 2 + 2 * U * C * 2 + 2 * T * C * 2


OP = Op(
    name="encoder_backward", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    # bf16 gradients, rounded once (twice for torch's) after an fp32 sum
    tol=dict(dwte=1e-2, dwpe=1e-2),
    cost=cost, inplace=True, numpy_check=numpy_check, llmc="dev/cuda/encoder_backward.cu")
