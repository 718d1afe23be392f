"""`llmpy export`: golden fixtures (llm.c's debug state) and Hugging Face directories.

    llmpy export debug-state --model MODEL --shard SHARD.bin --out DIR [-b 4] [-t 64]
                             [--seed 1337] [--steps 10] [--dtype fp64] [--fold-vocab]
    llmpy export hf CHECKPOINT.bin OUTDIR

`debug-state` is this project's counterpart of what llm.c's train_gpt2.py writes for
test_gpt2: DIR/model.bin (fp32, v3), DIR/debug_state.bin (x, y = the first B*T+1 tokens of
the shard, logits, loss, every gradient), and DIR/golden.json with the losses of `--steps`
AdamW steps on that batch (lr 1e-4, betas 0.9/0.95, eps 1e-8, no weight decay, gradient
clipping to 1.0 folded in as llm.c's test does). The torch engine computes all of it, in
float64 by default so the fixture is as exact as an fp32 file can hold. MODEL is an llm.c
model file, a Hugging Face GPT-2 directory or hub name (gpt2 ... gpt2-xl), or a descriptor
(d12, L=2,C=64,NH=4,T=64,V=1000) initialized at random from --seed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import LlmpyError, OneLineParser

# llm.c's test_gpt2 training recipe for the 10 steps on one batch.
GOLDEN_RECIPE = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
                 "grad_clip": 1.0}
MODEL_FILE, DEBUG_FILE, GOLDEN_FILE = "model.bin", "debug_state.bin", "golden.json"


def batch_from_shard(path, config: ModelConfig, B: int, T: int, fold_vocab: bool = False):
    """x, y (B, T) int32 from the first B*T+1 tokens of a shard, as llm.c's first batch."""
    from .formats import open_shard
    tokens = open_shard(path)
    if tokens.size < B * T + 1:
        raise LlmpyError(f"--shard {path}: {tokens.size} tokens, need B*T+1 = {B * T + 1}")
    buf = np.asarray(tokens[:B * T + 1], dtype=np.int32)
    if fold_vocab:
        buf = buf % config.vocab_size
    if buf.max() >= config.vocab_size:
        raise LlmpyError(f"--shard {path}: token id {buf.max()} >= vocab_size "
                         f"{config.vocab_size} of the model (use --fold-vocab for a small "
                         f"test vocabulary)")
    return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)


def write_golden(outdir, config: ModelConfig, params: np.ndarray, x, y, steps: int = 10,
                 dtype: str = "fp64", device: str = "cpu", meta: dict | None = None) -> dict:
    """Write model.bin, debug_state.bin and golden.json to `outdir`; return the JSON dict.

    Step k's loss is the loss before update k, as llm.c's test_gpt2 prints it; the update
    clips to global norm 1.0 through grad_scale = min(1, 1/norm) and uses t = k + 1."""
    from .engines.torch import TorchEngine
    from .formats import write_debug_state, write_model
    if config.max_seq_len < x.shape[1]:
        raise LlmpyError(f"-t {x.shape[1]} > maxT {config.max_seq_len} of the model")
    engine = TorchEngine(config, device=device, dtype=dtype)
    engine.set_params(params)
    logits = engine.logits(x)                                   # (B, T, V)
    losses, norms = [], []
    r = GOLDEN_RECIPE
    for k in range(max(steps, 1)):
        loss = engine.forward(x, y)
        engine.zero_grad()
        engine.backward()
        if k == 0:
            first_loss, grads = loss, engine.get_grads()
        if k < steps:
            norm = engine.grad_norm()
            engine.step(r["lr"], k + 1, r["weight_decay"], r["beta1"], r["beta2"], r["eps"],
                        grad_scale=min(1.0, r["grad_clip"] / norm) if norm > 0 else 1.0)
            losses.append(loss)
            norms.append(norm)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    write_model(outdir / MODEL_FILE, config, params, dtype="fp32")
    write_debug_state(outdir / DEBUG_FILE, config, x, y, logits, first_loss, grads)
    golden = {"model": MODEL_FILE, "debug_state": DEBUG_FILE, "B": int(x.shape[0]),
              "T": int(x.shape[1]), "config": config.describe(), "dtype": dtype,
              "steps": steps, **r, "losses": losses, "grad_norms": norms, **(meta or {})}
    tmp = outdir / (GOLDEN_FILE + ".tmp")
    tmp.write_text(json.dumps(golden, indent=2) + "\n")
    os.replace(tmp, outdir / GOLDEN_FILE)
    return golden


def _debug_state(args) -> int:
    from .models import load_model, resolve
    if not args.shard:  # a run dir: the first shard of that run's val data
        import glob
        from .settings import saved_run_config
        pattern = (saved_run_config(args.model) or {}).get("val_data", "")
        found = sorted(glob.glob(pattern)) if pattern else []
        if not found:
            raise LlmpyError(f"--shard: not given, and --model {args.model} is no run dir whose "
                             f"run_config.json names val shards; pass --shard FILE.bin")
        args.shard = found[0]
    config, params = load_model(args.model, args.seed, flag="--model")
    print(f"model: {resolve(args.model, flag='--model')[1]}; shard: {args.shard}")
    if args.batch < 1 or args.seq_len < 1 or args.steps < 0:
        raise LlmpyError(f"-b {args.batch} -t {args.seq_len} --steps {args.steps}: B and T "
                         f"must be positive, steps >= 0")
    x, y = batch_from_shard(args.shard, config, args.batch, args.seq_len, args.fold_vocab)
    meta = {"source": {"model": args.model, "shard": Path(args.shard).name, "seed": args.seed,
                       "fold_vocab": args.fold_vocab}}
    golden = write_golden(args.out, config, params, x, y, args.steps, args.dtype, args.device,
                          meta)
    print(f"{config.describe()}  B={args.batch} T={args.seq_len} dtype={args.dtype}")
    for k, loss in enumerate(golden["losses"]):
        print(f"step {k}: loss {loss:.6f}")
    print(f"wrote {args.out}/{{{MODEL_FILE}, {DEBUG_FILE}, {GOLDEN_FILE}}}")
    return 0


def _hf(args) -> int:
    from .hf import export_hf
    from .models import load_model, resolve
    where = resolve(args.model, flag="MODEL")[1]
    if Path(args.outdir).exists() and not Path(args.outdir).is_dir():
        raise LlmpyError(f"export hf: OUTDIR {args.outdir} is a file, expected a directory "
                         f"(new or to add the export to); pick another OUTDIR")
    out = export_hf(load_model(args.model, flag="MODEL"), args.outdir)
    print(f"read {where}; wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="llmpy export", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ds = sub.add_parser("debug-state", help="golden fixture: model, llm.c debug state, losses")
    ds.add_argument("--model", required=True,
                    help="llm.c model .bin, Hugging Face dir or name (gpt2..gpt2-xl), or descriptor")
    ds.add_argument("--shard", default="", help="token shard; x, y = its first B*T+1 tokens "
                    "(default for a run dir --model: the first shard of its val data)")
    ds.add_argument("--out", required=True, help="output directory")
    ds.add_argument("-b", dest="batch", type=int, default=4, help="batch size B (4)")
    ds.add_argument("-t", dest="seq_len", type=int, default=64, help="sequence length T (64)")
    ds.add_argument("--seed", type=int, default=1337, help="init seed for a descriptor (1337)")
    ds.add_argument("--steps", type=int, default=10, help="AdamW steps on the batch (10)")
    ds.add_argument("--dtype", choices=("fp64", "fp32"), default="fp64",
                    help="torch engine precision for the computation (fp64); files are fp32")
    ds.add_argument("--device", default="cpu", help="torch device (cpu)")
    ds.add_argument("--fold-vocab", action="store_true",
                    help="map token ids into the model's vocabulary (id %% V), for tiny test vocabularies")
    ds.set_defaults(func=_debug_state)
    hf = sub.add_parser("hf", help="Hugging Face GPT2LMHeadModel directory from an llm.c model")
    hf.add_argument("model", help="model spec as for `llmpy train -e`: an output dir (its newest "
                    "checkpoint), an llm.c model file (.bin), a descriptor or HF weights")
    hf.add_argument("outdir", help="output directory")
    hf.set_defaults(func=_hf)
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

