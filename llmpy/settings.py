"""The run's settings: llm.c's training flags, parsed into one frozen RunConfig and checked
in one place before anything is allocated (llm.c's train_gpt2.cu reads its flags at the top of
main(); we keep them in a dataclass that is printed at start and saved with checkpoints).

Every llm.c flag takes a value, `-h` included (HellaSwag), so help is `--help`. The defaults
ARE the main job (a small GPT on the embedded tinyshakespeare, sized for the device:
MAIN_JOB_CPU / MAIN_JOB_GPU), whatever other flags are given: `-i` changes the data and
nothing else. `--help` shows every default for this device.

Precedence: these defaults < `--config FILE` (a run_config.json an earlier run saved, or a
JSON object of RunConfig fields) < the flags on the command line. `-y 1` without --config
reads OUT/run_config.json when the output dir has one: a resume continues the run it finds.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
    gelu_fusion: int = -1         # -ge
    fp8_head: int = 0             # -f8
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
    ("-i", "--train-data", "train_data", str, "train token shards (glob)"),
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
    ("-ge", "--gelu-fusion", "gelu_fusion", int, "GELU in the fc matmuls' cuBLASLt "
     "epilogues, triton engine on CUDA: 0 none, 1 forward, 2 forward+backward, -1 auto (2 "
     "where cuBLASLt is available)"),
    ("-f8", "--fp8-head", "fp8_head", int, "matmuls in FP8, triton engine on sm89+ GPUs: "
     "0 none, 1 the lm head, 2 the lm head and the MLP's fc and fcproj (experimental; not "
     "in llm.c)"),
    ("-f", "--tf32", "tf32", int, "allow TF32 matmuls (0/1)"),
    ("-lg", "--gpu-log-every", "gpu_log_every", int, "log GPU memory every N steps (-1=off)"),
    ("-pn", "--num-processes", "num_processes", int, "number of processes"),
    ("-pr", "--process-rank", "process_rank", int, "this process's rank"),
    ("-pg", "--gpus-per-node", "gpus_per_node", int, "GPUs per node"),
    ("-pi", "--init-method", "init_method", str, "multi-process init: mpi|tcp|fs (fs: a "
     "file in -pf; one a killed run left is removed by the next launch)"),
    ("-ps", "--server-ip", "server_ip", str, "rendezvous server (tcp init)"),
    ("-pf", "--fs-path", "fs_path", str, "dir shared by all processes (fs init): holds "
     "llmpy_rendezvous (per slurm job step under slurm) and its .lock"),
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

# The main job, which is the defaults: a small GPT on embedded tinyshakespeare, sized for the device.
MAIN_JOB_CPU = dict(init="L=4,C=128,NH=4,T=128", batch_size=16, seq_len=64, max_steps=400,
                    lr=1e-3, warmup=20, final_lr_frac=0.1, weight_decay=0.0, val_every=100,
                    val_batches=20, sample_every=0, gen_tokens=96, out_dir="out")
MAIN_JOB_GPU = dict(init="d6", batch_size=32, seq_len=256, max_steps=600, lr=1e-3,
                    warmup=50, final_lr_frac=0.1, weight_decay=0.1, val_every=100,
                    val_batches=20, sample_every=0, gen_tokens=128, out_dir="out")


RUN_CONFIG_FILE = "run_config.json"


def defaults(has_cuda: bool = False) -> dict:
    """Every RunConfig field's default on this device: the main job's values."""
    base = asdict(RunConfig())
    base.update(MAIN_JOB_GPU if has_cuda else MAIN_JOB_CPU)
    return base


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (through the CLI), never usage + traceback
        raise LlmpyError(_hint(message))


def _hint(message: str) -> str:
    """argparse's message, plus what the user most likely meant."""
    if message.startswith("unrecognized arguments:"):
        longs = [f[1] for f in FLAGS] + ["--config", "--help"]
        for word in message.split(":", 1)[1].split():
            if word.startswith("-"):
                close = difflib.get_close_matches(word.split("=")[0], longs, n=1, cutoff=0.6)
                if close:
                    return f"{message} (did you mean {close[0]}?)"
    if message.startswith("argument -h/--hellaswag: expected one argument"):
        return (f"{message} (-h is llm.c's HellaSwag flag and takes 0 or 1; for help use "
                f"llmpy train --help)")
    return message


def build_parser(has_cuda: bool = False) -> argparse.ArgumentParser:
    p = _Parser(prog="llmpy train", add_help=False, allow_abbrev=False,
                description="Train a GPT (llm.c's flags). Every default is the main job's "
                            "value on this device (a small GPT on the embedded "
                            "tinyshakespeare), whichever other flags are given.")
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("--config", dest="config", default=None, metavar="FILE",
                   help="settings from a JSON file (an earlier run's run_config.json); "
                        "flags given here override it")
    dflt = defaults(has_cuda)
    for short, long, dest, typ, help_ in FLAGS:
        names = [n for n in (short, long) if n]
        shown = dflt[dest] if dflt[dest] != "" else _EMPTY.get(dest, "none")
        p.add_argument(*names, dest=dest, type=_typed(names[0], typ), default=None,
                       metavar=typ.__name__.upper(), help=f"{help_} (default: {shown})")
    return p


# what an empty default means, for --help
_EMPTY = {"train_data": "embedded tinyshakespeare train",
          "val_data": "embedded tinyshakespeare val", "init": "d12",
          "out_dir": "none: nothing saved", "prompt": "EOT",
          "hellaswag_file": "the cache's hellaswag_val.bin"}


def _typed(flag, typ):
    def convert(s):
        try:
            return typ(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {typ.__name__}, got {s!r}") from None
    convert.__name__ = typ.__name__  # argparse names the type in its message
    return convert


def parse_args(argv: list[str], has_cuda: bool = False) -> tuple[RunConfig, set[str]]:
    """Flags -> RunConfig (defaults < --config FILE < flags) and the set of fields the user
    set explicitly (by a flag or in the config file)."""
    ns = vars(build_parser(has_cuda).parse_args(argv))
    config_file = ns.pop("config")
    flags = {k: v for k, v in ns.items() if v is not None}
    out_dir = flags.get("out_dir", defaults(has_cuda)["out_dir"])
    saved = Path(out_dir) / RUN_CONFIG_FILE if out_dir else None
    if not config_file and flags.get("resume") == 1 and saved and saved.is_file():
        config_file = str(saved)  # a resume continues the run it finds (flags override)
        print(f"resume: settings from {saved}, flags given override them")
    from_file = load_run_config(config_file) if config_file else {}
    values = {**defaults(has_cuda), **from_file, **flags}
    return RunConfig(**values), set(from_file) | set(flags)


def load_run_config(path: str, flag: str = "--config ") -> dict:
    """The RunConfig fields of a JSON file: a run_config.json (its "settings") or a plain
    object of field names. Unknown names are refused, with the nearest field named."""
    p = Path(path)
    if not p.is_file():
        raise LlmpyError(f"{flag}{path}: no such file; expected a run_config.json that a "
                         f"run wrote to its output dir, or a JSON object of settings")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LlmpyError(f"{flag}{path}: not valid JSON ({e}); expected a JSON object of "
                         f"settings such as {{\"lr\": 0.001}}") from None
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        data = data["settings"]
    if not isinstance(data, dict):
        raise LlmpyError(f"{flag}{path}: expected a JSON object of settings, got "
                         f"{type(data).__name__}")
    types = {f.name: f.type for f in fields(RunConfig)}
    out = {}
    for k, v in data.items():
        if k not in types:
            close = difflib.get_close_matches(k, list(types), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LlmpyError(f"{flag}{path}: unknown setting {k!r}{hint}; expected RunConfig "
                             f"field names as in run_config.json")
        want = {"int": int, "float": float, "str": str}[types[k]]
        ok = not isinstance(v, bool) and (isinstance(v, want) or
                                          (want is float and isinstance(v, int)))
        if not ok:
            raise LlmpyError(f"{flag}{path}: setting {k!r} expected {want.__name__}, got "
                             f"{v!r}")
        out[k] = want(v)
    return out


def saved_run_config(spec: str) -> dict | None:
    """The run_config.json of a run dir `spec` (None if spec is no dir or has none), for
    eval, sample and export on a run dir; its "settings" are checked like --config's."""
    path = Path(spec) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    settings = load_run_config(str(path), flag="")  # checks the JSON, one line if bad
    return {**json.loads(path.read_text()), "settings": {**asdict(RunConfig()), **settings}}


def run_config_record(rc: RunConfig, **resolved) -> dict:
    """What a run saves as run_config.json: every RunConfig field (under "settings", which
    --config reads back), the resolved engine, device and data, and the package versions."""
    import platform
    import sys
    from importlib import metadata
    versions = {"python": platform.python_version()}
    for pkg in ("llmpy", "numpy", "torch", "triton", "tiktoken"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"settings": asdict(rc), **resolved, "versions": versions,
            "command": " ".join(sys.argv)}


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
                       ("-w", "master_weights"), ("-f", "tf32"),
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
    need(rc.gelu_fusion in (-1, 0, 1, 2), "-ge", "-1, 0, 1 or 2", rc.gelu_fusion)
    need(rc.fp8_head in (0, 1, 2), "-f8", "0, 1 or 2", rc.fp8_head)
    need(rc.device in ("auto", "cpu", "cuda", "mps") or rc.device.startswith("cuda:"),
         "--device", "cpu|cuda|mps|auto", rc.device)
    need(rc.dtype in ("auto", "fp32", "bf16"), "--dtype", "fp32|bf16|auto", rc.dtype)
    need(rc.nan_policy in ("skip", "stop"), "--nan-policy", "skip|stop", rc.nan_policy)
    need(rc.top_k >= 0, "--top-k", ">= 0", rc.top_k)
    need(rc.temperature >= 0, "--temperature", ">= 0", rc.temperature)
    if (rc.checkpoint_every or rc.resume) and not rc.out_dir:
        raise LlmpyError("-o: checkpoints (-n) and resume (-y) need an output dir, got none")
