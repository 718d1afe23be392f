"""Learning-rate schedules, as llm.c's llmc/schedulers.h.

cosine, linear and wsd warm up linearly, lr * (step + 1) / warmup, for the first `warmup`
steps, then decay from lr to min_lr = lr * final_frac over the remaining steps:
    cosine:   min_lr + 0.5 * (1 + cos(pi * p)) * (lr - min_lr), p = progress after warmup
    linear:   lr - p * (lr - min_lr)
    constant: lr at every step, no warmup and no decay (as llm.c's constant scheduler)
    wsd:      constant until 80% of the steps, then 1 - sqrt decay to min_lr over the last 20%
"""

from __future__ import annotations

import math

from .errors import LlmpyError

SCHEDULERS = ("cosine", "linear", "constant", "wsd")


def get_lr(kind: str, step: int, lr: float, warmup: int, total: int, final_frac: float) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total` steps."""
    if kind not in SCHEDULERS:
        raise LlmpyError(f"-k/--scheduler: expected one of {', '.join(SCHEDULERS)}, got {kind!r}")
    if kind == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * final_frac
    if kind == "wsd":
        decay_start = int(0.8 * total)
        if step < decay_start:
            return lr
        frac = (step - decay_start) / max(1, total - decay_start)
        return min_lr + (1.0 - math.sqrt(min(frac, 1.0))) * (lr - min_lr)
    p = (step - warmup) / max(1, total - warmup)
    p = min(max(p, 0.0), 1.0)
    if kind == "linear":
        return lr - p * (lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * p)) * (lr - min_lr)
