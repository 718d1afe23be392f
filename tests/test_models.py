"""The one model loader (llmpy.models): every spec kind resolves the same way for train -e,
sample, eval and export, and the commands take the same specs as typed by a user."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from llmpy.config import from_descriptor
from llmpy.errors import LlmpyError
from llmpy.formats import write_model, write_shard
from llmpy.init import init_params
from llmpy.models import load_model, peek_config, resolve

MODEL = "L=2,C=32,NH=2,T=32,V=512"


def llmpy(*args):
    return subprocess.run([sys.executable, "-m", "llmpy", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-step training run (numpy engine) and its data."""
    d = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    write_shard(d / "train_000001.bin", rng.integers(0, 512, size=4000))
    write_shard(d / "val_000000.bin", rng.integers(0, 512, size=2000))
    r = llmpy("train", "-i", str(d / "train_*.bin"), "-j", str(d / "val_*.bin"), "-e", MODEL,
              "-b", "2", "-t", "16", "-x", "2", "-v", "0", "-s", "0", "-o", str(d / "out"))
    assert r.returncode == 0, r.stderr
    return d


def test_every_spec_kind_resolves(run_dir, tmp_path):
    assert resolve(MODEL) == ("descriptor", MODEL)
    f = tmp_path / "m.bin"
    write_model(f, from_descriptor(MODEL), init_params(from_descriptor(MODEL), 1))
    assert resolve(str(f)) == ("file", str(f))
    kind, where = resolve(str(run_dir / "out"))
    assert kind == "checkpoint" and where.endswith("model_00000002.bin")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve(str(hf))[0] == "hf"
    for name in ("gpt2", "gpt2-xl", "openai-community/gpt2"):  # hub names, owner/name too
        assert resolve(name) == ("hf", name)
    assert peek_config(str(run_dir / "out")) == from_descriptor(MODEL)
    assert peek_config(str(f)) == load_model(str(f))[0]


@pytest.mark.parametrize("spec, what", [("nope.bin", "not a file or directory"),
                                        ("a/b/c", "not a file or directory")])
def test_bad_spec_names_itself(spec, what):
    with pytest.raises(LlmpyError, match=what):
        resolve(spec, flag="-e")


def test_dir_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(LlmpyError, match="no complete checkpoint"):
        resolve(str(tmp_path))


def test_commands_take_a_run_dir_as_train_e_does(run_dir, tmp_path):
    out = str(run_dir / "out")
    r = llmpy("eval", "val", out, "--file", str(run_dir / "val_*.bin"), "-t", "16", "-m", "2")
    assert r.returncode == 0, r.stderr
    assert "val loss:" in r.stdout
    r = llmpy("export", "hf", out, str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert "model_00000002.bin" in r.stdout and (tmp_path / "hf" / "config.json").is_file()
    # the exported dir is itself a spec: eval it, and continue training from it
    r = llmpy("eval", "val", str(tmp_path / "hf"), "--file", str(run_dir / "val_*.bin"),
              "-t", "16", "-m", "2")
    assert r.returncode == 0, r.stderr
    r = llmpy("export", "hf", MODEL, str(tmp_path / "hf2"))  # a descriptor too
    assert r.returncode == 0, r.stderr
    r = llmpy("export", "hf", str(tmp_path / "missing"), str(tmp_path / "hf3"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
