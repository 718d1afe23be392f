"""The triton engine: llm.c's train_gpt2.cu in Python (model.py), its kernels one concern per
module: encoder, layernorm, gelu, classifier, attention, adamw, reduce (bias gradients and
the grad norm)."""

from .model import TritonEngine

__all__ = ["TritonEngine"]
