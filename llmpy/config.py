"""Model shapes: the GPT-2 and GPT-3 descriptors of llm.c, and the 16 parameter tensors.

Mirrors llm.c's `gpt2_build_from_descriptor` / the header of its model .bin file.
Dimension legend used across llmpy:
    B  batch size          T  sequence length      C  channels (model width)
    V  vocabulary (50257)  Vp padded vocabulary    NH number of heads
    HS head size (C/NH)    L  number of layers     maxT maximum sequence length
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LlmpyError

GPT2_VOCAB = 50257
EOT = 50256

# Name of each parameter tensor, in llm.c's file order.
PARAM_NAMES = (
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
)
# Tensors that get decoupled weight decay (the 2-D matrices).
DECAYED = frozenset(("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"))

# GPT-2 family: depth -> (channels, heads); maxT 1024, head size 64 except d48 (C=1600, NH=25).
GPT2_SIZES = {6: (384, 6), 12: (768, 12), 24: (1024, 16), 36: (1280, 20), 48: (1600, 25)}
# GPT-3 family: channels -> (layers, heads); maxT 2048.
GPT3_SIZES = {768: (12, 12), 1024: (24, 16), 1536: (24, 16), 2048: (24, 16), 2560: (32, 32),
              4096: (32, 32)}


def pad_vocab(V: int, multiple: int = 128) -> int:
    """llm.c pads the vocabulary to a multiple of 128 (50257 -> 50304) for fast kernels."""
    return ((V + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT: what llm.c stores in header slots [2..7] of a model file."""
    max_seq_len: int      # maxT
    vocab_size: int       # V
    num_layers: int       # L
    num_heads: int        # NH
    channels: int         # C
    padded_vocab_size: int = 0  # Vp; 0 means pad_vocab(V)

    def __post_init__(self):
        if self.padded_vocab_size == 0:
            object.__setattr__(self, "padded_vocab_size", pad_vocab(self.vocab_size))
        for name in ("max_seq_len", "vocab_size", "num_layers", "num_heads", "channels"):
            if getattr(self, name) <= 0:
                raise LlmpyError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.channels % self.num_heads:
            raise LlmpyError(f"model config: channels {self.channels} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise LlmpyError(f"model config: padded vocab {self.padded_vocab_size} < vocab "
                             f"{self.vocab_size}")

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each of the 16 tensors, in file order (weights are (out, in))."""
        Vp, C, L, maxT = self.padded_vocab_size, self.channels, self.num_layers, self.max_seq_len
        return {
            "wte": (Vp, C), "wpe": (maxT, C),
            "ln1w": (L, C), "ln1b": (L, C),
            "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
            "attprojw": (L, C, C), "attprojb": (L, C),
            "ln2w": (L, C), "ln2b": (L, C),
            "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
            "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
            "lnfw": (C,), "lnfb": (C,),
        }

    def param_sizes(self) -> dict[str, int]:
        return {k: math.prod(s) for k, s in self.param_shapes().items()}

    def param_offsets(self) -> dict[str, tuple[int, int]]:
        """name -> (start, end) element offsets into the flat parameter buffer."""
        out, pos = {}, 0
        for name, n in self.param_sizes().items():
            out[name] = (pos, pos + n)
            pos += n
        return out

    @property
    def num_params(self) -> int:
        return sum(self.param_sizes().values())

    def describe(self) -> str:
        return (f"L={self.num_layers} C={self.channels} NH={self.num_heads} HS={self.head_size} "
                f"maxT={self.max_seq_len} V={self.vocab_size} Vp={self.padded_vocab_size} "
                f"params={self.num_params:,}")


def is_descriptor(s: str) -> bool:
    """True if `s` names a model shape (d12, gpt3:c768, L=2,C=64,...) rather than a file."""
    try:
        from_descriptor(s)
        return True
    except LlmpyError:
        return False


def from_descriptor(desc: str) -> ModelConfig:
    """Build a ModelConfig from llm.c's descriptors or a key=value spec.

    - `d6`, `d12`, `d24`, `d36`, `d48`: GPT-2 sizes (maxT 1024, V 50257).
    - `gpt3:c768`, `gpt3:c1024`, ... : GPT-3 sizes (maxT 2048).
    - `L=2,C=64,NH=4[,T=256][,V=50257]`: any shape, for laptops and tests.
    """
    s = desc.strip()
    if s.startswith("d") and s[1:].isdigit():
        depth = int(s[1:])
        if depth not in GPT2_SIZES:
            raise LlmpyError(f"model descriptor {desc!r}: GPT-2 depth must be one of "
                             f"{sorted(GPT2_SIZES)}; use L=..,C=..,NH=.. for other shapes")
        C, NH = GPT2_SIZES[depth]
        return ModelConfig(1024, GPT2_VOCAB, depth, NH, C)
    if s.startswith("gpt3:c") and s[6:].isdigit():
        C = int(s[6:])
        if C not in GPT3_SIZES:
            raise LlmpyError(f"model descriptor {desc!r}: GPT-3 channels must be one of "
                             f"{sorted(GPT3_SIZES)}")
        L, NH = GPT3_SIZES[C]
        return ModelConfig(2048, GPT2_VOCAB, L, NH, C)
    if "=" in s:
        keys = {"L": None, "C": None, "NH": None, "T": 1024, "V": GPT2_VOCAB}
        for part in s.split(","):
            k, _, v = part.partition("=")
            k = k.strip()
            if k not in keys or not v.strip().isdigit():
                raise LlmpyError(f"model descriptor {desc!r}: bad part {part!r}; expected "
                                 f"L=<int>,C=<int>,NH=<int>[,T=<int>][,V=<int>]")
            keys[k] = int(v)
        missing = [k for k, v in keys.items() if v is None]
        if missing:
            raise LlmpyError(f"model descriptor {desc!r}: missing {', '.join(missing)}")
        return ModelConfig(keys["T"], keys["V"], keys["L"], keys["NH"], keys["C"])
    raise LlmpyError(f"model descriptor {desc!r} not understood: expected d6|d12|d24|d36|d48, "
                     f"gpt3:c768|c1024|c1536|c2048|c2560|c4096, or L=..,C=..,NH=..[,T=..][,V=..]")
