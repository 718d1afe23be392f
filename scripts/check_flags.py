"""Check a `llmpy train` command line without training: the dry run of scripts/*.sh.

    python scripts/check_flags.py [--nproc N] [--need-resume] -- TRAIN_FLAGS...

Parses the flags with llmpy.settings.parse_args and runs llmpy.settings.validate (the checks the
trainer itself makes before allocating anything), then the ones the trainer only makes once
data and devices exist: the model descriptor, -t against the model's maxT, and -d against
B*T*N for N processes. Data files need not exist. Prints the resolved plan as a table and,
on its last line, `flags ok: DONE marker: PATH` (the marker of the last step's checkpoint,
whose existence means the run is over).
Bad flags: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "llmpy").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))    # run from a checkout without installing

from llmpy.checkpoint import done_path  # noqa: E402
from llmpy.config import from_descriptor, is_descriptor  # noqa: E402
from llmpy.errors import LlmpyError  # noqa: E402
from llmpy.logger import print_table  # noqa: E402
from llmpy.settings import parse_args, validate  # noqa: E402


HF_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def check(argv: list[str], nproc: int, need_resume: bool):
    """Raise LlmpyError on a bad flag; else return (the plan's rows, last step, out dir)."""
    if "-i" not in argv and "--train-data" not in argv:
        raise LlmpyError("-i: the scripts name their train shards; got no -i")
    rc, _ = parse_args(argv, has_cuda=True)
    validate(rc)
    if rc.num_processes > 1 and rc.num_processes != nproc:
        raise LlmpyError(f"-pn: expected the launcher's process count {nproc}, got "
                         f"{rc.num_processes}")
    rows = [("model", rc.init or "d12")]
    init = rc.init or "d12"
    if is_descriptor(init):
        config = from_descriptor(init)
        rows.append(("shape", f"{config.describe()}"))
        if rc.seq_len > config.max_seq_len:
            raise LlmpyError(f"-t: expected at most the model's maxT {config.max_seq_len}, "
                             f"got {rc.seq_len}")
    elif Path(init).exists() or init in HF_NAMES:
        rows.append(("shape", "(from the file, dir or Hugging Face; not read in a dry run)"))
    else:
        raise LlmpyError(f"-e: {init!r} is not a model descriptor (d12, gpt3:c768, "
                         f"L=..,C=..,NH=..), an existing file or dir, or a GPT-2 name "
                         f"({', '.join(HF_NAMES)})")
    per_micro = rc.batch_size * rc.seq_len * nproc
    total = rc.total_batch if rc.total_batch != -1 else per_micro
    if total % per_micro:
        raise LlmpyError(f"-d: total batch {total} must be divisible by B*T*processes = "
                         f"{rc.batch_size}*{rc.seq_len}*{nproc} = {per_micro} (lower -b, or "
                         f"change the number of GPUs)")
    if rc.max_steps == -1:
        raise LlmpyError("-x: the scripts need an explicit step count (their resume loop waits "
                         "for that step's DONE marker), got -1 (one epoch)")
    if need_resume and not rc.resume:
        raise LlmpyError("-y: the auto-resume loop needs -y 1, got 0")
    if not rc.out_dir:
        raise LlmpyError("-o: the scripts need an output dir (main.log, checkpoints), got none")
    every_ckpt = f"every {rc.checkpoint_every}" if rc.checkpoint_every else "at the end"
    rows += [
        ("processes", nproc),
        ("batch", f"B={rc.batch_size} T={rc.seq_len} total={total:,} tokens "
                  f"(grad accum {total // per_micro})"),
        ("steps", f"{rc.max_steps:,} = {rc.max_steps * total / 1e9:.2f}B tokens"),
        ("schedule", f"{rc.scheduler} lr={rc.lr:g} warmup={rc.warmup} "
                     f"final_frac={rc.final_lr_frac:g} wd={rc.weight_decay:g}"),
        ("val / HellaSwag / sample", f"every {rc.val_every} / "
                                     f"{'on' if rc.hellaswag else 'off'} / {rc.sample_every}"),
        ("checkpoints", f"{every_ckpt}, keep {rc.keep_last or 'all'}, resume {rc.resume}"),
        ("out dir", rc.out_dir),
    ]
    return rows, rc.max_steps, rc.out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        print("usage: python scripts/check_flags.py [--nproc N] [--need-resume] -- FLAGS...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="check_flags.py")
    p.add_argument("--nproc", type=int, default=1, help="processes the launcher starts")
    p.add_argument("--need-resume", action="store_true", help="require -y 1")
    opts = p.parse_args(argv[:split])
    try:
        rows, last_step, out_dir = check(argv[split + 1:], max(opts.nproc, 1), opts.need_resume)
    except LlmpyError as e:
        print(f"check_flags: error: {e}", file=sys.stderr)
        return 2
    print_table("llmpy train (dry run)", rows)
    print(f"flags ok: DONE marker: {done_path(out_dir, last_step)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
