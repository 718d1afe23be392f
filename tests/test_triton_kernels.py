"""The triton engine's kernels, one by one, against float64 references on nasty shapes.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before triton is imported; shapes stay tiny because it is slow). With CUDA the same tests
run the compiled kernels on the GPU.

Tolerances: inputs are bf16 and outputs are rounded to bf16 (relative step 2^-8 = 3.9e-3),
so outputs compare at 1e-2 relative; fp32 outputs (losses, stats, partial sums, fp32 state)
compare at 1e-5 or tighter, since only summation order differs from the float64 reference.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from llmpy.engines.triton import adamw, attention, classifier, encoder, gelu, layernorm  # noqa
from llmpy.engines.triton import reduce as red  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
BF16 = 1e-2     # bf16 outputs (rounding step 2^-8)
FP32 = 1e-5     # fp32 outputs from bf16 inputs: summation order only

# B=3, T=7 and C=100 are not multiples of any block size.
B, T, C = 3, 7, 100
N = B * T


def rel(a, b) -> float:
    a = torch.as_tensor(a).detach().double().cpu()
    b = torch.as_tensor(b).detach().double().cpu()
    return float((a - b).abs().max() / max(b.abs().max(), 1e-30))


def rand(*shape, scale=1.0, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


def ln_ref(x, w, b):
    x, w, b = x.double(), w.double(), b.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(var + 1e-5)
    return (x - mean) * rstd * w + b, mean[..., 0], rstd[..., 0]


@pytest.mark.parametrize("fused", [False, True])
def test_layernorm_forward(fused):
    x, d = rand(N, C, seed=1), rand(N, C, seed=2)
    w, b = rand(C, seed=3, scale=0.5) + 1, rand(C, seed=4, scale=0.1)
    out = torch.full((N, C), float("nan"), dtype=torch.bfloat16, device=DEV)
    mean = torch.full((N,), float("nan"), device=DEV)
    rstd = torch.full((N,), float("nan"), device=DEV)
    xs = torch.full((N, C), float("nan"), dtype=torch.bfloat16, device=DEV)
    if fused:
        layernorm.layernorm_forward(x, w, b, out, mean, rstd, delta=d, xsum=xs)
        ref_x = (x.double() + d.double()).to(torch.bfloat16)
        assert torch.equal(xs, ref_x)  # bf16(x + delta), rounded once
    else:
        layernorm.layernorm_forward(x, w, b, out, mean, rstd)
        ref_x = x
    ref, rm, rr = ln_ref(ref_x, w, b)
    assert rel(out, ref) < BF16
    assert rel(mean, rm) < FP32 and rel(rstd, rr) < FP32


@pytest.mark.parametrize("accumulate", [False, True])
def test_layernorm_backward(accumulate):
    x, dout = rand(N, C, seed=5), rand(N, C, seed=6)
    w, b = rand(C, seed=7, scale=0.5) + 1, rand(C, seed=8, scale=0.1)
    dres0 = rand(N, C, seed=9)
    out = torch.empty(N, C, dtype=torch.bfloat16, device=DEV)
    mean, rstd = torch.empty(N, device=DEV), torch.empty(N, device=DEV)
    layernorm.layernorm_forward(x, w, b, out, mean, rstd)
    dres = dres0.clone()
    partial = torch.full((4096 * 3 * C,), float("nan"), device=DEV)
    part = layernorm.layernorm_backward(dout, x, w, mean, rstd, dres, partial,
                                        accumulate=accumulate)
    # reference by float64 autograd
    xr = x.double().requires_grad_(True)
    wr, br = w.double().requires_grad_(True), b.double().requires_grad_(True)
    y = torch.nn.functional.layer_norm(xr, (C,), wr, br, 1e-5)
    y.backward(dout.double())
    ref_dres = xr.grad + (dres0.double() if accumulate else 0)
    assert rel(dres, ref_dres) < BF16
    sums = part.sum(0)  # (3, C)
    assert rel(sums[0], wr.grad) < FP32 * 10 and rel(sums[1], br.grad) < FP32
    assert rel(sums[2], dres.double().sum(0)) < FP32
    # add_partials into bf16 gradients
    dw = rand(C, seed=10)
    dw0 = dw.clone()
    red.add_partials(part[:, 0], dw)
    assert rel(dw, dw0.double() + wr.grad) < BF16
    # all three sums in one launch, into three targets
    ts = [rand(C, seed=s) for s in (30, 31, 32)]
    t0 = [t.clone() for t in ts]
    red.add_partials(part.reshape(part.shape[0], 3 * C), *ts)
    for k in range(3):
        assert rel(ts[k], t0[k].double() + sums[k]) < BF16


def test_gelu_forward_backward():
    OC = 4 * C
    x = rand(N, OC, seed=11, scale=2.0)
    out = torch.empty_like(x)
    gelu.gelu_forward(x, out)
    xr = x.double().requires_grad_(True)
    y = torch.nn.functional.gelu(xr, approximate="tanh")
    assert rel(out, y) < BF16
    # the tails: x / (1 + exp2(...)) with exp2 -> inf gives -0 below x ~ -10 (the true value
    # is below fp32's range there), x itself for large x; no NaN anywhere
    tails = torch.tensor([-1e4, -100.0, -12.0, -10.5, -9.0, -6.0, -3.0, 3.0, 6.0, 12.0, 1e4],
                         dtype=torch.bfloat16, device=DEV)
    got = gelu.gelu_forward(tails, torch.empty_like(tails)).double().cpu()
    t = tails.double().cpu()  # x sigmoid(2u) in float64: the tanh form cancels in the tail
    want = t * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3))
    assert not got.isnan().any()
    assert ((got - want).abs() <= 1e-2 * want.abs() + 1e-30).all(), (got, want)
    d = rand(N, OC, seed=12)
    y.backward(d.double())
    dd = d.clone()
    partial = torch.full((4096 * OC,), float("nan"), device=DEV)
    part = gelu.gelu_backward(dd, x, partial)
    assert rel(dd, xr.grad) < BF16
    assert rel(part.sum(0), dd.double().sum(0)) < FP32
    # x None: column sums of dout only, dout untouched (the -ge 2 path's fcb gradient)
    d2 = d.clone()
    part = gelu.gelu_backward(d2, None, partial)
    assert torch.equal(d2, d)
    assert rel(part.sum(0), d.double().sum(0)) < FP32


def test_encoder_forward_and_deterministic_backward():
    V, maxT = 37, 9
    rng = np.random.default_rng(0)
    # repeat one token many times so some buckets split into several sub-buckets
    inputs = rng.integers(0, V, size=(B, 50))
    inputs[:, ::2] = 5
    Bx, Tx = inputs.shape
    wte, wpe = rand(V, C, seed=13), rand(64, C, seed=14)
    out = torch.empty(Bx, Tx, C, dtype=torch.bfloat16, device=DEV)
    inp = torch.from_numpy(inputs).to(DEV, torch.int32)
    encoder.encoder_forward(inp, wte, wpe, out, pos=3)
    ref = wte.double()[inputs] + wpe.double()[3:3 + Tx]
    assert rel(out, ref) < BF16
    dout = rand(Bx, Tx, C, seed=15)
    plan, counts = encoder.bucket_plan(inputs)
    assert counts[1] > counts[2], "some token must span several sub-buckets"
    plan_t = torch.from_numpy(plan).to(DEV)
    dwte0, dwpe0 = rand(V, C, seed=16), rand(64, C, seed=17)
    results = []
    for _ in range(2):
        dwte, dwpe = dwte0.clone(), dwpe0.clone()
        encoder.encoder_backward(dout, plan_t, counts, dwte, dwpe)
        results.append((dwte, dwpe))
    ref_wte = dwte0.double().clone()
    ref_wte.index_add_(0, torch.from_numpy(inputs.reshape(-1)).to(DEV),
                       dout.double().reshape(-1, C))
    ref_wpe = dwpe0.double().clone()
    ref_wpe[:Tx] += dout.double().sum(0)
    assert rel(results[0][0], ref_wte) < BF16 and rel(results[0][1], ref_wpe) < BF16
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("write,programs,V,Vp", [(False, None, 1000, 1029),
                                                (True, None, 1000, 1029),
                                                (True, 2, 1000, 1029),
                                                (True, None, 4500, 4611),
                                                (True, 2, 4500, 4611)])
def test_fused_classifier(write, programs, V, Vp):
    """programs=2 with 4-row blocks: each program walks several blocks of rows. V=4500 is
    three tiles of columns (2048 a step here and on the GPU), walked backwards by the first
    pass: rows 0 and 1 put a large logit in the first and the last tile, so the running
    maxima must be rescaled and merged across tiles."""
    # Vp - V and V are not multiples of the block
    logits = rand(N, Vp, seed=18, scale=3.0)
    logits[0, 5], logits[1, V - 3] = 25.0, 25.0
    logits[:, V:] = 7.0  # padded columns must be ignored
    targets = torch.from_numpy(np.random.default_rng(1).integers(0, V, N)).to(DEV)
    ref_l = logits[:, :V].double().requires_grad_(True)
    ref_losses = torch.nn.functional.cross_entropy(ref_l, targets, reduction="none")
    ref_losses.mean().backward()
    lg = logits.clone()
    losses = torch.full((N,), float("nan"), device=DEV)
    classifier.fused_classifier(lg, targets, losses, V, 1.0 / N if write else None,
                                programs=programs, block_rows=4 if programs else None)
    assert rel(losses, ref_losses) < FP32
    if write:
        assert rel(lg[:, :V], ref_l.grad) < BF16
        assert not lg[:, V:].any(), "padded columns must get zero gradient"
    else:
        assert torch.equal(lg, logits)


@pytest.mark.parametrize("master", [True, False])
def test_adamw_matches_llmc_update_and_rounds_stochastically(master):
    n = 5003
    p32 = rand(n, seed=19, dtype=torch.float32)
    param = p32.to(torch.bfloat16)
    grad = rand(n, seed=20)
    m, v = rand(n, seed=21, scale=0.1, dtype=torch.float32), \
        rand(n, seed=22, scale=0.01, dtype=torch.float32).abs()
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, t=3, grad_scale=0.5)
    # llm.c's update in float64
    g = grad.double() * hp["grad_scale"]
    rm = 0.9 * m.double() + 0.1 * g
    rv = 0.95 * v.double() + 0.05 * g * g
    pin = p32.double() if master else param.double()
    mhat, vhat = rm / (1 - 0.9 ** 3), rv / (1 - 0.95 ** 3)
    rp = pin - hp["lr"] * (mhat / (vhat.sqrt() + hp["eps"]) + hp["weight_decay"] * pin)
    runs = []
    for _ in range(2):
        pa, ma, va = param.clone(), m.clone(), v.clone()
        mw = p32.clone() if master else None
        adamw.adamw_update(pa, grad, mw, ma, va, seed=1234, **hp)
        runs.append(pa)
        assert rel(ma, rm) < FP32 and rel(va, rv) < FP32
        if master:
            assert rel(mw, rp) < FP32
    assert torch.equal(runs[0], runs[1]), "same seed must round the same way"
    # stochastic rounding: each value lands on one of its two bf16 neighbours, unbiased
    lo = rp.float().to(torch.bfloat16)
    err = runs[0].double() - rp
    ulp = torch.where(rp.abs() > 0, (rp.abs() * 2 ** -7), torch.ones_like(rp))
    assert (err.abs() <= ulp * 1.01).all()
    assert abs(float((err / ulp).mean())) < 0.05, "stochastic rounding must be unbiased"
    other = param.clone()
    adamw.adamw_update(other, grad, p32.clone() if master else None, m.clone(), v.clone(),
                       seed=99, **hp)
    assert not torch.equal(other, runs[0]) and not torch.equal(lo, runs[0])


def test_sum_of_squares_and_copy_colsum():
    x = rand(123457, seed=23)
    s = red.sum_of_squares(x)
    assert rel(s, (x.double() ** 2).sum()) < FP32
    src = rand(N, 3 * C, seed=24)[:, 10:10 + C]  # a strided view
    dst = torch.empty(N, C, dtype=torch.bfloat16, device=DEV)
    partial = torch.empty(4096, C, device=DEV)
    from dev.kernels.copy_colsum import copy_colsum
    part = copy_colsum(src, dst, partial)
    assert torch.equal(dst, src)
    assert rel(part.sum(0), src.double().sum(0)) < FP32


def test_pack_heads():
    NH, HS = 4, 25
    g = rand(B, T, NH, HS, seed=25).transpose(1, 2)  # (B, NH, T, HS), (B, T, NH, HS) memory
    g2 = rand(B, NH, T, HS, seed=26)                 # (B, NH, T, HS) memory
    for src in (g, g2):
        dst = torch.empty(N, 3 * NH * HS, dtype=torch.bfloat16, device=DEV)[:, NH * HS:2 * NH * HS]
        partial = torch.empty(4096, 3 * NH * HS, device=DEV)[:, NH * HS:2 * NH * HS]
        attention.pack_heads(src, dst, partial)
        ref = src.transpose(1, 2).reshape(N, NH * HS)
        assert torch.equal(dst, ref)
        P = attention.pack_heads_partials(B, T)
        assert rel(partial[:P].sum(0), ref.double().sum(0)) < FP32


def test_attention_backend_matches_math():
    backends = attention.available_backends(torch.device(DEV))
    assert "math" in backends or DEV == "cpu"
    for backend in set(backends) | {"math"}:
        why = attention.self_check(backend, DEV, B=2, NH=2, T=9, HS=16 if DEV == "cpu" else 64)
        assert why is None, f"{backend}: {why}"
