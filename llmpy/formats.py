"""llm.c's binary file formats: checked readers and atomic writers.

Every llm.c file starts with a header of 256 little-endian int32 (1024 bytes): [0] magic,
[1] version, then per-format fields; unused slots are zero. Readers check the magic, the
version, the header fields and the exact file size before they read the body, and raise
FormatError naming the file, the field, what was expected and what was found. Writers write
a temporary file next to the target and rename it, so a crash never leaves half a file.

| file            | magic    | mirrors in llm.c                                  |
|-----------------|----------|---------------------------------------------------|
| model           | 20240326 | gpt2_write_to_checkpoint / gpt2_build_from_checkpoint (v3 fp32, v5 bf16) |
| debug state     | 20240327 | test_gpt2 / train_gpt2.py write_state             |
| tokenizer       | 20240328 | tokenizer_init / write_tokenizer                  |
| token shard     | 20240520 | dataloader shards (dev/data/data_common.py)       |
| eval (HellaSwag)| 20240522 | evalloader (dev/data/hellaswag.py)                |
| optimizer state | 20240527 | save_state / load_state in train_gpt2.cu          |
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import FormatError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

MODEL_MAGIC, MODEL_FP32, MODEL_BF16 = 20240326, 3, 5
DEBUG_MAGIC, DEBUG_VERSION = 20240327, 2
TOKENIZER_MAGIC, TOKENIZER_VERSION = 20240328, 2
SHARD_MAGIC, SHARD_VERSION = 20240520, 1
EVAL_MAGIC, EVAL_VERSION = 20240522, 1
STATE_MAGIC, STATE_VERSION = 20240527, 1

# llmpy's own extension of the state header (llm.c leaves these slots zero and never reads
# them): [40] bytes of a JSON blob appended after llm.c's body, [41] number of shard
# indices and [42] number of sample indices in the loader permutations.
STATE_EXTRA_LEN, STATE_NSHARDS, STATE_NSAMPLES = 40, 41, 42

REGEN_HINT = {
    MODEL_MAGIC: "re-export the model (llmpy export) or re-run training to regenerate it",
    SHARD_MAGIC: "re-run `llmpy data ...` to regenerate the shard",
    TOKENIZER_MAGIC: "re-write it with llmpy.tokenizer.write_tokenizer_file",
    EVAL_MAGIC: "re-run `llmpy data hellaswag` to regenerate it",
    STATE_MAGIC: "the checkpoint is damaged: delete its DONE file to resume from an older one",
    DEBUG_MAGIC: "re-run `llmpy export debug-state` to regenerate it",
}


# ----------------------------------------------------------------------------------------
# atomic writes and header checks

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, chunks) -> None:
    """Write an iterable of bytes-like chunks to `path` via a temp file + fsync + rename +
    fsync of the directory, so a DONE marker never outlives the files it vouches for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _WRITES[0] += 1
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for i, chunk in enumerate(chunks):
                f.write(memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else chunk)
                if i == 0:
                    f.flush()
                    _kill_point("partial")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        _kill_point("synced")
        os.replace(tmp, path)
        _kill_point("renamed")
        _fsync_dir(path.parent)  # the rename itself survives a power loss only after this
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_WRITES = [0]  # atomic writes so far in this process (for LLMPY_TEST_KILL_WRITE)


def _kill_point(phase: str) -> None:
    """Fault injection: LLMPY_TEST_KILL_WRITE=N:PHASE sends this process a real SIGKILL in
    its Nth atomic write, after the first chunk (partial), after the fsync (synced) or after
    the rename (renamed)."""
    if os.environ.get("LLMPY_TEST_KILL_WRITE") == f"{_WRITES[0]}:{phase}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # a platform without directory fds (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_header(magic: int, version: int, fields: dict[int, int] | None = None) -> np.ndarray:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1] = magic, version
    for slot, value in (fields or {}).items():
        header[slot] = value
    return header


def read_header(path, magic: int, versions: tuple[int, ...]) -> np.ndarray:
    """Read and check the 1024-byte header; returns it as int32 (256,)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "file", "an existing file", "no such file",
                          REGEN_HINT.get(magic, ""))
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise FormatError(path, "size", f"at least {HEADER_BYTES} bytes (the header)",
                          f"{size} bytes", REGEN_HINT.get(magic, ""))
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != magic:
        raise FormatError(path, "header[0] magic", magic, int(header[0]),
                          "wrong kind of file? " + REGEN_HINT.get(magic, ""))
    if header[1] not in versions:
        raise FormatError(path, "header[1] version", " or ".join(map(str, versions)),
                          int(header[1]), REGEN_HINT.get(magic, ""))
    return header


def check_size(path, expected: int, magic: int) -> None:
    size = Path(path).stat().st_size
    if size != expected:
        raise FormatError(path, "file size", f"{expected} bytes", f"{size} bytes",
                          "truncated or corrupt; " + REGEN_HINT.get(magic, ""))


def check_field(path, header, slot: int, name: str, lo: int, hi: int | None = None) -> int:
    value = int(header[slot])
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise FormatError(path, f"header[{slot}] {name}", rng, value)
    return value


# ----------------------------------------------------------------------------------------
# bf16 as raw 16-bit words

def fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (round to nearest, ties to even), returned as uint16 words."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_fp32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------------------
# model: [2] maxT [3] V [4] L [5] NH [6] C [7] Vp, then the 16 tensors

def _model_header(config: ModelConfig, version: int) -> np.ndarray:
    c = config
    return make_header(MODEL_MAGIC, version, {2: c.max_seq_len, 3: c.vocab_size, 4: c.num_layers,
                                              5: c.num_heads, 6: c.channels,
                                              7: c.padded_vocab_size})


def read_model_header(path) -> tuple[ModelConfig, int]:
    """Config and version (3 fp32 / 5 bf16) of a model file, checking its size."""
    h = read_header(path, MODEL_MAGIC, (MODEL_FP32, MODEL_BF16))
    maxT = check_field(path, h, 2, "maxT", 1)
    V = check_field(path, h, 3, "vocab_size", 1)
    L = check_field(path, h, 4, "num_layers", 1)
    NH = check_field(path, h, 5, "num_heads", 1)
    C = check_field(path, h, 6, "channels", 1)
    Vp = int(h[7]) if h[7] else V  # version-1-era files had no Vp; treat as unpadded
    if Vp < V:
        raise FormatError(path, "header[7] padded_vocab_size", f">= vocab_size {V}", Vp)
    if C % NH:
        raise FormatError(path, "header[6] channels", f"divisible by num_heads {NH}", C)
    config = ModelConfig(maxT, V, L, NH, C, Vp)
    itemsize = 4 if h[1] == MODEL_FP32 else 2
    check_size(path, HEADER_BYTES + itemsize * config.num_params, MODEL_MAGIC)
    return config, int(h[1])


def read_model(path) -> tuple[ModelConfig, np.ndarray]:
    """Read an llm.c model file (v3 fp32 or v5 bf16) -> (config, float32 params (N,))."""
    config, version = read_model_header(path)
    dtype = "<f4" if version == MODEL_FP32 else "<u2"
    body = np.fromfile(path, dtype=dtype, offset=HEADER_BYTES, count=config.num_params)
    params = body.astype(np.float32) if version == MODEL_FP32 else bf16_bits_to_fp32(body)
    return config, params


def write_model(path, config: ModelConfig, params: np.ndarray, dtype: str = "fp32") -> None:
    """Write an llm.c model file: dtype "fp32" (v3) or "bf16" (v5, rounded to nearest even)."""
    params = np.asarray(params)
    if params.shape != (config.num_params,):
        raise ValueError(f"write_model: params shape {params.shape} != ({config.num_params},)")
    if dtype == "fp32":
        body, version = np.ascontiguousarray(params, dtype="<f4"), MODEL_FP32
    elif dtype == "bf16":
        body, version = fp32_to_bf16_bits(params), MODEL_BF16
    else:
        raise ValueError(f"write_model: dtype must be fp32 or bf16, got {dtype!r}")
    atomic_write(path, [_model_header(config, version), body])


# ----------------------------------------------------------------------------------------
# debug state: [2] B [3] T; x, y int32 (B,T); logits (B,T,V); loss; grads (all 16, padded)

def write_debug_state(path, config: ModelConfig, x, y, logits, loss, grads) -> None:
    x = np.ascontiguousarray(x, dtype="<i4")
    B, T = x.shape
    logits = np.ascontiguousarray(logits, dtype="<f4")
    if logits.shape != (B, T, config.vocab_size):
        raise ValueError(f"write_debug_state: logits shape {logits.shape} != "
                         f"{(B, T, config.vocab_size)}")
    grads = np.ascontiguousarray(grads, dtype="<f4")
    if grads.shape != (config.num_params,):
        raise ValueError(f"write_debug_state: grads shape {grads.shape}")
    atomic_write(path, [make_header(DEBUG_MAGIC, DEBUG_VERSION, {2: B, 3: T}), x,
                        np.ascontiguousarray(y, dtype="<i4").reshape(B, T), logits,
                        np.array([loss], dtype="<f4"), grads])


def read_debug_state(path, config: ModelConfig) -> dict:
    h = read_header(path, DEBUG_MAGIC, (DEBUG_VERSION,))
    B = check_field(path, h, 2, "B", 1)
    T = check_field(path, h, 3, "T", 1, config.max_seq_len)
    V, N = config.vocab_size, config.num_params
    check_size(path, HEADER_BYTES + 4 * (2 * B * T + B * T * V + 1 + N), DEBUG_MAGIC)
    data = np.fromfile(path, dtype="<i4", offset=HEADER_BYTES)
    pos = 0

    def take(n, dtype):
        nonlocal pos
        out = data[pos:pos + n].view(dtype).copy()
        pos += n
        return out

    x = take(B * T, "<i4").reshape(B, T)
    y = take(B * T, "<i4").reshape(B, T)
    for name, ids in (("x", x), ("y", y)):
        if ids.min() < 0 or ids.max() >= V:
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise FormatError(path, f"{name} token ids", f"in [0, V = {V})", bad,
                              "a debug state of another model, or damaged: " +
                              REGEN_HINT[DEBUG_MAGIC])
    logits = take(B * T * V, "<f4").reshape(B, T, V)
    loss = float(take(1, "<f4")[0])
    grads = take(N, "<f4")
    return {"x": x, "y": y, "logits": logits, "loss": loss, "grads": grads}


# ----------------------------------------------------------------------------------------
# tokenizer: [2] V [3] eot; per token: 1 byte length, then the bytes

def write_tokenizer(path, token_bytes: list[bytes], eot: int) -> None:
    parts = [make_header(TOKENIZER_MAGIC, TOKENIZER_VERSION, {2: len(token_bytes), 3: eot})]
    body = bytearray()
    for i, b in enumerate(token_bytes):
        if not 1 <= len(b) <= 255:
            raise ValueError(f"write_tokenizer: token {i} has {len(b)} bytes, need 1..255")
        body.append(len(b))
        body += b
    parts.append(bytes(body))
    atomic_write(path, parts)


def read_tokenizer(path) -> tuple[list[bytes], int]:
    h = read_header(path, TOKENIZER_MAGIC, (1, TOKENIZER_VERSION))
    V = check_field(path, h, 2, "vocab_size", 1)
    eot = check_field(path, h, 3, "eot_token", 0, V - 1) if h[1] == 2 else 50256
    raw = Path(path).read_bytes()[HEADER_BYTES:]
    tokens, pos = [], 0
    for i in range(V):
        if pos >= len(raw):
            raise FormatError(path, f"token {i}", f"{V} tokens", f"file ends after {i}",
                              REGEN_HINT[TOKENIZER_MAGIC])
        n = raw[pos]
        if n == 0 or pos + 1 + n > len(raw):
            raise FormatError(path, f"token {i} length", "1..255 bytes inside the file", n,
                              REGEN_HINT[TOKENIZER_MAGIC])
        tokens.append(raw[pos + 1:pos + 1 + n])
        pos += 1 + n
    if pos != len(raw):
        raise FormatError(path, "file size", f"{HEADER_BYTES + pos} bytes",
                          f"{HEADER_BYTES + len(raw)} bytes", REGEN_HINT[TOKENIZER_MAGIC])
    return tokens, eot


# ----------------------------------------------------------------------------------------
# token shard: [2] ntok; ntok x uint16

def write_shard(path, tokens) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError("write_shard: token ids must fit in uint16")
    body = np.ascontiguousarray(tokens, dtype="<u2")
    atomic_write(path, [make_header(SHARD_MAGIC, SHARD_VERSION, {2: body.size}), body])


def shard_num_tokens(path) -> int:
    """Validate a shard's header and exact size (reading only the header); return ntok."""
    h = read_header(path, SHARD_MAGIC, (SHARD_VERSION,))
    ntok = check_field(path, h, 2, "num_tokens", 0)
    check_size(path, HEADER_BYTES + 2 * ntok, SHARD_MAGIC)
    return ntok


def open_shard(path) -> np.memmap:
    """A validated token shard as a read-only uint16 memmap (nothing is read into RAM yet)."""
    ntok = shard_num_tokens(path)
    if ntok == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


# ----------------------------------------------------------------------------------------
# eval file (HellaSwag): [2] examples [3] longest example in bytes; per example, uint16s:
# 65535, example bytes, index, label, num completions, ctx_len, ctx..., then per completion
# (len, tokens...)

EVAL_DELIM = 65535


def _encode_example(i: int, ex: dict) -> np.ndarray:
    ctx, endings = list(ex["ctx"]), [list(e) for e in ex["endings"]]
    words = [ex["label"], len(endings), len(ctx), *ctx]
    for e in endings:
        words += [len(e), *e]
    n_bytes = 2 * (3 + len(words))  # delimiter, byte count and index, then the words
    arr = np.array([EVAL_DELIM, n_bytes, i, *words], dtype=np.int64)
    if arr.max() > 65535 or arr.min() < 0:
        raise ValueError(f"write_eval: example {i} has a value outside uint16")
    return arr.astype("<u2")


def write_eval(path, examples: list[dict]) -> None:
    """examples: dicts with label (int), ctx (token list), endings (list of token lists)."""
    encoded = [_encode_example(i, ex) for i, ex in enumerate(examples)]
    longest = max((int(e[1]) for e in encoded), default=0)
    atomic_write(path, [make_header(EVAL_MAGIC, EVAL_VERSION, {2: len(examples), 3: longest}),
                        *encoded])


def read_eval(path) -> list[dict]:
    h = read_header(path, EVAL_MAGIC, (EVAL_VERSION,))
    n = check_field(path, h, 2, "num_examples", 0)
    longest = check_field(path, h, 3, "longest_example_bytes", 0)
    words = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES)
    out, pos = [], 0
    for i in range(n):
        where = f"example {i} (word {pos})"
        if pos + 6 > len(words) or words[pos] != EVAL_DELIM:
            raise FormatError(path, where, f"delimiter {EVAL_DELIM}",
                              "end of file" if pos >= len(words) else int(words[pos]),
                              REGEN_HINT[EVAL_MAGIC])
        n_bytes, index, label, n_end, ctx_len = (int(w) for w in words[pos + 1:pos + 6])
        if n_bytes > longest or pos + n_bytes // 2 > len(words):
            raise FormatError(path, f"{where} byte count", f"<= {longest} and inside the file",
                              n_bytes, REGEN_HINT[EVAL_MAGIC])
        body = words[pos + 6:pos + n_bytes // 2]
        ctx = body[:ctx_len].astype(np.int64).tolist()
        q, endings = ctx_len, []
        for _ in range(n_end):
            if q >= len(body):
                raise FormatError(path, f"{where} endings", f"{n_end} completions",
                                  f"{len(endings)}", REGEN_HINT[EVAL_MAGIC])
            m = int(body[q])
            endings.append(body[q + 1:q + 1 + m].astype(np.int64).tolist())
            q += 1 + m
        if q != len(body) or index != i or not 0 <= label < max(n_end, 1):
            raise FormatError(path, where, "a consistent example (index, label, lengths)",
                              f"index {index}, label {label}, {q} of {len(body)} words used",
                              REGEN_HINT[EVAL_MAGIC])
        out.append({"label": label, "ctx": ctx, "endings": endings})
        pos += n_bytes // 2
    if pos != len(words):
        raise FormatError(path, "file size", f"{HEADER_BYTES + 2 * pos} bytes",
                          f"{HEADER_BYTES + 2 * len(words)} bytes", REGEN_HINT[EVAL_MAGIC])
    return out


# ----------------------------------------------------------------------------------------
# optimizer state: [2] nproc [3] rank [4] master flag [5] shuffle flag [10] step [20..21] rng
# [30..31] shard idx [32..33] sample idx; body: m, v, (master), (shard perm, sample perm)

def _put64(header, slot, value):
    header[slot:slot + 2] = np.array([value], dtype="<u8").view("<i4")


def _get64(header, slot):
    return int(header[slot:slot + 2].view("<u8")[0])


def write_state(path, *, step: int, m, v, master=None, nproc: int = 1, rank: int = 0,
                rng_state: int = 0, shard_idx: int = 0, sample_idx: int = 0,
                shard_perm=None, sample_perm=None, extra: dict | None = None) -> None:
    """Write llm.c's optimizer state file; `extra` (JSON) rides after llm.c's body."""
    m = np.ascontiguousarray(m, dtype="<f4")
    v = np.ascontiguousarray(v, dtype="<f4")
    if m.shape != v.shape or m.ndim != 1:
        raise ValueError("write_state: m and v must be 1-D and the same size")
    shuffle = shard_perm is not None
    h = make_header(STATE_MAGIC, STATE_VERSION, {2: nproc, 3: rank, 4: int(master is not None),
                                                 5: int(shuffle), 10: step})
    _put64(h, 20, rng_state)
    _put64(h, 30, shard_idx)
    _put64(h, 32, sample_idx)
    parts = [h, m, v]
    if master is not None:
        master = np.ascontiguousarray(master, dtype="<f4")
        if master.shape != m.shape:
            raise ValueError("write_state: master weights must match m in size")
        parts.append(master)
    if shuffle:
        sp = np.ascontiguousarray(shard_perm, dtype="<i4")
        ip = np.ascontiguousarray(sample_perm if sample_perm is not None else [], dtype="<i4")
        h[STATE_NSHARDS], h[STATE_NSAMPLES] = sp.size, ip.size
        parts += [sp, ip]
    if extra is not None:
        blob = json.dumps(extra, sort_keys=True).encode()
        h[STATE_EXTRA_LEN] = len(blob)
        parts.append(blob)
    atomic_write(path, parts)


def read_state(path) -> dict:
    h = read_header(path, STATE_MAGIC, (STATE_VERSION,))
    nproc = check_field(path, h, 2, "num_processes", 1)
    rank = check_field(path, h, 3, "rank", 0, nproc - 1)
    has_master = check_field(path, h, 4, "use_master_weights", 0, 1)
    shuffle = check_field(path, h, 5, "should_shuffle", 0, 1)
    extra_len = check_field(path, h, STATE_EXTRA_LEN, "llmpy extra length", 0)
    nsh = check_field(path, h, STATE_NSHARDS, "llmpy shard count", 0)
    nsa = check_field(path, h, STATE_NSAMPLES, "llmpy sample count", 0)
    size = Path(path).stat().st_size
    float_bytes = size - HEADER_BYTES - extra_len - 4 * (nsh + nsa)
    parts = 3 if has_master else 2
    if float_bytes <= 0 or float_bytes % (4 * parts):
        raise FormatError(path, "file size", f"header + {parts} equal fp32 arrays + "
                          f"{nsh + nsa} int32 + {extra_len} extra bytes", f"{size} bytes",
                          REGEN_HINT[STATE_MAGIC])
    n = float_bytes // (4 * parts)
    body = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES, count=parts * n)
    out = {
        "nproc": nproc, "rank": rank, "step": int(h[10]), "rng_state": _get64(h, 20),
        "shard_idx": _get64(h, 30), "sample_idx": _get64(h, 32),
        "m": body[:n].copy(), "v": body[n:2 * n].copy(),
        "master": body[2 * n:3 * n].copy() if has_master else None,
        "shard_perm": None, "sample_perm": None, "extra": None,
    }
    tail_off = HEADER_BYTES + parts * n * 4
    if shuffle and (nsh or nsa):
        perms = np.fromfile(path, dtype="<i4", offset=tail_off, count=nsh + nsa)
        out["shard_perm"], out["sample_perm"] = perms[:nsh], perms[nsh:]
    if extra_len:
        with open(path, "rb") as f:
            f.seek(tail_off + 4 * (nsh + nsa))
            blob = f.read(extra_len)
        try:
            out["extra"] = json.loads(blob)
        except ValueError as e:
            raise FormatError(path, "llmpy extra JSON", "valid JSON", str(e),
                              REGEN_HINT[STATE_MAGIC]) from None
        _check_extra(path, out["extra"])
    return out


def _check_extra(path, extra) -> None:
    if not isinstance(extra, dict):  # llm.py writes an object; anything else is damage
        raise FormatError(path, "llmpy extra JSON", "an object", type(extra).__name__,
                          REGEN_HINT[STATE_MAGIC])

