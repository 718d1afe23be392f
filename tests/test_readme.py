"""The README stays true (issue 18 item 7): its "What next" commands run as printed on the
main job's output dir (a shortened main job), and its numbers for the main job hold."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def what_next_commands() -> list[str]:
    text = README.read_text()
    block = text.split("### What next", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [ln.split("  #")[0].strip() for ln in block.strip().splitlines()]


def test_main_job_non_embedding_parameters():
    from llmpy.config import from_descriptor
    from llmpy.settings import MAIN_JOB_CPU
    c = from_descriptor(MAIN_JOB_CPU["init"])
    non_embedding = c.num_params - c.padded_vocab_size * c.channels
    text = " ".join(README.read_text().split())
    assert f"{non_embedding / 1e6:.2f}M non-embedding parameters" in text
    assert f"all {c.num_params / 1e6:.2f}M but" in text


@pytest.mark.slow  # the main job's model (7M parameters) through six commands
def test_what_next_commands_run_on_the_main_job_output(tmp_path):
    env = dict(os.environ)  # the user's cache, as the README's commands use it
    # the main job as the README runs it, shortened to 2 steps
    r = subprocess.run([sys.executable, "-m", "llmpy", "train", "-x", "2", "-v", "2", "-m", "1",
                        "-g", "4"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    cmds = what_next_commands()
    assert [c.split()[:2] for c in cmds][:4] == [["llmpy", "sample"], ["llmpy", "eval"],
                                                ["llmpy", "plot"], ["llmpy", "export"]]
    for cmd in cmds:
        argv = shlex.split(cmd)
        if argv[0] == "python" and "transformers" in cmd:
            pytest.importorskip("transformers")
        if argv[0] == "llmpy":
            argv = [sys.executable, "-m", "llmpy", *argv[1:]]
            argv = [("3" if a == "800" else a) for a in argv]  # a short 'longer' run
        else:
            argv[0] = sys.executable
        r = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
        assert r.returncode == 0, (cmd, r.stderr)
        if "sample" in argv:
            assert r.stdout.startswith("ROMEO:") and "model out/model_00000002.bin" in r.stderr
        if "eval" in argv:
            assert re.search(r"val loss: [\d.]+ \(\d+ batches of 16x64", r.stdout)
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "out800" / "DONE_00000003").exists()
