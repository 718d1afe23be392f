"""Your files (llmpy.run_dir, llmpy.preempt): a fresh run never mixes with another run's
files, retention only deletes its own run's checkpoints, a resume says what differs, SIGTERM
and SIGINT checkpoint before stopping, OS errors are one line and exit 2."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from llmpy import checkpoint as ckpt
from llmpy import formats
from llmpy.cli import main as cli_main
from llmpy.dist import Dist
from llmpy.settings import parse_args
from llmpy.train import save_checkpoint, setup

from test_train import base_args, run_cli, shards  # noqa: F401  (the module's fixture)


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def one_line_exit_2(r, needle):
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fresh_run_refuses_another_runs_dir_and_overwrite_replaces_it(shards, tmp_path):
    out = tmp_path / "r1"
    r = run_cli(base_args(shards, out, steps=8, extra=["-n", "2"]))
    assert r.returncode == 0, r.stderr
    before = snapshot(out)
    r = run_cli(base_args(shards, out, steps=4, extra=["-n", "2", "-nk", "1"]))
    one_line_exit_2(r, "holds another run's checkpoints or logs")
    assert "--overwrite 1" in r.stderr and "-y 1" in r.stderr
    assert snapshot(out) == before  # nothing deleted, nothing overwritten
    r = run_cli(base_args(shards, out, steps=4, extra=["-n", "2", "-nk", "1",
                                                      "--overwrite", "1"]))
    assert r.returncode == 0, r.stderr
    assert "deleted" in r.stdout
    assert ckpt.complete_steps(out) == [4]  # the old run's step 8 is gone: sample loads 4


def test_retention_only_deletes_checkpoints_of_its_own_run(tmp_path):
    for step, owner in ((2, "old"), (8, "old"), (3, "me"), (4, "me"), (5, "")):
        ckpt.mark_done(tmp_path, step, owner)
    assert ckpt.apply_retention(tmp_path, 1, 0, run_id="me") == [3]
    assert ckpt.complete_steps(tmp_path) == [2, 4, 5, 8]


def test_resume_compares_settings(shards, tmp_path):
    out = tmp_path / "o"
    r = run_cli(base_args(shards, out, steps=4, extra=["-n", "2"]))
    assert r.returncode == 0, r.stderr
    before = snapshot(out)
    r = run_cli(base_args(shards, out, steps=8, extra=["-y", "1", "-c", "0.1"]))
    one_line_exit_2(r, "-c 0.0 -> 0.1")
    assert "--allow-changes 1" in r.stderr
    args = base_args(shards, out, steps=8, extra=["-y", "1"])
    r = run_cli([*args[:args.index("-e") + 1], "L=2,C=48,NH=2,T=32,V=512",
                 *args[args.index("-e") + 2:]])
    one_line_exit_2(r, "-e ")
    r = run_cli(base_args(shards, out, steps=2, extra=["-y", "1"]))
    one_line_exit_2(r, "past -x 2")
    assert snapshot(out) == before
    r = run_cli(base_args(shards, out, steps=4, extra=["-y", "1"]))
    assert r.returncode == 0 and "nothing to train" in r.stdout, r.stdout + r.stderr
    r = run_cli(base_args(shards, out, steps=6, extra=["-y", "1", "-l", "1e-3"]))
    assert r.returncode == 0, r.stderr
    assert "-l changed from 0.003 to 0.001" in r.stdout and "-x changed" in r.stdout
    r = run_cli(base_args(shards, out, steps=8, extra=["-y", "1", "-c", "0.1",
                                                      "--allow-changes", "1"]))
    assert r.returncode == 0 and "-c changed" in r.stdout, r.stderr


def test_done_is_removed_before_a_step_is_rewritten(shards, tmp_path, monkeypatch):
    out = tmp_path / "o"
    rc, _ = parse_args(base_args(shards, out, steps=2))
    run = setup(rc, Dist(), "numpy", "cpu")
    save_checkpoint(run, 2)
    assert ckpt.latest_step(out) == 2

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "save_state", full)
    with pytest.raises(OSError):
        save_checkpoint(run, 2)  # new model_2, old state_2: DONE_2 must not vouch for them
    assert ckpt.latest_step(out) is None


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_then_resume_is_bit_exact(shards, tmp_path, sig, code):
    steps = 60
    ref = tmp_path / "ref"
    r = run_cli(base_args(shards, ref, steps=steps, extra=["-v", "0"]))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "o"
    args = base_args(shards, out, steps=steps, extra=["-v", "0", "-n", "0", "-y", "1"])
    p = subprocess.Popen([sys.executable, "-m", "llmpy", "train", *args], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:
        if line.startswith("step    3/"):
            p.send_signal(sig)
            break
    rest, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    stopped = ckpt.latest_step(out)
    assert stopped is not None and 3 <= stopped < steps, rest
    assert "-y 1" in err and len(err.strip().splitlines()) == 1, err
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert f"resume from {stopped}" in r.stdout
    name = f"model_{steps:08d}.bin"
    assert (ref / name).read_bytes() == (out / name).read_bytes()


def test_out_dir_that_is_a_file_or_under_one(shards, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    for out in (f, f / "sub"):
        r = run_cli(base_args(shards, out, steps=2))
        one_line_exit_2(r, "is a file, expected a directory")
    assert f.read_text() == "mine"



def unprivileged(cmd):
    """`cmd` run without the power to write where the permissions say no: as is for a
    normal user; as root (CI) through setpriv with every capability dropped (root keeps its
    uid, so the interpreter under /root stays readable, but loses CAP_DAC_OVERRIDE); None
    when neither is possible."""
    if os.geteuid() != 0:
        return cmd
    import shutil
    if shutil.which("setpriv"):
        return ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                *cmd]
    return None


def test_unwritable_out_dir_is_refused_before_the_first_step(shards, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cmd = unprivileged([sys.executable, "-m", "llmpy", "train",
                        *base_args(shards, ro / "out", steps=2)])
    if cmd is None:
        pytest.skip("running as root without setpriv: no way to be refused a write")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        ro.chmod(0o700)
    one_line_exit_2(r, f"{ro} is not writable by this user")
    assert "pick another -o" in r.stderr and "step" not in r.stdout
    assert list(ro.iterdir()) == []


def test_disk_full_during_a_checkpoint(shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    real = os.fsync

    def fsync(fd):
        if ckpt.latest_step(out) == 2:  # the second checkpoint does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    assert cli_main(["train", *base_args(shards, out, steps=4, extra=["-n", "2"])]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(os, "fsync", real)
    assert not list(out.glob(".*.tmp"))  # nothing half-written
    assert ckpt.latest_step(out) == 2
    ckpt.load_for(out, 2, 0, 1)  # the old checkpoint survives, readable


def test_atomic_write_syncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    formats.atomic_write(tmp_path / "DONE_00000001", [b""])
    assert synced[-1] == str(tmp_path) and len(synced) == 2
