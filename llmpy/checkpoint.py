"""Checkpoints in llm.c's layout: model_%08d.bin, state_%08d_%05d.bin, then DONE_%08d.

Mirrors save_state / load_state and the checkpoint section of llm.c's train_gpt2.cu:
- rank 0 writes the model file (v3 fp32 or v5 bf16, whatever the engine holds), every rank
  writes its optimizer state file, and only when all are on disk an empty DONE_%08d marks the
  checkpoint complete. Every file is written to a temp file and renamed, so a crash at any
  moment leaves the previous checkpoint usable; a checkpoint without DONE is ignored.
- Retention: -nk keeps the newest k checkpoints; steps that are multiples of -nm are majors and
  are never deleted. A checkpoint is deleted DONE first, so a half-deleted one is never resumed.
- The state file carries llm.c's fields (step, loader position, AdamW m/v, master weights)
  plus a JSON blob llm.c ignores: the loader's full state, the outlier detectors, the run
  settings, so that resume is bit-exact.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import numpy as np

from . import formats

DONE_RE = re.compile(r"^DONE_(\d{8})$")


def model_path(out_dir, step: int) -> Path:
    return Path(out_dir) / f"model_{step:08d}.bin"


def state_path(out_dir, step: int, rank: int) -> Path:
    return Path(out_dir) / f"state_{step:08d}_{rank:05d}.bin"


def done_path(out_dir, step: int) -> Path:
    return Path(out_dir) / f"DONE_{step:08d}"


def complete_steps(out_dir) -> list[int]:
    """Steps with a DONE marker, oldest first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := DONE_RE.match(p.name)))


def latest_step(out_dir) -> int | None:
    """The newest complete checkpoint (-y 1 resumes from it), or None."""
    steps = complete_steps(out_dir)
    return steps[-1] if steps else None


def save_model(out_dir, step: int, engine) -> None:
    formats.write_model(model_path(out_dir, step), engine.config, engine.get_params(),
                        dtype=engine.param_dtype)


def save_state(out_dir, step: int, engine, *, rank: int = 0, nproc: int = 1,
               loader_state: dict | None = None, extra: dict | None = None,
               shard: tuple[int, int] | None = None) -> None:
    """This rank's optimizer state; with ZeRO-1 (`shard` = [start, end) of the flat buffer)
    only its slice of m, v and master weights, as llm.c writes them."""
    opt = engine.get_optimizer_state()
    sl = slice(*shard) if shard else slice(None)
    master = opt.get("master")
    ls = loader_state or {}
    formats.write_state(
        state_path(out_dir, step, rank), step=step, m=opt["m"][sl], v=opt["v"][sl],
        master=None if master is None else master[sl], nproc=nproc, rank=rank,
        shard_idx=int(ls.get("shard_idx", 0)),
        # llm.c's header holds the last sample of nproc*B*T tokens drawn (size_t -1 before
        # the first of a shard); our loader state holds the next sample of B*T tokens
        sample_idx=(int(ls.get("sample_idx", 0)) // nproc - 1) % 2**64,
        extra={"loader": ls, **(extra or {})})


def mark_done(out_dir, step: int, run_id: str = "") -> None:
    """DONE_%08d holds the id of the run that wrote the checkpoint (llm.c's is empty: it
    only tests that the file exists)."""
    formats.atomic_write(done_path(out_dir, step), [run_id.encode()])


def done_run_id(out_dir, step: int) -> str:
    try:
        return done_path(out_dir, step).read_bytes()[:64].decode(errors="replace").strip()
    except OSError:
        return ""


def load_for(out_dir, step: int, rank: int, world: int) -> dict:
    """A complete checkpoint (model config and params, and this rank's optimizer state) for a
    run of `world` processes, whatever the saved run's process count and
    ZeRO stage: sharded (ZeRO-1) m, v and master weights are gathered from every saved rank's
    file into full arrays (each rank then uses its own slice), so a run can resume on a
    different number of GPUs (llm.c cannot)."""
    config, params = formats.read_model(model_path(out_dir, step))
    first = formats.read_state(state_path(out_dir, step, 0))
    _check_extra(state_path(out_dir, step, 0), first["extra"])
    N = config.num_params
    if first["m"].size == N:  # unsharded: every rank holds the full state
        own = state_path(out_dir, step, rank)
        state = formats.read_state(own) if own.exists() and first["nproc"] == world else first
        return {"config": config, "params": params, "state": state}
    parts = [first] + [formats.read_state(state_path(out_dir, step, r))
                       for r in range(1, first["nproc"])]
    full = dict(first)
    for key in ("m", "v", "master"):
        if first[key] is not None:
            full[key] = np.concatenate([p[key] for p in parts])
    if full["m"].size != N:
        raise formats.FormatError(state_path(out_dir, step, 0), "optimizer state size",
                                  f"{N} values over {first['nproc']} shards",
                                  f"{full['m'].size}", "the checkpoint is incomplete")
    if first["nproc"] == world:  # same world: this rank's own loader fields
        full["extra"] = parts[rank]["extra"]
    return {"config": config, "params": params, "state": full}


def _check_extra(path, extra) -> None:
    """What save_state writes: loader / outliers / run objects (outliers: loss and norm)."""
    if extra is None:  # llm.c's state file
        return
    for key in ("loader", "outliers", "run"):
        if key in extra and not isinstance(extra[key], dict):
            raise formats.FormatError(path, f"llmpy extra {key!r}", "an object",
                                      type(extra[key]).__name__, "the state file is damaged")
    out = extra.get("outliers")
    if out is not None and not all(isinstance(out.get(k), dict) for k in ("loss", "norm")):
        raise formats.FormatError(path, "llmpy extra 'outliers'", "objects 'loss' and 'norm'",
                                  sorted(out), "the state file is damaged")


def delete(out_dir, step: int) -> None:
    done_path(out_dir, step).unlink(missing_ok=True)
    model_path(out_dir, step).unlink(missing_ok=True)
    for p in Path(out_dir).glob(f"state_{step:08d}_*.bin"):
        p.unlink(missing_ok=True)


def apply_retention(out_dir, keep_last: int, major_every: int,
                    run_id: str | None = None) -> list[int]:
    """Delete all but the newest `keep_last` complete checkpoints, sparing majors (steps that
    are a multiple of `major_every`). keep_last <= 0 keeps everything. With `run_id`, only
    that run's checkpoints (DONE content) are counted and deleted: another run's (or llm.c's)
    are never touched. Returns deleted steps."""
    if keep_last <= 0:
        return []
    steps = complete_steps(out_dir)
    if run_id is not None:
        steps = [s for s in steps if done_run_id(out_dir, s) == run_id]
    doomed = [s for s in steps[:-keep_last] if not (major_every > 0 and s % major_every == 0)]
    for s in doomed:
        delete(out_dir, s)
    return doomed


def kill_point(where: str, step: int) -> None:
    """Crash tests: LLMPY_TEST_KILL=in_checkpoint:STEP (after the model file, before the state
    and DONE) or after_checkpoint:STEP sends this process a real SIGKILL there."""
    if os.environ.get("LLMPY_TEST_KILL") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
