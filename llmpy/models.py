"""The one model loader, and the choice of engine and device.

A model spec (`llmpy train -e SPEC`, and the MODEL argument of sample, eval and export) is:
  - a descriptor: d12, gpt3:c768, L=..,C=..,NH=..[,T=..,V=..] (random init, llm.c's rules)
  - an llm.c model file (.bin, fp32 v3 or bf16 v5)
  - an output dir: its newest complete checkpoint (model_%08d.bin with DONE_%08d)
  - Hugging Face GPT-2 weights: a directory with config.json, or a hub name
    (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or owner/name)
checked in that order. `peek_config` gives the shape without reading any weights, for checks
before anything big is allocated; `load_model` gives the shape and the flat float32
parameters in llm.c's order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .config import ModelConfig, from_descriptor, is_descriptor
from .errors import LlmpyError
from .formats import read_model, read_model_header
from .hf import is_hf_spec


def resolve(spec: str, flag: str = "-e") -> tuple[str, str]:
    """(kind, where) of a model spec: kind is descriptor | file | checkpoint | hf; `where` is
    the file a checkpoint dir resolves to, else the spec itself."""
    if is_descriptor(spec):
        return "descriptor", spec
    p = Path(spec)
    if p.is_file():
        return "file", spec
    if p.is_dir() and ckpt.latest_step(p) is not None:
        return "checkpoint", str(ckpt.model_path(p, ckpt.latest_step(p)))
    if is_hf_spec(spec):
        return "hf", spec
    what = "a directory with no complete checkpoint (model_N.bin + DONE_N) and no config.json" \
        if p.is_dir() else "not a file or directory (no such file)" if p.suffix or \
        "/" in spec else "not a file or directory"
    raise LlmpyError(f"{flag} {spec!r}: {what}; expected a model descriptor (d12, gpt3:c768, "
                     f"L=..,C=..,NH=..), an llm.c model file, an output dir with a checkpoint, "
                     f"or Hugging Face GPT-2 weights (a dir, gpt2..gpt2-xl, owner/name)")


def peek_config(spec: str, flag: str = "-e") -> ModelConfig:
    """The model shape behind a spec, without reading any weights."""
    kind, where = resolve(spec, flag)
    if kind == "descriptor":
        return from_descriptor(where)
    if kind in ("file", "checkpoint"):
        return read_model_header(where)[0]
    from .hf import load_hf_config
    return load_hf_config(where)


def load_model(spec: str, seed: int = 1337, flag: str = "-e") -> tuple[ModelConfig, np.ndarray]:
    """(ModelConfig, flat float32 params in llm.c's order) of a spec; a descriptor is a random
    init from `seed` (llmpy.init)."""
    kind, where = resolve(spec, flag)
    if kind == "descriptor":
        from .init import init_params
        config = from_descriptor(where)
        return config, init_params(config, seed)
    if kind in ("file", "checkpoint"):
        return read_model(where)
    from .hf import load_hf
    return load_hf(where)


# ----------------------------------------------------------------------------------------
# engine and device

def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pick_engine_and_device(engine: str = "auto", device: str = "auto") -> tuple[str, str]:
    """auto device: cuda if torch sees one, else cpu. auto engine: triton on CUDA (torch if
    triton is missing), torch on MPS, numpy on the CPU."""
    if engine == "triton" and device == "auto" and not cuda_available():
        raise LlmpyError("--engine triton needs CUDA, and torch sees no CUDA device on this "
                         "machine (or torch is not installed); use --engine numpy or torch")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if engine == "auto":
        if device.startswith("cuda"):
            try:
                import importlib
                importlib.import_module("llmpy.engines.triton")
                engine = "triton"
            except ImportError:
                engine = "torch"
        elif device == "mps":
            engine = "torch"
        else:
            engine = "numpy"
    if engine in ("torch", "triton") or device != "cpu":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise LlmpyError(f"--engine {engine} --device {device}: needs PyTorch, which is not "
                             f"installed; pip install torch, or use --engine numpy --device "
                             f"cpu") from None
    if engine == "numpy" and device != "cpu":
        raise LlmpyError(f"--engine numpy runs on the CPU only, got --device {device}")
    if engine == "triton" and not device.startswith("cuda"):
        raise LlmpyError(f"--engine triton needs CUDA, got --device {device}")
    return engine, device


def engine_options(engine: str, device: str, rc=None) -> dict:
    """The options make_engine takes for `engine`, from the run settings `rc` (llmpy.settings
    RunConfig; None for the defaults): only those the engine uses."""
    seed = rc.seed if rc is not None else 1337
    if engine == "numpy":
        return {"seed": seed}
    opts = {"seed": seed, "device": device}
    cuda = device.startswith("cuda")
    if engine == "torch":
        dtype = rc.dtype if rc is not None and rc.dtype != "auto" else ("bf16" if cuda else "fp32")
        compile_ = rc.compile if rc is not None and rc.compile != -1 else int(cuda)
        opts.update(dtype=dtype, compile=bool(compile_))
    if engine == "triton" and rc is not None:
        opts.update(recompute=rc.recompute, master_weights=bool(rc.master_weights),
                    attention=rc.attention, gelu_fusion=rc.gelu_fusion,
                    fp8_head=rc.fp8_head)
    return opts


def engine_flags_row(rc, engine: str, device: str) -> str:
    """The engine-specific settings in force; flags this engine ignores are named."""
    if engine == "triton":
        return (f"-r {rc.recompute} -w {rc.master_weights} -ge {rc.gelu_fusion} -f8 "
                f"{rc.fp8_head} --attention "
                f"{rc.attention}; --dtype/--compile not used (bf16, no compile)")
    if engine == "torch":
        opts = engine_options(engine, device, rc)
        return (f"dtype {opts['dtype']}, compile {int(opts['compile'])}; "
                f"-r/-w/-ge/--attention not used")
    return "fp32; -r/-w/-ge/--attention/--dtype/--compile not used"


def build_engine(spec: str, engine: str = "auto", device: str = "auto", flag: str = "MODEL"):
    """Load a model spec into a fresh engine for inference (sample, eval): the engine and the
    file it was read from (or the spec)."""
    from .engines import make_engine
    config, params = load_model(spec, flag=flag)
    where = resolve(spec, flag)[1]
    engine_name, device = pick_engine_and_device(engine, device)
    eng = make_engine(engine_name, config, **engine_options(engine_name, device))
    eng.set_params(params)
    return eng, where
