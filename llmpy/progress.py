"""What a training run tells its user: the start-up table of settings (llm.c prints one),
the per-step line (llm.c's, plus elapsed time and an ETA), and OUT/run_config.json, the
resolved settings that `llmpy train --config` replays and eval/sample/export on a run dir
read. `run` is llmpy.train.Run; only its attributes are used here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .formats import atomic_write
from .logger import print_table
from .mfu import flops_per_token, peak_flops
from .models import engine_flags_row
from .settings import RUN_CONFIG_FILE, run_config_record


def print_startup(run) -> None:
    rc, tl = run.rc, run.train_loader
    print_table("llm.py train", [
        ("engine", f"{run.engine_name} on {run.device}"),
        ("engine flags", engine_flags_row(rc, run.engine_name, run.device)),
        ("model", rc.init or "d12"), ("shape", run.config.describe()),
        ("train data", f"{run.train_glob} ({tl.num_shards} shards, "
                       f"{tl.tokens_per_epoch:,} tokens/epoch)"),
        ("val data", f"{run.val_glob or '-'} ({run.val_batches} batches)"),
        ("batch", f"B={rc.batch_size} T={rc.seq_len} processes={run.dist.world} "
                  f"total={run.total_batch} tokens (grad accum {run.grad_accum})"),
        ("distributed", f"{run.dist.world} processes ({run.dist.backend}), ZeRO-{rc.zero}"
                        if run.dist.world > 1 else "no (1 process)"),
        ("steps", f"{run.steps} (resume from {run.start_step})" if run.start_step else run.steps),
        ("schedule", f"{rc.scheduler} lr={rc.lr:g} warmup={rc.warmup} "
                     f"final_frac={rc.final_lr_frac:g} wd={rc.weight_decay:g}"),
        ("val / sample / ckpt", f"every {rc.val_every} / {rc.sample_every} / "
                                f"{rc.checkpoint_every or 'end'}"),
        ("out dir", rc.out_dir or "- (no logs or checkpoints)"),
        ("skip z (loss/norm)", f"{rc.skip_loss_z:g} / {rc.skip_norm_z:g}; "
                               f"non-finite: {rc.nan_policy}"),
    ])


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def print_step(run, step, loss, zloss, norm, znorm, lr, dt, skip, comm_ms=None) -> None:
    """llm.c's step line, plus elapsed time and ETA (and the collective wait with world > 1)."""
    peak = peak_flops(run.device)
    tok_s = run.total_batch / dt
    mfu = f" | MFU {100 * tok_s * flops_per_token(run.config, run.rc.seq_len) / peak:.1f}%" \
        if peak else ""
    z = [f"{v:+.2f}z" if math.isfinite(v) else "z -" for v in (zloss, znorm)]  # - : window
    elapsed = time.perf_counter() - run.t_start                             # not yet full
    done = step + 1 - run.start_step  # rate from the first step on (start-up not counted)
    eta = (time.perf_counter() - run.t_steps) / done * (run.steps - step - 1)
    print(f"step {step + 1:4d}/{run.steps} | loss {loss:.6f} ({z[0]}) | norm {norm:.4f} "
          f"({z[1]}) | lr {lr:.2e} | {dt * 1e3:.1f} ms{mfu} | {tok_s:,.0f} tok/s | "
          f"{_hms(elapsed)} elapsed, ETA {_hms(eta)}" +
          (f" | comm wait {comm_ms:.1f} ms" if comm_ms is not None else "") +
          (f" | SKIPPED ({skip})" if skip else ""),
          flush=True)
    every = run.rc.gpu_log_every
    if every > 0 and step % every == 0 and run.device.startswith("cuda"):
        import torch
        print(f"gpu memory: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak, "
              f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved")


def save_run_config(run) -> None:
    """OUT/run_config.json: the resolved settings (`llmpy train --config` replays them; eval,
    sample and export on the run dir read them). A resume keeps the file it finds."""
    rc = run.rc
    if not rc.out_dir:
        print("note: no output dir (-o is empty): this run saves nothing (no main.log, "
              "no checkpoint, no run_config.json)", flush=True)
        return
    path = Path(rc.out_dir) / RUN_CONFIG_FILE
    if run.resume_state is not None and path.exists():
        return
    record = run_config_record(rc, engine=run.engine_name, device=run.device,
                               train_data=run.train_glob, val_data=run.val_glob,
                               model=run.config.describe())
    atomic_write(path, [json.dumps(record, indent=1).encode() + b"\n"])
