"""The torch engine: the engine interface's behaviour on the CPU.

Gradient accumulation, the grad norm, AdamW with llm.c's rules (checked against a NumPy
transcription of llm.c's update, weight decay only on the 2-D tensors), KV-cache decoding
against the full forward, state in and out with bit-exact continuation, bf16 autocast, and a
smoke run of bench/gpu_train.py. The golden fixture test lives in tests/test_golden.py.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from llmpy.config import DECAYED, ModelConfig
from llmpy.errors import LlmpyError

torch = pytest.importorskip("torch")
from llmpy.engines.torch import TorchEngine  # noqa: E402

# Odd sizes catch masking bugs that powers of two hide; V = 101 pads to Vp = 128.
SMALL = ModelConfig(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=4, channels=32)
B, T = 3, 7
# float64 engine against float64 NumPy: only summation order differs.
TOL64 = 1e-10


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def batch(seed=0, b=B, t=T, V=SMALL.vocab_size):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(b, t)), rng.integers(0, V, size=(b, t))


def engine(dtype="fp64", **kw):
    return TorchEngine(SMALL, device="cpu", dtype=dtype, **kw)


def test_loss_is_cross_entropy_of_unpadded_logits():
    e = engine()
    x, y = batch()
    logits = e.logits(x)
    assert logits.shape == (B, T, SMALL.vocab_size) and logits.dtype == np.float32
    lg = logits.astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    ref = float(np.mean(lse - np.take_along_axis(lg, y[..., None], -1)[..., 0]))
    assert abs(e.forward(x, y) - ref) < 1e-6
    assert math.isnan(e.forward(x))


def test_grads_accumulate_in_the_flat_buffer():
    """Two half batches with grad_scale 0.5 == the full batch; grads live in flat_grad."""
    x, y = batch(b=4)
    full = engine()
    full.forward(x, y)
    full.backward()
    acc = engine()
    for half in (slice(0, 2), slice(2, 4)):
        acc.forward(x[half], y[half])
        acc.backward(grad_scale=0.5)
    assert rel_err(acc.get_grads(), full.get_grads()) < TOL64
    lo, hi = acc.flat_grad.data_ptr(), acc.flat_grad.data_ptr() + acc.flat_grad.nbytes
    for name, p in acc.model.named_parameters():
        assert lo <= p.grad.data_ptr() < hi, f"{name}.grad left the flat buffer"
    g = acc.get_grads()
    assert abs(acc.grad_norm() - np.linalg.norm(g.astype(np.float64))) < 1e-6 * np.linalg.norm(g)
    wte_grad = g[:SMALL.padded_vocab_size * SMALL.channels].reshape(SMALL.padded_vocab_size, -1)
    assert not wte_grad[SMALL.vocab_size:].any(), "padded wte rows must get no gradient"
    acc.zero_grad()
    assert not acc.get_grads().any() and acc.grad_norm() == 0.0


def adamw_llmc(params, grads, m, v, lr, t, wd, beta1, beta2, eps, decay_mask):
    """llm.c's gpt2_update, transcribed: the reference the engine's AdamW must match."""
    m = beta1 * m + (1 - beta1) * grads
    v = beta2 * v + (1 - beta2) * grads * grads
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    params = params - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * decay_mask * params)
    return params, m, v


def test_step_matches_llmc_adamw_with_decay_on_2d_tensors_only():
    e = engine()
    mask = np.zeros(SMALL.num_params)
    for name, (a, b) in SMALL.param_offsets().items():
        mask[a:b] = name in DECAYED
    p, m, v = e.get_params().astype(np.float64), np.zeros(SMALL.num_params), 0.0
    hp = dict(lr=3e-3, wd=0.1, beta1=0.8, beta2=0.9, eps=1e-6)
    for t in (1, 2, 3):
        x, y = batch(seed=t)
        e.zero_grad()
        e.forward(x, y)
        e.backward()
        scale = 0.7 if t == 2 else 1.0  # clipping folded in: grads scaled first
        # get_grads rounds to fp32: feed the reference the engine's exact float64 grads
        g = e.flat_grad.numpy() * scale
        e.step(hp["lr"], t, hp["wd"], hp["beta1"], hp["beta2"], hp["eps"], grad_scale=scale)
        p, m, v = adamw_llmc(p, g, m, v, hp["lr"], t, hp["wd"], hp["beta1"], hp["beta2"],
                             hp["eps"], mask)
        assert rel_err(e.flat.numpy(), p) < TOL64, f"params after step {t}"
    st = e.get_optimizer_state()
    assert rel_err(st["m"], m) < 1e-6 and rel_err(st["v"], v) < 1e-6 and st["master"] is None


def test_sharded_step_equals_full_step():
    """ZeRO-1's step(shard=(start, end)) over shards that tile the buffer == one full step.
    The cut falls inside qkvw, so a decayed tensor is split between shards."""
    x, y = batch()
    full, sharded = engine(), engine()
    for e in (full, sharded):
        e.forward(x, y)
        e.backward()
    hp = dict(weight_decay=0.1, beta1=0.8, beta2=0.9, eps=1e-6, grad_scale=0.5)
    full.step(1e-2, 3, **hp)
    a, b = SMALL.param_offsets()["qkvw"]
    cut = (a + b) // 2 + 1
    for shard in ((0, cut), (cut, SMALL.num_params)):
        sharded.step(1e-2, 3, shard=shard, **hp)
    assert rel_err(sharded.flat.numpy(), full.flat.numpy()) < TOL64
    assert rel_err(sharded.v.numpy(), full.v.numpy()) < TOL64


def test_weight_decay_skips_biases_and_layernorms():
    e = engine()
    before = e.get_params()
    e.step(lr=0.1, t=1, weight_decay=0.5)  # zero gradients: only the decay moves anything
    after = e.get_params()
    for name, (a, b) in SMALL.param_offsets().items():
        if name in DECAYED:
            np.testing.assert_allclose(after[a:b], before[a:b] * (1 - 0.1 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(after[a:b], before[a:b])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kv_cache_decode_equals_full_forward(dtype):
    # fp32: summation order only (~1e-6). bf16: both paths round activations to bf16 at
    # slightly different places, so compare loosely.
    tol = 1e-4 if dtype == "fp32" else 0.1
    e = engine(dtype)
    x, _ = batch(b=2, t=SMALL.max_seq_len)
    full = e.logits(x)                                    # (2, maxT, V)
    T0 = 5
    out = e.prefill(x[:, :T0])
    assert out.shape == (2, SMALL.vocab_size)
    assert np.abs(out - full[:, T0 - 1]).max() < tol
    for pos in range(T0, SMALL.max_seq_len):
        out = e.decode(x[:, pos])
        assert np.abs(out - full[:, pos]).max() < tol, f"position {pos}"
    with pytest.raises(LlmpyError, match="maxT"):
        e.decode(x[:, 0])


def test_params_and_optimizer_state_round_trip_and_resume_bit_exact():
    """set_params + set_optimizer_state at step t, then the same steps: identical bits."""
    def train(e, steps):
        losses = []
        for t in steps:
            x, y = batch(seed=t, b=2, t=SMALL.max_seq_len)
            e.zero_grad()
            losses.append(e.forward(x, y))
            e.backward()
            norm = e.grad_norm()
            e.step(1e-2, t, weight_decay=0.1, grad_scale=min(1.0, 1.0 / norm))
        return losses

    a = engine("fp32")
    train(a, [1, 2])
    params, state = a.get_params(), a.get_optimizer_state()
    b = TorchEngine(SMALL, seed=7, device="cpu", dtype="fp32")
    assert not np.array_equal(b.get_params(), params)
    b.set_params(params)
    b.set_optimizer_state(state["m"], state["v"])
    np.testing.assert_array_equal(b.get_params(), params)
    np.testing.assert_array_equal(b.get_optimizer_state()["m"], state["m"])
    np.testing.assert_array_equal(b.get_optimizer_state()["v"], state["v"])
    assert train(a, [3, 4, 5]) == train(b, [3, 4, 5])
    np.testing.assert_array_equal(a.get_params(), b.get_params())
    np.testing.assert_array_equal(a.get_optimizer_state()["v"], b.get_optimizer_state()["v"])


def test_same_seed_same_init_as_every_engine():
    from llmpy.init import init_params
    np.testing.assert_array_equal(engine("fp32").get_params(), init_params(SMALL, 1337))
    np.testing.assert_array_equal(TorchEngine(SMALL, seed=3, device="cpu").get_params(),
                                  init_params(SMALL, 3))


def test_bf16_autocast_runs_on_cpu():
    x, y = batch()
    ref = engine("fp32").forward(x, y)
    e = engine("bf16")
    loss = e.forward(x, y)
    assert math.isfinite(loss) and abs(loss - ref) < 0.05
    e.backward()
    assert e.flat_grad.dtype == torch.float32 and math.isfinite(e.grad_norm())
    e.step(1e-3, 1)
    assert e.forward(x, y) < loss


def test_bad_input_is_an_llmpy_error():
    e = engine("fp32")
    with pytest.raises(LlmpyError, match="shape"):
        e.set_params(np.zeros(5, np.float32))
    with pytest.raises(LlmpyError, match="maxT"):
        e.logits(np.zeros((1, SMALL.max_seq_len + 1), dtype=np.int64))
    with pytest.raises(LlmpyError, match="dtype"):
        TorchEngine(SMALL, device="cpu", dtype="fp16")
    with pytest.raises(RuntimeError, match="forward"):
        e.backward()


@pytest.mark.parametrize("dtype", ["fp64", "bf16"])
def test_token_losses_are_the_forwards_losses_per_position(dtype):
    """token_losses is the training forward's cross-entropy before the mean. fp64: equal to
    the loss up to summation order; bf16: the same autocast forward, so the same up to fp32
    summation order too."""
    e = engine(dtype)
    x, y = batch(4)
    tl = e.token_losses(x, y)
    assert tl.shape == (B, T) and tl.dtype == np.float32
    assert abs(tl.astype(np.float64).mean() - e.forward(x, y)) < 1e-6
    if dtype == "fp64":  # against the cross-entropy of the returned (float32) logits
        lg = e.logits(x).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        ref = lse - np.take_along_axis(lg, y[..., None], -1)[..., 0]
        assert np.abs(tl - ref).max() < 1e-5
    with pytest.raises(LlmpyError, match="targets shape"):
        e.token_losses(x, y[:, :-1])


def test_options_are_explicit_keywords():
    """An option the engine does not have is a TypeError, never silently ignored."""
    from llmpy.engines import make_engine
    with pytest.raises(TypeError, match="compiled"):
        make_engine("torch", SMALL, device="cpu", compiled=True)
    with pytest.raises(TypeError):
        TorchEngine(SMALL, 1337)  # seed and the rest by keyword only
    assert engine().distributed


def test_resolve_device_errors_name_the_engine_and_what_it_takes(monkeypatch):
    from llmpy.engines.torch_common import resolve_device
    assert resolve_device("cpu", "torch") == torch.device("cpu")
    assert resolve_device(None, "torch").type in ("cuda", "mps", "cpu")
    with pytest.raises(LlmpyError, match="expected cuda, mps, cpu or cuda:N, got 'tpu'"):
        resolve_device("tpu", "torch")
    with pytest.raises(LlmpyError, match="torch engine: --device meta: expected cuda or mps"):
        resolve_device("meta", "torch")
    if torch.cuda.is_available():
        with pytest.raises(LlmpyError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}", "torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LlmpyError, match="x engine: needs a cuda device.*; try y"):
        resolve_device("auto", "x", types=("cuda",), hint="try y")
    with pytest.raises(LlmpyError, match="sees no CUDA device; use --device cpu"):
        TorchEngine(SMALL, device="cuda")


def test_kv_cache_stores_and_returns_the_prefix():
    from llmpy.engines.torch_common import KVCache
    cache = KVCache(SMALL, 2, torch.bfloat16, "cpu")
    assert cache.k.shape == (SMALL.num_layers, 2, SMALL.num_heads, SMALL.max_seq_len,
                             SMALL.head_size) and cache.k.dtype == torch.bfloat16
    k = torch.randn(2, SMALL.num_heads, 3, SMALL.head_size)
    cache.update(1, 0, k, -k)
    keys, values = cache.update(1, 3, k[:, :, :1], k[:, :, :1])
    assert keys.shape == (2, SMALL.num_heads, 4, SMALL.head_size)
    assert torch.equal(keys[:, :, :3], k.bfloat16()) and torch.equal(values[:, :, :3], -k.bfloat16())
    assert not cache.k[0].any()


def test_make_engine_builds_it():
    from llmpy.engines import make_engine
    e = make_engine("torch", SMALL, seed=1337, device="cpu")
    assert e.name == "torch" and e.param_dtype == "fp32" and e.config == SMALL


def test_bench_gpu_train_smoke_on_cpu(capsys):
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("gpu_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--device", "cpu", "--model", "L=2,C=64,NH=4,T=64", "-b", "2", "-t", "32",
                     "--total-batch", "128", "--steps", "2", "--warmup", "1", "--no-compile"])
    out = capsys.readouterr().out
    assert rc == 0 and "torch" in out and "tokens/s" in out


def test_compile_turns_off_inductors_mix_order_reduction():
    """Issue 14's root cause: Inductor's mix-order reduction drops the writes of the stacked
    layernorm weight gradients on CUDA (pytorch/pytorch#193061); a compiled engine turns it
    off before anything is compiled. The GPU side is tests/test_gpu_train_configs.py."""
    from torch._inductor import config as inductor_config
    if not hasattr(inductor_config.triton, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    before = inductor_config.triton.mix_order_reduction
    inductor_config.triton.mix_order_reduction = True
    try:
        TorchEngine(ModelConfig(max_seq_len=8, vocab_size=64, num_layers=1, num_heads=2,
                                channels=16), device="cpu", compile=True)
        assert inductor_config.triton.mix_order_reduction is False
    finally:
        inductor_config.triton.mix_order_reduction = before


def test_grad_ready_reports_each_tensor_once_when_final():
    """The engine contract's grad_ready hook (issue 16): each of the 16 tensors' ranges is
    reported once per backward, after its gradient is final (autograd's post-accumulate
    hook), so llmpy.dist may all-reduce it while the backward goes on."""
    import torch
    e = engine("fp32")
    x, y = batch()
    seen = []
    e.grad_ready = lambda ranges: seen.extend((a, b, e.flat_grad[a:b].clone())
                                              for a, b in ranges)
    for _ in range(2):  # accumulation: reported on every backward
        seen.clear()
        e.forward(x, y)
        e.backward(0.5)
        assert sorted((a, b) for a, b, _ in seen) == sorted(SMALL.param_offsets().values())
        for a, b, snap in seen:
            assert torch.equal(snap, e.flat_grad[a:b]), (a, b)


@pytest.mark.parametrize("name", ["numpy", "torch", "triton"])
def test_a_dropped_engine_is_freed(name):
    """An engine nobody references is freed with its buffers: the torch engine's grad_ready
    hooks once held it strongly from inside autograd, which kept 2 GB alive per d12 engine
    (bench/gpu_train.py counted them in the next engine's peak memory)."""
    import gc
    import weakref
    from llmpy.engines import make_engine
    if name == "triton":
        pytest.importorskip("triton")
    cfg = ModelConfig(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=4, channels=48)
    e = make_engine(name, cfg, **({} if name == "numpy" else {"device": "cpu"}
                                  if name == "torch" else {"device": "cpu", "verbose": False}))
    x = np.random.default_rng(0).integers(0, 101, size=(2, 8))
    e.forward(x, x)
    e.backward()
    ref = weakref.ref(e)
    del e
    gc.collect()
    assert ref() is None, f"the {name} engine outlives its last reference"
