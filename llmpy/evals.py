"""Evaluations shared by the training loop and `llmpy eval`: HellaSwag and validation loss.

HellaSwag scoring is llm.c's (llmc/evalloader.h): each example is 4 rows, context + one
ending each; an ending's score is the mean cross-entropy over its own tokens; the lowest
wins. Per-position losses come from `engine.token_losses` when the engine has it (no (B,T,V)
logits leave the device), else from `engine.logits` here in NumPy.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from .errors import LlmpyError


def token_losses(engine, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cross-entropy at every position, (B, T) float32."""
    if hasattr(engine, "token_losses"):
        return np.asarray(engine.token_losses(inputs, targets), dtype=np.float32)
    logits = np.asarray(engine.logits(inputs), dtype=np.float64)  # (B, T, V)
    logits -= logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits).sum(axis=-1))  # (B, T)
    picked = np.take_along_axis(logits, targets[..., None].astype(np.int64), axis=-1)[..., 0]
    return (logz - picked).astype(np.float32)


def hellaswag_accuracy(engine, loader, progress: bool = False) -> float:
    """Fraction of this rank's examples whose lowest-loss ending is the label."""
    correct = total = 0
    for batch in tqdm(loader, total=loader.num_batches, disable=not progress, desc="hellaswag",
                      unit="batch"):
        losses = token_losses(engine, batch.inputs, batch.targets)  # (B, T)
        correct += batch.num_correct(losses)
        total += batch.num_examples
    return correct / max(total, 1)


def main(argv: list[str]) -> int:
    """`llmpy eval hellaswag|val MODEL`: evaluate a model file, checkpoint dir or HF GPT-2."""
    from .data.loader import DistributedDataLoader, EvalLoader
    from .engines import make_engine
    from .train import _default_hellaswag_path, load_init, pick_engine_and_device

    p = argparse.ArgumentParser(prog="llmpy eval", description=main.__doc__)
    p.add_argument("task", choices=["hellaswag", "val"])
    p.add_argument("model", help="llm.c model .bin, an output dir (newest checkpoint), a "
                   "descriptor, or a Hugging Face GPT-2 name/dir")
    p.add_argument("--file", default="", help="HellaSwag eval file (default: the cache's "
                   "hellaswag_val.bin) or, for val, the token shard glob (-j)")
    p.add_argument("-b", "--batch-size", type=int, default=4)
    p.add_argument("-t", "--seq-len", type=int, default=0, help="default: the model's maxT "
                   "(val) or 512 (hellaswag)")
    p.add_argument("-m", "--val-batches", type=int, default=-1, help="-1: all")
    p.add_argument("--limit", type=int, default=0, help="HellaSwag: first N examples only")
    p.add_argument("--engine", default="auto")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    config, params = load_init(a.model)
    engine_name, device = pick_engine_and_device(a.engine, a.device)
    engine = make_engine(engine_name, config, device=device)
    engine.set_params(params)
    if a.task == "hellaswag":
        path = a.file or str(_default_hellaswag_path())
        T = a.seq_len or min(512, config.max_seq_len)
        B = max(4, a.batch_size - a.batch_size % 4)
        loader = EvalLoader(path, B, T)
        if a.limit:
            loader.examples = loader.examples[:a.limit]
            loader.num_batches = -(-len(loader.examples) // loader.examples_per_batch)
        acc = hellaswag_accuracy(engine, loader, progress=True)
        print(f"hellaswag accuracy: {acc:.4f} ({len(loader.examples)} examples, {path})")
    else:
        if not a.file:
            raise LlmpyError("--file: val needs a token shard glob, got none")
        T = a.seq_len or config.max_seq_len
        loader = DistributedDataLoader(a.file, a.batch_size, T)
        n = loader.batches_per_epoch if a.val_batches == -1 else min(a.val_batches,
                                                                      loader.batches_per_epoch)
        total = 0.0
        for _ in tqdm(range(n), desc="val", unit="batch"):
            x, y = loader.next_batch()
            total += engine.forward(x, y)
        print(f"val loss: {total / n:.4f} ({n} batches of {a.batch_size}x{T}, {a.file})")
    return 0
