"""Issue 13: every llm.c file kind, truncated and corrupted, through the command a user types.

Six kinds (llmpy/formats.py): model (v3 fp32 and v5 bf16, read by `train -e`), optimizer
state (`train -y 1` on a run dir), token shard (`train -i`), tokenizer (`sample
--tokenizer`), eval file (`eval hellaswag --file`) and debug state (`eval debug-state
--file`); the Hugging Face dir has its own suite (tests/test_hf.py). Each damage must give
exit code 2 and one line on stderr naming the damaged file, no traceback, before any
training step. One damage per kind runs as a subprocess (`python -m llmpy ...`), the others
through the same CLI entry point in this process, to stay fast.
"""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from llmpy import formats as F
from llmpy.cli import main as cli_main
from llmpy.config import ModelConfig

CFG = ModelConfig(max_seq_len=16, vocab_size=64, num_layers=1, num_heads=2, channels=16)
MODEL = "L=1,C=16,NH=2,T=16,V=64"  # the same shape, as a descriptor


# ----------------------------------------------------------------------------------------
# the damages: each takes a good file's bytes and the kind's count slot

def _set(data: bytes, slot: int, value: int) -> bytes:
    header = np.frombuffer(data[:F.HEADER_BYTES], dtype="<i4").copy()
    header[slot] = value
    return header.tobytes() + data[F.HEADER_BYTES:]


def _scribble(data: bytes, _slot) -> bytes:
    """Random bytes over header slots 1..49 (seeded: the same damage every run)."""
    junk = np.random.default_rng(13).integers(0, 256, size=49 * 4, dtype=np.uint8).tobytes()
    return data[:4] + junk + data[4 + len(junk):]


GENERIC = {  # name -> (damage, what the error line must say besides the file's name)
    "empty": (lambda d, s: b"", "size"),
    "cut in the header": (lambda d, s: d[:700], "size"),
    "cut in the body": (lambda d, s: d[:-3], ""),
    "wrong magic": (lambda d, s: _set(d, 0, 20240000), "magic"),
    "wrong version": (lambda d, s: _set(d, 1, 99), "version"),
    "count huge": (lambda d, s: _set(d, s, 2**31 - 1), ""),
    "count negative": (lambda d, s: _set(d, s, -1), ""),
    "longer than the header says": (lambda d, s: d + bytes(4), ""),
    "header scribbled": (_scribble, ""),
}


def check_one_line(rc, out, err, path, needle=""):
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err, err
    assert needle in err, err
    assert not re.search(r"^step\s+\d+/", out, re.M), out  # no training step ran


def refused_in_one_line(argv, path, needle, what, subprocess_run, capsys):
    """Run llmpy `argv` (as a subprocess, or in this process) and check it refuses `path` in
    one line; `what` names the case in a failure."""
    if subprocess_run:
        r = subprocess.run([sys.executable, "-m", "llmpy", *argv], capture_output=True,
                           text=True, timeout=120)
        rc, out, err = r.returncode, r.stdout, r.stderr
    else:
        capsys.readouterr()
        rc = cli_main(argv)
        out, err = capsys.readouterr()
    try:
        check_one_line(rc, out, err, path, needle)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def run_damages(tmp_path, capsys, good: bytes, name: str, slot: int, command, damages):
    """Write each damaged copy as tmp_path/<i>/name and run `command(path)` (an argv for
    llmpy) on it: the first in a subprocess, the rest in this process."""
    for i, (what, (damage, needle)) in enumerate(damages.items()):
        path = tmp_path / str(i) / name
        path.parent.mkdir()
        path.write_bytes(damage(good, slot))
        refused_in_one_line(command(path), path, needle, f"{name}, {what}", i == 0, capsys)


# ----------------------------------------------------------------------------------------
# good files of every kind, tiny

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    F.write_model(d / "model.bin", CFG, rng.normal(0, 0.02, CFG.num_params), "fp32")
    F.write_model(d / "model_bf16.bin", CFG, rng.normal(0, 0.02, CFG.num_params), "bf16")
    F.write_shard(d / "train_000001.bin", np.tile(rng.integers(0, 64, 37), 40))
    F.write_shard(d / "val_000000.bin", rng.integers(0, 64, 600))
    F.write_tokenizer(d / "tokenizer.bin", [bytes([97 + i % 26]) * (1 + i // 26)
                                            for i in range(64)], eot=63)
    F.write_eval(d / "eval.bin", [{"label": i % 4, "ctx": [1, 2, 3 + i],
                                   "endings": [[4, 5], [6], [7, 8, 9], [10 + i]]}
                                  for i in range(3)])
    B, T = 2, 8
    x = rng.integers(0, 64, (B, T))
    F.write_debug_state(d / "debug_state.bin", CFG, x, np.roll(x, -1, 1),
                        rng.normal(size=(B, T, 64)), 4.1, rng.normal(size=CFG.num_params))
    return d


def train_args(files, out, *more):
    return ["train", "-i", str(files / "train_*.bin"), "-j", str(files / "val_*.bin"),
            "-b", "2", "-t", "16", "-d", "32", "-x", "4", "-v", "2", "-m", "1", "-s", "0",
            "--engine", "numpy", "-o", str(out), *more]


# ----------------------------------------------------------------------------------------
# one test per kind

@pytest.mark.parametrize("name", ["model.bin", "model_bf16.bin"])
def test_damaged_model_file(files, tmp_path, capsys, name):
    damages = {**GENERIC,
               "channels not divisible by heads": (lambda d, s: _set(d, 6, 15), "channels"),
               "padded vocab below vocab": (lambda d, s: _set(d, 7, 8), "padded_vocab")}
    run_damages(tmp_path, capsys, (files / name).read_bytes(), name, 4,
                lambda p: train_args(files, p.parent / "out", "-e", str(p)), damages)


def test_damaged_shard(files, tmp_path, capsys):
    bad_id = (lambda d, s: d[:F.HEADER_BYTES + 10] + np.uint16(64).tobytes() +
              d[F.HEADER_BYTES + 12:])
    damages = {**GENERIC, "token id >= V": (bad_id, "V = 64")}
    # ids are checked as batches are read (a mid-run one: test_train); unshuffled, this
    # one is in the first batch
    run_damages(tmp_path, capsys, (files / "train_000001.bin").read_bytes(), "train_000001.bin",
                2, lambda p: [*train_args(files, p.parent / "out", "-e", MODEL), "-i", str(p),
                              "--shuffle", "0"], damages)


@pytest.fixture(scope="module")
def run_dir(files, tmp_path_factory):
    """A finished 2-step run with a checkpoint at step 2 (its state file gets damaged)."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert cli_main(train_args(files, out, "-e", MODEL, "-x", "2", "-n", "2")) == 0
    return out


def test_damaged_state_file(files, run_dir, tmp_path, capsys):
    name = "state_00000002_00000.bin"
    good = (run_dir / name).read_bytes()
    damages = {**GENERIC,
               "JSON side data damaged": (lambda d, s: d[:-1] + b"!", "JSON"),
               "master flag out of range": (lambda d, s: _set(d, 4, 7), "use_master_weights"),
               "rank past nproc": (lambda d, s: _set(d, 3, 5), "rank")}

    for i, (what, (damage, needle)) in enumerate(damages.items()):
        path = tmp_path / str(i) / "out" / name
        path.parent.parent.mkdir()
        shutil.copytree(run_dir, path.parent)
        path.write_bytes(damage(good, F.STATE_EXTRA_LEN))
        argv = train_args(files, path.parent, "-e", MODEL, "-y", "1", "-x", "4")
        refused_in_one_line(argv, path, needle, f"state, {what}", i == 0, capsys)
        assert path.read_bytes() == damage(good, F.STATE_EXTRA_LEN)  # left as it was


def test_damaged_tokenizer_file(files, tmp_path, capsys):
    first_len = F.HEADER_BYTES  # the first token's length byte
    damages = {**GENERIC,
               "token of length 0": (lambda d, s: d[:first_len] + b"\0" + d[first_len + 1:],
                                     "length"),
               "eot past the vocabulary": (lambda d, s: _set(d, 3, 64), "eot"),
               "fewer tokens than the model's V": (
                   lambda d, s: _set(_set(d[:-(1 + 3)], 2, 63), 3, 0), "V = 64")}
    run_damages(tmp_path, capsys, (files / "tokenizer.bin").read_bytes(), "tokenizer.bin", 2,
                lambda p: ["sample", str(files / "model.bin"), "-g", "2", "--tokenizer",
                           str(p)], damages)


def test_damaged_eval_file(files, tmp_path, capsys):
    body = F.HEADER_BYTES
    damages = {**GENERIC,
               "delimiter overwritten": (lambda d, s: d[:body] + np.uint16(7).tobytes() +
                                         d[body + 2:], "delimiter"),
               "token id >= V": (lambda d, s: d[:body + 12] + np.uint16(64).tobytes() +
                                 d[body + 14:], "V = 64"),
               "longest example too small": (lambda d, s: _set(d, 3, 4), "byte count")}
    run_damages(tmp_path, capsys, (files / "eval.bin").read_bytes(), "eval.bin", 2,
                lambda p: ["eval", "hellaswag", str(files / "model.bin"), "--file", str(p)],
                damages)


def test_damaged_debug_state(files, tmp_path, capsys):
    damages = {**GENERIC,
               "T past the model's maxT": (lambda d, s: _set(d, 3, 17), "T"),
               "token id >= V": (lambda d, s: d[:F.HEADER_BYTES] + np.int32(64).tobytes() +
                                 d[F.HEADER_BYTES + 4:], "")}
    run_damages(tmp_path, capsys, (files / "debug_state.bin").read_bytes(), "debug_state.bin",
                2, lambda p: ["eval", "debug-state", str(files / "model.bin"), "--file",
                              str(p)], damages)


def test_good_files_pass_the_same_commands(files, capsys):
    """The commands above accept the undamaged files: only the damage is refused."""
    from pathlib import Path
    golden = Path(__file__).parent / "fixtures" / "golden_tiny"
    assert cli_main(["sample", str(files / "model.bin"), "-g", "3", "--tokenizer",
                     str(files / "tokenizer.bin")]) == 0
    assert cli_main(["eval", "hellaswag", str(files / "model.bin"), "--file",
                     str(files / "eval.bin")]) == 0
    assert cli_main(["eval", "debug-state", str(golden)]) == 0  # llm.c's test_gpt2: OK
    assert capsys.readouterr().out.rstrip().endswith("OK")
    # a debug state of other numbers than the model's: NOT OK, exit 1
    assert cli_main(["eval", "debug-state", str(files / "model.bin")]) == 1
    assert "NOT OK" in capsys.readouterr().out


def test_tokenizer_whose_eot_the_model_lacks(files, tmp_path, capsys):
    """A well-formed tokenizer with more tokens than the model's V and its EOT past V: without
    --prompt the samples would start there, so it is refused naming the file; with a prompt
    the same file decodes."""
    path = tmp_path / "big_tokenizer.bin"
    F.write_tokenizer(path, [bytes([97 + i % 26]) * (1 + i // 26) for i in range(100)], eot=99)
    argv = ["sample", str(files / "model.bin"), "-g", "2", "--tokenizer", str(path)]
    capsys.readouterr()
    rc = cli_main(argv)
    out, err = capsys.readouterr()
    check_one_line(rc, out, err, path, "EOT token 99")
    assert cli_main(argv + ["--prompt", "!"]) == 0  # GPT-2 BPE id 0
