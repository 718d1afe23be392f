"""Causal self-attention through torch's fused kernels, forward and backward called
explicitly (llm.c's attention_forward_cudnn / attention_backward_cudnn in llmc/cudnn_att.cpp).

The (B, T, 3C) qkv activation is read in place: q, k, v are (B, NH, T, HS) strided views of
it, and each backend returns an output whose memory is (B, T, NH, HS), so the (B, T, C)
input of the attproj matmul is a view too. Backward returns dq, dk, dv; one Triton kernel
packs them into the (B, T, 3C) dqkv buffer and sums their columns per block of rows (the
qkv bias gradient), so no extra pass is needed for the bias.

Backends: "cudnn" (cuDNN's fused attention), "flash" (FlashAttention-2 in torch), "math"
(written out in fp32 with torch matmuls: any head size, for shapes the fused kernels
reject), and "cpu" (torch's CPU flash kernel, for tests with TRITON_INTERPRET=1). The fused
backward kernels run with torch's deterministic flag raised, so resumed runs reproduce bit
for bit.

Dimension legend: B batch, T time, C channels, NH heads, HS head size, N = B*T.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, pow2

BACKENDS = ("cudnn", "flash", "math", "cpu")
aten = torch.ops.aten


# GPU launch configuration of the pack kernel (bench/triton_kernels.py sweeps it).
PACK_GPU = dict(ROWS_T=256, BLOCK_T=64, num_warps=4)


@triton.jit
def _pack_kernel(src_ptr, s_b, s_h, s_t, dst_ptr, partial_ptr, T, NH, HS, dst_stride,
                 partial_stride, ROWS_T, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program: head h of batch row b, times [tb * ROWS_T, (tb + 1) * ROWS_T); it reads
    # (BLOCK_T, HS) tiles of the source, writes them into the head's HS columns of dst and
    # sums those columns
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    d = tl.arange(0, BLOCK_D)
    dmask = d < HS
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    src = src_ptr + b * s_b + h.to(tl.int64) * s_h
    dst = dst_ptr + b * T * dst_stride + h * HS
    for r in range(0, ROWS_T, BLOCK_T):
        t = tb * ROWS_T + r + tl.arange(0, BLOCK_T)
        mask = ((t < T) & (r + tl.arange(0, BLOCK_T) < ROWS_T))[:, None] & dmask[None, :]
        t64 = t.to(tl.int64)[:, None]
        x = tl.load(src + t64 * s_t + d[None, :], mask=mask, other=0.0)
        tl.store(dst + t64 * dst_stride + d[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(x.to(tl.float32), axis=0)
    row = b * tl.cdiv(T, ROWS_T) + tb
    tl.store(partial_ptr + row * partial_stride + h * HS + d, acc, mask=dmask)


def _pack_rows_t(T: int) -> int:
    return max(1, T) if interpreting() else PACK_GPU["ROWS_T"]


def pack_heads_partials(B: int, T: int) -> int:
    """Rows of partial sums that pack_heads writes for a (B, NH, T, HS) source."""
    return B * triton.cdiv(T, _pack_rows_t(T))


def pack_heads(src: torch.Tensor, dst: torch.Tensor, partial: torch.Tensor) -> None:
    """dst (N, C) (unit column stride) = src (B, NH, T, HS) (unit last stride) laid out as
    (B, T, NH*HS); partial (P, C) (unit column stride) gets the column sums per block of
    positions, P = pack_heads_partials(B, T)."""
    B, NH, T, HS = src.shape
    N, C = dst.shape
    if N != B * T or C != NH * HS or src.stride(3) != 1 or dst.stride(1) != 1:
        raise ValueError(f"pack_heads: src {tuple(src.shape)} does not fit dst {tuple(dst.shape)}"
                         f" (or a last stride is not 1)")
    check_device(src, dst, partial)
    P = pack_heads_partials(B, T)
    if partial.shape[0] < P or partial.shape[1] != C or partial.stride(1) != 1:
        raise ValueError(f"pack_heads: partial must be at least ({P}, {C})")
    rows_t = _pack_rows_t(T)
    if interpreting():
        BLOCK_T, num_warps = pow2(T), 1
    else:
        BLOCK_T, num_warps = PACK_GPU["BLOCK_T"], PACK_GPU["num_warps"]
    grid = (B * NH, triton.cdiv(T, rows_t))
    _pack_kernel[grid](src, src.stride(0), src.stride(1), src.stride(2), dst, partial, T, NH, HS,
                       dst.stride(0), partial.stride(0), rows_t, BLOCK_T=BLOCK_T,
                       BLOCK_D=pow2(HS), num_warps=num_warps)


@contextlib.contextmanager
def _deterministic():
    """torch's flash and cuDNN backward kernels pick their deterministic algorithm (no
    atomic dq accumulation) only while this flag is up, without warn_only."""
    was, warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def split_qkv(qkv: torch.Tensor, NH: int):
    """qkv (B, T, 3C) -> q, k, v (B, NH, T, HS), strided views."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // NH
    view = qkv.view(B, T, 3, NH, HS)
    return tuple(view[:, :, i].transpose(1, 2) for i in range(3))


class Attention:
    """Causal attention with one backend, scale 1/sqrt(HS)."""

    def __init__(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, qkv: torch.Tensor, NH: int):
        """qkv (B, T, 3C) -> y (B, T, C) (usually a view), saved (for backward)."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = split_qkv(qkv, NH)
        scale = 1.0 / math.sqrt(C // NH)
        if self.backend == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True,
                                                                         scale=scale)
            extra = ()
        elif self.backend == "math":
            out, lse = _math_forward(q, k, v, scale)
            extra = ()
        elif self.backend == "flash":
            r = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
            out, lse, extra = r[0], r[1], tuple(r[2:8])
        else:
            r = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                         scale=scale)
            out, lse, extra = r[0], r[1], tuple(r[2:8])
        y = out.transpose(1, 2).reshape(B, T, C)  # (B, T, C), a view for (B, T, NH, HS) memory
        return y, (out, lse, extra)

    def backward(self, dy: torch.Tensor, qkv: torch.Tensor, saved, NH: int, dqkv: torch.Tensor,
                 partial: torch.Tensor) -> torch.Tensor:
        """dy (B, T, C) -> dqkv (B, T, 3C) written; partial (P, 3C) fp32 gets the column
        sums of dqkv per block of rows. Returns the partial rows used."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        HS = C // NH
        q, k, v = split_qkv(qkv, NH)
        out, lse, extra = saved
        dout = dy.view(B, T, NH, HS).transpose(1, 2)  # (B, NH, T, HS)
        scale = 1.0 / math.sqrt(HS)
        if self.backend == "math":  # plain torch ops, deterministic as they are
            grads = _math_backward(dout, q, k, v, out, lse, scale)
        elif self.backend == "cpu":
            grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, True, scale=scale)
        elif self.backend == "flash":
            cum_q, cum_k, max_q, max_k, rng_state, unused = extra
            with _deterministic():
                grads = aten._scaled_dot_product_flash_attention_backward(
                    dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, rng_state,
                    unused, scale=scale)
        else:
            cum_q, cum_k, max_q, max_k, seed, offset = extra
            with _deterministic():
                grads = aten._scaled_dot_product_cudnn_attention_backward(
                    dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k,
                    0.0, True, scale=scale)
        N = B * T
        d2 = dqkv.view(N, C3)
        P = pack_heads_partials(B, T)
        for i, g in enumerate(grads):
            pack_heads(g, d2[:, i * C:(i + 1) * C], partial[:, i * C:(i + 1) * C])
        return partial[:P]


def _math_scores(q, k, scale):
    """fp32 causal scores (B, NH, T, T) of bf16 q, k (B, NH, T, HS)."""
    T = q.size(2)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill_(~causal, float("-inf"))


def _math_forward(q, k, v, scale):
    """Attention written out in fp32 (any head size; for shapes the fused kernels reject).
    Returns out (B, NH, T, HS) bf16 in (B, T, NH, HS) memory and the logsumexp (B, NH, T)."""
    s = _math_scores(q, k, scale)
    lse = torch.logsumexp(s, dim=-1)                                      # (B, NH, T)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.float())          # (B, NH, T, HS)
    out = out.transpose(1, 2).to(torch.bfloat16).transpose(1, 2)
    return out, lse


def _math_backward(dout, q, k, v, out, lse, scale):
    """FlashAttention's backward in fp32: p from the saved logsumexp, D = rowsum(dO * O)."""
    p = torch.exp(_math_scores(q, k, scale) - lse[..., None])             # (B, NH, T, T)
    do = dout.float()
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.float().transpose(-1, -2))
    ds = p * (dp - (do * out.float()).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    return tuple(t.to(torch.bfloat16) for t in (dq, dk, dv))


def available_backends(device: torch.device, head_size: int = 64) -> list[str]:
    """Backends to try, fastest first. The fused kernels need a head size that is a multiple
    of 8 up to 128 (cuDNN and FlashAttention-2 reject or mishandle others)."""
    if device.type != "cuda":
        return ["cpu"]
    out = []
    if head_size % 8 == 0 and head_size <= 128:
        if torch.backends.cudnn.is_available() and \
                hasattr(aten, "_scaled_dot_product_cudnn_attention"):
            out.append("cudnn")
        out.append("flash")
    out.append("math")
    return out


def self_check(backend: str, device, B=2, NH=3, T=80, HS=64) -> str | None:
    """Run one backend against fp32 math attention on random data, forward and backward,
    twice (bitwise equal backward = deterministic). None if it passes, else why not."""
    g = torch.Generator(device="cpu").manual_seed(0)
    C = NH * HS
    qkv = torch.randn(B, T, 3 * C, generator=g).to(device, torch.bfloat16)
    dy = torch.randn(B, T, C, generator=g).to(device, torch.bfloat16)
    try:
        att = Attention(backend)
        y, saved = att.forward(qkv, NH)
        partial = torch.empty(pack_heads_partials(B, T), 3 * C, device=device)
        runs = []
        for _ in range(2):
            dqkv = torch.empty_like(qkv)
            att.backward(dy, qkv, saved, NH, dqkv, partial)
            runs.append(dqkv)
    except (RuntimeError, NotImplementedError) as e:  # backend missing in this build
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    ref_qkv = qkv.float().requires_grad_(True)
    q, k, v = split_qkv(ref_qkv, NH)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = ref.transpose(1, 2).reshape(B, T, C)
    ref.backward(dy.float())

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())
    errs = (rel(y, ref.detach()), rel(runs[0], ref_qkv.grad))
    if max(errs) > 2e-2:
        return f"error vs fp32 math attention: forward {errs[0]:.2e}, backward {errs[1]:.2e}"
    if not torch.equal(runs[0], runs[1]):
        return "backward is not deterministic"
    return None
