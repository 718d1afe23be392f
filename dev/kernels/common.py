"""What every op module of the kernel library shares: the two sets of dimensions, the Op and
Version records the harness reads, input makers, and the jit helpers that keep kernels
correct in Triton's CPU interpreter.

An op module (layernorm_forward.py, ...) writes its kernels, then one launcher per version
(`version1`, `version2`, ...; the docstring's first line is what the table prints, the rest
says what changed and why it is faster), then `OP = Op(...)`: how to make inputs, the
reference, the tolerances and the bytes or FLOPs one call must move.

Dimension legend (GPT-2 124M at B=8, T=1024; TINY is odd on purpose, so masks are tested):
    B batch  T time  C channels  NH heads  HS = C // NH  V vocabulary  Vp padded vocabulary
    N = B*T rows  P parameters (flat AdamW / grad-norm buffers)
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl

from llmpy.engines.triton.common import interpreting, pow2, to_dtype
from llmpy.engines.triton.fp8 import E4M3, E4M3_MAX, Fp8Out

__all__ = ["FULL", "TINY", "Op", "Version", "versions_of", "generator", "randn", "tokens",
           "rel_err", "np_rel", "dot", "dot_min", "interpreting", "pow2", "to_dtype",
           "FP8_TOP", "to_top", "delayed_amax", "pow2_scale", "e4m3_out", "e4m3_version"]

FULL = dict(B=8, T=1024, C=768, NH=12, V=50257, Vp=50304, maxT=1024, P=124_475_904)
TINY = dict(B=2, T=37, C=100, NH=4, V=307, Vp=320, maxT=40, P=10_007)

Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Version:
    """One implementation of an op: fn(**inputs) -> outputs (a dict of tensors).
    kind: "triton" (written in this library), "production" (the triton engine's kernel,
    imported) or "unit" (torch/cuBLAS: what the others are measured against). tol: this
    version's own tolerances where its outputs are coarser than the op's (torch returning
    bf16 where the kernels return fp32), merged over Op.tol. decode: turns the outputs into
    the op's values before the check (an FP8 output and its scale), outside the timing."""
    name: str
    fn: Callable[..., Outputs]
    kind: str = "triton"
    tol: dict[str, float] = field(default_factory=dict)
    decode: Callable[[Outputs], Outputs] | None = None

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.split("\n\n")[0].replace("\n", " ")


@dataclass(frozen=True)
class Op:
    """An op as the harness sees it.

    make(dims, device, seed) -> inputs; reference(**inputs) -> outputs in float64 (computed
    before any version runs, since some versions work in place); tol: output name -> the
    largest max|out - ref| / max|ref| accepted (each op says why next to it);
    optional_tol: outputs only some versions give (a fused bias gradient), checked where
    present; cost(dims, inputs) -> ("bytes", n) for memory-bound ops (what one call must
    read and write at least) or ("flops", n); inplace: versions overwrite their inputs, so
    each run gets fresh ones.
    numpy_check(inputs, ref): where the NumPy engine has this layer, the largest relative
    difference between the torch reference and numpy_layers in float64 (the slow path is
    the law: the references are checked against it at tiny shapes)."""
    name: str
    make: Callable[[dict, torch.device, int], dict]
    reference: Callable[..., Outputs]
    versions: tuple[Version, ...]
    tol: dict[str, float]
    cost: Callable[[dict, dict], tuple[str, float]]
    optional_tol: dict[str, float] = field(default_factory=dict)
    inplace: bool = False
    numpy_check: Callable[[dict, Outputs], float] | None = None
    llmc: str = ""


def versions_of(module_globals: dict, production: Callable | None = None,
                unit: Callable | None = None, unit_tol: dict | None = None
                ) -> tuple[Version, ...]:
    """version1, version2, ... of a module in order, then production, then the unit."""
    out = []
    i = 1
    while f"version{i}" in module_globals:
        out.append(Version(str(i), module_globals[f"version{i}"]))
        i += 1
    if production is not None:
        out.append(Version(str(i), production, "production"))
    if unit is not None:
        out.append(Version("torch", unit, "unit", dict(unit_tol or {})))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# inputs

def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(g: torch.Generator, *shape, dtype=torch.bfloat16, scale=1.0, shift=0.0):
    """Normal numbers made on the generator's device (fast at full size)."""
    x = torch.randn(*shape, generator=g, device=g.device, dtype=torch.float32)
    if scale != 1.0 or shift != 0.0:
        x = x * scale + shift
    return x.to(dtype)


def tokens(g: torch.Generator, n: int, V: int) -> torch.Tensor:
    """n int32 token ids with a Zipf-like frequency (p ~ 1 / (rank + 10)), as in text: some
    tokens repeat hundreds of times in a batch, which matters for the encoder backward."""
    p = 1.0 / (torch.arange(V, device=g.device, dtype=torch.float32) + 10.0)
    ranks = torch.multinomial(p, n, replacement=True, generator=g)
    ids = torch.randperm(V, generator=g, device=g.device)   # frequent ids spread over V
    return ids[ranks].to(torch.int32)


# ----------------------------------------------------------------------------------------------
# FP8 outputs with a delayed scale (-f8 2: fp8.Fp8Out)
#
# A version writing its output in e4m3 takes an `amax` input, standing for the max |output|
# of an earlier micro-step, and uses the scale pow2_scale(amax): the smallest power of two >=
# amax / 448 (a power of two, so that dividing by it is an exact multiply: a correctly
# rounded division per element made the GELU kernel compute-bound), and each program stores
# the max |output| of its own tiles as one partial (no atomics, no second pass), folded into
# the next micro-step's amax. Values above 448 * scale saturate at 448 (e4m3's largest).
# make() gives amax =
# 0.9 max |output| (delayed_amax) and shapes its inputs so that max |output| is FP8_TOP =
# 7.35 (to_top where the output is linear in an input; the GELU forward scales x): 0.9 of it
# gives the scale 2^-6, 448 * 2^-6 = 7 < 7.35, so the largest values (|.| in (7, 7.35])
# take the saturating path. Without the shaping nothing might saturate: rounded up to a power
# of two, the scale puts 448 * scale anywhere in [amax, 2 amax), up to 1.8x max |output|.

FP8_TOP = 7.35
# e4m3 values against the float64 reference, relative to max |ref|: 3 mantissa bits round a
# value by at most 2^-4 = 6.25% of it, after bf16's 2^-8 = 0.4%; the saturated ones (above
# 7, max 7.35) by at most 0.35 / 7.35 = 4.8% of max |ref|
E4M3_TOL = 0.075
# max of the partial maxima (the bf16 values' max |.|) against the float64 max |out|: bf16
# rounds it by at most 2^-8 = 3.9e-3, plus fp32's own error in computing the value
AMAX_TOL = 5e-3


def to_top(y: torch.Tensor) -> torch.Tensor:
    """The factor (0-d fp32) that makes y's largest |value| -FP8_TOP: an op linear in an input
    scales that input by it. Negative, so that a max taken without the abs misses it."""
    return -FP8_TOP / y.flatten()[y.abs().argmax()].float()


def delayed_amax(y: torch.Tensor) -> torch.Tensor:
    """An FP8 version's amax input (1,) fp32: 0.9 of max |y|, y this call's output computed
    in fp32 from the inputs, so that the saturating path runs (see FP8_TOP)."""
    return (0.9 * y.float().abs().max()).reshape(1)


def e4m3_out(shape, programs: int, amax: torch.Tensor) -> Fp8Out:
    """Where an FP8 version writes: e4m3 values, amax (read), `programs` partial maxima
    filled with NaN (a program that does not store its own makes their max NaN: a failed
    check; the fill, one small kernel, is timed with the version) and the scale used."""
    dev = amax.device
    return Fp8Out(torch.empty(shape, dtype=E4M3, device=dev), amax,
                  torch.full((programs,), float("nan"), device=dev),
                  torch.empty(1, device=dev))


def e4m3_version(name: str, fn, key: str) -> "Version":
    """The Version of an op's FP8 production version: fn returns, besides the op's outputs,
    `key` (the e4m3 values), "scale" and "part" (an e4m3_out's); decoded outside the timing
    into key = e4m3 times the scale the kernel stored and amax = the max of the partials,
    which the reference gives as its output in float64 and max |output|, and "scale" as
    pow2_scale(amax). Tolerances: E4M3_TOL for the values, AMAX_TOL for amax, the scale
    exact."""
    def decode(out):
        return dict(out, **{key: out[key].float() * out["scale"],
                            "amax": out["part"].max().reshape(1)})
    return Version(name, fn, "production", {key: E4M3_TOL, "amax": AMAX_TOL, "scale": 0.0},
                   decode)


def pow2_scale(amax: torch.Tensor, maxv: float = E4M3_MAX) -> torch.Tensor:
    """The float64 reference of the engine's delayed scale (fp8.pow2_scale_of): the smallest
    power of two >= amax / maxv, the quotient rounded once to fp32 as the kernel has it."""
    r = (amax.double() / maxv).float().double()
    return torch.where(r > 0, torch.exp2(torch.ceil(torch.log2(r))), torch.ones_like(r))


# ----------------------------------------------------------------------------------------------
# measures

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = float((out - ref).abs().max()) if ref.numel() else 0.0
    if math.isnan(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


def np_rel(a, b) -> float:
    return rel_err(torch.as_tensor(a), torch.as_tensor(b))


# ----------------------------------------------------------------------------------------------
# jit helpers

@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (set under TRITON_INTERPRET=1) multiplies in fp32: the CPU
    interpreter of Triton 3.9 returns garbage for a bf16 tl.dot."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


def dot_min(n: int) -> int:
    """A tl.dot block size for a dimension of n: a power of two, at least 16 (the GPU's
    smallest tensor-core tile)."""
    return max(16, pow2(n))
