"""Data-parallel training on the CPU with gloo: 2 ranks == 1 rank with 2x accumulation,
identical parameters on every rank, ZeRO-1 == ZeRO-0, NaN on one rank, resume on another
process count."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from llmpy import checkpoint as ckpt  # noqa: E402
from llmpy.formats import write_shard  # noqa: E402

WORKER = str(Path(__file__).with_name("dist_worker.py"))
MODEL = "L=2,C=32,NH=2,T=32,V=512"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("distdata")
    rng = np.random.default_rng(1)
    phrase = rng.integers(0, 512, size=89)
    toks = np.tile(phrase, 120)
    write_shard(d / "train_000001.bin", toks)
    write_shard(d / "val_000000.bin", rng.integers(0, 512, size=2000))
    return d


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(shards, out, steps=10, extra=()):
    return ["-i", str(shards / "train_*.bin"), "-j", str(shards / "val_*.bin"), "-e", MODEL,
            "-b", "2", "-t", "16", "-d", "64", "-x", str(steps), "-l", "1e-3", "-u", "2",
            "-c", "0.1", "-v", "5", "-m", "2", "-s", "0", "--shuffle", "0",
            "--engine", "torch", "--device", "cpu", "--dtype", "fp32", "--compile", "0",
            "-o", str(out), *extra]


def launch(world, args, tmp_path, tag, worker_opts=(), env_extra=None, killed=False):
    """Start `world` ranks as torchrun would; return each rank's result dict (killed: the
    ranks are expected to die by SIGKILL; return None)."""
    port = free_port()
    procs, outs = [], []
    for r in range(world):
        out = tmp_path / f"{tag}_rank{r}.json"
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               **(env_extra or {})}
        if world == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(k)
        procs.append(subprocess.Popen([sys.executable, WORKER, str(out), *worker_opts, "--",
                                       *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == (-9 if killed else 0), log[-3000:]
    return None if killed else [json.loads(o.read_text()) for o in outs]


def losses(res):
    return np.array([res["losses"][str(s)] for s in sorted(map(int, res["losses"]))])


def test_two_ranks_match_one_rank_with_accumulation(shards, tmp_path):
    one = launch(1, args_for(shards, tmp_path / "one"), tmp_path, "one")[0]
    two = launch(2, args_for(shards, tmp_path / "two"), tmp_path, "two")
    # fp32; the only difference is the order of the gradient sums
    np.testing.assert_allclose(losses(two[0]), losses(one), rtol=1e-6)
    assert two[0]["params_sha"] == two[1]["params_sha"]  # ranks hold identical parameters
    p1, p2 = np.load(one["params_path"]), np.load(two[0]["params_path"])
    np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-6)
    assert two[0]["val_losses"] == two[1]["val_losses"]


def test_zero1_equals_zero0_and_resumes_on_another_world(shards, tmp_path):
    z0 = launch(2, args_for(shards, tmp_path / "z0"), tmp_path, "z0")
    z1 = launch(2, args_for(shards, tmp_path / "z1", extra=["-z", "1", "-n", "5"]), tmp_path,
                "z1")
    assert z1[0]["params_sha"] == z1[1]["params_sha"]
    np.testing.assert_allclose(losses(z1[0]), losses(z0[0]), rtol=1e-6)
    # ZeRO-1's sharded AdamW is written out, ZeRO-0's is torch's fused one: the same update
    # in another operation order, so parameters agree to float rounding amplified by Adam
    # where gradients are near zero (lr 1e-3, 10 steps).
    np.testing.assert_allclose(np.load(z1[0]["params_path"]), np.load(z0[0]["params_path"]),
                               rtol=1e-5, atol=1e-5)
    # the ZeRO-1 state files hold half of m and v each
    from llmpy.formats import read_state
    s0 = read_state(tmp_path / "z1" / "state_00000005_00000.bin")
    s1 = read_state(tmp_path / "z1" / "state_00000005_00001.bin")
    n = np.load(z0[0]["params_path"]).size
    assert s0["m"].size + s1["m"].size == n and s0["nproc"] == 2
    # resume the 2-rank ZeRO-1 run's step-5 checkpoint on one process, to step 10
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for f in (tmp_path / "z1").iterdir():
        if "00000005" in f.name:
            (resumed / f.name).write_bytes(f.read_bytes())
    r1 = launch(1, args_for(shards, resumed, extra=["-y", "1"]), tmp_path, "r1")[0]
    assert sorted(map(int, r1["losses"])) == list(range(5, 10))
    np.testing.assert_allclose([r1["losses"][str(s)] for s in range(5, 10)],
                               losses(z1[0])[5:], rtol=1e-5)


def test_nan_on_one_rank_is_agreed(shards, tmp_path):
    res = launch(2, args_for(shards, tmp_path / "nan", steps=6), tmp_path, "nan",
                 worker_opts=["--nan-at", "3", "--nan-rank", "1"])
    assert res[0]["skipped"] == res[1]["skipped"] == [3]
    assert res[0]["params_sha"] == res[1]["params_sha"]
    assert np.isfinite(np.load(res[0]["params_path"])).all()


def test_outlier_skip_on_one_rank_is_agreed(shards, tmp_path):
    """A decision only one rank takes (its loss z-score alone is an outlier): every rank must
    skip that step, or the parameters part ways (and with -z 1 a rank waits alone). The NaN
    test above cannot see this: the all-reduce of the loss spreads a NaN to every rank."""
    res = launch(2, args_for(shards, tmp_path / "zs", steps=6, extra=["-sl", "5"]), tmp_path,
                 "zs", worker_opts=["--outlier-at", "3", "--outlier-rank", "1"])
    assert res[0]["skipped"] == res[1]["skipped"] == [3]
    assert res[0]["params_sha"] == res[1]["params_sha"]


def test_numpy_engine_with_processes_is_refused_before_the_rendezvous(shards, tmp_path):
    """-pi tcp to a server nobody runs: refused at once, not after waiting for it."""
    import subprocess
    import sys
    import time
    args = [*args_for(shards, tmp_path / "o", steps=2), "--engine", "numpy", "-pn", "2",
            "-pr", "0", "-pi", "tcp", "-ps", "127.0.0.1:9", "--device", "cpu"]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "llmpy", "train", *args], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "LLMPY_DIST_TIMEOUT_MIN": "1"})
    assert r.returncode == 2 and "--engine numpy: runs in one process only" in r.stderr, \
        r.stderr
    assert time.time() - t0 < 30


def test_stale_fs_rendezvous_file_is_one_line_after_the_timeout(shards, tmp_path):
    """A rendezvous file that never completed (a run killed while it waited, or garbage):
    the launch used to wait forever, whatever the timeout; now it stops after
    LLMPY_DIST_TIMEOUT_MIN with one line naming the file, and removes it for the next one."""
    import subprocess
    import sys
    rdv = tmp_path / "rdv"
    rdv.mkdir()
    (rdv / "llmpy_rendezvous").write_bytes(b"\x00" * 64)  # what a killed run leaves
    args = [*args_for(shards, tmp_path / "o", steps=2), "-pn", "2", "-pr", "0", "-pi", "fs",
            "-pf", str(rdv)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "-m", "llmpy", "train", *args], capture_output=True,
                       text=True, timeout=120, env={**env, "LLMPY_DIST_TIMEOUT_MIN": "0.05"})
    assert r.returncode == 2, r.stderr
    assert "removed its file " + str(rdv / "llmpy_rendezvous") in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (rdv / "llmpy_rendezvous").exists()


KILLED_AFTER_RENDEZVOUS = """
import os, signal, sys
from llmpy.dist import init
from llmpy.settings import RunConfig
rc = RunConfig(num_processes=2, process_rank=int(sys.argv[1]), init_method="fs",
               fs_path=sys.argv[2])
init(rc, "cpu", "torch")
os.kill(os.getpid(), signal.SIGKILL)  # as scancel -s KILL, an OOM kill, a node lost
"""


def test_fs_rendezvous_file_of_a_killed_run_does_not_hang_the_next_launch(shards, tmp_path):
    """Two ranks meet through -pi fs and are SIGKILLed: their file stays. The next launch
    (same -pf, no slurm) removes it, says so in one line and trains, instead of waiting for
    the timeout; a clean run leaves no rendezvous file."""
    rdv = tmp_path / "rdv"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["LLMPY_DIST_TIMEOUT_MIN"] = "0.75"
    killed = [subprocess.Popen([sys.executable, "-c", KILLED_AFTER_RENDEZVOUS, str(r),
                                str(rdv)], env=env) for r in range(2)]
    assert [p.wait(timeout=120) for p in killed] == [-9, -9]
    assert (rdv / "llmpy_rendezvous").exists()
    procs = [subprocess.Popen([sys.executable, "-m", "llmpy", "train", *args_for(
        shards, tmp_path / "o", steps=1, extra=["-v", "0", "-pn", "2", "-pr", str(r), "-pi",
                                                "fs", "-pf", str(rdv)])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    notes = [line for log in logs for line in log.splitlines() if "-pi fs: removed" in line]
    assert len(notes) == 1 and str(rdv / "llmpy_rendezvous") in notes[0], logs
    assert not (rdv / "llmpy_rendezvous").exists()


def test_fs_rendezvous_is_marked_only_when_every_process_has_met(tmp_path, monkeypatch):
    """NCCL's init_process_group returns before the other ranks join (it connects lazily):
    a file marked by rank 0 at that point would be taken for a killed launch's by a rank
    that starts late, and deleted under the live launch. Here init is a no-op, as a lazy
    backend's: after rank 0 alone the file holds no mark and is kept; the last to arrive
    marks it."""
    import torch.distributed as tdist
    from llmpy import dist
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: None)
    path = str(tmp_path / "llmpy_rendezvous")
    keep = tdist.FileStore(path, 3)  # an observer, so the file outlives the two ranks
    dist._file_rendezvous(path, "nccl", 0, 2)
    assert dist.RENDEZVOUS_DONE.encode() not in open(path, "rb").read()
    assert not dist._remove_stale_rendezvous(path) and os.path.exists(path)
    dist._file_rendezvous(path, "nccl", 1, 2)
    assert dist.RENDEZVOUS_DONE.encode() in open(path, "rb").read()
    del keep


def test_launcher_detection(monkeypatch):
    from llmpy.dist import detect, init_method
    from llmpy.settings import RunConfig
    for k in list(os.environ):
        if k.startswith(("OMPI_", "PMI_", "SLURM_", "MPI_")) or k in ("RANK", "WORLD_SIZE",
                                                                       "LOCAL_RANK"):
            monkeypatch.delenv(k)
    rc = RunConfig()
    assert detect(rc) == (0, 1, 0, "single")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert detect(rc) == (3, 4, 1, "mpi")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert detect(rc) == (2, 8, 2, "torchrun")
    assert init_method(rc, "torchrun", 2) == "env://"
    flags = RunConfig(num_processes=16, process_rank=9, gpus_per_node=8, init_method="tcp",
                      server_ip="10.0.0.1")
    assert detect(flags) == (9, 16, 1, "flags")
    assert init_method(flags, "flags", 9) == "tcp://10.0.0.1:29500"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
              "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert detect(rc) == (1, 2, 0, "slurm")
    from llmpy.errors import LlmpyError
    with pytest.raises(LlmpyError, match="-ps"):
        init_method(RunConfig(init_method="tcp"), "slurm", 0)


def test_llmc_flags_with_shared_file_init(shards, tmp_path):
    """llm.c's own way: -pn 2 -pr r -pi fs -pf DIR, no launcher environment at all."""
    procs = []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for r in range(2):
        args = args_for(shards, tmp_path / "fs", steps=3, extra=[
            "-pn", "2", "-pr", str(r), "-pi", "fs", "-pf", str(tmp_path / "rdv")])
        procs.append(subprocess.Popen([sys.executable, "-m", "llmpy", "train", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "processes=2" in logs[0]
    assert "comm wait" in logs[0]  # time blocked in collectives, on the step line
    assert (tmp_path / "fs" / "state_00000003_00001.bin").exists()
    assert (tmp_path / "fs" / "DONE_00000003").exists()


def test_same_batches_on_1_2_4_ranks_shuffled_and_resume_on_another_count(shards, tmp_path):
    """Issue 16: shuffle on, one total batch (4 samples of B*T per step): 1, 2 and 4 ranks,
    ZeRO-0 and ZeRO-1, give the same losses; a 2-rank run killed after its step-5
    checkpoint resumes on 1 and on 4 ranks with the uninterrupted run's losses."""
    def args(out, *extra):
        a = args_for(shards, out, extra=["-d", "128", "--shuffle", "1", *extra])
        return a

    ref = losses(launch(1, args(tmp_path / "w1"), tmp_path, "w1")[0])
    runs = {}
    for world, zero in ((2, 0), (4, 0), (2, 1), (4, 1)):
        tag = f"w{world}z{zero}"
        runs[tag] = launch(world, args(tmp_path / tag, "-z", str(zero), "-n", "5"), tmp_path,
                           tag)
        assert len({r["params_sha"] for r in runs[tag]}) == 1  # every rank holds the same
        # fp32; only the order of the gradient sums differs
        np.testing.assert_allclose(losses(runs[tag][0]), ref, rtol=1e-6)
    # kill a 2-rank ZeRO-1 run right after its step-5 checkpoint, resume on 1 and 4 ranks
    launch(2, args(tmp_path / "killed", "-z", "1", "-n", "5"), tmp_path, "killed",
           env_extra={"LLMPY_TEST_KILL": "after_checkpoint:5"}, killed=True)
    full = runs["w2z1"][0]["losses"]
    for world in (1, 4):
        d = tmp_path / f"resume{world}"
        d.mkdir()
        for f in (tmp_path / "killed").iterdir():
            if "00000005" in f.name:
                (d / f.name).write_bytes(f.read_bytes())
        res = launch(world, args(d, "-z", "1", "-y", "1"), tmp_path, f"resume{world}")[0]
        assert sorted(map(int, res["losses"])) == list(range(5, 10))
        np.testing.assert_allclose([res["losses"][str(k)] for k in range(5, 10)],
                                   [full[str(k)] for k in range(5, 10)], rtol=1e-6)
    log = (tmp_path / "w2z0" / "main.log").read_text()
    assert " comm:" in log.splitlines()[-1] or any(" comm:" in ln for ln in log.splitlines())
    assert " comm:" not in (tmp_path / "w1" / "main.log").read_text()  # llm.c's line


@pytest.mark.parametrize("world,zero", [(2, 0), (4, 1)])
def test_overlap_on_and_off_are_bitwise_equal(shards, tmp_path, world, zero):
    """Issue 16: all-reducing each bucket as the backward finishes it (--overlap 1, the
    default) and after the backward (--overlap 0) give bitwise the same run; with
    accumulation, so only the last micro-step's gradients may cross ranks."""
    res = {}
    for overlap in (1, 0):
        a = args_for(shards, tmp_path / f"o{overlap}", steps=4,
                     extra=["-d", "256", "--shuffle", "1", "-z", str(zero),
                            "--overlap", str(overlap)])
        res[overlap] = launch(world, a, tmp_path, f"o{overlap}")
    assert res[1][0]["params_sha"] == res[0][0]["params_sha"] == res[1][-1]["params_sha"]
    assert res[1][0]["losses"] == res[0][0]["losses"]


def _ranks(world, args, timeout=180):
    """`llmpy train ARGS` as `world` ranks (torchrun's environment): [(rc, stdout, stderr)]."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), OMP_NUM_THREADS="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LLMPY_DIST_TIMEOUT_MIN="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "llmpy", "train", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


def test_bad_token_on_one_rank_stops_every_rank_with_a_checkpoint(shards, tmp_path):
    """An id >= V in rank 1's batch of step 3 only (B*T = 32 tokens, 2 ranks, no shuffle:
    step s of rank r reads sample 2s + r). Both ranks finish the step's collectives, agree,
    write the step-3 checkpoint together and exit 2 with one line each, rank 1's naming the
    shard and the token; with the shard fixed, -y 1 gives the losses of an uninterrupted
    run. (Before, rank 1 exited alone and rank 0 waited in the all-reduce until its
    timeout, with nothing saved.)"""
    good = np.fromfile(shards / "train_000001.bin", dtype="<u2", offset=1024)
    shard = tmp_path / "mine_000001.bin"
    bad = good.copy()
    bad[7 * 32 + 10] = 600  # sample 7: step 3, rank 1; V = 512
    write_shard(shard, bad)

    def args(out, *more):
        a = args_for(shards, out, steps=6, extra=["-v", "0", *more])
        a[a.index("-i") + 1] = str(shard)
        return a
    results = _ranks(2, args(tmp_path / "o"))
    for r, (rc, out, err) in enumerate(results):
        assert rc == 2 and len(err.strip().splitlines()) == 1, (r, rc, err[-2000:])
        assert "saved at step 3" in err and "-y 1" in err, err
    assert str(shard) in results[1][2] and f"token {7 * 32 + 10}" in results[1][2]
    assert "another rank" in results[0][2]
    assert ckpt.complete_steps(tmp_path / "o") == [3]
    write_shard(shard, good)
    assert [r[0] for r in _ranks(2, args(tmp_path / "o", "-y", "1"))] == [0, 0]
    assert [r[0] for r in _ranks(2, args(tmp_path / "ref"))] == [0, 0]

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: row["train_loss"] for row in rows if "train_loss" in row}
    ref = losses(tmp_path / "ref")
    assert losses(tmp_path / "o") == ref and sorted(ref) == list(range(6))
