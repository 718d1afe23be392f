"""Causal self-attention through torch's fused kernels, forward and backward called
explicitly (llm.c's attention_forward_cudnn / attention_backward_cudnn in llmc/cudnn_att.cpp).

The (B, T, 3C) qkv activation is read in place: q, k, v are (B, NH, T, HS) strided views of
it, and each backend returns an output whose memory is (B, T, NH, HS), so the (B, T, C)
input of the attproj matmul is a view too. Backward returns dq, dk, dv; one Triton kernel
packs them into the (B, T, 3C) dqkv buffer and sums their columns per block of rows (the
qkv bias gradient), so no extra pass is needed for the bias.

Backends: "cudnn" (cuDNN's fused attention), "flash" (FlashAttention-2 in torch), and "cpu"
(torch's CPU flash kernel, for tests with TRITON_INTERPRET=1). Every backward runs with
torch's deterministic flag raised, so resumed runs reproduce bit for bit.

Dimension legend: B batch, T time, C channels, NH heads, HS head size, N = B*T.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, pow2

BACKENDS = ("cudnn", "flash", "cpu")
aten = torch.ops.aten


@triton.jit
def _pack_kernel(src_ptr, s_b, s_h, s_t, dst_ptr, partial_ptr, N, T, C, HS, dst_stride,
                 partial_stride, ROWS_PER_PROG, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    h = (cols // HS).to(tl.int64)
    d = (cols % HS).to(tl.int64)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = pid_r * ROWS_PER_PROG + r + tl.arange(0, BLOCK_R)
        rmask = (rows < N) & (r + tl.arange(0, BLOCK_R) < ROWS_PER_PROG)
        mask = rmask[:, None] & cmask[None, :]
        b = (rows // T).to(tl.int64)
        t = (rows % T).to(tl.int64)
        src = src_ptr + (b * s_b + t * s_t)[:, None] + (h * s_h + d)[None, :]
        x = tl.load(src, mask=mask, other=0.0).to(dst_ptr.dtype.element_ty)
        tl.store(dst_ptr + rows.to(tl.int64)[:, None] * dst_stride + cols[None, :], x, mask=mask)
        acc += tl.sum(x.to(tl.float32), axis=0)
    tl.store(partial_ptr + pid_r * partial_stride + cols, acc, mask=cmask)


def pack_rows_per_prog(N: int) -> int:
    return max(1, N) if interpreting() else 256


def pack_heads(src: torch.Tensor, dst: torch.Tensor, partial: torch.Tensor) -> None:
    """dst (N, C) (unit column stride) = src (B, NH, T, HS) (unit last stride) laid out as
    (B, T, NH*HS); partial (P, C) (unit column stride) gets the column sums per block of
    rows."""
    B, NH, T, HS = src.shape
    N, C = dst.shape
    if N != B * T or C != NH * HS or src.stride(3) != 1 or dst.stride(1) != 1:
        raise ValueError(f"pack_heads: src {tuple(src.shape)} does not fit dst {tuple(dst.shape)}"
                         f" (or a last stride is not 1)")
    check_device(src, dst, partial)
    rows_per_prog = pack_rows_per_prog(N)
    P = triton.cdiv(N, rows_per_prog)
    if partial.shape[0] < P or partial.shape[1] != C or partial.stride(1) != 1:
        raise ValueError(f"pack_heads: partial must be at least ({P}, {C})")
    if interpreting():
        BLOCK_R, BLOCK_C = pow2(min(N, 16384 // pow2(C))), pow2(C)
    else:
        BLOCK_R, BLOCK_C = 16, 128
    grid = (P, triton.cdiv(C, BLOCK_C))
    _pack_kernel[grid](src, src.stride(0), src.stride(1), src.stride(2), dst, partial, N, T, C,
                       HS, dst.stride(0), partial.stride(0), rows_per_prog, BLOCK_R=BLOCK_R,
                       BLOCK_C=BLOCK_C)


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
        with _deterministic():
            if self.backend == "cpu":
                grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    dout, q, k, v, out, lse, 0.0, True, scale=scale)
            elif self.backend == "flash":
                cum_q, cum_k, max_q, max_k, rng_state, unused = extra
                grads = aten._scaled_dot_product_flash_attention_backward(
                    dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, rng_state,
                    unused, scale=scale)
            else:
                cum_q, cum_k, max_q, max_k, seed, offset = extra
                grads = aten._scaled_dot_product_cudnn_attention_backward(
                    dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k,
                    0.0, True, scale=scale)
        N = B * T
        d2 = dqkv.view(N, C3)
        P = pack_heads_partials(N)
        for i, g in enumerate(grads):
            pack_heads(g, d2[:, i * C:(i + 1) * C], partial[:, i * C:(i + 1) * C])
        return partial[:P]


def pack_heads_partials(N: int) -> int:
    return triton.cdiv(N, pack_rows_per_prog(N))


def available_backends(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["cpu"]
    out = []
    if torch.backends.cudnn.is_available() and hasattr(aten, "_scaled_dot_product_cudnn_attention"):
        out.append("cudnn")
    out.append("flash")
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
        partial = torch.empty(pack_heads_partials(B * T), 3 * C, device=device)
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
