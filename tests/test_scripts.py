"""scripts/: every run script passes its dry run (flags parse and validate through
llmpy.settings.parse_args/validate), carries llm.c's recipe, and the resume loop resumes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmpy.formats import write_shard
from llmpy.settings import parse_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
RUN_SCRIPTS = sorted(SCRIPTS.glob("run_*.sh"))
MULTI_NODE = sorted((SCRIPTS / "multi_node").iterdir())
ALL_SCRIPTS = RUN_SCRIPTS + [SCRIPTS / "sweep_lr.sh"] + MULTI_NODE

# llm.c's recipes (its scripts/run_*.sh): model, B, T, total batch, steps, lr, final frac,
# warmup, checkpoint every, and what else differs between them.
RECIPES = {
    "run_gpt2_124M.sh": dict(init="d12", batch_size=64, seq_len=1024, total_batch=524288,
                             max_steps=18865, lr=6e-4, final_lr_frac=0.0, warmup=700,
                             checkpoint_every=5000),
    "run_gpt2_350M.sh": dict(init="d24", batch_size=64, seq_len=1024, total_batch=524288,
                             max_steps=60000, lr=3e-4, final_lr_frac=0.0, warmup=700,
                             checkpoint_every=2000),
    "run_gpt2_774M.sh": dict(init="d36", batch_size=32, seq_len=1024, total_batch=524288,
                             max_steps=286102, lr=2.5e-4, final_lr_frac=0.0, warmup=700,
                             checkpoint_every=4000),
    "run_gpt2_1558M.sh": dict(init="d48", batch_size=16, seq_len=1024, total_batch=1048576,
                              max_steps=32000, lr=6e-4, final_lr_frac=0.1, warmup=700,
                              checkpoint_every=2000, gen_tokens=384),
    "run_gpt3_125M.sh": dict(init="gpt3:c768", batch_size=32, seq_len=2048, total_batch=524288,
                             max_steps=572204, lr=6e-4, final_lr_frac=0.1, warmup=700,
                             checkpoint_every=10000, keep_last=5, major_every=50000,
                             skip_loss_z=7.0, skip_norm_z=7.0),
}
LAUNCHERS = {sys.executable, "torchrun", "mpirun", "srun"}
COMMON = dict(weight_decay=0.1, recompute=0, zero=1, val_every=250, hellaswag=1, resume=1)


# the scripts' knobs: none may leak in from the environment the tests run in
KNOBS = ("NGPU", "OUT_DIR", "DATA_ROOT", "EXTRA_ARGS", "MAX_RETRIES", "RETRY_SLEEP", "DRY_RUN",
         "PYTHON", "CPU_OK", "LLMPY_CACHE", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "SERVER_IP",
         "SYNC_DIR", "LRS", "MODEL", "TRAIN", "VAL", "STEPS", "SWEEP_DIR")


def clean_env(**env):
    base = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
    return {**base, "PYTHON": sys.executable, "RETRY_SLEEP": "0", **env}


def run_script(script, tmp_path, **env):
    """Run a script from an empty dir with nothing built (DATA_ROOT empty)."""
    full_env = clean_env(DATA_ROOT=str(tmp_path / "data"), **env)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run(["bash", str(script)], cwd=work, env=full_env, capture_output=True,
                          text=True, timeout=120)


def printed_train_command(stdout: str) -> list[str]:
    """The flags after `train` in the last launch command the dry run printed."""
    line = [ln for ln in stdout.splitlines() if ln.split(" ", 1)[0] in LAUNCHERS][-1]
    words = shlex.split(line)
    if words[0] == "srun":                       # bash -c "python -m llmpy train ... -pr $X"
        task = words[-1].replace("$SLURM_PROCID", "0").replace("$SLURM_JOB_ID.$SLURM_STEP_ID",
                                                                "7.0")
        words = shlex.split(task)
    return words[words.index("train") + 1:]


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: p.name)
def test_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: p.name)
def test_dry_run(script, tmp_path):
    r = run_script(script, tmp_path, DRY_RUN="1")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "flags ok: DONE marker: " in r.stdout
    assert "dry run" in r.stdout
    flags = printed_train_command(r.stdout)
    rc, given = parse_args(flags, has_cuda=True)        # the printed command parses
    assert rc.resume == 1 and rc.out_dir and rc.max_steps > 0
    # a dry run builds, downloads and writes nothing
    assert not (tmp_path / "data").exists()
    assert not any((tmp_path / "work").iterdir())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_llmc(name, tmp_path):
    r = run_script(SCRIPTS / name, tmp_path, DRY_RUN="1", NGPU="8")
    assert r.returncode == 0, r.stderr + r.stdout
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("torchrun --standalone --nproc_per_node=8 -m llmpy train ")
    rc, _ = parse_args(printed_train_command(r.stdout), has_cuda=True)
    for field, want in {**COMMON, **RECIPES[name]}.items():
        assert getattr(rc, field) == want, (name, field)
    assert f"DONE_{rc.max_steps:08d}" in r.stdout
    assert "edu_fineweb" in rc.train_data if "1558M" in name else "fineweb" in rc.train_data


def test_one_gpu_uses_python_not_torchrun(tmp_path):
    r = run_script(SCRIPTS / "run_gpt2_124M.sh", tmp_path, DRY_RUN="1", NGPU="1")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.strip().splitlines()[-1])[:4] == [sys.executable, "-m",
                                                                 "llmpy", "train"]
    assert "grad accum 8" in r.stdout


def test_bad_extra_args_fail_the_dry_run(tmp_path):
    r = run_script(SCRIPTS / "run_gpt2_124M.sh", tmp_path, DRY_RUN="1", EXTRA_ARGS="-z 3")
    assert r.returncode == 2
    assert "-z: expected 0 or 1, got 3" in r.stderr
    assert "nothing was run" in r.stderr


def test_batch_not_divisible_by_gpus_fails(tmp_path):
    # 524,288 tokens are not a multiple of 64 * 1024 * 3
    r = run_script(SCRIPTS / "run_gpt2_124M.sh", tmp_path, DRY_RUN="1", NGPU="3")
    assert r.returncode == 2
    assert "-d: total batch 524288 must be divisible by B*T*processes" in r.stderr


def test_extra_args_override_the_recipe(tmp_path):
    r = run_script(SCRIPTS / "run_gpt2_124M.sh", tmp_path, DRY_RUN="1", NGPU="1",
                   EXTRA_ARGS="-b 16 --engine torch")
    assert r.returncode == 0, r.stderr
    rc, _ = parse_args(printed_train_command(r.stdout))
    assert rc.batch_size == 16 and rc.engine == "torch" and rc.total_batch == 524288
    assert "grad accum 32" in r.stdout


def test_slurm_dry_run_checks_every_rank(tmp_path):
    r = run_script(SCRIPTS / "multi_node" / "slurm_fs.sbatch", tmp_path, DRY_RUN="1",
                   SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2")
    assert r.returncode == 0, r.stderr
    rc, _ = parse_args(printed_train_command(r.stdout))
    assert (rc.num_processes, rc.gpus_per_node, rc.init_method) == (4, 2, "fs")
    assert rc.fs_path.endswith("/rendezvous/step_7.0") and "-pr $SLURM_PROCID" in r.stdout
    # 16 tasks of B=32 fill 524,288 tokens; 3 tasks cannot
    r = run_script(SCRIPTS / "multi_node" / "slurm_tcp.sbatch", tmp_path, DRY_RUN="1",
                   SLURM_NTASKS="3", SLURM_NTASKS_PER_NODE="3")
    assert r.returncode == 2 and "-d: total batch" in r.stderr


# ----------------------------------------------------------------------------------------
# the helper and the resume loop

def test_check_flags_helper(capsys):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import check_flags
    finally:
        sys.path.remove(str(SCRIPTS))
    ok = ["-i", "x_train_*.bin", "-e", "d12", "-b", "8", "-t", "1024", "-d", "65536",
          "-x", "10", "-o", "out", "-y", "1"]
    assert check_flags.main(["--nproc", "2", "--need-resume", "--", *ok]) == 0
    assert capsys.readouterr().out.strip().endswith("flags ok: DONE marker: out/DONE_00000010")
    for bad, msg in [(["-t", "2048"], "-t: expected at most the model's maxT 1024"),
                     (["-x", "-1"], "-x: the scripts need an explicit step count"),
                     (["-y", "0"], "-y: the auto-resume loop needs -y 1"),
                     (["-e", "d13"], "d13"),
                     (["-pn", "4"], "-pn: expected the launcher's process count 2")]:
        assert check_flags.main(["--nproc", "2", "--need-resume", "--", *ok, *bad]) == 2
        assert msg in capsys.readouterr().err


def bash_with_common(snippet, tmp_path, **env):
    full_env = clean_env(DATA_ROOT=str(tmp_path / "data"), **env)
    script = f"set -euo pipefail\nsource {shlex.quote(str(SCRIPTS / 'common.sh'))}\n{snippet}"
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_resume_loop_gives_up_after_max_retries(tmp_path):
    r = bash_with_common("DONE_FILE=never; run_until_done never false", tmp_path,
                         MAX_RETRIES="3")
    assert r.returncode == 1
    assert r.stdout.count("run ") == 3 and "run 3/3" in r.stdout
    assert "gave up after 3 runs" in r.stderr


def test_resume_loop_does_not_retry_bad_input(tmp_path):
    r = bash_with_common("run_until_done never bash -c 'exit 2'", tmp_path)
    assert r.returncode == 2
    assert "run 1/" in r.stdout and "run 2/" not in r.stdout
    assert "not retrying" in r.stderr


def test_missing_data_builder_is_a_clear_error(tmp_path):
    r = bash_with_common(f"ensure_shards no_such_dataset {tmp_path}/d nsd", tmp_path)
    assert r.returncode == 1
    assert "`llmpy data no_such_dataset` is not available" in r.stderr
    assert "nsd_train_*.bin" in r.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_shard(d / "tiny_train_000001.bin", rng.integers(0, 512, size=8000))
    write_shard(d / "tiny_val_000000.bin", rng.integers(0, 512, size=2000))
    return d


def test_resume_loop_resumes_after_a_crash(shards, tmp_path):
    """The training process is SIGKILLed right after its step-4 checkpoint; the loop reruns
    it with -y 1, it resumes from step 4 and finishes, and the loop stops at DONE."""
    out = tmp_path / "run"
    flags = ["-i", str(shards / "tiny_train_*.bin"), "-j", str(shards / "tiny_val_*.bin"),
             "-o", str(out), "-e", "L=2,C=32,NH=2,T=32,V=512", "-b", "2", "-t", "16",
             "-d", "64", "-x", "8", "-l", "3e-3", "-v", "4", "-m", "2", "-s", "0",
             "-n", "4", "-y", "1", "--engine", "numpy"]
    r = bash_with_common(f"NGPU=0 CPU_OK=1; train_until_done {shlex.join(flags)}", tmp_path,
                         NGPU="0", CPU_OK="1", LLMPY_TEST_KILL="after_checkpoint:4")
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    assert "run 1/20" in r.stdout and "run 2/20" in r.stdout and "run 3/" not in r.stdout
    assert "training exited with 137" in r.stdout          # 128 + SIGKILL
    assert (out / "DONE_00000008").exists() and (out / "DONE_00000004").exists()
    from llmpy.plot import parse_log
    run = parse_log(out)
    assert [s for s, _ in run.train] == list(range(8))
    assert [s for s, _ in run.val] == [0, 4, 8]


def test_resume_loop_with_torchrun_two_processes(shards, tmp_path):
    """The same through torchrun (NGPU=2, gloo on the CPU): both ranks are killed after the
    step-4 checkpoint, torchrun fails, the loop restarts it and the ranks resume."""
    pytest.importorskip("torch")
    import shutil
    if not shutil.which("torchrun"):
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "run"
    flags = ["-i", str(shards / "tiny_train_*.bin"), "-j", str(shards / "tiny_val_*.bin"),
             "-o", str(out), "-e", "L=2,C=32,NH=2,T=32,V=512", "-b", "2", "-t", "16",
             "-d", "64", "-x", "8", "-l", "3e-3", "-v", "4", "-m", "2", "-s", "0",
             "-n", "4", "-y", "1", "--engine", "torch", "--device", "cpu"]
    r = bash_with_common(f"train_until_done {shlex.join(flags)}", tmp_path, NGPU="2",
                         CPU_OK="1", LLMPY_TEST_KILL="after_checkpoint:4")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "torchrun --standalone --nproc_per_node=2 -m llmpy train" in r.stdout
    assert "run 2/20" in r.stdout and "run 3/" not in r.stdout
    assert (out / "DONE_00000008").exists()
    assert (out / "state_00000008_00001.bin").exists()          # rank 1's state
    from llmpy.plot import parse_log
    assert [s for s, _ in parse_log(out).train] == list(range(8))
