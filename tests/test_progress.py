"""What a run shows while it works (llmpy.progress, issue 18 item 4 and 6): llm.c's per-step
line plus elapsed time and an ETA, z-scores shown as "-" until the outlier window fills, a
readable distributed row, and a progress bar for validation."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np

from llmpy.formats import write_shard


def test_step_line_has_elapsed_and_eta(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train_000001.bin", rng.integers(0, 512, size=4000))
    write_shard(tmp_path / "val_000000.bin", rng.integers(0, 512, size=2000))
    r = subprocess.run([sys.executable, "-m", "llmpy", "train", "-i",
                        str(tmp_path / "train_*.bin"), "-j", str(tmp_path / "val_*.bin"),
                        "-e", "L=2,C=32,NH=2,T=32,V=512", "-b", "2", "-t", "16", "-x", "4",
                        "-v", "0", "-o", ""], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    steps = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert len(steps) == 4
    for ln in steps:  # llm.c's fields first, then ours
        assert re.search(r"^step +\d+/4 \| loss [\d.]+ \(z -\) \| norm [\d.]+ \(z -\) \| lr "
                         r"\S+ \| [\d.]+ ms \| [\d,]+ tok/s \| \d+m\d\ds elapsed, ETA \d+m\d\ds$",
                         ln), ln
    assert steps[-1].endswith("ETA 0m00s")
    assert "nan" not in r.stdout
    assert re.search(r"\| distributed +\| no \(1 process\) +\|", r.stdout)


def test_hms():
    from llmpy.progress import _hms
    assert (_hms(0.4), _hms(65), _hms(3600 * 2 + 61)) == ("0m00s", "1m05s", "2h01m")


def test_val_shows_a_progress_bar(tmp_path, capsys):
    from llmpy.data.loader import DistributedDataLoader
    from llmpy.engines import make_engine
    from llmpy.evals import val_loss
    from llmpy.config import from_descriptor
    from llmpy.init import init_params
    write_shard(tmp_path / "val_000000.bin", np.arange(400) % 512)
    config = from_descriptor("L=1,C=16,NH=2,T=16,V=512")
    eng = make_engine("numpy", config, seed=1)
    eng.set_params(init_params(config, 1))
    loader = DistributedDataLoader(str(tmp_path / "val_*.bin"), 2, 16)
    val_loss(eng, loader, 3, progress=True)
    err = capsys.readouterr().err
    assert "val:" in err and "0/3 [" in err
    val_loss(eng, loader, 3, progress=False)
    assert capsys.readouterr().err == ""
