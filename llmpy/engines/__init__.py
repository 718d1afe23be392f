"""Engines: the model math behind one interface, so one training loop drives any of them.

Every engine holds the 16 llm.c parameter tensors (llmpy.config.PARAM_NAMES) in llm.c's order,
as views of one flat buffer, and implements:

    engine.config                      ModelConfig
    engine.name                        "numpy" | "torch" | "triton"
    engine.param_dtype                 "fp32" | "bf16" (what a model file is written as: v3 | v5)

    forward(inputs, targets=None) -> float
        inputs, targets: int array (B, T). Runs the model; with targets returns the mean
        cross-entropy over B*T (padded vocab rows excluded), else returns nan.
    backward(grad_scale=1.0)
        Backpropagates the last forward, ADDING grad_scale * d(mean loss)/d(params) into the
        gradient buffer (gradient accumulation: the loop passes 1/grad_accum_steps).
    zero_grad()
    grad_norm() -> float               global L2 norm of the gradient buffer (fp32 accumulate)
    step(lr, t, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8, grad_scale=1.0)
        One AdamW update, llm.c's rules: bias correction with t (= step + 1), decoupled
        weight decay on the 2-D tensors only (llmpy.config.DECAYED), gradients multiplied by
        grad_scale first (the loop folds clipping into it: min(1, clip / norm)).
    logits(inputs) -> np.ndarray (B, T, V) float32, unpadded. No gradient state touched.
    prefill(inputs) -> np.ndarray (B, V) float32: runs the prompt (B, T0), fills a KV cache,
        returns the logits of the last position.
    decode(tokens) -> np.ndarray (B, V) float32: feeds one token per row (B,) at the next
        position using the KV cache. Position must stay < maxT.

    get_params() -> np.ndarray (num_params,) float32, llm.c order (a copy)
    set_params(flat)                   flat: float32 array (num_params,)
    get_grads() -> np.ndarray (num_params,) float32 (a copy; for tests and debug states)
    get_optimizer_state() -> dict(m=float32 array, v=float32 array, master=float32 array|None)
    set_optimizer_state(m, v, master=None)

Engines are built with `make_engine(name, config, seed=..., device=..., **options)` below,
random init as llm.c (llmpy.init.init_params) or with `set_params`.
"""

from __future__ import annotations

ENGINES = ("numpy", "torch", "triton")


def make_engine(name: str, config, **options):
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
