"""Run settings (llmpy.settings) as a user meets them (issue 18): defaults that do not depend
on other flags, --help showing them, run_config.json saved and replayed by --config, and the
messages for misspelled flags, `-h` without a value and the triton engine without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from llmpy.errors import LlmpyError
from llmpy.formats import write_shard
from llmpy.settings import MAIN_JOB_CPU, RUN_CONFIG_FILE, defaults, parse_args

MODEL = "L=2,C=32,NH=2,T=32,V=512"


def llmpy(*args, cwd=None):
    env = {**os.environ, "LLMPY_CACHE": os.environ.get("LLMPY_CACHE", "")} \
        if os.environ.get("LLMPY_CACHE") else None
    return subprocess.run([sys.executable, "-m", "llmpy", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_shard(d / "train_000001.bin", rng.integers(0, 512, size=4000))
    write_shard(d / "val_000000.bin", rng.integers(0, 512, size=2000))
    return d


def tiny(data, out, *extra):
    return ["-i", str(data / "train_*.bin"), "-j", str(data / "val_*.bin"), "-e", MODEL,
            "-b", "2", "-t", "16", "-x", "3", "-v", "3", "-m", "2", "-o", str(out), *extra]


# ---------------------------------------------------------------------------------------
# item 1: no hidden mode switch

@pytest.mark.parametrize("has_cuda", [False, True])
def test_defaults_do_not_depend_on_other_flags(has_cuda):
    plain, _ = parse_args([], has_cuda=has_cuda)
    with_i, given = parse_args(["-i", "x_*.bin"], has_cuda=has_cuda)
    diff = {k for k, v in asdict(plain).items() if asdict(with_i)[k] != v}
    assert diff == {"train_data"} and given == {"train_data"}
    assert asdict(plain) == defaults(has_cuda)


def test_help_shows_every_default():
    r = llmpy("train", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for value in ("(default: 0.001)", f"(default: {MAIN_JOB_CPU['init']})", "(default: 400)",
                  "(default: out)", "(default: embedded tinyshakespeare train)"):
        assert value in text, value
    assert text.count("(default:") >= 50  # every flag


def test_a_run_that_saves_nothing_says_so(data, tmp_path):
    r = llmpy("train", *tiny(data, ""), "-x", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "this run saves nothing" in r.stdout
    assert not any(tmp_path.iterdir())
    assert "main job done" not in r.stdout and "training done" in r.stdout


# ---------------------------------------------------------------------------------------
# item 3: the saved run config, and --config

def test_run_config_saved_and_replayed_with_flags_overriding(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = llmpy("train", *tiny(data, a, "-l", "2e-3", "-u", "1"))
    assert r.returncode == 0, r.stderr
    record = json.loads((a / RUN_CONFIG_FILE).read_text())
    assert record["settings"]["lr"] == 2e-3 and record["settings"]["init"] == MODEL
    assert record["engine"] == "numpy" and record["device"] == "cpu"
    assert "numpy" in record["versions"] and record["val_data"] == str(data / "val_*.bin")
    # the replay: same settings except the flags given, so the same losses
    r = llmpy("train", "--config", str(a / RUN_CONFIG_FILE), "-o", str(b))
    assert r.returncode == 0, r.stderr
    replay = json.loads((b / RUN_CONFIG_FILE).read_text())["settings"]
    assert {k for k, v in replay.items() if record["settings"][k] != v} == {"out_dir"}
    assert (a / "main.log").read_text() == (b / "main.log").read_text()
    r = llmpy("train", "--config", str(a / RUN_CONFIG_FILE), "-o", str(tmp_path / "c"),
              "-x", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "c" / RUN_CONFIG_FILE).read_text())["settings"]["max_steps"] == 1


def test_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{"lrr": 0.1}')
    r = llmpy("train", "--config", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "unknown setting 'lrr'" in r.stderr and "did you mean 'lr'" in r.stderr
    bad.write_text('{"lr": "fast"}')
    with pytest.raises(LlmpyError, match="'lr' expected float"):
        parse_args(["--config", str(bad)])
    r = llmpy("train", "--config", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "no such file" in r.stderr


# ---------------------------------------------------------------------------------------
# item 2 and 5: eval, sample and export on a run dir use its data and settings, and say
# which checkpoint they loaded

def test_eval_sample_export_on_a_run_dir(data, tmp_path):
    out = tmp_path / "run"  # GPT-2's vocabulary, so that sampling can start from EOT
    r = llmpy("train", *tiny(data, out, "-g", "5", "-e", "L=1,C=32,NH=2,T=32"))
    assert r.returncode == 0, r.stderr
    r = llmpy("eval", "val", str(out), "-m", "2")
    assert r.returncode == 0, r.stderr
    assert f"model: {out}/model_00000003.bin" in r.stdout
    assert "2 batches of 2x16" in r.stdout and str(data / "val_*.bin") in r.stdout
    r = llmpy("sample", str(out), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert f"model {out}/model_00000003.bin" in r.stderr
    r = llmpy("export", "debug-state", "--model", str(out), "--out", str(tmp_path / "ds"),
              "-b", "1", "-t", "8", "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert f"shard: {data}/val_000000.bin" in r.stdout and "model_00000003.bin" in r.stdout
    r = llmpy("eval", "val", str(tmp_path / "ds" / "model.bin"))  # a file: no run config
    assert r.returncode == 2 and "pass --file GLOB" in r.stderr


def test_sample_shows_a_document_break():
    from llmpy.config import EOT
    from llmpy.sample import DOC_BREAK, detokenize
    from llmpy.tokenizer import get_tokenizer
    tok = get_tokenizer()
    ids = tok.encode("Hello") + [EOT] + tok.encode("World")
    text = detokenize(tok, ids)
    assert text == "Hello" + DOC_BREAK + "World" and "<|endoftext|>" not in text


# ---------------------------------------------------------------------------------------
# item 6: messages

@pytest.mark.parametrize("args, needle", [
    (["--max-step", "3"], "did you mean --max-steps?"),
    (["--lr-warmup", "3"], "unrecognized arguments"),
    (["-h"], "for help use llmpy train --help"),
    (["--engine", "triton", "-x", "1"], "--engine triton needs CUDA, and torch sees no CUDA"),
])
def test_messages_point_the_way(args, needle):
    r = llmpy("train", *args)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "got --device" not in r.stderr


def test_resume_reads_the_saved_run_config(data, tmp_path):
    """`-y 1 -o OUT` alone continues OUT's run with its settings: the same losses as the run
    done in one go."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    flags = tiny(data, whole, "-k", "constant", "-l", "2e-3", "-x", "4", "-n", "2")
    assert llmpy("train", *flags).returncode == 0
    first = tiny(data, part, "-k", "constant", "-l", "2e-3", "-x", "2", "-n", "2")
    assert llmpy("train", *first).returncode == 0
    r = llmpy("train", "-y", "1", "-o", str(part), "-x", "4")
    assert r.returncode == 0, r.stderr
    assert f"resume: settings from {part / RUN_CONFIG_FILE}" in r.stdout
    assert "L=2 C=32" in r.stdout and "(resume from 2)" in r.stdout
    def records(d):
        return [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    want = {r["step"]: r["train_loss"] for r in records(whole) if "train_loss" in r}
    got = {r["step"]: r["train_loss"] for r in records(part) if "train_loss" in r}
    assert got == want
