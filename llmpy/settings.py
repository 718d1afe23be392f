"""The run's settings: llm.c's training flags, parsed into one frozen RunConfig and checked
in one place before anything is allocated (llm.c's train_gpt2.cu reads its flags at the top of
main(); we keep them in a dataclass that is printed at start and saved with checkpoints).

Every llm.c flag takes a value, `-h` included (HellaSwag), so help is `--help`. Without `-i`
the main job's settings apply: a small GPT on the embedded tinyshakespeare, sized for the
device (MAIN_JOB_CPU / MAIN_JOB_GPU).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .errors import LlmpyError
from .schedulers import SCHEDULERS

@dataclass(frozen=True)
class RunConfig:
    """Resolved run settings (llm.c's flags). Printed at start, saved with checkpoints."""
    train_data: str = ""          # -i
    val_data: str = ""            # -j
    init: str = ""                # -e
    out_dir: str = ""             # -o
    batch_size: int = 4           # -b
    seq_len: int = 1024           # -t
    total_batch: int = -1         # -d
    max_steps: int = -1           # -x
    scheduler: str = "cosine"     # -k
    lr: float = 3e-4              # -l
    warmup: int = 0               # -u
    final_lr_frac: float = 1.0    # -q
    weight_decay: float = 0.0     # -c
    skip_loss_z: float = 0.0      # -sl
    skip_norm_z: float = 0.0      # -sg
    val_every: int = 20           # -v
    val_batches: int = 20         # -m
    sample_every: int = 20        # -s
    gen_tokens: int = 64          # -g
    hellaswag: int = 0            # -h
    overfit: int = 0              # -a
    checkpoint_every: int = 0     # -n
    keep_last: int = 0            # -nk
    major_every: int = 0          # -nm
    resume: int = 0               # -y
    zero: int = 0                 # -z
    recompute: int = 1            # -r
    master_weights: int = 1       # -w
    gelu_fusion: int = 0          # -ge
    tf32: int = 1                 # -f
    gpu_log_every: int = -1       # -lg
    num_processes: int = 1        # -pn
    process_rank: int = 0         # -pr
    gpus_per_node: int = 8        # -pg
    init_method: str = "mpi"      # -pi
    server_ip: str = ""           # -ps
    fs_path: str = ""             # -pf
    engine: str = "auto"
    attention: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    compile: int = -1
    seed: int = 1337
    shuffle: int = 1
    overlap: int = 1
    nan_policy: str = "skip"
    prompt: str = ""
    top_k: int = 0
    temperature: float = 1.0
    hellaswag_file: str = ""
    overwrite: int = 0
    allow_changes: int = 0


ATTENTION = ("auto", "cudnn", "flash", "math")

# (short flag, long flag, field, type, help). Every llm.c flag takes a value.
FLAGS = [
    ("-i", "--train-data", "train_data", str, "train token shards (glob); default: embedded "
     "tinyshakespeare"),
    ("-j", "--val-data", "val_data", str, "val token shards (glob)"),
    ("-e", "--init", "init", str, "model: descriptor (d12, gpt3:c768, L=..,C=..,NH=..), "
     "llm.c .bin file, checkpoint dir, or Hugging Face gpt2* name/dir"),
    ("-o", "--out-dir", "out_dir", str, "output dir for main.log and checkpoints"),
    ("-b", "--batch-size", "batch_size", int, "micro-batch size per process"),
    ("-t", "--seq-len", "seq_len", int, "sequence length"),
    ("-d", "--total-batch", "total_batch", int, "total batch in tokens (-1: B*T*processes)"),
    ("-x", "--max-steps", "max_steps", int, "optimizer steps (-1: one epoch)"),
    ("-k", "--scheduler", "scheduler", str, "LR schedule: " + "|".join(SCHEDULERS)),
    ("-l", "--lr", "lr", float, "peak learning rate"),
    ("-u", "--warmup", "warmup", int, "warmup steps (cosine, linear, wsd; constant has "
     "none, as in llm.c)"),
    ("-q", "--final-lr-frac", "final_lr_frac", float, "final LR as a fraction of -l"),
    ("-c", "--weight-decay", "weight_decay", float, "AdamW weight decay (2-D tensors)"),
    ("-sl", "--skip-loss-z", "skip_loss_z", float, "skip update if loss z-score > this (0=off)"),
    ("-sg", "--skip-norm-z", "skip_norm_z", float, "skip update if norm z-score > this (0=off)"),
    ("-v", "--val-every", "val_every", int, "validate (and HellaSwag) every N steps (0=off)"),
    ("-m", "--val-batches", "val_batches", int, "validation batches (-1: all)"),
    ("-s", "--sample-every", "sample_every", int, "sample every N steps (0=off)"),
    ("-g", "--gen-tokens", "gen_tokens", int, "tokens to generate when sampling"),
    ("-h", "--hellaswag", "hellaswag", int, "HellaSwag eval every -v steps (0/1)"),
    ("-a", "--overfit", "overfit", int, "overfit the first val batch (0/1; llm.c's -a: "
     "train on the val data, unshuffled)"),
    ("-n", "--checkpoint-every", "checkpoint_every", int, "checkpoint every N steps (0=end only)"),
    ("-nk", "--keep-last", "keep_last", int, "keep the newest K checkpoints (0=all)"),
    ("-nm", "--major-every", "major_every", int, "checkpoints at multiples of N are kept"),
    ("-y", "--resume", "resume", int, "resume from the newest complete checkpoint (0/1)"),
    ("-z", "--zero", "zero", int, "ZeRO stage (0 or 1)"),
    ("-r", "--recompute", "recompute", int, "recompute in backward: 0 none, 1 GELU, 2 +LN"),
    ("-w", "--master-weights", "master_weights", int, "keep fp32 master weights (0/1)"),
    ("-ge", "--gelu-fusion", "gelu_fusion", int, "fuse GELU into the fc matmul (only 0: "
     "not implemented)"),
    ("-f", "--tf32", "tf32", int, "allow TF32 matmuls (0/1)"),
    ("-lg", "--gpu-log-every", "gpu_log_every", int, "log GPU memory every N steps (-1=off)"),
    ("-pn", "--num-processes", "num_processes", int, "number of processes"),
    ("-pr", "--process-rank", "process_rank", int, "this process's rank"),
    ("-pg", "--gpus-per-node", "gpus_per_node", int, "GPUs per node"),
    ("-pi", "--init-method", "init_method", str, "multi-process init: mpi|tcp|fs"),
    ("-ps", "--server-ip", "server_ip", str, "rendezvous server (tcp init)"),
    ("-pf", "--fs-path", "fs_path", str, "shared-file path (fs init)"),
    (None, "--engine", "engine", str, "numpy|torch|triton|auto"),
    (None, "--attention", "attention", str, "attention kernel of the triton engine: "
     "auto|cudnn|flash|math"),
    (None, "--device", "device", str, "cpu|cuda|mps|auto"),
    (None, "--dtype", "dtype", str, "fp32|bf16|auto (torch engine)"),
    (None, "--compile", "compile", int, "torch.compile (torch engine; -1 = on for CUDA)"),
    (None, "--seed", "seed", int, "seed for init, data shuffling and sampling"),
    (None, "--shuffle", "shuffle", int, "shuffle train shards and samples each epoch (0/1)"),
    (None, "--overlap", "overlap", int, "all-reduce gradients during the backward (0/1; "
     "several processes; the same result either way)"),
    (None, "--nan-policy", "nan_policy", str, "on a non-finite loss or gradient: skip|stop"),
    (None, "--prompt", "prompt", str, "text to continue when sampling (default: EOT)"),
    (None, "--top-k", "top_k", int, "top-k when sampling (0 = off)"),
    (None, "--temperature", "temperature", float, "sampling temperature"),
    (None, "--hellaswag-file", "hellaswag_file", str, "HellaSwag eval file for -h 1"),
    (None, "--overwrite", "overwrite", int, "1: a fresh run may replace the checkpoints and "
     "logs of another run in -o (they are deleted first)"),
    (None, "--allow-changes", "allow_changes", int, "1: -y 1 may resume with settings that "
     "differ from the checkpoint's (-e, -b, -t, -d, -k, ...)"),
]

# The main job (no -i): a small GPT on embedded tinyshakespeare, sized for the device.
MAIN_JOB_CPU = dict(init="L=4,C=128,NH=4,T=128", batch_size=16, seq_len=64, max_steps=400,
                    lr=1e-3, warmup=20, final_lr_frac=0.1, weight_decay=0.0, val_every=100,
                    val_batches=20, sample_every=0, gen_tokens=96, out_dir="out")
MAIN_JOB_GPU = dict(init="d6", batch_size=32, seq_len=256, max_steps=600, lr=1e-3,
                    warmup=50, final_lr_frac=0.1, weight_decay=0.1, val_every=100,
                    val_batches=20, sample_every=0, gen_tokens=128, out_dir="out")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (through the CLI), never usage + traceback
        raise LlmpyError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llmpy train", add_help=False, allow_abbrev=False,
                description="Train a GPT (llm.c's flags). With no flags: the main job, a "
                            "small GPT on the embedded tinyshakespeare.")
    p.add_argument("--help", action="help", help="show this help and exit")
    for short, long, dest, typ, help_ in FLAGS:
        names = [n for n in (short, long) if n]
        p.add_argument(*names, dest=dest, type=_typed(names[0], typ), default=None,
                       metavar=typ.__name__.upper(), help=help_)
    return p


def _typed(flag, typ):
    def convert(s):
        try:
            return typ(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {typ.__name__}, got {s!r}") from None
    convert.__name__ = typ.__name__  # argparse names the type in its message
    return convert


def parse_args(argv: list[str], has_cuda: bool = False) -> tuple[RunConfig, set[str]]:
    """Flags -> RunConfig (with main-job defaults when -i is absent) and the set of fields
    the user gave explicitly."""
    ns = vars(build_parser().parse_args(argv))
    given = {k for k, v in ns.items() if v is not None}
    values = {k: v for k, v in ns.items() if v is not None}
    if "train_data" not in given:
        preset = MAIN_JOB_GPU if has_cuda else MAIN_JOB_CPU
        values = {**preset, **values}
    return RunConfig(**values), given


def validate(rc: RunConfig) -> None:
    """Cross-field checks, before anything is allocated. One LlmpyError names the flag."""
    def need(cond, flag, what, got):
        if not cond:
            raise LlmpyError(f"{flag}: expected {what}, got {got!r}")
    need(rc.batch_size >= 1, "-b", "an integer >= 1", rc.batch_size)
    need(rc.seq_len >= 1, "-t", "an integer >= 1", rc.seq_len)
    need(rc.total_batch == -1 or rc.total_batch >= 1, "-d", "-1 or a positive token count",
         rc.total_batch)
    need(rc.max_steps == -1 or rc.max_steps >= 0, "-x", "-1 (one epoch) or >= 0", rc.max_steps)
    need(rc.scheduler in SCHEDULERS, "-k", "|".join(SCHEDULERS), rc.scheduler)
    need(rc.lr >= 0 and math.isfinite(rc.lr), "-l", "a finite learning rate >= 0", rc.lr)
    need(rc.warmup >= 0, "-u", ">= 0", rc.warmup)
    need(0 <= rc.final_lr_frac <= 1, "-q", "a fraction in [0, 1]", rc.final_lr_frac)
    need(rc.weight_decay >= 0, "-c", ">= 0", rc.weight_decay)
    need(rc.skip_loss_z >= 0, "-sl", ">= 0", rc.skip_loss_z)
    need(rc.skip_norm_z >= 0, "-sg", ">= 0", rc.skip_norm_z)
    need(rc.val_every >= 0, "-v", ">= 0", rc.val_every)
    need(rc.val_batches == -1 or rc.val_batches >= 1, "-m", "-1 or >= 1", rc.val_batches)
    need(rc.sample_every >= 0, "-s", ">= 0", rc.sample_every)
    need(rc.gen_tokens >= 1, "-g", ">= 1", rc.gen_tokens)
    need(rc.gpu_log_every == -1 or rc.gpu_log_every >= 1, "-lg", "-1 (off) or >= 1",
         rc.gpu_log_every)
    for flag, name in (("-h", "hellaswag"), ("-a", "overfit"), ("-y", "resume"),
                       ("-w", "master_weights"), ("-ge", "gelu_fusion"), ("-f", "tf32"),
                       ("--shuffle", "shuffle"), ("--overwrite", "overwrite"),
                       ("--allow-changes", "allow_changes"), ("--overlap", "overlap")):
        need(getattr(rc, name) in (0, 1), flag, "0 or 1", getattr(rc, name))
    need(rc.checkpoint_every >= 0, "-n", ">= 0", rc.checkpoint_every)
    need(rc.keep_last >= 0, "-nk", ">= 0", rc.keep_last)
    need(rc.major_every >= 0, "-nm", ">= 0", rc.major_every)
    need(rc.zero in (0, 1), "-z", "0 or 1", rc.zero)
    need(rc.recompute in (0, 1, 2), "-r", "0, 1 or 2", rc.recompute)
    need(rc.num_processes >= 1, "-pn", ">= 1", rc.num_processes)
    need(0 <= rc.process_rank < rc.num_processes, "-pr", f"in [0, {rc.num_processes})",
         rc.process_rank)
    need(rc.init_method in ("mpi", "tcp", "fs", "env"), "-pi", "mpi|tcp|fs", rc.init_method)
    need(rc.engine in ("auto", "numpy", "torch", "triton"), "--engine",
         "numpy|torch|triton|auto", rc.engine)
    need(rc.attention in ATTENTION, "--attention", "|".join(ATTENTION), rc.attention)
    if rc.gelu_fusion:
        raise LlmpyError("-ge 1: GELU fusion into the fc matmul is not implemented (the "
                         "engines' cuBLAS matmuls have no GELU epilogue that keeps the "
                         "pre-activation for the backward); use -ge 0")
    need(rc.device in ("auto", "cpu", "cuda", "mps") or rc.device.startswith("cuda:"),
         "--device", "cpu|cuda|mps|auto", rc.device)
    need(rc.dtype in ("auto", "fp32", "bf16"), "--dtype", "fp32|bf16|auto", rc.dtype)
    need(rc.nan_policy in ("skip", "stop"), "--nan-policy", "skip|stop", rc.nan_policy)
    need(rc.top_k >= 0, "--top-k", ">= 0", rc.top_k)
    need(rc.temperature >= 0, "--temperature", ">= 0", rc.temperature)
    if (rc.checkpoint_every or rc.resume) and not rc.out_dir:
        raise LlmpyError("-o: checkpoints (-n) and resume (-y) need an output dir, got none")
