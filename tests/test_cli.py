"""`llmpy <command>` as typed: every bad input is one line on stderr and exit code 2, for
every command (argparse errors included), never a traceback or a usage block."""

import subprocess
import sys

import pytest

from llmpy import checkpoint as ckpt
from llmpy.cli import main as cli_main
from llmpy.formats import read_state, write_state

from test_train import base_args, run_cli, shards  # noqa: F401  (the module's fixture)


def llmpy(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmpy", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["sample", "nope.bin"], "'nope.bin': not a file or directory (no such file)"),
    (["sample", "L=2,C=32,NH=2,T=32", "--num-samples", "-1"], "--num-samples: expected >= 1"),
    (["sample", "L=2,C=32,NH=2,T=32", "--num-samples", "0"], "--num-samples: expected >= 1"),
    (["sample", "L=2,C=32,NH=2,T=32", "--bogus"], "unrecognized arguments: --bogus"),
    (["eval", "val", "L=2,C=32,NH=2,T=32", "-m", "0", "--file", "x"], "-m: expected -1"),
    (["eval", "hellaswag", "L=2,C=32,NH=2,T=32", "--limit", "-1"], "--limit: expected >= 0"),
    (["eval", "bogus", "d6"], "invalid choice: 'bogus'"),
    (["export", "nope"], "invalid choice: 'nope'"),
    (["data", "fineweb", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "-i", "."], "'.' is a directory; expected a glob of token shards"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    r = llmpy(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_export_hf_onto_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    r = llmpy("export", "hf", "L=2,C=32,NH=2,T=32", str(f))
    assert r.returncode == 2 and "is a file" in r.stderr, r.stderr
    assert f.read_text() == "mine"


@pytest.mark.parametrize("flags", [["--engine", "torch"], ["--device", "cuda"]])
def test_torch_engine_without_torch(shards, tmp_path, monkeypatch, capsys, flags):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert cli_main(["train", *base_args(shards, tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert "needs PyTorch, which is not installed" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra,needle", [([1, 2], "an object, got list"),
                                          ({"loader": [0]}, "'loader': expected an object"),
                                          ({"outliers": {"loss": 1}}, "'outliers'")])
def test_state_json_of_the_wrong_structure(shards, tmp_path, extra, needle):
    out = tmp_path / "o"
    assert run_cli(base_args(shards, out, steps=2, extra=["-n", "2"])).returncode == 0
    p = ckpt.state_path(out, 2, 0)
    st = read_state(p)
    write_state(p, step=2, m=st["m"], v=st["v"], master=st["master"], extra=extra)
    r = run_cli(base_args(shards, out, steps=4, extra=["-y", "1"]))
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
