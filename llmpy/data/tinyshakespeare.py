"""tinyshakespeare, embedded: the text ships with llmpy, the shards are built on first use.

Mirrors llm.c's dev/data/tinyshakespeare.py: split the text on blank lines ("\\n\\n"); each
section becomes EOT followed by the GPT-2 tokens of the section with "\\n\\n" re-appended
(all but the last section); the first 32,768 tokens are val, the remaining 305,260 train.
Writes `tiny_shakespeare_val.bin` and `tiny_shakespeare_train.bin` (llm.c token shards).

NOTICE: tinyshakespeare.txt.gz is Andrej Karpathy's tinyshakespeare (input.txt of char-rnn,
github.com/karpathy/char-rnn, data/tinyshakespeare), about 1 MB of the works of William
Shakespeare, which are in the public domain. Stored gzip -9 -n (no name, no timestamp), so
the compressed file is reproducible byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import FormatError, LlmpyError
from ..formats import open_shard, write_shard
from ..tokenizer import get_tokenizer
from . import cache_dir

TRAIN_NAME = "tiny_shakespeare_train.bin"
VAL_NAME = "tiny_shakespeare_val.bin"
NUM_VAL = 32_768
NUM_TRAIN = 305_260
TEXT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # input.txt
# sha256 of the uint16 little-endian token bodies llm.c's script produces (not the headers).
VAL_TOKENS_SHA256 = "d5ad4a9d91976783859c221697e3e0488675d095f676fe3fedac339caa4c193a"
TRAIN_TOKENS_SHA256 = "25f64f50080b1237d8d70e36d9ae43ca00855bbb7d5dcac6118c3cb75eeb7b2f"


def load_text() -> str:
    """The tinyshakespeare text (1,115,394 characters), checked against its sha256."""
    raw = gzip.decompress((resources.files("llmpy.data") / "tinyshakespeare.txt.gz").read_bytes())
    actual = hashlib.sha256(raw).hexdigest()
    if actual != TEXT_SHA256:
        raise LlmpyError(f"llmpy/data/tinyshakespeare.txt.gz: sha256 of the text: expected "
                         f"{TEXT_SHA256}, got {actual} (reinstall llmpy)")
    return raw.decode("utf-8")


def tokenize(text: str) -> np.ndarray:
    """llm.c's procedure: EOT + section + "\\n\\n" for each blank-line section but the last."""
    sections = text.split("\n\n")
    docs = [s + "\n\n" for s in sections[:-1]] + [sections[-1]]
    tok = get_tokenizer()
    tokens = []
    for ids in tok.encode_batch(docs):
        tokens.append(tok.eot)
        tokens.extend(ids)
    return np.array(tokens, dtype=np.uint16)


def shard_paths(out_dir: str | Path | None = None) -> tuple[Path, Path]:
    d = Path(out_dir) if out_dir is not None else cache_dir("tinyshakespeare")
    return d / TRAIN_NAME, d / VAL_NAME


def build_tinyshakespeare(out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Tokenize the embedded text and write both shards (atomically); returns (train, val)."""
    train_path, val_path = shard_paths(out_dir)
    tokens = tokenize(load_text())
    val, train = tokens[:NUM_VAL], tokens[NUM_VAL:]
    if (len(tokens) != NUM_VAL + NUM_TRAIN or _sha256(val) != VAL_TOKENS_SHA256
            or _sha256(train) != TRAIN_TOKENS_SHA256):
        raise LlmpyError(f"tinyshakespeare: got {len(tokens)} tokens that differ from llm.c's "
                         f"({NUM_VAL} + {NUM_TRAIN}, sha256 checked): the GPT-2 tokenizer is "
                         f"not exact here (check the tiktoken version)")
    try:
        train_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmpyError(f"tinyshakespeare: cannot create {train_path.parent}: "
                         f"{e.strerror or e} (pick another --out DIR or set LLMPY_CACHE)") from None
    write_shard(val_path, val)
    write_shard(train_path, train)
    return train_path, val_path


def _sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<u2").tobytes()).hexdigest()


def _is_built(path: Path, sha256: str) -> bool:
    """A valid shard (header, exact size) holding exactly the expected tokens (0.6 MB read)."""
    if not path.exists():
        return False
    try:
        return _sha256(open_shard(path)) == sha256
    except FormatError:
        return False


def ensure_tinyshakespeare(dir: str | Path | None = None) -> tuple[Path, Path]:
    """(train_path, val_path) of the tinyshakespeare shards in `dir` (default: the cache dir
    $LLMPY_CACHE/tinyshakespeare or ~/.cache/llmpy/tinyshakespeare), built on first use.
    Shards that hold exactly llm.c's tokens are reused untouched; others are rebuilt."""
    train_path, val_path = shard_paths(dir)
    if _is_built(train_path, TRAIN_TOKENS_SHA256) and _is_built(val_path, VAL_TOKENS_SHA256):
        return train_path, val_path
    return build_tinyshakespeare(dir)
