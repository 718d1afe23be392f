"""Model FLOPs utilization (llm.c's llmc/mfu.h): training FLOPs per token against the GPU's
dense bf16 tensor-core peak, looked up by device name."""

from __future__ import annotations

from .config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s); matched against the CUDA device name.
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12),
                   ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
                   ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12)]


def peak_flops(device: str) -> float | None:
    """The bf16 peak of the CUDA device in use, or None (CPU, MPS, an unlisted GPU)."""
    if not device.startswith("cuda"):
        return None
    import torch
    name = torch.cuda.get_device_name()
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(config: ModelConfig, T: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*C*T for attention (PaLM)."""
    return 6 * config.num_params + 12 * config.num_layers * config.channels * T
