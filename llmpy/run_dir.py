"""The output dir's rules (README "Your files"): whose files are in -o, and whether a resume
continues the run that wrote its checkpoint.

- A fresh run refuses an output dir that holds another run's checkpoints or logs, unless it
  resumes (-y 1) or is told --overwrite 1 (then those files, and only those, are deleted
  first, and the deletion is printed).
- Every checkpoint carries its run's settings (the state file's JSON extra, under "run") and
  the run's id (also the content of DONE_%08d, which llm.c only tests for existence), so
  retention deletes only checkpoints of the run that wrote them.
- A resume compares this run's settings with the checkpoint's: more steps (-x) and a new lr
  (-l) are allowed and printed; anything else that changes the run is refused unless
  --allow-changes 1.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

from .errors import LlmpyError
from .settings import RunConfig

RUN_FILE_GLOBS = ("model_*.bin", "state_*.bin", "DONE_*", "main.log", "metrics.jsonl")

# settings that change what a resumed run computes, with their flags
COMPARED = {"init": "-e", "train_data": "-i", "batch_size": "-b", "seq_len": "-t",
            "total_batch": "-d", "scheduler": "-k", "warmup": "-u", "final_lr_frac": "-q",
            "weight_decay": "-c", "skip_loss_z": "-sl", "skip_norm_z": "-sg", "overfit": "-a",
            "seed": "--seed", "shuffle": "--shuffle", "master_weights": "-w",
            "nan_policy": "--nan-policy"}
ALLOWED = {"max_steps": "-x", "lr": "-l"}


def new_run_id() -> str:
    return uuid.uuid4().hex


def run_files(out_dir) -> list[Path]:
    d = Path(out_dir)
    if not d.is_dir():
        return []
    return sorted({p for g in RUN_FILE_GLOBS for p in d.glob(g) if p.is_file()})


def check_out_dir(rc: RunConfig, master: bool = True) -> None:
    """-o must be a writable directory (or one that can be made); a fresh run must not mix with the
    files of another run there. Called before anything is allocated."""
    if not rc.out_dir:
        return
    d = Path(rc.out_dir)
    near = next(p for p in [d, *d.parents] if p.exists() or p == Path(p.anchor) or
                str(p) == ".")
    if not near.is_dir():
        raise LlmpyError(f"-o {rc.out_dir}: {near} is a file, expected a directory "
                         f"(pick another -o)")
    if not os.access(near, os.W_OK | os.X_OK):
        raise LlmpyError(f"-o {rc.out_dir}: {near} is not writable by this user; expected a "
                         f"writable dir (pick another -o or fix its permissions)")
    if rc.resume and master and d.is_dir():  # temp files of a killed run: ours, by name
        for p in d.glob(".*.tmp"):
            if p.name.startswith((".model_", ".state_", ".DONE_")):
                p.unlink(missing_ok=True)
    found = run_files(d)
    if rc.resume or not found:  # -y 1 continues what is there (or starts it, if nothing is)
        return
    if not rc.overwrite:
        names = ", ".join(p.name for p in found[:3]) + (" ..." if len(found) > 3 else "")
        raise LlmpyError(f"-o {rc.out_dir}: holds another run's checkpoints or logs "
                         f"({len(found)} files: {names}); expected an empty or new dir for a "
                         f"fresh run; resume it with -y 1, pick another -o, or pass "
                         f"--overwrite 1 to delete those files first")
    if master:
        for p in found:
            p.unlink(missing_ok=True)
        print(f"--overwrite 1: deleted {len(found)} files of the previous run in {d}")


def run_record(rc: RunConfig, run_id: str) -> dict:
    """What a checkpoint stores about its run (state extra "run")."""
    return {"run_id": run_id, "settings": dataclasses.asdict(rc)}


def check_resume(rc: RunConfig, saved: dict | None, step: int, steps: int, where) -> bool:
    """Compare this run with the checkpoint's run at `step`. Raises LlmpyError on a change
    that --allow-changes does not allow; prints the allowed ones. Returns False when there
    is nothing left to train (the checkpoint is at the last step)."""
    if steps < step:
        raise LlmpyError(f"-y 1: the checkpoint in {where} is at step {step}, past -x "
                         f"{steps}; expected -x > {step} to train further (nothing done)")
    if steps == step:
        print(f"resume: the checkpoint in {where} is at step {step}, which is -x {steps}: "
              f"this run is complete, nothing to train (raise -x to train further)")
    if not saved or "settings" not in saved:
        print(f"resume: the checkpoint at step {step} carries no llm.py run settings "
              f"(llm.c or an older llm.py wrote it): they are not compared")
        return steps > step
    old, new = saved["settings"], dataclasses.asdict(rc)
    changed = [(flag, k) for k, flag in COMPARED.items() if k in old and old[k] != new[k]]
    if changed and not rc.allow_changes:
        what = "; ".join(f"{flag} {old[k]!r} -> {new[k]!r}" for flag, k in changed)
        raise LlmpyError(f"-y 1: the checkpoint at step {step} in {where} was written with "
                         f"other settings ({what}); expected the same; give the checkpoint's "
                         f"values, or --allow-changes 1 to resume with these anyway")
    for flag, k in changed + [(f, k) for k, f in ALLOWED.items()
                              if k in old and old[k] != new[k]]:
        print(f"resume: {flag} changed from {old[k]!r} to {new[k]!r}")
    return steps > step
