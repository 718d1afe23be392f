"""The one training loop, for every engine: `llmpy train` (llm.c's train_gpt2.cu main()).

The loop owns everything that is not model math: flags, data, the LR schedule, gradient
accumulation, clipping, outlier and NaN skipping, validation, HellaSwag, sampling,
checkpoints and logs. Engines (llmpy.engines) only do forward, backward and AdamW.

Flags are llm.c's (each takes a value; `-h` is HellaSwag, so help is `--help`) with long
aliases. With no arguments it is the main job: a small GPT trained from scratch on the
embedded tinyshakespeare (shards built on first use), a few minutes on a laptop CPU, a
bigger model on a GPU.

Per step, in llm.c's order: validation, HellaSwag and sampling when due, a checkpoint when
due, then (unless it is the last step) one optimizer step over -d tokens:
  zero_grad; grad_accum x (next_batch, forward, backward(1/grad_accum)); grad_norm;
  skip the update if the loss or norm is an outlier or not finite; else
  step(lr(step), t=step+1, grad_scale=min(1, 1/norm)).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .config import ModelConfig, from_descriptor, is_descriptor
from .errors import LlmpyError, TrainingStopped
from .formats import read_model, read_model_header
from .schedulers import SCHEDULERS, get_lr

GRAD_CLIP = 1.0
OUTLIER_WINDOW = 128

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; matched against the CUDA device name.
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
                   ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                   ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12)]


# ----------------------------------------------------------------------------------------
# settings

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
    device: str = "auto"
    dtype: str = "auto"
    compile: int = -1
    seed: int = 1337
    shuffle: int = 1
    nan_policy: str = "skip"
    prompt: str = ""
    top_k: int = 0
    temperature: float = 1.0
    hellaswag_file: str = ""


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
    ("-u", "--warmup", "warmup", int, "warmup steps"),
    ("-q", "--final-lr-frac", "final_lr_frac", float, "final LR as a fraction of -l"),
    ("-c", "--weight-decay", "weight_decay", float, "AdamW weight decay (2-D tensors)"),
    ("-sl", "--skip-loss-z", "skip_loss_z", float, "skip update if loss z-score > this (0=off)"),
    ("-sg", "--skip-norm-z", "skip_norm_z", float, "skip update if norm z-score > this (0=off)"),
    ("-v", "--val-every", "val_every", int, "validate (and HellaSwag) every N steps (0=off)"),
    ("-m", "--val-batches", "val_batches", int, "validation batches (-1: all)"),
    ("-s", "--sample-every", "sample_every", int, "sample every N steps (0=off)"),
    ("-g", "--gen-tokens", "gen_tokens", int, "tokens to generate when sampling"),
    ("-h", "--hellaswag", "hellaswag", int, "HellaSwag eval every -v steps (0/1)"),
    ("-a", "--overfit", "overfit", int, "overfit a single batch (0/1)"),
    ("-n", "--checkpoint-every", "checkpoint_every", int, "checkpoint every N steps (0=end only)"),
    ("-nk", "--keep-last", "keep_last", int, "keep the newest K checkpoints (0=all)"),
    ("-nm", "--major-every", "major_every", int, "checkpoints at multiples of N are kept"),
    ("-y", "--resume", "resume", int, "resume from the newest complete checkpoint (0/1)"),
    ("-z", "--zero", "zero", int, "ZeRO stage (0 or 1)"),
    ("-r", "--recompute", "recompute", int, "recompute in backward: 0 none, 1 GELU, 2 +LN"),
    ("-w", "--master-weights", "master_weights", int, "keep fp32 master weights (0/1)"),
    ("-ge", "--gelu-fusion", "gelu_fusion", int, "fuse GELU into matmuls (0/1)"),
    ("-f", "--tf32", "tf32", int, "allow TF32 matmuls (0/1)"),
    ("-lg", "--gpu-log-every", "gpu_log_every", int, "log GPU memory every N steps (-1=off)"),
    ("-pn", "--num-processes", "num_processes", int, "number of processes"),
    ("-pr", "--process-rank", "process_rank", int, "this process's rank"),
    ("-pg", "--gpus-per-node", "gpus_per_node", int, "GPUs per node"),
    ("-pi", "--init-method", "init_method", str, "multi-process init: mpi|tcp|fs"),
    ("-ps", "--server-ip", "server_ip", str, "rendezvous server (tcp init)"),
    ("-pf", "--fs-path", "fs_path", str, "shared-file path (fs init)"),
    (None, "--engine", "engine", str, "numpy|torch|triton|auto"),
    (None, "--device", "device", str, "cpu|cuda|mps|auto"),
    (None, "--dtype", "dtype", str, "fp32|bf16|auto (torch engine)"),
    (None, "--compile", "compile", int, "torch.compile (torch engine; -1 = on for CUDA)"),
    (None, "--seed", "seed", int, "seed for init, data shuffling and sampling"),
    (None, "--shuffle", "shuffle", int, "shuffle train shards and samples each epoch (0/1)"),
    (None, "--nan-policy", "nan_policy", str, "on a non-finite loss or gradient: skip|stop"),
    (None, "--prompt", "prompt", str, "text to continue when sampling (default: EOT)"),
    (None, "--top-k", "top_k", int, "top-k when sampling (0 = off)"),
    (None, "--temperature", "temperature", float, "sampling temperature"),
    (None, "--hellaswag-file", "hellaswag_file", str, "HellaSwag eval file for -h 1"),
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
                       ("--shuffle", "shuffle")):
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
    need(rc.device in ("auto", "cpu", "cuda", "mps") or rc.device.startswith("cuda:"),
         "--device", "cpu|cuda|mps|auto", rc.device)
    need(rc.dtype in ("auto", "fp32", "bf16"), "--dtype", "fp32|bf16|auto", rc.dtype)
    need(rc.nan_policy in ("skip", "stop"), "--nan-policy", "skip|stop", rc.nan_policy)
    need(rc.top_k >= 0, "--top-k", ">= 0", rc.top_k)
    need(rc.temperature >= 0, "--temperature", ">= 0", rc.temperature)
    if (rc.checkpoint_every or rc.resume) and not rc.out_dir:
        raise LlmpyError("-o: checkpoints (-n) and resume (-y) need an output dir, got none")


# ----------------------------------------------------------------------------------------
# engine, device and model

def pick_engine_and_device(engine: str = "auto", device: str = "auto") -> tuple[str, str]:
    """auto: triton on CUDA (torch if triton is missing), numpy on the CPU."""
    if device == "auto":
        device = "cpu"
        try:
            import torch
            if torch.cuda.is_available():
                device = "cuda"
        except ImportError:
            pass
    if engine == "auto":
        if device.startswith("cuda"):
            try:
                import importlib
                importlib.import_module("llmpy.engines.triton")
                engine = "triton"
            except ImportError:
                engine = "torch"
        elif device == "mps":
            engine = "torch"
        else:
            engine = "numpy"
    if engine == "numpy" and device != "cpu":
        raise LlmpyError(f"--engine numpy runs on the CPU only, got --device {device}")
    if engine == "triton" and not device.startswith("cuda"):
        raise LlmpyError(f"--engine triton needs CUDA, got --device {device}")
    return engine, device


def peek_config(init: str) -> ModelConfig:
    """The model shape behind -e without reading any weights (for checks before allocating)."""
    if is_descriptor(init):
        return from_descriptor(init)
    p = Path(init)
    if p.is_file():
        return read_model_header(p)[0]
    if p.is_dir() and ckpt.latest_step(p) is not None:
        return read_model_header(ckpt.model_path(p, ckpt.latest_step(p)))[0]
    if _is_hf(init, p):
        from .hf import load_hf_config
        return load_hf_config(init)
    return load_init(init)[0]  # not a model: load_init raises the error that says so


def load_init(init: str, seed: int = 1337, flag: str = "-e") -> tuple[ModelConfig, np.ndarray]:
    """-e: a descriptor (random init), an llm.c model file, an output dir (its newest complete
    checkpoint), or Hugging Face GPT-2 weights (gpt2|gpt2-medium|gpt2-large|gpt2-xl|DIR)."""
    from .init import init_params
    if is_descriptor(init):
        config = from_descriptor(init)
        return config, init_params(config, seed)
    p = Path(init)
    if p.is_file():
        return read_model(p)
    if p.is_dir() and ckpt.latest_step(p) is not None:
        return read_model(ckpt.model_path(p, ckpt.latest_step(p)))
    if _is_hf(init, p):
        from .hf import load_hf
        return load_hf(init)
    raise LlmpyError(f"{flag}: {init!r} is not a model descriptor (d12, gpt3:c768, L=..,C=..,NH=..),"
                     f" an llm.c model file, a checkpoint dir or a Hugging Face GPT-2 dir/name")


def _is_hf(init: str, p: Path) -> bool:
    """-e names Hugging Face GPT-2 weights: a hub name or a directory with config.json."""
    return init in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or \
        (p.is_dir() and (p / "config.json").exists())


def engine_options(rc: RunConfig, engine: str, device: str) -> dict:
    if engine == "numpy":
        return {"seed": rc.seed}
    opts = {"seed": rc.seed, "device": device}
    if engine == "torch":
        dtype = rc.dtype if rc.dtype != "auto" else ("bf16" if device.startswith("cuda") else
                                                     "fp32")
        compile_ = rc.compile if rc.compile != -1 else int(device.startswith("cuda"))
        opts.update(dtype=dtype, compile=bool(compile_))
    if engine == "triton":
        opts.update(recompute=rc.recompute, master_weights=bool(rc.master_weights),
                    gelu_fusion=rc.gelu_fusion)
    return opts


# ----------------------------------------------------------------------------------------
# outlier detection (llm.c's llmc/outlier_detector.h)

class OutlierDetector:
    """z-score of each new value against the previous `window` values (nan until full)."""

    def __init__(self, window: int = OUTLIER_WINDOW):
        self.window = window
        self.buffer = [0.0] * window
        self.count = 0
        self.index = 0

    def update(self, x: float) -> float:
        if self.count < self.window:
            self.buffer[self.count] = x
            self.count += 1
            return math.nan
        mean = sum(self.buffer) / self.window
        var = sum((b - mean) ** 2 for b in self.buffer) / self.window
        std = math.sqrt(var)
        z = (x - mean) / std if std > 0 else math.nan
        self.buffer[self.index] = x
        self.index = (self.index + 1) % self.window
        return z

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer), "count": self.count, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.buffer, self.count, self.index = list(s["buffer"]), int(s["count"]), int(s["index"])


# ----------------------------------------------------------------------------------------
# logging

class Logger:
    """main.log in llm.c's line format, plus metrics.jsonl with full-precision values."""

    def __init__(self, out_dir: str, resume: bool, enabled: bool = True):
        self.enabled = bool(out_dir) and enabled
        if self.enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            mode = "a" if resume else "w"
            self.log = open(Path(out_dir) / "main.log", mode)
            self.jsonl = open(Path(out_dir) / "metrics.jsonl", mode)

    def _write(self, line: str, record: dict) -> None:
        if self.enabled:
            self.log.write(line + "\n")
            self.log.flush()
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def train(self, step, loss, lr, norm, **more):
        self._write(f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}",
                    {"step": step, "train_loss": loss, "lr": lr, "norm": norm, **more})

    def val(self, step, loss):
        self._write(f"s:{step} tel:{loss:.4f}", {"step": step, "val_loss": loss})

    def hellaswag(self, step, acc):
        self._write(f"s:{step} eval:{acc:.4f}", {"step": step, "hellaswag": acc})

    def close(self):
        if self.enabled:
            self.log.close()
            self.jsonl.close()


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"+{'-' * (width + 2)}+{'-' * 52}+")
    print(f"| {title:<{width}} | {'':<50} |")
    print(f"+{'-' * (width + 2)}+{'-' * 52}+")
    for k, v in rows:
        print(f"| {k:<{width}} | {str(v):<50} |")
    print(f"+{'-' * (width + 2)}+{'-' * 52}+")


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch
    name = torch.cuda.get_device_name()
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(config: ModelConfig, T: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*C*T for attention (PaLM)."""
    return 6 * config.num_params + 12 * config.num_layers * config.channels * T


# ----------------------------------------------------------------------------------------
# evaluation helpers

def val_loss(engine, loader, num_batches: int) -> float:
    loader.reset()
    total = 0.0
    for _ in range(num_batches):
        x, y = loader.next_batch()
        total += engine.forward(x, y)
    return total / num_batches


def sample_text(engine, rc: RunConfig, step: int) -> str:
    from .sample import generate
    from .tokenizer import get_tokenizer
    tok = get_tokenizer()
    prompt = tok.encode(rc.prompt) if rc.prompt else [tok.eot]
    row = generate(engine, prompt, rc.gen_tokens, temperature=rc.temperature,
                   top_k=rc.top_k or None, seed=rc.seed + step)[0]
    return rc.prompt + tok.decode(row)


# ----------------------------------------------------------------------------------------
# the loop

def train(rc: RunConfig, given: set[str] | None = None) -> dict:
    # `given` (the flags set explicitly, from parse_args) is accepted so that
    # train(*parse_args(argv)) reads naturally; the loop itself needs only the RunConfig.
    """Run training as configured. Returns a summary dict (losses, final val loss, ...)."""
    from .dist import init as init_dist

    validate(rc)
    engine_name, device = pick_engine_and_device(rc.engine, rc.device)
    dist = init_dist(rc, device)
    try:
        return _train(rc, dist, engine_name, device)
    finally:
        dist.shutdown()


def _train(rc: RunConfig, dist, engine_name: str, device: str) -> dict:
    from .data.loader import DistributedDataLoader, EvalLoader
    from .engines import make_engine

    rank, world, master = dist.rank, dist.world, dist.master
    if world > 1:
        if engine_name == "numpy":
            raise LlmpyError("--engine numpy runs in one process; use --engine torch or "
                             "triton for multi-process training")
        if device == "cuda":
            device = f"cuda:{dist.local_rank}"
    if rc.zero and world == 1 and master:
        print("note: -z 1 with one process is the same as -z 0")
    if device.startswith("cuda"):  # -f: TF32 for fp32 matmuls and convolutions (llm.c's -f)
        import torch
        torch.backends.cuda.matmul.allow_tf32 = bool(rc.tf32)
        torch.backends.cudnn.allow_tf32 = bool(rc.tf32)

    # -- data first: bad shards fail before anything big is allocated
    train_glob, val_glob = rc.train_data, rc.val_data
    if not train_glob:
        from .data.tinyshakespeare import ensure_tinyshakespeare
        train_path, val_path = ensure_tinyshakespeare()
        train_glob = str(train_path)
        val_glob = val_glob or str(val_path)
    config = peek_config(rc.init or "d12")
    B, T = rc.batch_size, rc.seq_len
    if T > config.max_seq_len:
        raise LlmpyError(f"-t: expected at most the model's maxT {config.max_seq_len}, got {T}")
    tokens_per_micro = B * T * world
    total_batch = rc.total_batch if rc.total_batch != -1 else tokens_per_micro
    if total_batch % tokens_per_micro:
        raise LlmpyError(f"-d: total batch {total_batch} must be divisible by B*T*processes = "
                         f"{B}*{T}*{world} = {tokens_per_micro}")
    grad_accum = total_batch // tokens_per_micro
    train_loader = DistributedDataLoader(train_glob, B, T, rank, world,
                                         shuffle=bool(rc.shuffle), seed=rc.seed)
    val_loader = DistributedDataLoader(val_glob, B, T, rank, world) if val_glob else None
    if val_loader is not None and rc.val_every > 0 and val_loader.batches_per_epoch < 1:
        val_loader = None
    if rc.max_steps == -1:
        steps = train_loader.tokens_per_epoch // total_batch
        if steps < 1:
            raise LlmpyError(f"-d: one epoch of {train_glob} ({train_loader.tokens_per_epoch} "
                             f"tokens) is smaller than one step of {total_batch} tokens")
    else:
        steps = rc.max_steps
    val_batches = 0
    if val_loader is not None and rc.val_every > 0:
        avail = val_loader.batches_per_epoch
        val_batches = avail if rc.val_batches == -1 else min(rc.val_batches, avail)
    hs_loader = None
    if rc.hellaswag:
        hs_file = rc.hellaswag_file or str(_default_hellaswag_path())
        if not Path(hs_file).is_file():
            raise LlmpyError(f"-h 1: HellaSwag eval file {hs_file} not found (build it with "
                             f"`llmpy data hellaswag`, or pass --hellaswag-file)")
        hs_loader = EvalLoader(hs_file, B - B % 4 or 4, T, rank, world)

    # -- resume point
    start_step, resume_state = 0, None
    if rc.resume:
        last = ckpt.latest_step(rc.out_dir)
        if last is not None:
            resume_state = ckpt.load_for(rc.out_dir, last, rank, world)
            start_step = last
            config = resume_state["config"]

    # -- model
    if resume_state is not None:
        params = resume_state["params"]
    else:
        config, params = load_init(rc.init or "d12", seed=rc.seed)
    engine = make_engine(engine_name, config, **engine_options(rc, engine_name, device))
    engine.set_params(params)
    del params
    sync = GradSync(engine, dist, rc.zero)
    loss_det, norm_det = OutlierDetector(), OutlierDetector()
    if resume_state is not None:
        st = resume_state["state"]
        engine.set_optimizer_state(st["m"], st["v"], st["master"])
        extra = st["extra"] or {}
        if "loader" in extra:
            train_loader.load_state_dict(rescale_loader_state(extra["loader"], train_loader))
        if "outliers" in extra:
            loss_det.load_state_dict(extra["outliers"]["loss"])
            norm_det.load_state_dict(extra["outliers"]["norm"])

    if master:
        print_table("llm.py train", [
            ("engine", f"{engine_name} on {device}"), ("model", rc.init or "d12"),
            ("shape", config.describe()),
            ("train data", f"{train_glob} ({train_loader.num_shards} shards, "
                           f"{train_loader.tokens_per_epoch:,} tokens/epoch)"),
            ("val data", f"{val_glob or '-'} ({val_batches} batches)"),
            ("batch", f"B={B} T={T} processes={world} total={total_batch} tokens "
                      f"(grad accum {grad_accum})"),
            ("distributed", f"{world} x {dist.backend or '-'}, ZeRO-{rc.zero if world > 1 else 0}"),
            ("steps", f"{steps} (resume from {start_step})" if start_step else steps),
            ("schedule", f"{rc.scheduler} lr={rc.lr:g} warmup={rc.warmup} "
                         f"final_frac={rc.final_lr_frac:g} wd={rc.weight_decay:g}"),
            ("val / sample / ckpt", f"every {rc.val_every} / {rc.sample_every} / "
                                    f"{rc.checkpoint_every or 'end'}"),
            ("out dir", rc.out_dir or "- (no logs or checkpoints)"),
            ("skip z (loss/norm)", f"{rc.skip_loss_z:g} / {rc.skip_norm_z:g}; "
                                   f"non-finite: {rc.nan_policy}"),
        ])
    logger = Logger(rc.out_dir, resume=resume_state is not None, enabled=master)
    peak = peak_flops(device)
    fpt = flops_per_token(config, T)
    summary = {"losses": {}, "val_losses": {}, "skipped": [], "steps": steps,
               "engine": engine_name, "device": device}
    overfit_batch = None
    step_times = []

    for step in range(start_step, steps + 1):
        last_step = step == steps
        resumed_here = resume_state is not None and step == start_step

        if val_batches and (step % rc.val_every == 0 or last_step):
            vl = dist.mean(val_loss(engine, val_loader, val_batches))
            summary["val_losses"][step] = vl
            logger.val(step, vl)
            if master:
                print(f"val loss {vl:.6f}")
        if hs_loader is not None and rc.val_every and (step % rc.val_every == 0 or last_step):
            from .evals import hellaswag_counts
            correct, total = hellaswag_counts(engine, hs_loader)
            acc = dist.sum(correct) / max(dist.sum(total), 1)
            logger.hellaswag(step, acc)
            if master:
                print(f"HellaSwag: {acc:.4f}")
        if master and rc.sample_every and ((step > 0 and step % rc.sample_every == 0)
                                           or last_step):
            print(f"generating:\n---\n{sample_text(engine, rc, step)}\n---")
        if rc.out_dir and not resumed_here and step > 0 and (
                (rc.checkpoint_every and step % rc.checkpoint_every == 0) or last_step):
            save_checkpoint(rc, engine, sync, step, train_loader, loss_det, norm_det, dist)
        if last_step:
            break

        # -- one optimizer step over total_batch tokens
        t0 = time.perf_counter()
        engine.zero_grad()
        loss = 0.0
        for _ in range(grad_accum):
            if rc.overfit:
                overfit_batch = overfit_batch or train_loader.next_batch()
                x, y = overfit_batch
            else:
                x, y = train_loader.next_batch()
            loss += engine.forward(x, y) / grad_accum
            engine.backward(1.0 / grad_accum)
        loss = dist.mean(loss)   # identical on every rank from here on
        norm = sync.reduce()     # averages gradients across ranks; the global norm
        zloss, znorm = loss_det.update(loss), norm_det.update(norm)
        lr = get_lr(rc.scheduler, step, rc.lr, rc.warmup, steps, rc.final_lr_frac)
        # loss and norm agree on every rank already; agree_any makes the decision collective
        # even if a rank's arithmetic differed, so no rank waits alone in the all-gather.
        finite = not dist.agree_any(not (math.isfinite(loss) and math.isfinite(norm)))
        skip = ""
        if not finite:
            if rc.nan_policy == "stop":
                logger.close()
                raise TrainingStopped(f"step {step}: non-finite loss {loss} or grad norm "
                                      f"{norm}; stopped before the update (--nan-policy stop)")
            skip = "non-finite"
        elif rc.skip_loss_z and zloss > rc.skip_loss_z:
            skip = f"loss z {zloss:.2f}"
        elif rc.skip_norm_z and znorm > rc.skip_norm_z:
            skip = f"norm z {znorm:.2f}"
        if not skip:
            grad_scale = GRAD_CLIP / norm if norm > GRAD_CLIP else 1.0
            sync.step(lr, step + 1, weight_decay=rc.weight_decay, grad_scale=grad_scale)
        else:
            summary["skipped"].append(step)
        dt = time.perf_counter() - t0
        if step > start_step:  # the first step includes warm-up (compile, allocation)
            step_times.append(dt)
        tok_s = total_batch / dt
        summary["losses"][step] = loss
        logger.train(step, loss, lr, norm, skipped=skip or None, ms=dt * 1e3)
        if master:
            mfu = f" | MFU {100 * tok_s * fpt / peak:.1f}%" if peak else ""
            print(f"step {step + 1:4d}/{steps} | loss {loss:.6f} ({zloss:+.2f}z) | norm "
                  f"{norm:.4f} ({znorm:+.2f}z) | lr {lr:.2e} | {dt * 1e3:.1f} ms{mfu} | "
                  f"{tok_s:,.0f} tok/s" + (f" | SKIPPED ({skip})" if skip else ""), flush=True)
            if rc.gpu_log_every > 0 and step % rc.gpu_log_every == 0 and \
                    device.startswith("cuda"):
                import torch
                print(f"gpu memory: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated, "
                      f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak, "
                      f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved")
    logger.close()
    if step_times:
        summary["median_step_s"] = float(np.median(step_times))
        summary["tokens_per_s"] = total_batch / summary["median_step_s"]
    summary["engine_obj"] = engine
    return summary


class GradSync:
    """Gradients across ranks, and the AdamW step: whole (ZeRO-0: all-reduce, every rank
    updates every parameter) or sharded (ZeRO-1: reduce-scatter, each rank updates its
    1/world slice of the flat parameters and AdamW state, then all-gather). One process: the
    engine's own grad_norm and step, untouched."""

    def __init__(self, engine, dist, zero: int):
        self.engine, self.dist = engine, dist
        self.shard = None
        if dist.world > 1:
            if not hasattr(engine, "flat_grad"):
                raise LlmpyError(f"--engine {engine.name}: has no flat gradient buffer for "
                                 f"multi-process training")
            if zero:
                self.shard = dist.shard_range(engine.config.num_params)

    def reduce(self) -> float:
        """Average the gradients over ranks; return the global gradient norm."""
        if self.dist.world == 1:
            return self.engine.grad_norm()
        grad = self.engine.flat_grad
        if self.shard is None:
            self.dist.all_reduce_avg_(grad)
            return self.engine.grad_norm()
        import torch
        mine = self.dist.reduce_scatter_avg_(grad)
        sq = torch.linalg.vector_norm(mine, dtype=torch.float32).item() ** 2
        return math.sqrt(self.dist.sum(sq))

    def step(self, lr: float, t: int, **hyper) -> None:
        if self.shard is None:
            self.engine.step(lr, t, **hyper)
            return
        self.engine.step(lr, t, shard=self.shard, **hyper)
        self.dist.all_gather_(self.engine.flat)


def rescale_loader_state(state: dict, loader) -> dict:
    """A loader state saved with another process count: keep the epoch and shard, and map
    the sample index by tokens consumed (exact without shuffling; with shuffling the rest of
    that shard is drawn in the new run's order)."""
    if int(state.get("world", loader.world)) == loader.world:
        return state
    old_tokens = int(state["sample_idx"]) * int(state["world"]) * int(state["B"]) * int(state["T"])
    new = dict(state, world=loader.world, B=loader.B, T=loader.T)
    shard = int(loader.shard_order(int(state["epoch"]))[int(state["shard_idx"])])
    new["sample_idx"] = min(old_tokens // loader.sample_tokens, loader.shard_samples[shard] - 1)
    return new


def _default_hellaswag_path() -> Path:
    from .data import cache_dir
    return cache_dir("hellaswag") / "hellaswag_val.bin"


def save_checkpoint(rc, engine, sync, step, loader, loss_det, norm_det, dist) -> None:
    """model (rank 0), state (every rank), then DONE once every rank's files are on disk: a
    crash at any point leaves the previous checkpoint as the newest complete one. Then
    -nk/-nm retention."""
    out, rank = rc.out_dir, dist.rank
    if rank == 0:
        ckpt.save_model(out, step, engine)
    _test_kill("in_checkpoint", step)
    ls = loader.state_dict()
    extra = {"outliers": {"loss": loss_det.state_dict(), "norm": norm_det.state_dict()},
             "run": asdict(rc), "shard": list(sync.shard) if sync.shard else None,
             "num_params": engine.config.num_params}
    ckpt.save_state(out, step, engine, rank=rank, nproc=dist.world, loader_state=ls,
                    extra=extra, shard=sync.shard)
    dist.barrier()
    if rank == 0:
        ckpt.mark_done(out, step)
        ckpt.apply_retention(out, rc.keep_last, rc.major_every)
        print(f"checkpoint: {ckpt.model_path(out, step)} (+ state, DONE)", flush=True)
    _test_kill("after_checkpoint", step)


def _test_kill(where: str, step: int) -> None:
    """Crash tests: LLMPY_TEST_KILL=in_checkpoint:STEP (after the model file, before the state
    and DONE) or after_checkpoint:STEP sends this process a real SIGKILL there."""
    if os.environ.get("LLMPY_TEST_KILL") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str]) -> int:
    has_cuda = cuda_available() and "cpu" not in argv  # picks the main job's size
    rc, given = parse_args(argv, has_cuda=has_cuda)
    t0 = time.time()
    summary = train(rc, given)
    if rc.process_rank == 0:
        if "train_data" not in given:
            print(f"main job done in {time.time() - t0:.0f} s: final val loss "
                  f"{summary['val_losses'].get(summary['steps'], float('nan')):.4f}")
            print("sample:\n---\n" + sample_text(summary["engine_obj"], rc, summary["steps"]) +
                  "\n---")
            if rc.out_dir:
                print(f"logs and checkpoint in {rc.out_dir}/ (main.log, model_*.bin)")
    return 0


if __name__ == "__main__":
    from .cli import main as cli_main
    sys.exit(cli_main(["train", *sys.argv[1:]]))
