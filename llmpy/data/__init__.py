"""Data: token shards and their loaders, dataset builders, the embedded tinyshakespeare text.

Mirrors llm.c's dev/data/ (dataset scripts that write uint16 token shards) and
llmc/dataloader.h (the distributed, shuffled training loader and the HellaSwag eval loader).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(name: str = "") -> Path:
    """Where built datasets live by default: $LLMPY_CACHE, else ~/.cache/llmpy; then `name`."""
    root = os.environ.get("LLMPY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmpy")
    return Path(root) / name if name else Path(root)


from .loader import DistributedDataLoader, EvalBatch, EvalLoader  # noqa: E402
from .tinyshakespeare import ensure_tinyshakespeare  # noqa: E402

__all__ = ["cache_dir", "DistributedDataLoader", "EvalBatch", "EvalLoader",
           "ensure_tinyshakespeare"]
