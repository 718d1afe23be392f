"""AdamW over the flat buffers, with fp32 master weights and stochastic rounding to bf16
(llm.c's adamw_kernel3 in llmc/adamw.cuh and stochastic_rounding in llmc/cuda_utils.cuh).

    g = grad * grad_scale                     (clipping folded in by the training loop)
    m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
    p = p - lr (m / bc1 / (sqrt(v / bc2) + eps) + wd p),  bc = 1 - beta^t

p is the fp32 master weight (or, without master weights, the bf16 parameter upcast). The
new bf16 parameter is p rounded stochastically: a random 16-bit number is added to the low
half of p's fp32 bits before they are cut off, so the rounding is unbiased on average. The
random bits come from Philox (tl.randint) keyed by a per-launch seed and the element index:
deterministic given the engine's seed, the step and the tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting


@triton.jit
def _stochastic_round_bf16(x, seed, offs):
    r = tl.randint(seed, offs)
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (r & 0xFFFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _adamw_kernel(param_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, n, lr, beta1, beta2, bc1, bc2,
                  eps, wd, grad_scale, seed, base, HAS_MASTER: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    # explicit fma: left to itself the compiler contracts a*b + c differently for different
    # specializations of the same kernel (pointer alignment, n), which would make a tensor
    # updated in slices (ZeRO-1) differ in the last bit from one updated whole
    m = tl.fma(beta1, m, (1.0 - beta1) * g)
    v = tl.fma(beta2, v, (1.0 - beta2) * (g * g))
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    update = tl.fma(wd, p, (m / bc1) / (tl.sqrt(v / bc2) + eps))
    p = tl.fma(-lr, update, p)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    # the random bits are keyed by the element's index in its whole tensor (base + offs), so
    # a tensor updated in slices (ZeRO-1 shards) rounds exactly as when updated at once
    tl.store(param_ptr + offs, _stochastic_round_bf16(p, seed, offs + base), mask=mask)


def adamw_update(param, grad, master, m, v, *, lr, beta1, beta2, eps, weight_decay, t,
                 grad_scale, seed, base: int = 0):
    """One AdamW step on one tensor's flat views: param bf16, grad bf16, master fp32 or None,
    m and v fp32, all (n,) contiguous. seed: a 31-bit int for the stochastic rounding; base:
    where these views start inside their tensor (a ZeRO-1 shard's slice), for the same
    rounding bits as an update of the whole tensor."""
    n = param.numel()
    for x, what in ((grad, "grad"), (m, "m"), (v, "v")) + (((master, "master"),) if master is
                                                          not None else ()):
        if x.numel() != n or not x.is_contiguous():
            raise ValueError(f"adamw_update: {what} must be contiguous ({n},)")
    if param.dtype != torch.bfloat16 or m.dtype != torch.float32 or v.dtype != torch.float32:
        raise ValueError("adamw_update: param must be bf16 and m, v fp32")
    check_device(param, grad, m, v)
    BLOCK = 65536 if interpreting() else 1024
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, master if master is not None else m, m, v, n, lr, beta1, beta2,
        1.0 - beta1 ** t, 1.0 - beta2 ** t, eps, weight_decay, grad_scale, seed, base,
        HAS_MASTER=master is not None, BLOCK=BLOCK, num_warps=4)
