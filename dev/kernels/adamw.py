"""AdamW over one flat parameter buffer (llm.c's dev/cuda/adamw.cu).

    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    p = p - lr (m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) + wd p)

As in the triton engine: bf16 parameters and gradients, fp32 master weights and fp32 m, v,
all (P,) flat, one launch for the whole model (GPT-2 124M: P = 124,475,904). Per parameter
a step must read g (2 B), m, v, master (12 B) and write m, v, master (12 B) and the bf16
parameter (2 B): 28 bytes, so it is memory-bound like everything but the matmuls.

    version 1  three kernels: m, then v, then the parameters: g is read twice, m and v
               written and read back
    version 2  one fused kernel: every byte moved once; bf16 by round-to-nearest
    version 3  production: version 2 with stochastic rounding to bf16 (unbiased, so tiny
               updates are not lost to rounding); the same bytes, so the same speed

Dimension legend: P parameters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpy.engines.triton import adamw as engine

from .common import Op, generator, randn, to_dtype, versions_of

HP = dict(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=10)
BLOCK = 1024


@triton.jit
def _m_kernel(g_ptr, m_ptr, n, beta1, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    tl.store(m_ptr + offs, beta1 * m + (1.0 - beta1) * g, mask=mask)


@triton.jit
def _v_kernel(g_ptr, v_ptr, n, beta2, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    tl.store(v_ptr + offs, beta2 * v + (1.0 - beta2) * g * g, mask=mask)


@triton.jit
def _param_kernel(param_ptr, master_ptr, m_ptr, v_ptr, n, lr, bc1, bc2, eps, wd,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    p = p - lr * ((m / bc1) / (tl.sqrt(v / bc2) + eps) + wd * p)
    tl.store(master_ptr + offs, p, mask=mask)
    tl.store(param_ptr + offs, to_dtype(p, param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_fused_kernel(param_ptr, grad_ptr, master_ptr, m_ptr, v_ptr, n, lr, beta1, beta2,
                        bc1, bc2, eps, wd, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - lr * ((m / bc1) / (tl.sqrt(v / bc2) + eps) + wd * p)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(master_ptr + offs, p, mask=mask)
    tl.store(param_ptr + offs, to_dtype(p, param_ptr.dtype.element_ty), mask=mask)


def _bias_corrections():
    return 1.0 - HP["beta1"] ** HP["t"], 1.0 - HP["beta2"] ** HP["t"]


def version1(param, grad, master, m, v):
    """three kernels: update m, update v, then update the parameters

    The optimizer as three elementwise steps, each a kernel over the whole buffer. The
    parameter kernel reads m and v back right after they were written, and g is read
    twice: 2 + 8 + 2 + 8 + 8 + 4 + 8 + 2 = 42 bytes per parameter instead of 28."""
    n = param.numel()
    bc1, bc2 = _bias_corrections()
    grid = (triton.cdiv(n, BLOCK),)
    _m_kernel[grid](grad, m, n, HP["beta1"], BLOCK=BLOCK)
    _v_kernel[grid](grad, v, n, HP["beta2"], BLOCK=BLOCK)
    _param_kernel[grid](param, master, m, v, n, HP["lr"], bc1, bc2, HP["eps"],
                        HP["weight_decay"], BLOCK=BLOCK)
    return dict(param=param, master=master, m=m, v=v)


def version2(param, grad, master, m, v):
    """one fused kernel: each value loaded once, updated in registers, stored once

    llm.c's adamw_kernel2: the 28 compulsory bytes per parameter and one launch. The new
    bf16 parameter is the fp32 master rounded to nearest."""
    n = param.numel()
    bc1, bc2 = _bias_corrections()
    _adamw_fused_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, master, m, v, n, HP["lr"], HP["beta1"], HP["beta2"], bc1, bc2, HP["eps"],
        HP["weight_decay"], BLOCK=BLOCK, num_warps=4)
    return dict(param=param, master=master, m=m, v=v)


def production(param, grad, master, m, v):
    """production (llmpy/engines/triton/adamw.py): fused, with stochastic rounding to bf16

    The engine's kernel (llm.c's adamw_kernel3): version 2's single pass, but the bf16
    parameter is rounded stochastically (a Philox random number added below the cut), so
    an update smaller than half a bf16 step still moves the parameter on average. Not
    faster than version 2 (the same bytes; the random numbers are computed, not loaded):
    better."""
    engine.adamw_update(param, grad, master, m, v, lr=HP["lr"], beta1=HP["beta1"],
                        beta2=HP["beta2"], eps=HP["eps"], weight_decay=HP["weight_decay"],
                        t=HP["t"], grad_scale=1.0, seed=1234)
    return dict(param=param, master=master, m=m, v=v)


def unit(param, grad, master, m, v):
    """torch._fused_adamw_ on fp32 master (grads upcast), then param.copy_ (the unit)"""
    step = torch.tensor(float(HP["t"]), device=param.device)
    torch._fused_adamw_([master], [grad.float()], [m], [v], [], [step], lr=HP["lr"],
                        beta1=HP["beta1"], beta2=HP["beta2"], weight_decay=HP["weight_decay"],
                        eps=HP["eps"], amsgrad=False, maximize=False)
    param.copy_(master)
    return dict(param=param, master=master, m=m, v=v)


def make(dims, device, seed):
    g = generator(device, seed)
    P = dims["P"]
    master = randn(g, P, dtype=torch.float32, scale=0.02)
    return dict(param=master.to(torch.bfloat16), grad=randn(g, P, scale=0.01), master=master,
                m=randn(g, P, dtype=torch.float32, scale=1e-3),
                v=randn(g, P, dtype=torch.float32, scale=1e-3).square())


def reference(param, grad, master, m, v):
    b1, b2, lr, eps, wd = HP["beta1"], HP["beta2"], HP["lr"], HP["eps"], HP["weight_decay"]
    bc1, bc2 = _bias_corrections()
    g = grad.double()
    rm = b1 * m.double() + (1 - b1) * g
    rv = b2 * v.double() + (1 - b2) * g * g
    p = master.double()
    rp = p - lr * ((rm / bc1) / (torch.sqrt(rv / bc2) + eps) + wd * p)
    return dict(param=rp, master=rp, m=rm, v=rv)


def cost(dims, inputs):
    return "bytes", 28 * dims["P"]


OP = Op(
    name="adamw", make=make, reference=reference,
    versions=versions_of(globals(), production, unit),
    # master, m, v: fp32 arithmetic (1e-5); param: bf16, rounded once to nearest or
    # stochastically (within one bf16 step, 2^-7 relative)
    tol=dict(param=1e-2, master=1e-5, m=1e-5, v=1e-5),
    cost=cost, inplace=True, llmc="dev/cuda/adamw.cu")
