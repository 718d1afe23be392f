"""Shared pytest hooks: tests marked `gpu` skip where torch sees no CUDA device, and without
CUDA every Triton kernel runs in Triton's CPU interpreter."""

from __future__ import annotations

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# TRITON_INTERPRET is read when triton is first imported, and any test module may be the
# first to import it (directly or through torch): set it here, before all of them.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
