"""The golden fixture (this project's test_gpt2): any engine against a frozen reference.

tests/fixtures/golden_tiny was written by the torch engine in float64 with

    llmpy export debug-state --model L=2,C=64,NH=4,T=64,V=1000 --fold-vocab \
        --shard tiny_shakespeare_val.bin --out tests/fixtures/golden_tiny

(seed 1337, B=4, T=64; token ids of tinyshakespeare val folded into V=1000 so the logits
stay small: V=1000 pads to Vp=1024). `check_golden` is what llm.c's test_gpt2 does: load the
model, compare logits, loss and all 16 gradients with the debug state, then take 10 AdamW
steps on the same batch and compare the losses. Call it from any engine's tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmpy.config import PARAM_NAMES
from llmpy.formats import read_debug_state, read_model

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "golden_tiny"


def rel_err(a, b) -> float:
    """max |a - b| relative to max |b|: scale-free, one number per tensor."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_golden(engine_factory, rtol_logits: float, rtol_grads: float, loss_tol: float,
                 golden_dir=GOLDEN_DIR) -> dict:
    """Check an engine against a golden fixture directory (model.bin, debug_state.bin,
    golden.json); raise AssertionError naming the first mismatch.

    engine_factory(config) -> engine. rtol_logits and rtol_grads bound rel_err (max abs
    difference over max abs reference) of the logits and of each of the 16 gradients;
    loss_tol bounds |loss - reference| for the first loss and the loss of every step.
    Returns the errors it measured, for messages and tuning tolerances."""
    golden_dir = Path(golden_dir)
    golden = json.loads((golden_dir / "golden.json").read_text())
    config, params = read_model(golden_dir / golden["model"])
    ref = read_debug_state(golden_dir / golden["debug_state"], config)
    x, y = ref["x"], ref["y"]

    engine = engine_factory(config)
    engine.set_params(params)
    errors = {"logits": rel_err(engine.logits(x), ref["logits"])}
    assert errors["logits"] <= rtol_logits, f"logits: rel err {errors['logits']:.3g} > {rtol_logits}"

    r = golden
    losses = []
    for k in range(golden["steps"]):
        loss = engine.forward(x, y)
        engine.zero_grad()
        engine.backward()
        if k == 0:
            errors["loss"] = abs(loss - ref["loss"])
            assert errors["loss"] <= loss_tol, f"loss {loss} vs {ref['loss']}"
            grads, ref_grads = engine.get_grads(), ref["grads"]
            for name, (a, b) in config.param_offsets().items():
                errors["d" + name] = rel_err(grads[a:b], ref_grads[a:b])
            bad = {k: v for k, v in errors.items() if k[1:] in PARAM_NAMES and v > rtol_grads}
            assert not bad, f"gradients over rel err {rtol_grads}: {bad}"
        norm = engine.grad_norm()
        engine.step(r["lr"], k + 1, r["weight_decay"], r["beta1"], r["beta2"], r["eps"],
                    grad_scale=min(1.0, r["grad_clip"] / norm) if norm > 0 else 1.0)
        losses.append(loss)
    diffs = np.abs(np.array(losses) - np.array(golden["losses"]))
    errors["losses"] = float(diffs.max()) if diffs.size else 0.0
    assert errors["losses"] <= loss_tol, \
        f"step losses {np.round(losses, 6).tolist()} vs {golden['losses']} (tol {loss_tol})"
    return errors


def test_fixture_is_small_and_consistent():
    golden = json.loads((GOLDEN_DIR / "golden.json").read_text())
    size = sum(p.stat().st_size for p in GOLDEN_DIR.iterdir())
    assert size < 4_000_000, f"fixture is {size} bytes; keep it a few MB at most"
    config, params = read_model(GOLDEN_DIR / "model.bin")
    ref = read_debug_state(GOLDEN_DIR / "debug_state.bin", config)
    assert ref["x"].shape == (golden["B"], golden["T"]) and len(golden["losses"]) == 10
    np.testing.assert_array_equal(ref["x"][:, 1:], ref["y"][:, :-1])  # y is x shifted by one
    wte_grad = ref["grads"][:config.padded_vocab_size * config.channels]
    wte_grad = wte_grad.reshape(config.padded_vocab_size, config.channels)
    assert not wte_grad[config.vocab_size:].any(), "padded wte rows must get zero gradient"
    assert abs(ref["loss"] - golden["losses"][0]) < 1e-6


# Tolerances against the float64 reference (stored as fp32). fp32 engines (torch, numpy):
# measured rel err <= 7e-7 on logits and every gradient, <= 6.2e-7 on the 10 losses; the
# bounds leave ~10x room for other BLAS summation orders. bf16 autocast: measured ~4e-3
# (logits), <= 8e-3 (grads), 1e-4 (losses); llm.c's bf16 test allows 0.05 on the loss.
FP32_TOL = dict(rtol_logits=5e-6, rtol_grads=1e-5, loss_tol=5e-6)


def test_golden_torch_cpu_fp32():
    pytest.importorskip("torch")
    from llmpy.engines.torch import TorchEngine
    check_golden(lambda config: TorchEngine(config, device="cpu", dtype="fp32"), **FP32_TOL)


BF16_TOL = dict(rtol_logits=2e-2, rtol_grads=3e-2, loss_tol=2e-3)


def test_golden_torch_cpu_bf16():
    pytest.importorskip("torch")
    from llmpy.engines.torch import TorchEngine
    check_golden(lambda config: TorchEngine(config, device="cpu", dtype="bf16"), **BF16_TOL)


def test_golden_torch_cpu_fp64_exact():
    """The engine that wrote the fixture reproduces it up to the fp32 rounding of the files."""
    pytest.importorskip("torch")
    from llmpy.engines.torch import TorchEngine
    check_golden(lambda config: TorchEngine(config, device="cpu", dtype="fp64"),
                 rtol_logits=1e-6, rtol_grads=1e-6, loss_tol=1e-6)


def test_golden_numpy():
    try:
        from llmpy.engines.numpy import NumpyEngine
    except ImportError:
        pytest.skip("numpy engine not available")
    check_golden(lambda config: NumpyEngine(config), **FP32_TOL)


def test_export_debug_state_remakes_the_fixture(tmp_path):
    """`llmpy export debug-state` (the command in this file's docstring) writes the fixture:
    the same model bytes and batch, and the same numbers up to BLAS summation order."""
    pytest.importorskip("torch")
    from llmpy.cli import main
    from llmpy.data.tinyshakespeare import ensure_tinyshakespeare
    _, val = ensure_tinyshakespeare()
    argv = ["export", "debug-state", "--model", "L=2,C=64,NH=4,T=64,V=1000", "--fold-vocab",
            "--shard", str(val), "--out", str(tmp_path), "--steps", "3"]
    assert main(argv) == 0
    assert (tmp_path / "model.bin").read_bytes() == (GOLDEN_DIR / "model.bin").read_bytes()
    config, _ = read_model(GOLDEN_DIR / "model.bin")
    new, ref = (read_debug_state(d / "debug_state.bin", config) for d in (tmp_path, GOLDEN_DIR))
    np.testing.assert_array_equal(new["x"], ref["x"])
    np.testing.assert_array_equal(new["y"], ref["y"])
    assert rel_err(new["logits"], ref["logits"]) < 1e-6 and rel_err(new["grads"], ref["grads"]) < 1e-6
    golden = json.loads((GOLDEN_DIR / "golden.json").read_text())
    losses = json.loads((tmp_path / "golden.json").read_text())["losses"]
    np.testing.assert_allclose(losses, golden["losses"][:3], atol=1e-9)
    assert main(argv[:-4] + ["--out", str(tmp_path / "x"), "-t", "65"]) == 2  # T > maxT


@pytest.mark.gpu
def test_golden_torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from llmpy.engines.torch import TorchEngine
    # fp32 on CUDA (TF32 off, torch's default for matmuls): same bounds as on the CPU.
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        check_golden(lambda config: TorchEngine(config, device="cuda", dtype="fp32"), **FP32_TOL)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for compile_ in (False, True):
        check_golden(lambda config: TorchEngine(config, device="cuda", dtype="bf16",
                                                compile=compile_), **BF16_TOL)
