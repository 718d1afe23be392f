"""What the torch and triton engines share: picking the device, and the KV cache of
prefill/decode. (The numpy engine never imports this module: it needs no torch.)

Dimension legend: B batch, NH heads, HS head size, L layers, maxT max sequence length.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import LlmpyError

DEVICE_TYPES = ("cuda", "mps", "cpu")  # the order "auto" tries them in


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return kind == "cpu"


def resolve_device(device: str | None, engine: str, types=DEVICE_TYPES,
                   hint: str = "use --device cpu") -> torch.device:
    """--device ("cuda", "cuda:1", "mps", "cpu"; None or "auto" for the first available of
    `types`) -> torch.device, or an LlmpyError naming the engine, what it accepts and `hint`.
    `types` are the device types this engine runs on, in order of preference."""
    if device is None or device == "auto":
        found = [t for t in types if _available(t)]
        if not found:
            raise LlmpyError(f"{engine} engine: needs a {' or '.join(types)} device and torch "
                             f"{torch.__version__} sees none; {hint}")
        device = found[0]
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LlmpyError(f"--device: expected {', '.join(types)} or cuda:N, got {device!r}") from None
    if dev.type not in types:
        raise LlmpyError(f"{engine} engine: --device {device}: expected {' or '.join(types)}; "
                         f"{hint}")
    if not _available(dev.type):
        raise LlmpyError(f"{engine} engine: --device {device}, but torch {torch.__version__} "
                         f"sees no {dev.type.upper()} device; {hint}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LlmpyError(f"{engine} engine: --device {device}, but only "
                         f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


class KVCache:
    """Keys and values of every layer for positions 0..maxT-1, (L, B, NH, maxT, HS) each, in
    the engine's activation dtype (the torch engine's autocast or parameter dtype; bf16 in
    the triton engine)."""

    def __init__(self, config: ModelConfig, B: int, dtype: torch.dtype, device):
        shape = (config.num_layers, B, config.num_heads, config.max_seq_len, config.head_size)
        self.B = B
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, NH, maxT, HS)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, NH, maxT, HS)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, NH, T, HS) at positions pos..pos+T-1; return the keys and values
        of positions 0..pos+T-1, (B, NH, pos+T, HS) each."""
        T = k.size(2)
        self.k[layer, :, :, pos:pos + T] = k
        self.v[layer, :, :, pos:pos + T] = v
        return self.k[layer, :, :, :pos + T], self.v[layer, :, :, :pos + T]
