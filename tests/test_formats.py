"""llm.c file formats: byte-exact round trips, and a clear error for every corrupt file."""

import numpy as np
import pytest

from llmpy import formats as F
from llmpy.config import ModelConfig
from llmpy.errors import FormatError
from llmpy.init import init_params

# Odd sizes on purpose: V=101 pads to Vp=128, so the padded rows are exercised.
CFG = ModelConfig(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=3, channels=24)


def roundtrip_bytes(path, read, write):
    before = path.read_bytes()
    obj = read(path)
    path2 = path.with_name("again_" + path.name)
    write(path2, obj)
    assert path2.read_bytes() == before


def corrupt_variants(path, tmp_path):
    """Yield (name, file) for: truncated, extended, wrong magic, wrong version."""
    data = bytearray(path.read_bytes())
    variants = {
        "truncated": bytes(data[:-3]),
        "extended": bytes(data + b"\0\0\0\0"),
        "magic": bytes(b"\x01\x02\x03\x04" + data[4:]),
        "version": bytes(data[:4] + b"\x63\0\0\0" + data[8:]),
        "header_only_part": bytes(data[:100]),
    }
    for name, blob in variants.items():
        p = tmp_path / f"bad_{name}_{path.name}"
        p.write_bytes(blob)
        yield name, p


def assert_clear_error(fn, path):
    with pytest.raises(FormatError) as e:
        fn(path)
    msg = str(e.value)
    assert str(path) in msg and "expected" in msg and "got" in msg


def test_model_fp32_roundtrip_and_errors(tmp_path):
    params = init_params(CFG, seed=3)
    p = tmp_path / "model.bin"
    F.write_model(p, CFG, params)
    assert p.stat().st_size == 1024 + 4 * CFG.num_params
    cfg, back = F.read_model(p)
    assert cfg == CFG and np.array_equal(back, params)
    header = np.fromfile(p, dtype="<i4", count=8)
    assert header.tolist() == [20240326, 3, 16, 101, 2, 3, 24, 128]
    roundtrip_bytes(p, F.read_model, lambda q, o: F.write_model(q, o[0], o[1]))
    for _, bad in corrupt_variants(p, tmp_path):
        assert_clear_error(F.read_model, bad)


def test_model_bf16_roundtrip(tmp_path):
    params = init_params(CFG, seed=4)
    p = tmp_path / "model_bf16.bin"
    F.write_model(p, CFG, params, dtype="bf16")
    assert p.stat().st_size == 1024 + 2 * CFG.num_params
    cfg, back = F.read_model(p)
    assert np.fromfile(p, dtype="<i4", count=2)[1] == 5
    assert np.allclose(back, params, rtol=2 ** -8, atol=0)
    roundtrip_bytes(p, F.read_model, lambda q, o: F.write_model(q, o[0], o[1], dtype="bf16"))


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 0.0, np.inf], dtype=np.float32)
    b = F.fp32_to_bf16_bits(x)
    y = F.bf16_bits_to_fp32(b)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
    assert y.tolist() == [1.0, 1.0, 1.0 + 2 ** -6, -2.5, 0.0, np.inf]
    assert F.fp32_to_bf16_bits(np.array([np.nan], np.float32))[0] == 0x7FC0


def test_shard_roundtrip_memmap_and_errors(tmp_path):
    toks = np.random.default_rng(0).integers(0, 50257, size=1001)
    p = tmp_path / "shard.bin"
    F.write_shard(p, toks)
    assert F.shard_num_tokens(p) == 1001
    m = F.open_shard(p)
    assert isinstance(m, np.memmap) and np.array_equal(m, toks)
    roundtrip_bytes(p, lambda q: np.asarray(F.open_shard(q)), F.write_shard)
    for _, bad in corrupt_variants(p, tmp_path):
        assert_clear_error(F.open_shard, bad)
    with pytest.raises(ValueError):
        F.write_shard(tmp_path / "x.bin", [70000])


def test_tokenizer_roundtrip_and_errors(tmp_path):
    toks = [bytes([i]) for i in range(256)] + [b"hello", b" world", "é".encode()]
    p = tmp_path / "tok.bin"
    F.write_tokenizer(p, toks, eot=258)
    back, eot = F.read_tokenizer(p)
    assert back == toks and eot == 258
    roundtrip_bytes(p, F.read_tokenizer, lambda q, o: F.write_tokenizer(q, o[0], o[1]))
    for _, bad in corrupt_variants(p, tmp_path):
        assert_clear_error(F.read_tokenizer, bad)


def test_eval_roundtrip_and_errors(tmp_path):
    examples = [
        {"label": 2, "ctx": [1, 2, 3], "endings": [[4], [5, 6], [7, 8, 9], [10]]},
        {"label": 0, "ctx": [11], "endings": [[12, 13], [14], [15], [16, 17, 18, 19]]},
    ]
    p = tmp_path / "eval.bin"
    F.write_eval(p, examples)
    h = np.fromfile(p, dtype="<i4", count=4)
    # longest: delimiter, bytes, index, label, 4, ctx_len, 3 ctx, then (1+1)+(1+2)+(1+3)+(1+1)
    assert h.tolist() == [20240522, 1, 2, 2 * (6 + 3 + 11)]
    assert F.read_eval(p) == examples
    roundtrip_bytes(p, F.read_eval, F.write_eval)
    for _, bad in corrupt_variants(p, tmp_path):
        assert_clear_error(F.read_eval, bad)


def test_state_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    n = 1000
    m, v, master = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    p = tmp_path / "state.bin"
    F.write_state(p, step=42, m=m, v=v, master=master, nproc=2, rank=1, rng_state=2 ** 40 + 5,
                  shard_idx=3, sample_idx=2 ** 33, shard_perm=[2, 0, 1], sample_perm=[1, 0],
                  extra={"epoch": 2, "outliers": [1.5, 2.5]})
    s = F.read_state(p)
    assert s["step"] == 42 and s["nproc"] == 2 and s["rank"] == 1
    assert s["rng_state"] == 2 ** 40 + 5 and s["shard_idx"] == 3 and s["sample_idx"] == 2 ** 33
    assert np.array_equal(s["m"], m) and np.array_equal(s["v"], v)
    assert np.array_equal(s["master"], master)
    assert s["shard_perm"].tolist() == [2, 0, 1] and s["sample_perm"].tolist() == [1, 0]
    assert s["extra"] == {"epoch": 2, "outliers": [1.5, 2.5]}

    def rewrite(q, s):
        F.write_state(q, step=s["step"], m=s["m"], v=s["v"], master=s["master"],
                      nproc=s["nproc"], rank=s["rank"], rng_state=s["rng_state"],
                      shard_idx=s["shard_idx"], sample_idx=s["sample_idx"],
                      shard_perm=s["shard_perm"], sample_perm=s["sample_perm"], extra=s["extra"])
    roundtrip_bytes(p, F.read_state, rewrite)
    for name, bad in corrupt_variants(p, tmp_path):
        assert_clear_error(F.read_state, bad)
    # without master weights, shuffle or extras: exactly llm.c's layout
    F.write_state(p, step=1, m=m, v=v)
    assert p.stat().st_size == 1024 + 8 * n
    assert F.read_state(p)["master"] is None


def test_debug_state_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    B, T = 2, 5
    x = rng.integers(0, 101, (B, T))
    y = rng.integers(0, 101, (B, T))
    logits = rng.standard_normal((B, T, 101)).astype(np.float32)
    grads = rng.standard_normal(CFG.num_params).astype(np.float32)
    p = tmp_path / "debug.bin"
    F.write_debug_state(p, CFG, x, y, logits, 4.5, grads)
    d = F.read_debug_state(p, CFG)
    assert np.array_equal(d["x"], x) and np.array_equal(d["y"], y)
    assert np.array_equal(d["logits"], logits) and d["loss"] == 4.5
    assert np.array_equal(d["grads"], grads)
    roundtrip_bytes(p, lambda q: F.read_debug_state(q, CFG),
                    lambda q, d: F.write_debug_state(q, CFG, d["x"], d["y"], d["logits"],
                                                     d["loss"], d["grads"]))
    for _, bad in corrupt_variants(p, tmp_path):
        assert_clear_error(lambda q: F.read_debug_state(q, CFG), bad)


def test_missing_file_error(tmp_path):
    assert_clear_error(F.read_model, tmp_path / "nope.bin")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def chunks():
        yield b"abc"
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        F.atomic_write(tmp_path / "f.bin", chunks())
    assert list(tmp_path.iterdir()) == []
