"""Evaluations shared by the training loop and `llmpy eval`: HellaSwag, MMLU, validation loss.

HellaSwag scoring is llm.c's (llmc/evalloader.h): each example is 4 rows, context + one
ending each; an ending's score is the mean cross-entropy over its own tokens; the lowest
wins. Per-position losses come from `engine.token_losses` when the engine has it (no (B,T,V)
logits leave the device), else from `engine.logits` here in NumPy.

MMLU (llm.c's dev/data/mmlu.py) is the same multiple-choice scoring over an eval file of
the same format (`llmpy data mmlu`). `llmpy eval` also reports the "acc" of llm.c's Python
scripts (the ending with the lowest total loss wins) next to the mean-loss "acc_norm".
"""

from __future__ import annotations


import numpy as np
from tqdm import tqdm

from .data.loader import NUM_COMPLETIONS
from .errors import LlmpyError, OneLineParser


def token_losses(engine, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cross-entropy at every position, (B, T) float32 (the engine contract's token_losses)."""
    return np.asarray(engine.token_losses(inputs, targets), dtype=np.float32)


def multiple_choice_scores(engine, loader, progress: bool = False,
                           desc: str = "eval") -> dict:
    """Both of llm.c's scores over this rank's examples: {"acc_norm": lowest mean loss per
    ending wins (what llm.c's C code and the training loop report), "acc": lowest total
    loss wins, "examples": how many}."""
    correct = correct_sum = total = 0
    for batch in tqdm(loader, total=loader.num_batches, disable=not progress, desc=desc,
                      unit="batch"):
        losses = token_losses(engine, batch.inputs, batch.targets)  # (B, T)
        correct += batch.num_correct(losses)
        summed = (losses.astype(np.float64) * batch.mask).sum(axis=1)  # (B,)
        pred = summed.reshape(-1, NUM_COMPLETIONS).argmin(axis=1)      # (B/4,)
        correct_sum += int(((pred == batch.labels) & (batch.labels >= 0)).sum())
        total += batch.num_examples
    n = max(total, 1)
    return {"acc_norm": correct / n, "acc": correct_sum / n, "examples": total}


def hellaswag_accuracy(engine, loader, progress: bool = False) -> float:
    """Fraction of this rank's examples whose lowest-loss ending is the label."""
    correct, total = hellaswag_counts(engine, loader, progress)
    return correct / max(total, 1)


def hellaswag_counts(engine, loader, progress: bool | None = False) -> tuple[int, int]:
    """(correct, examples) over this rank's share of the eval file (progress as val_loss)."""
    correct = total = 0
    for batch in tqdm(loader, total=loader.num_batches, desc="hellaswag", unit="batch",
                      disable=None if progress is None else not progress, leave=False):
        losses = token_losses(engine, batch.inputs, batch.targets)  # (B, T)
        correct += batch.num_correct(losses)
        total += batch.num_examples
    return correct, total


def val_loss(engine, loader, num_batches: int, progress: bool | None = False) -> float:
    """Mean loss over the first `num_batches` batches of a token-shard loader (reset first).
    progress: a bar on stderr (None: only when stderr is a terminal)."""
    loader.reset()
    total = 0.0
    for _ in tqdm(range(num_batches), disable=None if progress is None else not progress,
                  desc="val", unit="batch", leave=False):
        x, y = loader.next_batch()
        total += engine.forward(x, y)
    return total / num_batches


def default_eval_path(task: str):
    """Where `llmpy data hellaswag|mmlu` writes by default (and training looks for -h 1)."""
    from .data import cache_dir
    return cache_dir(task) / ("hellaswag_val.bin" if task == "hellaswag" else "mmlu_test.bin")


# llm.c's test_gpt2.c bounds: logits within 1e-2, gradients within 2e-2 (here relative to
# each tensor's largest value, so one bound fits every tensor), the loss within 1e-2
DEBUG_TOL = {"logits": 1e-2, "grads": 2e-2, "loss": 1e-2}


def debug_state_errors(engine, ref: dict) -> dict:
    """What llm.c's test_gpt2 checks of a debug state (formats.read_debug_state) on `engine`:
    max |error| / max |reference| of the logits and of each of the 16 gradients, and the
    loss difference, for the state's batch x, y."""
    def rel(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    errors = {"logits": rel(engine.logits(ref["x"]), ref["logits"])}
    errors["loss"] = abs(float(engine.forward(ref["x"], ref["y"])) - ref["loss"])
    engine.zero_grad()
    engine.backward()
    grads = engine.get_grads()
    for name, (a, b) in engine.config.param_offsets().items():
        errors["d" + name] = rel(grads[a:b], ref["grads"][a:b])
    return errors


def _debug_state(a) -> int:
    """`llmpy eval debug-state MODEL [--file STATE]`: llm.c's test_gpt2 on any engine."""
    from pathlib import Path

    from .formats import read_debug_state
    from .models import build_engine
    if Path(a.model).is_dir() and (Path(a.model) / "model.bin").is_file():
        a.model = str(Path(a.model) / "model.bin")  # a dir of `llmpy export debug-state`
    state = a.file or str((Path(a.model) if Path(a.model).is_dir() else
                           Path(a.model).parent) / "debug_state.bin")
    engine, where = build_engine(a.model, a.engine, a.device, flag="MODEL")
    ref = read_debug_state(state, engine.config)  # checked before anything is computed
    print(f"model: {where}; debug state: {state} (B={ref['x'].shape[0]}, "
          f"T={ref['x'].shape[1]})", flush=True)
    errors = debug_state_errors(engine, ref)
    worst = max((v, k) for k, v in errors.items() if k.startswith("d"))
    bad = [k for k, v in errors.items()
           if v > DEBUG_TOL["grads" if k.startswith("d") else k]]
    print(f"logits rel err {errors['logits']:.3g}, loss {ref['loss']:.6f} (err "
          f"{errors['loss']:.3g}), worst gradient {worst[1]} rel err {worst[0]:.3g}")
    print("OK" if not bad else f"NOT OK: {', '.join(bad)} over llm.c's test_gpt2 bounds "
          f"{DEBUG_TOL}")
    return 0 if not bad else 1


def main(argv: list[str]) -> int:
    """`llmpy eval hellaswag|mmlu|val|debug-state MODEL`: evaluate a model file, checkpoint
    dir or HF GPT-2 (name or directory); debug-state compares the model's logits, loss and
    gradients with an llm.c debug state (test_gpt2)."""
    from pathlib import Path

    from .data.loader import DistributedDataLoader, EvalLoader
    from .models import build_engine
    from .settings import saved_run_config

    p = OneLineParser(prog="llmpy eval", description=main.__doc__)
    p.add_argument("task", choices=["hellaswag", "mmlu", "val", "debug-state"])
    p.add_argument("model", help="llm.c model .bin, an output dir (newest checkpoint), a "
                   "descriptor, or a Hugging Face GPT-2 name/dir")
    p.add_argument("--file", default="", help="eval file (default: the cache's "
                   "hellaswag/hellaswag_val.bin or mmlu/mmlu_test.bin); for val, the token "
                   "shard glob (-j; default on a run dir: that run's val data); for "
                   "debug-state, the llm.c debug state (default: debug_state.bin beside "
                   "MODEL, or in MODEL when it is a dir of `llmpy export debug-state`)")
    p.add_argument("-b", "--batch-size", type=int, default=0, help="default: the run's -b "
                   "(run dir), else 4")
    p.add_argument("-t", "--seq-len", type=int, default=0, help="default: the run's -t (run "
                   "dir), else the model's maxT (val, mmlu) or 512 (hellaswag)")
    p.add_argument("-m", "--val-batches", type=int, default=-1, help="-1: all")
    p.add_argument("--limit", type=int, default=0, help="HellaSwag/MMLU: first N examples only")
    p.add_argument("--engine", default="auto")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.task == "debug-state":
        return _debug_state(a)
    record = saved_run_config(a.model) or {}  # a run dir: its data and settings
    run = record.get("settings", {})
    a.batch_size = a.batch_size or run.get("batch_size", 4)
    a.seq_len = a.seq_len or run.get("seq_len", 0)
    if a.task == "hellaswag" and not a.file:
        a.file = run.get("hellaswag_file", "")
    for flag, value, ok, what in (("-b", a.batch_size, a.batch_size >= 1, ">= 1"),
                                  ("-t", a.seq_len, a.seq_len >= 0, ">= 0 (0: default)"),
                                  ("-m", a.val_batches, a.val_batches == -1 or a.val_batches >= 1,
                                   "-1 (all) or >= 1"),
                                  ("--limit", a.limit, a.limit >= 0, ">= 0 (0: all)")):
        if not ok:
            raise LlmpyError(f"{flag}: expected {what}, got {value}")
    if a.task != "val":
        path = a.file or str(default_eval_path(a.task))
        if not Path(path).is_file():  # checked before the model is loaded
            raise LlmpyError(f"{a.task}: no eval file {path} (build it with `llmpy data "
                             f"{a.task}`, or pass --file)")
    if a.task == "val" and not a.file:
        a.file = record.get("val_data", "")
        if not a.file:
            raise LlmpyError(f"--file: val needs a token shard glob, got none, and {a.model} "
                             f"is no run dir with a run_config.json; pass --file GLOB")
    engine, where = build_engine(a.model, a.engine, a.device, flag="MODEL")
    print(f"model: {where}", flush=True)
    config = engine.config
    if a.task != "val":
        default_T = min(512, config.max_seq_len) if a.task == "hellaswag" else config.max_seq_len
        T = a.seq_len or default_T
        B = max(4, a.batch_size - a.batch_size % 4)
        loader = EvalLoader(path, B, T, vocab_size=config.vocab_size)
        if a.limit:
            loader.examples = loader.examples[:a.limit]
            loader.num_batches = -(-len(loader.examples) // loader.examples_per_batch)
        scores = multiple_choice_scores(engine, loader, progress=True, desc=a.task)
        print(f"{a.task} accuracy: {scores['acc_norm']:.4f} ({scores['examples']} examples, "
              f"{path})")
        print(f"{a.task} acc (lowest total loss): {scores['acc']:.4f}, acc_norm (lowest mean "
              f"loss, llm.c's C score): {scores['acc_norm']:.4f}")
    else:
        T = a.seq_len or config.max_seq_len
        loader = DistributedDataLoader(a.file, a.batch_size, T, vocab_size=config.vocab_size)
        n = loader.batches_per_epoch if a.val_batches == -1 else min(a.val_batches,
                                                                      loader.batches_per_epoch)
        total = 0.0
        for _ in tqdm(range(n), desc="val", unit="batch"):
            x, y = loader.next_batch()
            total += engine.forward(x, y)
        print(f"val loss: {total / n:.4f} ({n} batches of {a.batch_size}x{T}, {a.file})")
    return 0
