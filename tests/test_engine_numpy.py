"""The NumPy engine against torch autograd: every layer, the whole model, AdamW, the KV cache.

torch is only a test dependency here; the engine itself never imports it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmpy.config import DECAYED, ModelConfig
from llmpy.engines import make_engine
from llmpy.engines import numpy_layers as nl
from llmpy.engines.numpy import NumpyEngine
from llmpy.errors import LlmpyError

torch = pytest.importorskip("torch")
F = torch.nn.functional

# Odd sizes catch masking and broadcasting bugs that powers of two hide.
B, T, C, NH = 3, 7, 100, 4
# float64 on both sides: only summation order differs, so errors are ~1e-15.
TOL64 = 1e-10

# V = 101 pads to Vp = 128, so the 27 padding columns must stay out of the loss.
SMALL = ModelConfig(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=4, channels=32)


def rel_err(a, b):
    """max |a - b| relative to max |b| (scale-free, and defined for all-zero b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# layers, float64, against torch autograd

def test_encoder(rng):
    Vp, maxT = 13, 11
    inputs = rng.integers(0, 10, size=(B, T))     # repeats, so the scatter must add
    wte, wpe = rng.normal(size=(Vp, C)), rng.normal(size=(maxT, C))
    dout = rng.normal(size=(B, T, C))
    out, cache = nl.encoder_forward(inputs, wte, wpe)
    dwte, dwpe = np.ones((Vp, C)), np.ones((maxT, C))    # backward adds into them
    nl.encoder_backward(dout, cache, dwte, dwpe)
    tw, tp = t64(wte), t64(wpe)
    ref = tw[torch.tensor(inputs)] + tp[:T]
    ref.backward(torch.tensor(dout))
    assert rel_err(out, ref.detach()) < TOL64
    assert rel_err(dwte - 1, tw.grad) < TOL64
    assert rel_err(dwpe - 1, tp.grad) < TOL64


def test_layernorm(rng):
    x, w, b = rng.normal(2.0, 3.0, size=(B, T, C)), rng.normal(size=C), rng.normal(size=C)
    dout = rng.normal(size=(B, T, C))
    out, cache = nl.layernorm_forward(x, w, b)
    dx, dw, db = nl.layernorm_backward(dout, cache)
    tx, tw, tb = t64(x), t64(w), t64(b)
    ref = F.layer_norm(tx, (C,), tw, tb, eps=1e-5)
    ref.backward(torch.tensor(dout))
    assert rel_err(out, ref.detach()) < TOL64
    for mine, theirs in ((dx, tx), (dw, tw), (db, tb)):
        assert rel_err(mine, theirs.grad) < TOL64


@pytest.mark.parametrize("bias", [True, False])
def test_matmul(rng, bias):
    OUT = 3 * C
    x, w, dout = rng.normal(size=(B, T, C)), rng.normal(size=(OUT, C)), rng.normal(size=(B, T, OUT))
    b = rng.normal(size=OUT) if bias else None
    out, cache = nl.matmul_forward(x, w, b)
    dx, dw, db = nl.matmul_backward(dout, cache)
    tx, tw = t64(x), t64(w)
    tb = t64(b) if bias else None
    ref = F.linear(tx, tw, tb)
    ref.backward(torch.tensor(dout))
    assert rel_err(out, ref.detach()) < TOL64
    assert rel_err(dx, tx.grad) < TOL64 and rel_err(dw, tw.grad) < TOL64
    assert (db is None) if not bias else rel_err(db, tb.grad) < TOL64
    # writing dw into a given buffer gives the same numbers, in that buffer
    dw_out = np.empty_like(w)
    assert nl.matmul_backward(dout, cache, dw_out)[1] is dw_out
    assert np.array_equal(dw_out, dw)


def torch_attention(qkv, NH):
    Bq, Tq, C3 = qkv.shape
    q, k, v = qkv.split(C3 // 3, dim=-1)
    q, k, v = (a.reshape(Bq, Tq, NH, -1).transpose(1, 2) for a in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)    # scale 1/sqrt(HS)
    return y.transpose(1, 2).reshape(Bq, Tq, C3 // 3)


def test_attention(rng):
    qkv, dout = rng.normal(size=(B, T, 3 * C)), rng.normal(size=(B, T, C))
    out, cache = nl.attention_forward(qkv, NH)
    dqkv = nl.attention_backward(dout, cache)
    tq = t64(qkv)
    ref = torch_attention(tq, NH)
    ref.backward(torch.tensor(dout))
    assert rel_err(out, ref.detach()) < TOL64
    assert rel_err(dqkv, tq.grad) < TOL64


def test_attention_kv_cache(rng):
    """Prefill 4 positions then feed 3 one by one: same outputs as one causal pass."""
    qkv = rng.normal(size=(B, T, 3 * C))
    full, _ = nl.attention_forward(qkv, NH)
    K, V = np.zeros((B, NH, 16, C // NH)), np.zeros((B, NH, 16, C // NH))
    outs = [nl.attention_forward(qkv[:, :4], NH, (K, V), pos=0)[0]]
    outs += [nl.attention_forward(qkv[:, t:t + 1], NH, (K, V), pos=t)[0] for t in range(4, T)]
    assert rel_err(np.concatenate(outs, axis=1), full) < TOL64


def test_gelu(rng):
    x, dout = rng.normal(0.0, 3.0, size=(B, T, 4 * C)), rng.normal(size=(B, T, 4 * C))
    out, cache = nl.gelu_forward(x)
    dx = nl.gelu_backward(dout, cache)
    tx = t64(x)
    ref = F.gelu(tx, approximate="tanh")
    ref.backward(torch.tensor(dout))
    assert rel_err(out, ref.detach()) < TOL64
    assert rel_err(dx, tx.grad) < TOL64


def test_residual(rng):
    a, b, dout = (rng.normal(size=(B, T, C)) for _ in range(3))
    out, cache = nl.residual_forward(a, b)
    da, db = nl.residual_backward(dout, cache)
    assert np.array_equal(out, a + b) and np.array_equal(da, dout) and np.array_equal(db, dout)


def test_softmax_crossentropy_ignores_padding(rng):
    N, V, Vp = B * T, 101, 128
    logits = rng.normal(0.0, 4.0, size=(N, Vp))
    logits[:, V:] = 50.0          # huge padded logits: must not leak into softmax or loss
    targets = rng.integers(0, V, size=N)
    dlosses = rng.normal(size=N)
    tl = t64(logits)
    ref = F.cross_entropy(tl[:, :V], torch.tensor(targets), reduction="none")
    ref.backward(torch.tensor(dlosses))
    losses, cache = nl.softmax_crossentropy_forward(logits.copy(), targets, V)
    dlogits = nl.softmax_crossentropy_backward(dlosses, cache)
    assert rel_err(losses, ref.detach()) < TOL64
    assert rel_err(dlogits, tl.grad) < TOL64
    assert not dlogits[:, V:].any()


# ----------------------------------------------------------------------------------------------
# the whole model against a small torch GPT-2 (tied wte, padded vocab sliced to V)

def torch_gpt2(flat, cfg, inputs, targets=None):
    """GPT-2 in torch autograd on a flat parameter tensor laid out as llm.c's file."""
    p = {name: flat[a:b].view(cfg.param_shapes()[name])
         for name, (a, b) in cfg.param_offsets().items()}
    Bx, Tx = inputs.shape
    Cx = cfg.channels
    x = p["wte"][inputs] + p["wpe"][:Tx]
    for l in range(cfg.num_layers):
        h = F.layer_norm(x, (Cx,), p["ln1w"][l], p["ln1b"][l], eps=1e-5)
        y = torch_attention(F.linear(h, p["qkvw"][l], p["qkvb"][l]), cfg.num_heads)
        x = x + F.linear(y, p["attprojw"][l], p["attprojb"][l])
        h = F.layer_norm(x, (Cx,), p["ln2w"][l], p["ln2b"][l], eps=1e-5)
        h = F.gelu(F.linear(h, p["fcw"][l], p["fcb"][l]), approximate="tanh")
        x = x + F.linear(h, p["fcprojw"][l], p["fcprojb"][l])
    x = F.layer_norm(x, (Cx,), p["lnfw"], p["lnfb"], eps=1e-5)
    logits = (x @ p["wte"].T)[..., :cfg.vocab_size]
    if targets is None:
        return logits, None
    loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
    return logits, loss


def make_batch(cfg, Bx, Tx, seed=1):
    r = np.random.default_rng(seed)
    return (r.integers(0, cfg.vocab_size, size=(Bx, Tx)),
            r.integers(0, cfg.vocab_size, size=(Bx, Tx)))


def random_params(cfg, seed=2):
    """Init, plus non-trivial LayerNorm weights and biases so their gradients get tested."""
    eng = NumpyEngine(cfg, seed=seed)
    flat = eng.get_params()
    r = np.random.default_rng(seed)
    for name, (a, b) in cfg.param_offsets().items():
        if name not in DECAYED:
            flat[a:b] += r.normal(0.0, 0.1, size=b - a).astype(np.float32)
    return flat


# fp32 engine vs float64 torch: fp32 rounding over 2 layers, ~1e-6; float64 vs float64: ~1e-14.
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_model_matches_torch(dtype, tol):
    cfg = SMALL
    inputs, targets = make_batch(cfg, 3, 15)
    flat = random_params(cfg)
    eng = NumpyEngine(cfg, dtype=dtype)
    eng.set_params(flat)
    eng.zero_grad()
    loss = eng.forward(inputs, targets)
    eng.backward()
    tflat = t64(flat)
    tlogits, tloss = torch_gpt2(tflat, cfg, torch.tensor(inputs), torch.tensor(targets))
    tloss.backward()
    assert abs(loss - tloss.item()) / tloss.item() < tol
    # logits() hands out float32 whatever the engine's dtype
    assert rel_err(eng.logits(inputs), tlogits.detach()) < max(tol, 1e-6)
    grads = eng.grads_flat
    for name, (a, b) in cfg.param_offsets().items():
        assert rel_err(grads[a:b], tflat.grad[a:b]) < tol, name
    wte_grad = eng.grads["wte"]
    assert not wte_grad[cfg.vocab_size:].any(), "padded rows of wte got a gradient"
    assert np.array_equal(eng.get_grads(), grads.astype(np.float32))


def test_init_loss_is_uniform():
    cfg = SMALL
    eng = NumpyEngine(cfg)
    loss = eng.forward(*make_batch(cfg, 2, 16))
    assert abs(loss - math.log(cfg.vocab_size)) < 0.05


# fp32 engine vs float64 torch over 10 steps at lr 1e-3: the loss stays within 1e-5.
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-10)])
def test_adamw_tracks_torch(dtype, tol):
    cfg = SMALL
    inputs, targets = make_batch(cfg, 2, 16)
    flat = random_params(cfg)
    lr, wd, clip = 1e-3, 0.1, 1.0
    eng = NumpyEngine(cfg, dtype=dtype)
    eng.set_params(flat)
    tp = {name: t64(flat[a:b].reshape(cfg.param_shapes()[name]))
          for name, (a, b) in cfg.param_offsets().items()}
    groups = [dict(params=[tp[n] for n in tp if n in DECAYED], weight_decay=wd),
              dict(params=[tp[n] for n in tp if n not in DECAYED], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    ti, tt = torch.tensor(inputs), torch.tensor(targets)
    losses = []
    for step in range(10):
        eng.zero_grad()
        loss = eng.forward(inputs, targets)
        eng.backward()
        losses.append(loss)
        norm = eng.grad_norm()
        eng.step(lr, step + 1, weight_decay=wd, grad_scale=min(1.0, clip / norm))

        opt.zero_grad()
        tflat = torch.cat([tp[n].reshape(-1) for n in tp])
        _, tloss = torch_gpt2(tflat, cfg, ti, tt)
        tloss.backward()
        tnorm = math.sqrt(sum(float((t.grad ** 2).sum()) for t in tp.values()))
        for t in tp.values():
            t.grad *= min(1.0, clip / tnorm)
        opt.step()
        assert abs(loss - tloss.item()) / tloss.item() < tol, step
        assert abs(norm - tnorm) / tnorm < 10 * tol, step
    assert losses[-1] < losses[0] - 0.1     # it is learning the batch
    st = eng.get_optimizer_state()
    assert st["m"].dtype == np.float32 and st["m"].shape == (cfg.num_params,)
    assert st["master"] is None


def test_optimizer_state_roundtrip():
    """Stepping on from saved params + m, v equals stepping on without the save."""
    cfg = SMALL
    batch = make_batch(cfg, 2, 8)
    a = NumpyEngine(cfg)
    for t in (1, 2):
        a.zero_grad(), a.forward(*batch), a.backward(), a.step(1e-3, t, weight_decay=0.1)
    b = NumpyEngine(cfg, seed=7)
    b.set_params(a.get_params())
    b.set_optimizer_state(**a.get_optimizer_state())
    for e in (a, b):
        e.zero_grad(), e.forward(*batch), e.backward(), e.step(1e-3, 3, weight_decay=0.1)
    assert np.array_equal(a.get_params(), b.get_params())


# ----------------------------------------------------------------------------------------------
# gradient accumulation and zero_grad

def test_grad_accumulation_same_batch_is_exact():
    cfg = SMALL
    batch = make_batch(cfg, 2, 12)
    eng = NumpyEngine(cfg)
    eng.zero_grad()
    eng.forward(*batch), eng.backward(1.0)
    whole = eng.get_grads()
    eng.zero_grad()
    for _ in range(2):
        eng.forward(*batch), eng.backward(0.5)
    # 0.5 g + 0.5 g == g exactly in binary floating point
    assert np.array_equal(eng.get_grads(), whole)


def test_grad_accumulation_two_halves():
    cfg = SMALL
    inputs, targets = make_batch(cfg, 4, 12)
    eng = NumpyEngine(cfg, dtype=np.float64)
    eng.zero_grad()
    eng.forward(inputs, targets), eng.backward()
    whole = eng.grads_flat.copy()
    eng.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        eng.forward(inputs[half], targets[half]), eng.backward(0.5)
    assert rel_err(eng.grads_flat, whole) < TOL64


def test_zero_grad():
    cfg = SMALL
    eng = NumpyEngine(cfg)
    eng.forward(*make_batch(cfg, 2, 8)), eng.backward()
    assert eng.grad_norm() > 0
    eng.zero_grad()
    assert eng.grad_norm() == 0.0 and not eng.get_grads().any()
    eng.zero_grad()
    eng.forward(*make_batch(cfg, 2, 8, seed=3)), eng.backward()
    once = eng.get_grads()
    eng.zero_grad()
    eng.forward(*make_batch(cfg, 2, 8, seed=3)), eng.backward()
    assert np.array_equal(eng.get_grads(), once)


# ----------------------------------------------------------------------------------------------
# inference: KV cache

@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_kv_cache_decode_matches_full_forward(dtype, tol):
    cfg = SMALL
    eng = NumpyEngine(cfg, dtype=dtype)
    eng.set_params(random_params(cfg))
    tokens, _ = make_batch(cfg, 3, cfg.max_seq_len)
    full = eng.logits(tokens)                             # (B, maxT, V)
    T0 = 5
    assert rel_err(eng.prefill(tokens[:, :T0]), full[:, T0 - 1]) < tol
    for t in range(T0, cfg.max_seq_len):                 # up to the last position
        assert rel_err(eng.decode(tokens[:, t]), full[:, t]) < tol, t
    with pytest.raises(LlmpyError):
        eng.decode(tokens[:, 0])                         # past maxT
    # a second prefill starts over
    assert rel_err(eng.prefill(tokens[:, :2]), full[:, 1]) < tol


def test_interface_checks():
    cfg = SMALL
    eng = make_engine("numpy", cfg, seed=1337, device="cpu")    # the CPU is its one device
    assert isinstance(eng, NumpyEngine)
    assert eng.name == "numpy" and eng.param_dtype == "fp32"
    assert eng.get_params().dtype == np.float32 and eng.get_params().shape == (cfg.num_params,)
    assert math.isnan(eng.forward(make_batch(cfg, 1, 4)[0]))
    with pytest.raises(LlmpyError):
        eng.forward(np.zeros((1, cfg.max_seq_len + 1), dtype=np.int64))
    with pytest.raises(LlmpyError):
        eng.forward(np.full((1, 4), cfg.vocab_size))
    with pytest.raises(LlmpyError):
        eng.set_params(np.zeros(3, dtype=np.float32))
    assert eng.logits(make_batch(cfg, 2, 3)[0]).shape == (2, 3, cfg.vocab_size)


def test_unknown_options_raise():
    """A misspelled or foreign option names itself instead of being silently ignored."""
    with pytest.raises(TypeError, match="sede"):
        NumpyEngine(SMALL, sede=1)
    with pytest.raises(TypeError, match="compile"):
        make_engine("numpy", SMALL, seed=1, compile=True)    # a torch engine option
    with pytest.raises(LlmpyError, match="CPU only"):
        NumpyEngine(SMALL, device="cuda")
    for device in (None, "auto", "cpu"):
        assert NumpyEngine(SMALL, device=device).distributed is False


# ----------------------------------------------------------------------------------------------
# token_losses: the cross-entropy at every position, for evals

def test_token_losses(monkeypatch):
    """Per-position losses equal torch's cross-entropy and average to forward's loss; a
    training forward/backward around the call is unaffected."""
    import llmpy.engines.numpy as engine_module
    monkeypatch.setattr(engine_module, "LOSS_ROWS", 7)   # 3 x 15 rows: chunks and a tail
    cfg = SMALL
    inputs, targets = make_batch(cfg, 3, 15)
    flat = random_params(cfg)
    eng = NumpyEngine(cfg, dtype=np.float64)
    eng.set_params(flat)
    tlogits, _ = torch_gpt2(t64(flat, grad=False), cfg, torch.tensor(inputs))
    ref = F.cross_entropy(tlogits.reshape(-1, cfg.vocab_size),
                          torch.tensor(targets).reshape(-1), reduction="none")
    eng.zero_grad()
    loss = eng.forward(inputs, targets)
    losses = eng.token_losses(*make_batch(cfg, 2, 9, seed=5))  # between forward and backward
    assert losses.shape == (2, 9) and losses.dtype == np.float32
    losses = eng.token_losses(inputs, targets)
    assert losses.shape == (3, 15) and losses.dtype == np.float32
    assert rel_err(losses.reshape(-1), ref) < 1e-6             # float32 out
    assert abs(float(losses.astype(np.float64).mean()) - loss) < 1e-6
    eng.backward()
    after = eng.get_grads()
    eng.zero_grad()
    eng.forward(inputs, targets), eng.backward()
    assert np.array_equal(after, eng.get_grads())
    with pytest.raises(LlmpyError, match="shape"):
        eng.token_losses(inputs, targets[:, :-1])
    with pytest.raises(LlmpyError, match="targets"):
        eng.token_losses(inputs, np.full_like(targets, cfg.vocab_size))
