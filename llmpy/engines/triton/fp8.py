"""The FP8 lm head (-f8 1): the tied classifier's three matmuls in FP8 through
torch._scaled_mm (cuBLASLt), on GPUs with FP8 tensor cores (sm89+). Fp8Mlp at the end is
-f8 2's MLP, with the jit helpers that let other kernels write FP8 (fp8_store,
fp8_epilogue).

The lm head's matmuls are the largest of GPT-2 small (at d12 about a third of a step's
matmul time) and the one place where FP8 paid for its own quantization in
bench/fp8_matmul.py. Inputs in e4m3 (3 mantissa bits) with one scale per tensor (amax / 448,
computed on the GPU at every forward); gradients in e5m2 (2 mantissa bits, a wider range),
as is usual for FP8 training. Products accumulate in fp32 inside cuBLASLt; outputs are bf16
(logits, the input gradient) and fp32 (the weight gradient).

Per forward with targets, for N rows of lnf (N, C) and the tied wte (Vp, C):

    lnf -> e4m3 x8 (N, C) and xT8 (C, N); wte -> e4m3 w8 (Vp, C) and wT8 (C, Vp)
    per chunk of HEAD_ROWS rows (r of them):
        logits (r, Vp) bf16       = x8 @ w8^T                       e4m3 x e4m3
        losses; d8 (r, Vp) e5m2   = (softmax - onehot) * 2^15        (classifier.py)
        dT8[:, chunk] (Vp, r)     = d8 transposed, byte for byte
        dlnf rows (r, C) bf16     = d8 @ wte * 2^-15 / N             e5m2 x e4m3
    dwte (Vp, C) fp32             = dT8 @ lnf * 2^-15 / N (K = N)    e5m2 x e4m3

and backward(grad_scale) only scales: dlnf *= grad_scale, wte.grad += grad_scale * dwte.
The head's backward runs inside the forward because the chunks share one logits buffer:
the (N, Vp) logits (6.6 GB at B=64) never exist whole, and the head needs about 2/3 of that
(dT8 is N x Vp bytes). FP8 wants both operands of every matmul contiguous along the
reduced axis, hence the transposed copies. 2^15 keeps |softmax - onehot| <= 1 inside
e5m2's range (max 57344) with probabilities down to ~1e-9 still normal numbers.

Dimension legend: N rows (B*T), C channels, V vocabulary, Vp padded vocabulary, R chunk rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .classifier import fused_classifier
from .common import INTERPRETED, check_device, interpreting, pow2, to_dtype

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
E4M3_MAX = 448.0
E5M2_MAX = 57344.0
FP8_MAX = {E4M3: E4M3_MAX, E5M2: E5M2_MAX}  # largest finite value of each type
D_SCALE = 2.0 ** 15      # (softmax - onehot) in [-1, 1], stored times this in e5m2
HEAD_ROWS = 8192         # rows of logits per chunk
AMAX_PROGRAMS = 512      # partial maxima of the amax pass
# the logits matmul with Hopper's fast FP8 accumulation (fewer promotions of the partial
# sums to fp32; what FP8 recipes use for forwards, K = C is short): 4.98 against 5.64 ms
# per 65536 rows at d12 on an H200. The two gradient matmuls keep the full accumulation.
FAST_ACCUM = True
# GPU tile of the byte transpose
TRANSPOSE = dict(BLOCK_R=128, BLOCK_C=128, num_warps=8)  # H200: 0.234 ms for 8192 x 50304


@triton.jit
def scale_of(amax, MAXV: tl.constexpr):
    """The dequantization scale amax / MAXV (1 for amax 0), correctly rounded: the GPU's
    plain fp32 `/` is not (21 / 448 came out one ulp above 3/64 on an H200, and x / scale
    then fell below its ties)."""
    return tl.where(amax > 0, tl.math.div_rn(amax, MAXV), 1.0)


@triton.jit
def pow2_scale_of(amax, MAXV: tl.constexpr):
    """The smallest power of two >= amax / MAXV (1 for amax 0): the -f8 2 activations'
    scales, so that x / scale is x times an exact 2^-k (a correctly rounded division per
    element made the GELU kernel compute-bound: 0.39 against 0.23 ms per call at d12)."""
    bits = tl.math.div_rn(amax, MAXV).to(tl.uint32, bitcast=True)
    e = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.uint32)  # round the exponent up
    return tl.where(amax > 0, (e << 23).to(tl.float32, bitcast=True), 1.0)


@triton.jit
def to_fp8(x, scale, dtype: tl.constexpr, MAXV: tl.constexpr, POW2: tl.constexpr = False):
    """fp32 x -> x / scale in FP8 `dtype`, rounded to nearest even, saturating at +-MAXV
    (values above the scale's amax, which a delayed scale can meet). POW2: scale is a
    power of two, and x / scale is x times its exact reciprocal (its exponent negated).
    On the GPU, e4m3's conversion saturates by itself (its last instruction is a
    cvt.rn.satfinite, on sm89 and sm90), so the clamp is left to the interpreter and e5m2
    (0.025 ms of GELU's 0.3 per call; older Triton emulates e5m2 on sm89 unsaturated). The
    e5m2 clamp turns NaN into -MAXV; e4m3 keeps NaN, as the interpreter does."""
    if POW2:
        inv = ((254 << 23) - scale.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)
        v = x * inv
    else:
        v = tl.math.div_rn(x, scale)
    if INTERPRETED or dtype != tl.float8e4nv:
        v = tl.minimum(tl.maximum(v, -MAXV), MAXV)
    return to_dtype(v, dtype)


@triton.jit
def delayed_scale(amax_ptr, MAXV: tl.constexpr):
    """The (power of two) scale of an FP8 output from earlier micro-steps' max |output|."""
    return pow2_scale_of(tl.load(amax_ptr), MAXV)


@triton.jit
def fp8_store(out8_ptr, offs, mask, y, scale, MAXV: tl.constexpr):
    """What a kernel producing y (fp32 holding the bf16 values it stores) does to write y
    in FP8 too: stores y / scale in out8's type and returns this tile's max |y| (the kernel
    keeps the maximum over its tiles and stores it as its program's partial: no atomics,
    as everywhere in the engine)."""
    tl.store(out8_ptr + offs, to_fp8(y, scale, out8_ptr.dtype.element_ty, MAXV, True),
             mask=mask)
    return tl.max(tl.where(mask, tl.abs(y), 0.0))


@triton.jit
def fp8_epilogue(out8_ptr, amax_ptr, part_ptr, scale_ptr, offs, mask, y, pid,
                 MAXV: tl.constexpr):
    """The whole FP8 output of a kernel whose program `pid` produced one tile y (fp32
    holding bf16 values): y in FP8 with the delayed scale of amax, the program's max |y|
    into part[pid], the scale into scale (by program 0)."""
    scale = delayed_scale(amax_ptr, MAXV)
    tl.store(part_ptr + pid, fp8_store(out8_ptr, offs, mask, y, scale, MAXV))
    tl.store(scale_ptr, scale, mask=pid == 0)


@triton.jit
def _amax_kernel(x_ptr, part_ptr, n, step, BLOCK: tl.constexpr):
    # grid-stride max |x| -> one partial per program
    m = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.abs(x))
    tl.store(part_ptr + tl.program_id(0), tl.max(m, axis=0))


@triton.jit
def _cast_kernel(x_ptr, part_ptr, P, out_ptr, outT_ptr, scale_ptr, amax_ptr, M, K,
                 MAXV: tl.constexpr, POW2: tl.constexpr, TRANSPOSE: tl.constexpr,
                 AMAX_OUT: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # every program reduces the partials itself (P is small), so no second launch
    amax = tl.max(tl.load(part_ptr + tl.arange(0, BLOCK_P), mask=tl.arange(0, BLOCK_P) < P,
                          other=0.0), axis=0)
    if POW2:
        scale = pow2_scale_of(amax, MAXV)
    else:
        scale = scale_of(amax, MAXV)
    pm, pk = tl.program_id(0), tl.program_id(1)
    tl.store(scale_ptr, scale, mask=(pm == 0) & (pk == 0))
    if AMAX_OUT:
        tl.store(amax_ptr, amax, mask=(pm == 0) & (pk == 0))
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    q = to_fp8(x, scale, out_ptr.dtype.element_ty, MAXV, POW2)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], q, mask=mask)
    if TRANSPOSE:
        tl.store(outT_ptr + cols.to(tl.int64)[None, :] * M + rows[:, None], q, mask=mask)


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, ld, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one tile of bytes: src (R, C) row-major -> dst (C, R) with row stride ld
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask)
    tl.store(dst_ptr + cols.to(tl.int64)[None, :] * ld + rows[:, None], x, mask=mask)


def transpose_bytes(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst = src.t() for 1-byte tensors (FP8 moved as uint8): src (R, C) contiguous, dst
    (C, R) with unit column stride, e.g. a column slice of a wider buffer.

    Its own kernel because storing one FP8 tile twice from the classifier, row-major and
    transposed, wrote wrong bytes on an H200 (triton 3.6), while either store alone was
    right."""
    R, C = src.shape
    if not src.is_contiguous() or dst.shape != (C, R) or dst.stride(1) != 1 or \
            src.element_size() != 1 or dst.element_size() != 1:
        raise ValueError(f"transpose_bytes: src {tuple(src.shape)} contiguous, dst (C, R) "
                         f"with unit column stride, 1-byte elements")
    check_device(src, dst)
    if interpreting():
        BR, BC, nw = pow2(min(R, 64)), pow2(min(C, 256)), 1
    else:
        BR, BC, nw = TRANSPOSE["BLOCK_R"], TRANSPOSE["BLOCK_C"], TRANSPOSE["num_warps"]
    _transpose_kernel[(triton.cdiv(R, BR), triton.cdiv(C, BC))](
        src.view(torch.uint8), dst.view(torch.uint8), R, C, dst.stride(0), BLOCK_R=BR,
        BLOCK_C=BC, num_warps=nw)
    return dst


def quantize(x: torch.Tensor, out: torch.Tensor, out_t: torch.Tensor | None,
             scale: torch.Tensor, partial: torch.Tensor,
             amax: torch.Tensor | None = None, pow2_scale: bool = False) -> torch.Tensor:
    """x (M, K) contiguous -> out (M, K) in its FP8 type (e4m3 or e5m2) = x / scale rounded
    to nearest even, out_t (K, M) its transpose (or None), scale (1,) fp32 = max |x| / MAX
    (448 for e4m3, 57344 for e5m2; 1 for an all-zero x), so that out * scale ~ x; with
    pow2_scale the smallest power of two >= that (as the kernels writing FP8 themselves use);
    amax (1,) fp32, if given, gets max |x|. partial: fp32 scratch of >= AMAX_PROGRAMS
    entries."""
    M, K = x.shape
    if not x.is_contiguous() or out.shape != (M, K) or out.dtype not in FP8_MAX or \
            (out_t is not None and (out_t.shape != (K, M) or out_t.dtype != out.dtype)):
        raise ValueError(f"quantize: x {tuple(x.shape)} contiguous, out (M, K) and out_t "
                         f"(K, M) of one FP8 type")
    check_device(x, out, scale, partial)
    n = x.numel()
    if interpreting():
        BLOCK, P, BM, BK = pow2(min(n, 4096)), 1, pow2(min(M, 64)), pow2(min(K, 64))
    else:
        BLOCK, P, BM, BK = 2048, min(AMAX_PROGRAMS, triton.cdiv(n, 2048)), 64, 64
    _amax_kernel[(P,)](x, partial, n, P * BLOCK, BLOCK=BLOCK)
    _cast_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BK))](
        x, partial, P, out, out if out_t is None else out_t, scale,
        scale if amax is None else amax, M, K, MAXV=FP8_MAX[out.dtype], POW2=pow2_scale,
        TRANSPOSE=out_t is not None, AMAX_OUT=amax is not None, BLOCK_P=pow2(P),
        BLOCK_M=BM, BLOCK_K=BK)
    return scale


def quantize_e4m3(x: torch.Tensor, out: torch.Tensor, out_t: torch.Tensor | None,
                  scale: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """quantize() into e4m3: scale = max |x| / 448 (the head's lnf and wte)."""
    if out.dtype != E4M3:
        raise ValueError(f"quantize_e4m3: out must be e4m3, got {out.dtype}")
    return quantize(x, out, out_t, scale, partial)


class Fp8Out(NamedTuple):
    """Where a kernel writes its output in FP8 as well (layernorm_forward, gelu_forward,
    gelu_backward): out (same shape, e4m3 or e5m2); amax (1,), the max |output| of earlier
    micro-steps, whose scale amax / MAX it uses (a delayed scale); partial (fp32, at least
    one per program) that gets each program's max |output|; scale (1,) that gets the scale
    used."""
    out: torch.Tensor
    amax: torch.Tensor
    partial: torch.Tensor
    scale: torch.Tensor


def fp8_args(fp8: Fp8Out | None, like: torch.Tensor, programs: int) -> tuple:
    """A launcher's kernel arguments for an optional Fp8Out: (out8, amax, partial, scale,
    OUT8, MAXV), with `like` standing in for the pointers when there is none."""
    if fp8 is None:
        return like, like, like, like, False, 1.0
    if fp8.out.shape != like.shape or not fp8.out.is_contiguous() or \
            fp8.out.dtype not in FP8_MAX:
        raise ValueError(f"fp8 output: {tuple(fp8.out.shape)} {fp8.out.dtype}, expected "
                         f"contiguous {tuple(like.shape)} e4m3 or e5m2")
    if fp8.partial.numel() < programs or fp8.partial.dtype != torch.float32:
        raise ValueError(f"fp8 output: partial needs {programs} fp32, got "
                         f"{fp8.partial.numel()} {fp8.partial.dtype}")
    check_device(*fp8)
    return (*fp8, True, FP8_MAX[fp8.out.dtype])


def supported(device: torch.device) -> str | None:
    """None if the FP8 head can run on `device`, else why not (for a one-line refusal)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type == "cpu":
        return None if interpreting() else "the CPU (tests only, under TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return f"a {device.type} device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor}; FP8 needs sm89+)"
    return None


class Fp8Head:
    """The FP8 lm head's buffers for N rows (one (B, T)), and its forward and backward.
    `buf(*shape, dtype=...)` allocates (Activations' allocator, for the memory report)."""

    def __init__(self, N: int, C: int, Vp: int, buf):
        R = min(N, HEAD_ROWS)
        bf, f32 = torch.bfloat16, torch.float32
        self.N, self.R = N, R
        self.logits = buf(R, Vp, dtype=bf)                   # (R, Vp) one chunk's logits
        self.d8 = buf(R, Vp, dtype=E5M2)                     # (R, Vp) its scaled dlogits
        self.dT8 = buf(Vp, N, dtype=E5M2)                    # (Vp, N) all of them, transposed
        self.x8, self.xT8 = buf(N, C, dtype=E4M3), buf(C, N, dtype=E4M3)
        self.w8, self.wT8 = buf(Vp, C, dtype=E4M3), buf(C, Vp, dtype=E4M3)
        self.dw = buf(Vp, C, dtype=f32)                      # (Vp, C) wte's head gradient
        # lnf, wte, dlogits (2^-15 / N): 64 bytes apart, as cuBLASLt wants scale pointers
        # aligned (4 bytes apart it answers CUBLAS_STATUS_NOT_SUPPORTED)
        self.scales = buf(3, 16, dtype=f32)[:, :1]
        self.scales[2].fill_(1.0 / (N * D_SCALE))
        self.partial = buf(AMAX_PROGRAMS, dtype=f32)

    def forward(self, lnf: torch.Tensor, wte: torch.Tensor, targets: torch.Tensor,
                losses: torch.Tensor, dlnf: torch.Tensor, V: int) -> None:
        """losses (N,) of the mean loss; dlnf (N, C) bf16 and self.dw get the gradient of
        the mean loss (unscaled by backward's grad_scale)."""
        N, R = self.N, self.R
        sx, sw, sd = self.scales[0], self.scales[1], self.scales[2]            # (1,) each
        quantize_e4m3(lnf, self.x8, self.xT8, sx, self.partial)
        quantize_e4m3(wte, self.w8, self.wT8, sw, self.partial)
        for s in range(0, N, R):
            e = min(N, s + R)
            logits, d8 = self.logits[:e - s], self.d8[:e - s]
            torch._scaled_mm(self.x8[s:e], self.w8.t(), sx, sw, out_dtype=torch.bfloat16,
                             use_fast_accum=FAST_ACCUM, out=logits)     # (r, Vp)
            fused_classifier(logits, targets[s:e], losses[s:e], V, D_SCALE, out=d8)
            transpose_bytes(d8, self.dT8[:, s:e])
            torch._scaled_mm(d8, self.wT8.t(), sd, sw, out_dtype=torch.bfloat16,
                             out=dlnf[s:e])                             # (r, C)
        torch._scaled_mm(self.dT8, self.xT8.t(), sd, sx, out_dtype=torch.float32,
                         out=self.dw)                                   # (Vp, C)

    def backward(self, grad_scale: float, dlnf: torch.Tensor, gwte: torch.Tensor) -> None:
        """dlnf *= grad_scale; gwte += grad_scale * the head's wte gradient."""
        if grad_scale != 1.0:
            dlnf.mul_(grad_scale)
        gwte.add_(self.dw, alpha=grad_scale)


class Fp8Mlp:
    """-f8 2: the MLP's fc and fcproj forwards and fc's input gradient in FP8, for one
    (B, T) of N rows and L layers. `buf` allocates as in Fp8Head.

    Per layer l (the engine's forward and backward call these in this order):

        fc:      fch (N, 4C) bf16 = x8 @ wfc8[l]^T + fcb       x8 = ln2 in e4m3     fast acc.
        fcproj:  proj (N, C) bf16 = h8 @ wproj8[l]^T + fcprojb  h8 = gelu(fch) in e4m3
        fc's input gradient: dln2 (N, C) bf16 = d8 @ fcw        d8 = dfch in e4m3

    dfch is e4m3 rather than the usual e5m2: with one scale per tensor its 3 mantissa bits
    kept the GPU test's worst gradient tensor within 6.2% of fp32, e5m2's 2 within 9.4%.

    The two weight gradients and fcproj's input gradient (with its GELU' in cuBLASLt's
    epilogue under -ge 2) stay bf16: they would need transposed FP8 copies of activations
    or lose that epilogue, for less than they save. The weights are quantized (amax / 448,
    one scale per tensor) at the first forward after they or the step changed.

    x8, h8 and d8 are written by the kernels that produce ln2, gelu(fch) and dfch, in the
    same pass (layernorm_forward, gelu_forward and gelu_backward with an Fp8Out), so no
    extra pass reads them. That needs the scale before the values exist: a delayed scale,
    max |x| of the micro-steps before in this step (Transformer Engine's delayed scaling
    with a history of one step's micro-steps), saturating at the type's largest value
    beyond it. The first micro-step of every step (after zero_grad or step) measures
    instead: bf16 output, then quantize() with its exact amax. So the scales, and every
    bit, depend only on this step's weights and data: a resumed run rounds as the
    uninterrupted one did.

    The activations' scales are powers of two (pow2_scale_of), the weights' exact.
    amax[kind, l] is read by the kernels of a micro-step; they write one max per program
    into part[kind, l], folded into amax at the next micro-step's begin (one reduction for
    all layers; no atomics). `programs` (>= any of those kernels' program counts) sizes
    part.
    """

    X, H, D = 0, 1, 2  # kinds: ln2, gelu(fch), dfch (all e4m3)

    def __init__(self, L: int, N: int, C: int, programs: int, buf):
        f32 = torch.float32
        self.L = L
        self.wfc = buf(L, 4 * C, C, dtype=E4M3)              # fcw (4C, C) per layer
        self.wfcT = buf(L, C, 4 * C, dtype=E4M3)             # its transpose
        self.wproj = buf(L, C, 4 * C, dtype=E4M3)            # fcprojw (C, 4C)
        self.x8 = buf(N, C, dtype=E4M3)                      # ln2 of the current layer
        self.h8 = buf(N, 4 * C, dtype=E4M3)                  # h8 in the forward, d8 after
        self.d8 = self.h8
        # per layer: fcw, fcprojw, x8, h8, d8; 64 bytes apart (cuBLASLt's alignment)
        self.scales = buf(5, L, 16, dtype=f32)[..., :1]
        self.amax = buf(3, L, dtype=f32)
        self.part = buf(3, L, programs, dtype=f32)
        self.amax.zero_()
        self.part.zero_()
        self.partial = buf(AMAX_PROGRAMS, dtype=f32)
        self.measuring = True
        # each kernel's Fp8Out per (kind, layer): fixed views, made once
        self._outs = [[Fp8Out(b8, self.amax[k, l:l + 1], self.part[k, l], self.scales[2 + k, l])
                       for l in range(L)] for k, b8 in enumerate((self.x8, self.h8, self.d8))]

    def begin(self, fresh: bool, p: dict) -> None:
        """At a training forward. If `fresh` (the first forward since the weights or the
        step changed): quantize fcw and fcprojw, clear the partial maxima, measure. Else
        fold the last micro-step's partial maxima into amax."""
        self.measuring = fresh
        if not fresh:
            torch.maximum(self.amax, self.part.amax(dim=2), out=self.amax)
            return
        self.part.zero_()
        for l in range(self.L):
            quantize(p["fcw"][l], self.wfc[l], self.wfcT[l], self.scales[0, l], self.partial)
            quantize(p["fcprojw"][l], self.wproj[l], None, self.scales[1, l], self.partial)

    def out(self, kind: int, l: int) -> Fp8Out | None:
        """The Fp8Out for the kernel producing `kind` of layer l (None when measuring)."""
        return None if self.measuring else self._outs[kind][l]

    def measure(self, kind: int, l: int, x: torch.Tensor) -> None:
        """When measuring: quantize the bf16 x with its own amax, which is kept."""
        if self.measuring:
            o = self._outs[kind][l]
            quantize(x, o.out, None, o.scale, self.partial, amax=o.amax, pow2_scale=True)

    def fc(self, l: int, bias: torch.Tensor, out: torch.Tensor) -> None:
        torch._scaled_mm(self.x8, self.wfc[l].t(), self.scales[2, l], self.scales[0, l],
                         bias=bias, out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM,
                         out=out)

    def fcproj(self, l: int, bias: torch.Tensor, out: torch.Tensor) -> None:
        torch._scaled_mm(self.h8, self.wproj[l].t(), self.scales[3, l], self.scales[1, l],
                         bias=bias, out_dtype=torch.bfloat16, use_fast_accum=FAST_ACCUM,
                         out=out)

    def fc_input_grad(self, l: int, out: torch.Tensor) -> None:
        torch._scaled_mm(self.d8, self.wfcT[l].t(), self.scales[4, l], self.scales[0, l],
                         out_dtype=torch.bfloat16, out=out)
