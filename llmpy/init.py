"""Random initialization of the flat parameter buffer, as llm.c's gpt2_build_from_random.

N(0, 0.02) for wte (first V rows; padded rows stay zero), wpe, qkvw, fcw;
N(0, 0.02/sqrt(2L)) for the residual projections attprojw and fcprojw; LayerNorm weights 1;
biases 0. Drawn with numpy's PCG64 from `seed`, tensor by tensor in file order, so every
engine starts from the same numbers.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


def init_params(config: ModelConfig, seed: int = 1337) -> np.ndarray:
    """Return a float32 array (num_params,) with llm.c's random init."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(config.num_params, dtype=np.float32)
    offs = config.param_offsets()
    shapes = config.param_shapes()
    resid_std = 0.02 / np.sqrt(2 * config.num_layers)
    for name, (a, b) in offs.items():
        view = flat[a:b].reshape(shapes[name])
        if name == "wte":
            V = config.vocab_size
            view[:V] = rng.normal(0.0, 0.02, size=(V, config.channels))
        elif name in ("wpe", "qkvw", "fcw"):
            view[...] = rng.normal(0.0, 0.02, size=view.shape)
        elif name in ("attprojw", "fcprojw"):
            view[...] = rng.normal(0.0, resid_std, size=view.shape)
        elif name in ("ln1w", "ln2w", "lnfw"):
            view[...] = 1.0
        # biases stay zero
    return flat


def param_views(flat: np.ndarray, config: ModelConfig) -> dict[str, np.ndarray]:
    """Named views (no copies) of the 16 tensors inside a flat buffer, in file order."""
    shapes = config.param_shapes()
    return {name: flat[a:b].reshape(shapes[name]) for name, (a, b) in config.param_offsets().items()}
