"""`llmpy plot`: main.log parsing (restarts), baselines, the PNG, and its errors."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

from llmpy import plot
from llmpy.cli import main as cli_main
from llmpy.errors import LlmpyError
from llmpy.logger import Logger

LOGS = Path(__file__).parent / "fixtures" / "logs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------------------
# parsing

def test_parse_restart_small():
    run = plot.parse_log(LOGS / "restart_small")
    assert run.label == "restart_small"
    assert run.restarts == [2]
    assert run.skipped_lines == 1
    steps, losses = zip(*run.train)
    assert steps == (0, 1, 2, 3, 4, 5)
    # steps 2..4 come from the resumed attempt; step 5's loss is nan (a non-finite step)
    assert losses[:5] == (10.9876, 9.5, 8.15, 7.85, 7.35)
    assert math.isnan(losses[5])
    assert run.val == [(0, 10.99), (2, 8.05), (4, 7.45), (6, 7.1)]
    # the abandoned attempt's HellaSwag at step 4 is gone; the resumed run logged none there
    assert run.hellaswag == [(6, 0.27)]


def test_parse_synthetic_run_with_two_restarts():
    log = LOGS / "d12_lr6e-4" / "main.log"
    run = plot.parse_log(log)
    assert run.restarts == [500, 800]
    steps = [s for s, _ in run.train]
    assert steps == list(range(1200))                   # each step once, in order: no zig-zag
    assert [s for s, _ in run.val] == list(range(0, 1201, 100))
    assert [s for s, _ in run.hellaswag] == list(range(0, 1201, 100))
    # the later record of a step wins
    last = {}
    for line in log.read_text().splitlines():
        s, rest = line.split(" ", 1)
        if rest.startswith("trl:"):
            last[int(s[2:])] = float(rest.split()[0][4:])
    assert dict(run.train) == last


def test_parse_logger_output(tmp_path):
    """What the training loop's Logger writes, including a resume that appends."""
    out = tmp_path / "run"
    log = Logger(str(out), resume=False)
    for s in range(6):                                  # llm.c's order: val, eval, train
        if s % 4 == 0:
            log.val(s, 10.5 - s)
            log.hellaswag(s, 0.25 + s / 1000)
        log.train(s, 10.0 - s, 1e-3, 1.5)
    log.close()
    log = Logger(str(out), resume=True)                 # resumed from a checkpoint at step 4
    log.val(4, 6.75)
    log.train(4, 5.5, 1e-3, 1.0)
    log.close()
    run = plot.parse_log(out)
    assert run.restarts == [4]
    assert run.train == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0), (4, 5.5)]
    assert run.val == [(0, 10.5), (4, 6.75)]
    assert run.hellaswag == [(0, 0.25)]                 # step 4's was the abandoned attempt's


def test_smooth_is_a_centered_mean_and_keeps_nan():
    got = plot.smooth([1.0, 3.0, 5.0, math.nan, 7.0, 9.0], 3)
    assert got[:3] == [2.0, 3.0, 4.0]                   # windows [1,3], [1,3,5], [3,5,nan]
    assert math.isnan(got[3])
    assert got[4:] == [8.0, 8.0]                        # [nan,7,9], [7,9]
    assert plot.smooth([4.0, 2.0], 1) == [4.0, 2.0]


@pytest.mark.parametrize("choice, model, labels, want", [
    ("auto", None, ["out", "run2"], None),              # a tiny run: no baseline
    ("auto", "d24", ["out"], "350M"),
    ("auto", "gpt3:c768", ["x"], "124M"),
    ("auto", None, ["log_gpt2_124M"], "124M"),          # the scripts/ dir names
    ("auto", None, ["log_gpt2_124M", "log_gpt2_350M"], None),
    ("auto", None, ["log_gpt2_1558M"], "1558M"),
    ("none", "d12", ["log_gpt2_124M"], None),
    ("774M", None, ["out"], "774M"),
])
def test_pick_baseline(choice, model, labels, want):
    assert plot.pick_baseline(choice, model, labels) == want


# ----------------------------------------------------------------------------------------
# the image

def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sub" / "loss.png"
    rc = cli_main(["plot", str(LOGS / "d12_lr6e-4"), str(LOGS / "d12_lr1e-3" / "main.log"),
                   "-o", str(out), "--smooth", "20", "--baseline", "124M"])
    assert rc == 0
    width, height = png_size(out)
    assert 1200 <= width <= 4000 and 300 <= height <= 1500    # three panels side by side
    assert 20_000 < out.stat().st_size < 2_000_000
    text = capsys.readouterr().out
    assert "2 restart(s) at 500, 800" in text
    assert "baseline: OpenAI GPT-2 124M" in text
    # not a blank canvas: the pixels vary
    import matplotlib.image
    pixels = matplotlib.image.imread(out)
    assert pixels.std() > 0.05


def test_plot_labels_and_one_panel_without_val(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "train_only.log"
    log.write_text("".join(f"s:{s} trl:{5 - s / 10:.4f} lr:0.000100 norm:1.00\n"
                           for s in range(30)))
    out = tmp_path / "one.png"
    assert cli_main(["plot", str(log), "-o", str(out), "--labels", "mine"]) == 0
    width, height = png_size(out)
    assert width < height * 2                         # a single panel


# ----------------------------------------------------------------------------------------
# errors: one line, exit 2

def run_err(capsys, argv):
    rc = cli_main(["plot", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("llmpy plot: error: ")
    return err


def test_missing_file(tmp_path, capsys):
    err = run_err(capsys, [str(tmp_path / "nope.log"), "-o", str(tmp_path / "x.png")])
    assert "nope.log: no such file or dir" in err


def test_dir_without_main_log(tmp_path, capsys):
    err = run_err(capsys, [str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert "no main.log" in err


def test_log_without_records(tmp_path, capsys):
    log = tmp_path / "main.log"
    log.write_text("hello\nstep 1 loss 3.0\n")
    err = run_err(capsys, [str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert "no parseable lines" in err
    assert not (tmp_path / "x.png").exists()


def test_bad_flags(tmp_path, capsys):
    run_err(capsys, [str(LOGS / "restart_small"), "--labels", "a,b"])
    run_err(capsys, [str(LOGS / "restart_small"), "--baseline", "7B"])
    run_err(capsys, [str(LOGS / "restart_small"), "--smooth", "-3"])
    run_err(capsys, [str(LOGS / "restart_small"), "--model", "d99"])


def test_matplotlib_missing_says_what_to_install(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    run = plot.parse_log(LOGS / "restart_small")
    with pytest.raises(LlmpyError, match=r"pip install llmpy\[plot\]"):
        plot.plot_runs([run], tmp_path / "x.png")


def test_plot_shows_the_first_steps(tmp_path):
    """Issue 18: the loss axis holds the start (10.85 at init), not only the tail."""
    pytest.importorskip("matplotlib")
    import re
    import subprocess
    log = tmp_path / "main.log"
    log.write_text("".join(f"s:{s} trl:{5.5 + 5.35 * 0.9 ** s:.4f} lr:0.000100 norm:1.00\n"
                           for s in range(100)) + "s:0 tel:10.8500\ns:99 tel:5.6000\n")
    r = subprocess.run([sys.executable, "-m", "llmpy", "plot", str(tmp_path), "-o",
                        str(tmp_path / "p.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lo, hi = map(float, re.search(r"loss axis: ([\d.]+) \.\. ([\d.]+)", r.stdout).groups())
    assert lo < 5.5 and hi > 10.85
