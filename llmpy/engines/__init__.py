"""Engines: the model math behind one interface, so one training loop drives any of them.

Every engine holds the 16 llm.c parameter tensors (llmpy.config.PARAM_NAMES) in llm.c's order,
as views of one flat buffer. The table below (and the `Engine` protocol, the same list in
code) is the whole contract: every engine has every member not marked "distributed only",
and callers use the members without probing for them with hasattr. Token arrays are int
(B, T) with T <= maxT; "flat" is a float32 array (num_params,) in llm.c's order; bad input
raises an LlmpyError.

attributes
    name            "numpy", "torch" or "triton"
    config          the ModelConfig
    param_dtype     "fp32" or "bf16": what a model file is written as (version 3 or 5)
    distributed     True if the engine has the members marked "distributed only", which
                    multi-process training (llmpy.dist) needs: numpy False, torch and
                    triton True

training
    forward(inputs, targets=None) -> float
                    mean cross-entropy over B*T (padded vocab rows excluded), keeping what
                    backward needs; without targets it runs the model and returns nan
    backward(grad_scale=1.0)
                    backpropagates the last forward, ADDING grad_scale * d(mean loss) /
                    d(params) into the gradient buffer (the loop passes 1/grad_accum_steps)
    zero_grad()
    grad_norm() -> float
                    global L2 norm of the gradient buffer (fp32 accumulation)
    step(lr, t, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_scale=1.0)
                    one AdamW update, llm.c's rules: bias correction with t (= step + 1),
                    decoupled weight decay on the 2-D tensors only (llmpy.config.DECAYED),
                    gradients multiplied by grad_scale first (the loop folds clipping into
                    it: min(1, clip / norm))

distributed only
    flat, flat_grad torch tensors (num_params,) on the engine's device: the parameters and
                    the gradients, which llmpy.dist averages, reduce-scatters and
                    all-gathers in place
    step(..., shard=(start, end))
                    the same update on flat[start:end] only (ZeRO-1): the shards of one
                    step together give the full step
    grad_ready      None, or a callable(ranges) the caller sets: during backward() the
                    engine calls it with a list of [start, end) ranges of flat_grad as soon
                    as those gradients are final for this backward (every element exactly
                    once per backward, wte last), so llmpy.dist can start their all-reduce
                    while the rest of the backward runs. Engines know nothing else of it.

inference (no gradient state touched; the loop calls these between steps)
    logits(inputs) -> np.ndarray (B, T, V) float32, unpadded
    token_losses(inputs, targets) -> np.ndarray (B, T) float32
                    the cross-entropy at every position, what forward averages, without
                    (B, T, V) logits leaving the engine
    prefill(inputs) -> np.ndarray (B, V) float32
                    runs the prompt (B, T0), fills a KV cache, returns the logits of the
                    last position
    decode(tokens) -> np.ndarray (B, V) float32
                    feeds one token per row (B,) at the next position through the KV
                    cache; the position must stay < maxT

state in and out
    get_params() -> flat            a copy
    set_params(flat)
    get_grads() -> flat             a copy, for tests and debug states
    get_optimizer_state() -> dict(m=flat, v=flat, master=flat or None)
                    master: the fp32 master weights, None where the engine keeps none
    set_optimizer_state(m, v, master=None)

Engines are built with `make_engine(name, config, **options)` below, with random init as
llm.c's (llmpy.init.init_params) or weights from `set_params`. Options are keywords, and an
engine rejects one it does not know (a TypeError) rather than ignore it. Every engine takes
seed and device (None or "auto" for the best one; numpy: the CPU only), and:
    numpy   dtype (np.float32, or np.float64 for tests)
    torch   dtype ("fp32", "bf16" or "fp64"), compile, fused
    triton  recompute (0, 1 or 2), master_weights, attention, verbose
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..config import ModelConfig

ENGINES = ("numpy", "torch", "triton")


class Engine(Protocol):
    """The contract of the table above, for readers and type checkers (engines do not
    subclass it)."""

    name: str
    config: ModelConfig
    param_dtype: str
    distributed: bool

    def forward(self, inputs, targets=None) -> float: ...
    def backward(self, grad_scale: float = 1.0) -> None: ...
    def zero_grad(self) -> None: ...
    def grad_norm(self) -> float: ...
    def step(self, lr: float, t: int, weight_decay: float = 0.0, beta1: float = 0.9,
             beta2: float = 0.95, eps: float = 1e-8, grad_scale: float = 1.0,
             shard: tuple[int, int] | None = None) -> None: ...   # shard: distributed only
    # distributed only: flat, flat_grad (torch.Tensor, (num_params,)), grad_ready

    def logits(self, inputs) -> np.ndarray: ...
    def token_losses(self, inputs, targets) -> np.ndarray: ...
    def prefill(self, inputs) -> np.ndarray: ...
    def decode(self, tokens) -> np.ndarray: ...

    def get_params(self) -> np.ndarray: ...
    def set_params(self, flat) -> None: ...
    def get_grads(self) -> np.ndarray: ...
    def get_optimizer_state(self) -> dict: ...
    def set_optimizer_state(self, m, v, master=None) -> None: ...


def make_engine(name: str, config, **options) -> Engine:
    """Create an engine by name; imports lazily so the numpy engine needs no torch."""
    if name == "numpy":
        from .numpy import NumpyEngine
        return NumpyEngine(config, **options)
    if name == "torch":
        from .torch import TorchEngine
        return TorchEngine(config, **options)
    if name == "triton":
        from .triton import TritonEngine
        return TritonEngine(config, **options)
    from ..errors import LlmpyError
    raise LlmpyError(f"--engine: expected one of {', '.join(ENGINES)} or auto, got {name!r}")
