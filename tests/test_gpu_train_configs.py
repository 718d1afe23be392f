"""Every training configuration a user can pick on a GPU, through `llmpy train` as typed,
against the fp32 eager torch engine: same init, one batch of real text, 12 steps.

This is the test that would have caught issue 14: `llmpy train --engine torch --device cuda`
(compile on, bf16) reported a grad norm of 127,114 at step 0 where every other configuration
gave 20.9, because Inductor's mix-order reduction (default since torch 2.10) dropped the
writes of the layernorm weight gradients, which the engine's stacked (L, C) parameters
assemble into one buffer (pytorch/pytorch#193061). On the CPU compile on and off agree, and
the engine-level tests pass: only the CLI's configuration on CUDA, at 16K tokens per
reduction, showed it. So: the CLI path, real text, B*T = 16,384, every step compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

MODEL = "d6"
STEPS = 12
# bf16 against fp32, measured on an H200 (d6, 12 steps of lr 3e-4 on one 16x1024 batch of
# tinyshakespeare val, fp32 eager: grad norm 8.336 at step 0, loss 10.844 -> 8.179): the
# worst configuration (triton, flash attention) stays within 0.009 of the loss and 5.2% of
# the norm at every step; torch compile fp32 within 0.001 / 0.6%. With the bug back in
# (mix-order reduction on) the CLI default was off by 2.4 in loss and 8.7x in norm.
LOSS_TOL = 0.05       # absolute, every step
NORM_RTOL = 0.10      # relative, every step

CONFIGS = {
    "torch eager bf16": ["--engine", "torch", "--compile", "0", "--dtype", "bf16"],
    "torch compile fp32": ["--engine", "torch", "--compile", "1", "--dtype", "fp32"],
    "torch compile bf16 (CLI default)": ["--engine", "torch"],
    "triton -r 0": ["--engine", "triton", "-r", "0"],
    "triton -r 1": ["--engine", "triton", "-r", "1"],
    "triton -r 2": ["--engine", "triton", "-r", "2"],
    "triton cudnn": ["--engine", "triton", "--attention", "cudnn"],
    "triton flash": ["--engine", "triton", "--attention", "flash"],
    "triton -ge 0": ["--engine", "triton", "-ge", "0"],
    "triton -f8 1 (FP8 lm head)": ["--engine", "triton", "-f8", "1"],
}
# Not here: -f8 2 (the MLP in FP8 too). Measured on an H200: its step-0 loss and norm agree
# (10.8423 / 8.318 against 10.8437 / 8.334), but this run passes through a spike (fp32
# eager's loss rises to 11.718 at step 5) that the bf16 configurations follow within 0.009,
# and FP8's larger noise (gradients within ~6% per tensor, test_engine_triton.py) sends it
# another way (10.061 at step 5; max |loss diff| 1.66 over the 12 steps). bench/fp8_loss.py
# compares it with bf16 over 200 steps instead.
REFERENCE = ["--engine", "torch", "--compile", "0", "--dtype", "fp32"]


def train(init: Path, val: str, out: Path, flags: list[str]) -> list[tuple[float, float]]:
    args = [sys.executable, "-m", "llmpy", "train", "--device", "cuda", "-e", str(init),
            "-i", val, "-j", val, "-a", "1", "--shuffle", "0", "-b", "16", "-t", "1024",
            "-d", "16384", "-l", "3e-4", "-u", "0", "-q", "1", "-c", "0", "-x", str(STEPS),
            "-v", "0", "-s", "0",
            "-o", str(out), *flags]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["train_loss"], row["norm"]) for row in rows if "train_loss" in row]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from llmpy.config import from_descriptor
    from llmpy.data.tinyshakespeare import ensure_tinyshakespeare
    from llmpy.formats import write_model
    from llmpy.init import init_params
    d = tmp_path_factory.mktemp("configs")
    config = from_descriptor(MODEL)
    write_model(d / "init.bin", config, init_params(config, 1337))
    val = str(ensure_tinyshakespeare()[1])
    reference = train(d / "init.bin", val, d / "reference", REFERENCE)
    assert len(reference) == STEPS
    return d, val, reference


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_tracks_fp32_eager(setup, name):
    d, val, reference = setup
    got = train(d / "init.bin", val, d / name.replace(" ", "_").replace("(", "").replace(")", ""),
                CONFIGS[name])
    assert len(got) == STEPS
    dl = max(abs(a[0] - b[0]) for a, b in zip(got, reference))
    dn = max(abs(a[1] - b[1]) / b[1] for a, b in zip(got, reference))
    print(f"\n{name}: max |loss - fp32 eager| {dl:.4f}, max norm rel diff {dn:.4f}, "
          f"losses {got[0][0]:.4f} -> {got[-1][0]:.4f}, norm0 {got[0][1]:.3f}")
    for step, ((loss, norm), (rloss, rnorm)) in enumerate(zip(got, reference)):
        assert abs(loss - rloss) <= LOSS_TOL, (name, step, loss, rloss)
        assert abs(norm - rnorm) <= NORM_RTOL * rnorm, (name, step, norm, rnorm)
    assert got[-1][0] < got[0][0] - 1.0  # and it learns
