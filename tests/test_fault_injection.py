"""Fault injection across checkpoint writes: a real SIGKILL at random points inside the
atomic writes of a run's checkpoints (formats.atomic_write's LLMPY_TEST_KILL_WRITE: after the
first chunk, after the fsync, after the rename), then a resume with the same command. Every
resume must be bit-exact against an uninterrupted run, no complete checkpoint may be lost,
and no temp file may be left. The trial count and the figures are printed (pytest -s)."""

import random

import numpy as np

from llmpy import checkpoint as ckpt
from llmpy.formats import read_state

from test_train import base_args, run_cli, shards  # noqa: F401  (the module's fixture)

STEPS = 4          # checkpoints at 1..STEPS (-n 1): 3 atomic writes each (model, state, DONE)
PHASES = ("partial", "synced", "renamed")
TRIALS = 21
BEFORE = 1         # atomic writes before the first checkpoint: run_config.json


def expected_complete(write: int, phase: str) -> list[int]:
    w = write - BEFORE
    step, kind = (w - 1) // 3 + 1, (w - 1) % 3  # kind 2 is the DONE marker
    return list(range(1, step + (kind == 2 and phase == "renamed")))


def test_sigkill_at_random_points_of_checkpoint_writes(shards, tmp_path):
    extra = ["-n", "1", "-v", "0", "-y", "1"]
    ref = tmp_path / "ref"
    r = run_cli(base_args(shards, ref, steps=STEPS, extra=extra))
    assert r.returncode == 0, r.stderr
    final = ckpt.model_path(ref, STEPS).read_bytes()
    ref_state = read_state(ckpt.state_path(ref, STEPS, 0))
    points = [(w, ph) for w in range(BEFORE + 1, BEFORE + 3 * STEPS + 1) for ph in PHASES]
    trials = random.Random(13).sample(points, TRIALS)
    survived, lost = 0, 0
    for i, (write, phase) in enumerate(trials):
        out = tmp_path / f"t{i}"
        args = base_args(shards, out, steps=STEPS, extra=extra)
        r = run_cli(args, {"LLMPY_TEST_KILL_WRITE": f"{write}:{phase}"})
        assert r.returncode == -9, (write, phase, r.stderr)
        want = expected_complete(write, phase)
        lost += len(set(want) - set(ckpt.complete_steps(out)))
        assert ckpt.complete_steps(out) == want, (write, phase)
        r = run_cli(args)
        assert r.returncode == 0, (write, phase, r.stderr)
        assert ckpt.model_path(out, STEPS).read_bytes() == final, (write, phase)
        st = read_state(ckpt.state_path(out, STEPS, 0))
        assert np.array_equal(st["m"], ref_state["m"]) and np.array_equal(st["v"],
                                                                          ref_state["v"])
        assert not list(out.glob(".*.tmp")), (write, phase)
        survived += 1
    print(f"fault injection: {TRIALS} trials (SIGKILL inside checkpoint writes), {survived} "
          f"resumed bit-exact, {lost} checkpoints lost")
    assert survived == TRIALS and lost == 0
