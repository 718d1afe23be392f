"""The training loop: flags, bad input, schedules, logs, checkpoints, kill-and-resume, NaNs."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmpy import checkpoint as ckpt
from llmpy.cli import main as cli_main
from llmpy.formats import read_model, read_state, write_shard
from llmpy.schedulers import get_lr
from llmpy.outlier_detector import OutlierDetector
from llmpy.settings import parse_args
from llmpy.train import train

# A tiny model with a small vocab so each step takes milliseconds.
MODEL = "L=2,C=32,NH=2,T=32,V=512"
try:
    import torch  # noqa: F401
    HAS_TORCH = True
except ImportError:
    HAS_TORCH = False
ENGINES = ["numpy", pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH,
                                                                     reason="needs torch"))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    # a learnable stream: a repeating random phrase with noise
    phrase = rng.integers(0, 512, size=97)
    toks = np.tile(phrase, 200)
    noise = rng.random(toks.size) < 0.05
    toks[noise] = rng.integers(0, 512, size=noise.sum())
    write_shard(d / "train_000001.bin", toks[:12000])
    write_shard(d / "train_000002.bin", toks[12000:])
    write_shard(d / "val_000000.bin", rng.integers(0, 512, size=3000))
    return d


def base_args(shards, out, engine="numpy", steps=8, extra=()):
    return ["-i", str(shards / "train_*.bin"), "-j", str(shards / "val_*.bin"), "-e", MODEL,
            "-b", "2", "-t", "16", "-d", "64", "-x", str(steps), "-l", "3e-3", "-u", "2",
            "-v", "4", "-m", "2", "-s", "0", "-o", str(out), "--engine", engine, *extra]


def run_cli(args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "llmpy", "train", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def train_losses(out):
    """step -> train loss from metrics.jsonl (the last record of a step wins: resumes)."""
    losses = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train_loss" in r:
            losses[r["step"]] = r["train_loss"]
    return losses


# ---------------------------------------------------------------------------------------
# schedules

def test_schedules_match_formulas():
    lr, warm, total, frac = 1.0, 10, 110, 0.1
    for kind in ("cosine", "linear", "wsd"):
        assert get_lr(kind, 0, lr, warm, total, frac) == pytest.approx(0.1)
        assert get_lr(kind, 4, lr, warm, total, frac) == pytest.approx(0.5)
    # llm.c's constant scheduler has no warmup (LLMC_FACTS.md: only cosine, linear, wsd warm up)
    assert get_lr("constant", 0, lr, warm, total, frac) == 1.0
    assert get_lr("constant", 4, lr, warm, total, frac) == 1.0
    # cosine: halfway through the decay sits halfway between lr and min_lr
    assert get_lr("cosine", 60, lr, warm, total, frac) == pytest.approx(0.55)
    assert get_lr("cosine", 10, lr, warm, total, frac) == pytest.approx(1.0)
    assert get_lr("cosine", 110, lr, warm, total, frac) == pytest.approx(0.1)
    p = (35 - 10) / 100
    assert get_lr("cosine", 35, lr, warm, total, frac) == pytest.approx(
        0.1 + 0.5 * (1 + math.cos(math.pi * p)) * 0.9)
    assert get_lr("linear", 60, lr, warm, total, frac) == pytest.approx(0.55)
    assert get_lr("linear", 110, lr, warm, total, frac) == pytest.approx(0.1)
    assert get_lr("constant", 100, lr, warm, total, frac) == 1.0
    # wsd: flat until 80% of the steps (88), then 1 - sqrt decay over the last 20% (22 steps)
    assert get_lr("wsd", 87, lr, warm, total, frac) == 1.0
    assert get_lr("wsd", 88, lr, warm, total, frac) == pytest.approx(1.0)
    assert get_lr("wsd", 99, lr, warm, total, frac) == pytest.approx(
        0.1 + (1 - math.sqrt(11 / 22)) * 0.9)
    assert get_lr("wsd", 110, lr, warm, total, frac) == pytest.approx(0.1)


def test_outlier_detector_zscore():
    d = OutlierDetector(window=4)
    assert all(math.isnan(d.update(x)) for x in (1.0, 2.0, 3.0, 4.0))
    z = d.update(10.0)
    mean, std = 2.5, math.sqrt(1.25)
    assert z == pytest.approx((10 - mean) / std)
    s = d.state_dict()
    d2 = OutlierDetector(window=4)
    d2.load_state_dict(s)
    assert d2.update(3.0) == d.update(3.0)


# ---------------------------------------------------------------------------------------
# bad input: one line, exit code 2, before anything is allocated

@pytest.mark.parametrize("args,needle", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["-b", "abc"], "-b"),
    (["-b", "0"], "-b: expected an integer >= 1, got 0"),
    (["-t", "64"], "-t: expected at most the model's maxT 32, got 64"),
    (["-d", "100"], "-d: total batch 100 must be divisible by B*T*processes"),
    (["-i", "/nonexistent/train_*.bin"], "no token shards match '/nonexistent/train_*.bin'"),
    (["-k", "exp"], "-k: expected cosine|linear|constant|wsd"),
    (["-ge", "3"], "-ge: expected -1, 0, 1 or 2, got 3"),
    (["-e", "d13"], "d13"),
    (["--engine", "jax"], "--engine"),
    (["-q", "2"], "-q: expected a fraction in [0, 1]"),
    (["-s", "2"], "outside the model's vocabulary V = 512"),  # EOT 50256 > V: before step 1
    (["-e", "L=2,C=32,NH=2,T=32", "-s", "2", "--prompt", "a " * 40],
     "expected fewer than the model's maxT 32"),
])
def test_bad_input_exit_2(shards, tmp_path, capsys, args, needle):
    rc = cli_main(["train", *base_args(shards, tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written


def test_bad_shard_fails_before_training(shards, tmp_path, capsys):
    bad = tmp_path / "bad_000001.bin"
    bad.write_bytes((shards / "train_000001.bin").read_bytes()[:-10])
    rc = cli_main(["train", *base_args(shards, tmp_path / "o"), "-i", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "file size" in err


def test_token_ids_past_the_vocabulary_name_the_shard(shards, tmp_path, capsys):
    big = tmp_path / "big_000001.bin"
    write_shard(big, np.full(3000, 600))  # ids a V=512 model does not have
    rc = cli_main(["train", *base_args(shards, tmp_path / "o"), "-i", str(big)])
    err = capsys.readouterr().err
    assert rc == 2 and str(big) in err and "V = 512" in err, err



def test_bad_token_mid_run_saves_the_last_step_first(shards, tmp_path, capsys):
    """An id >= V in step 3's second micro-batch (B*T = 32 tokens, 2 per step, no shuffle):
    one line naming the shard, the token and the checkpoint of step 3, exit 2; after the
    shard is fixed, -y 1 gives the uninterrupted run's losses (nothing lost)."""
    good = np.fromfile(shards / "train_000001.bin", dtype="<u2", offset=1024)
    shard = tmp_path / "mine_000001.bin"
    bad = good.copy()
    bad[3 * 64 + 40] = 600  # V = 512
    write_shard(shard, bad)
    args = lambda out, *more: [*base_args(shards, out, steps=6), "-i", str(shard),  # noqa: E731
                               "--shuffle", "0", *more]
    r = run_cli(args(tmp_path / "o"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for needle in (str(shard), f"token {3 * 64 + 40}", "got 600", "saved at step 3",
                   "model_00000003.bin", "-y 1"):
        assert needle in r.stderr, r.stderr
    assert ckpt.complete_steps(tmp_path / "o") == [3]
    write_shard(shard, good)
    assert cli_main(["train", *args(tmp_path / "o", "-y", "1")]) == 0
    assert cli_main(["train", *args(tmp_path / "ref")]) == 0
    capsys.readouterr()
    ref = train_losses(tmp_path / "ref")
    assert train_losses(tmp_path / "o") == ref and sorted(ref) == list(range(6))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bad", [65535, 512, -1])  # uint16 max, a padded-vocab row, negative
def test_engines_range_check_token_ids(engine, bad):
    from llmpy.config import from_descriptor
    from llmpy.engines import make_engine
    from llmpy.errors import LlmpyError
    eng = make_engine(engine, from_descriptor(MODEL))
    x = np.zeros((1, 4), dtype=np.int64)
    x[0, 2] = bad
    with pytest.raises(LlmpyError, match="token ids"):
        eng.forward(x, np.zeros((1, 4), dtype=np.int64))


def test_bad_input_subprocess_has_no_traceback(shards, tmp_path):
    r = run_cli([*base_args(shards, tmp_path / "o"), "-b", "abc"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "-b" in r.stderr


# ---------------------------------------------------------------------------------------
# logs and checkpoints

def test_main_log_format_and_learning(shards, tmp_path):
    out = tmp_path / "o"
    s = train(*parse_args(base_args(shards, out, steps=16, extra=["-l", "1e-2"])))
    lines = (out / "main.log").read_text().splitlines()
    train_re = re.compile(r"^s:\d+ trl:\d+\.\d{4} lr:\d+\.\d{6} norm:\d+\.\d{2}$")
    val_re = re.compile(r"^s:\d+ tel:\d+\.\d{4}$")
    assert sum(bool(train_re.match(x)) for x in lines) == 16
    assert sum(bool(val_re.match(x)) for x in lines) == 5  # steps 0, 4, 8, 12, 16
    assert all(train_re.match(x) or val_re.match(x) for x in lines)
    assert lines[0] == f"s:0 tel:{s['val_losses'][0]:.4f}"
    assert s["losses"][15] < s["losses"][0] - 0.5  # it learns the repeated phrase
    assert ckpt.latest_step(out) == 16  # a checkpoint at the end


def test_retention_keeps_newest_and_majors(shards, tmp_path):
    out = tmp_path / "o"
    train(*parse_args(base_args(shards, out, steps=7, extra=["-n", "1", "-nk", "2", "-nm",
                                                                 "3", "-v", "0"])))
    assert ckpt.complete_steps(out) == [3, 6, 7]
    assert sorted(p.name for p in out.glob("model_*.bin")) == [
        "model_00000003.bin", "model_00000006.bin", "model_00000007.bin"]


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_and_resume_is_bit_exact(shards, tmp_path, engine):
    k = 4
    args_a = base_args(shards, tmp_path / "a", engine, steps=2 * k, extra=["-n", str(k), "-y",
                                                                          "1"])
    args_b = base_args(shards, tmp_path / "b", engine, steps=2 * k, extra=["-n", str(k), "-y",
                                                                          "1"])
    ra = run_cli(args_a)
    assert ra.returncode == 0, ra.stderr
    # run B dies by SIGKILL right after its step-k checkpoint, then is relaunched as it was
    rb = run_cli(args_b, {"LLMPY_TEST_KILL": f"after_checkpoint:{k}"})
    assert rb.returncode == -9
    assert ckpt.latest_step(tmp_path / "b") == k
    rb2 = run_cli(args_b)
    assert rb2.returncode == 0, rb2.stderr
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [la[s] for s in range(k, 2 * k)] == [lb[s] for s in range(k, 2 * k)]
    ma = (tmp_path / "a" / f"model_{2 * k:08d}.bin").read_bytes()
    mb = (tmp_path / "b" / f"model_{2 * k:08d}.bin").read_bytes()
    assert ma == mb
    sa = read_state(ckpt.state_path(tmp_path / "a", 2 * k, 0))
    sb = read_state(ckpt.state_path(tmp_path / "b", 2 * k, 0))
    assert np.array_equal(sa["m"], sb["m"]) and np.array_equal(sa["v"], sb["v"])


def test_resume_of_an_llmc_state_file_continues_its_data(shards, tmp_path):
    """A state file as llm.c writes it (no llm.py JSON after the body): the data continue at
    the shard and sample in its header, so the resumed steps equal an uninterrupted run's."""
    from llmpy.formats import write_state
    k = 4
    ra = run_cli(base_args(shards, tmp_path / "a", steps=2 * k,
                           extra=["-n", str(k), "--shuffle", "0"]))
    assert ra.returncode == 0, ra.stderr
    b = tmp_path / "b"
    b.mkdir()
    for name in (f"model_{k:08d}.bin", f"DONE_{k:08d}"):
        (b / name).write_bytes((tmp_path / "a" / name).read_bytes())
    st = read_state(ckpt.state_path(tmp_path / "a", k, 0))
    assert st["sample_idx"] == 2 * k - 1  # the last sample drawn (2 micro-batches a step)
    write_state(ckpt.state_path(b, k, 0), step=k, m=st["m"], v=st["v"], master=st["master"],
                shard_idx=st["shard_idx"], sample_idx=st["sample_idx"])
    assert read_state(ckpt.state_path(b, k, 0))["extra"] is None
    rb = run_cli(base_args(shards, b, steps=2 * k, extra=["-n", str(k), "--shuffle", "0",
                                                         "-y", "1"]))
    assert rb.returncode == 0, rb.stderr
    la, lb = train_losses(tmp_path / "a"), train_losses(b)
    assert [la[s] for s in range(k, 2 * k)] == [lb[s] for s in range(k, 2 * k)]


def test_crash_while_checkpointing_resumes_from_previous(shards, tmp_path):
    k = 4
    args = base_args(shards, tmp_path / "o", steps=3 * k, extra=["-n", str(k), "-y", "1"])
    r = run_cli(args, {"LLMPY_TEST_KILL": f"in_checkpoint:{2 * k}"})
    assert r.returncode == -9
    out = tmp_path / "o"
    assert (out / f"model_{2 * k:08d}.bin").exists()  # half a checkpoint: no state, no DONE
    assert not (out / f"DONE_{2 * k:08d}").exists()
    assert ckpt.latest_step(out) == k
    r2 = run_cli(args)
    assert r2.returncode == 0, r2.stderr
    assert f"resume from {k}" in r2.stdout
    ref = tmp_path / "ref"
    train(*parse_args(base_args(shards, ref, steps=3 * k, extra=["-n", str(k)])))
    assert (ref / f"model_{3 * k:08d}.bin").read_bytes() == \
        (out / f"model_{3 * k:08d}.bin").read_bytes()


class NanOnce:
    """Wraps an engine; the backward of optimizer step `at` gets a NaN gradient scale, so every
    gradient is NaN (as if the model blew up at that step)."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0
        self.params_around = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def backward(self, grad_scale=1.0):
        nan = self.calls == self.at
        self.calls += 1
        self.inner.backward(float("nan") if nan else grad_scale)

    def step(self, lr, t, **kw):
        self.inner.step(lr, t, **kw)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_never_reaches_parameters(shards, tmp_path, monkeypatch, policy):
    import llmpy.engines as engines
    real = engines.make_engine
    made = []

    def make(name, config, **opts):
        e = NanOnce(real(name, config, **opts), at=3)
        made.append(e)
        return e
    monkeypatch.setattr(engines, "make_engine", make)
    snapshots = []
    args = base_args(shards, tmp_path / "o", steps=6, extra=["--nan-policy", policy, "-d", "32",
                                                             "-v", "0"])
    rc, given = parse_args(args)
    if policy == "stop":
        from llmpy.errors import TrainingStopped
        with pytest.raises(TrainingStopped, match="step 3"):
            train(rc, given)
        params = made[0].get_params()
        assert np.isfinite(params).all()
        return
    orig_step = NanOnce.step

    def recording_step(self, lr, t, **kw):
        snapshots.append(t)
        orig_step(self, lr, t, **kw)
    monkeypatch.setattr(NanOnce, "step", recording_step)
    s = train(rc, given)
    assert s["skipped"] == [3]
    assert 4 not in snapshots  # AdamW t = step + 1 never ran for step 3
    assert np.isfinite(made[0].get_params()).all()
    assert np.isfinite(read_model(tmp_path / "o" / "model_00000006.bin")[1]).all()
    assert all(np.isfinite(v) for st, v in s["losses"].items() if st != 3)


def test_overfit_single_batch(shards, tmp_path):
    s = train(*parse_args(base_args(shards, tmp_path / "o", steps=20,
                                    extra=["-a", "1", "-l", "1e-2", "-v", "0"])))
    assert s["losses"][19] < 0.5 * s["losses"][0]


def test_overfit_trains_on_the_first_val_batch(shards, tmp_path):
    """llm.c's -a 1 sets the train pattern to the val pattern, unshuffled: the loss of step 0
    is the val loss of the first val batch, exactly (same parameters, same tokens)."""
    s = train(*parse_args(base_args(shards, tmp_path / "o", steps=3,
                                    extra=["-a", "1", "-v", "3", "-m", "1"])))
    assert s["losses"][0] == s["val_losses"][0]
    assert s["losses"][1] != s["losses"][0]  # it trains


def test_main_job_smoke(tmp_path):
    """`llmpy train` with no data flags: the main job on embedded tinyshakespeare (shortened)."""
    env = {"LLMPY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "llmpy", "train", "-x", "3", "-v", "3", "-m", "1",
                        "-o", str(tmp_path / "out"), "-g", "8"], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "main job done" in r.stdout and "sample:" in r.stdout
    assert (tmp_path / "cache" / "tinyshakespeare" / "tiny_shakespeare_train.bin").exists()
    assert ckpt.latest_step(tmp_path / "out") == 3


def test_hellaswag_in_the_loop_logs_eval_lines(shards, tmp_path):
    from llmpy.formats import write_eval
    rng = np.random.default_rng(5)
    examples = [{"label": int(rng.integers(0, 4)), "ctx": rng.integers(0, 512, 5).tolist(),
                 "endings": [rng.integers(0, 512, int(rng.integers(1, 4))).tolist()
                             for _ in range(4)]} for _ in range(6)]
    hs = tmp_path / "hs.bin"
    write_eval(hs, examples)
    out = tmp_path / "o"
    train(*parse_args(base_args(shards, out, steps=4, extra=["-h", "1", "--hellaswag-file",
                                                             str(hs), "-b", "4", "-d", "64"])))
    evals = [x for x in (out / "main.log").read_text().splitlines() if "eval:" in x]
    assert len(evals) == 2  # steps 0 and 4
    assert all(re.match(r"^s:\d+ eval:\d\.\d{4}$", x) for x in evals)
    # 6 examples: the accuracy is a multiple of 1/6
    acc = float(evals[-1].split("eval:")[1])
    assert abs(acc * 6 - round(acc * 6)) < 1e-3


def test_missing_hellaswag_file_is_exit_2(shards, tmp_path, capsys):
    rc = cli_main(["train", *base_args(shards, tmp_path / "o"), "-h", "1", "--hellaswag-file",
                   str(tmp_path / "nope.bin")])
    assert rc == 2 and "llmpy data hellaswag" in capsys.readouterr().err
