"""Streaming dataset preparation shared by the builders: read documents, tokenize them in a
process pool, write llm.c token shards, resume an interrupted build.

Mirrors the main loop of llm.c's dev/data/fineweb.py and data_common.write_datafile: every
document becomes EOT 50256 followed by its `encode_ordinary` tokens; the token stream is cut
into shards of `shard_size` tokens (a document that crosses a boundary is split, its tail
starts the next shard); shard 0 is `{name}_val_000000.bin`, the others
`{name}_train_{index:06d}.bin`; the last shard holds the remainder.

Memory stays bounded whatever the dataset's size:
- documents are streamed (jsonl line by line, parquet batch by batch, Hugging Face
  `datasets` in streaming mode) and cut into chunks of at most CHUNK_DOCS documents or
  CHUNK_CHARS characters;
- at most `2 * workers` chunks are in flight in the pool (Pool.imap would read the whole
  input ahead of the workers), and results come back in input order;
- tokens go straight into the shard's temporary file (`ShardWriter`), never into a list:
  the resident set does not grow with the shard size either (llm.c holds a shard in RAM).

Resume: after each finished shard, `{name}_progress.json` (written atomically) records the
shard's file and token count and where the input stands: `docs` documents fully written and
`offset` tokens of the next one (the part of a split document already in the shard). A rerun
checks the finished shards, skips `docs` documents, drops `offset` tokens and goes on, so an
interrupted build (or a `--limit` build continued without the limit) ends up identical to an
uninterrupted one.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import multiprocessing as mp
import os
import re
import signal
import tempfile
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ..errors import FormatError, LlmpyError
from ..formats import (HEADER_BYTES, SHARD_MAGIC, SHARD_VERSION, atomic_write, make_header,
                       shard_num_tokens)
from ..tokenizer import get_tokenizer

SHARD_SIZE = 10**8          # llm.c's fineweb.py default (-s)
CHUNK_DOCS = 256            # documents per pool task ...
CHUNK_CHARS = 1 << 20       # ... or characters, whichever is reached first
PROGRESS_VERSION = 1


# ----------------------------------------------------------------------------------------
# reading documents: jsonl (optionally .gz), json arrays, parquet

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def expand_inputs(patterns, suffixes=INPUT_SUFFIXES) -> list[Path]:
    """Files matching the glob(s) in `patterns` (a string or a list), sorted per pattern."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[Path] = []
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise LlmpyError(f"--input: no files match {pat!r}")
        for m in matches:
            if not m.endswith(tuple(suffixes)):
                raise LlmpyError(f"--input: {m}: expected a file ending in "
                                 f"{', '.join(suffixes)}")
            files.append(Path(m))
    return files


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_records(path, columns: list[str] | None = None) -> Iterator[dict]:
    """The records of one input file, streamed: jsonl (one object a line), a json array
    (TinyStories' data*.json; read whole), or parquet (batch by batch, `columns` only)."""
    path = Path(path)
    if path.name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LlmpyError(f"--input {path}: reading parquet needs pyarrow "
                             f"(pip install pyarrow)") from None
        try:
            # pre_buffer (pyarrow's default) keeps the file's column chunks as it reads on
            # (RSS grew ~25 MB per 50M characters here); a 1 MB read buffer stays flat
            pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
            if missing:
                raise LlmpyError(f"{path}: no column {missing[0]!r} (columns: "
                                 f"{', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                yield from batch.to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's errors derive from these
            raise LlmpyError(f"{path}: not a readable parquet file: {e}") from None
        return
    with _open_text(path) as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        if first == "[":  # a json array
            f.seek(0)
            try:
                records = json.load(f)
            except ValueError as e:
                raise LlmpyError(f"{path}: not valid JSON: {e}") from None
            for i, rec in enumerate(records):
                yield _check_record(path, f"record {i}", rec)
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise LlmpyError(f"{path}:{lineno}: not valid JSON: {e}") from None
            yield _check_record(path, f"line {lineno}", rec)


def _check_record(path, where, rec) -> dict:
    if not isinstance(rec, dict):
        raise LlmpyError(f"{path}: {where}: expected a JSON object, got "
                         f"{type(rec).__name__}")
    return rec


def get_field(rec: dict, field: str, path, where) -> str:
    try:
        value = rec[field]
    except KeyError:
        raise LlmpyError(f"{path}: {where}: no field {field!r} (fields: "
                         f"{', '.join(map(str, rec))}); pick one with --field") from None
    if not isinstance(value, str):
        raise LlmpyError(f"{path}: {where}: field {field!r} should be text, got "
                         f"{type(value).__name__}")
    return value


def iter_texts(paths, field: str) -> Iterator[str]:
    """The `field` of every record of every file, in order."""
    for path in paths:
        for i, rec in enumerate(iter_records(path, [field])):
            yield get_field(rec, field, path, f"record {i}")


def chunked(texts: Iterable[str], max_docs: int = CHUNK_DOCS,
            max_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for t in texts:
        chunk.append(t)
        chars += len(t)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------
# tokenization, in a process pool

def tokenize_docs(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """EOT + encode_ordinary(text) for each text -> (tokens uint16, per-document lengths)."""
    tok = get_tokenizer()
    flat: list[int] = []
    lens = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        flat.append(tok.eot)
        flat.extend(ids)
        lens[i] = 1 + len(ids)
    return np.array(flat, dtype=np.uint16), lens


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group: the main process stops the pool, the
    # workers need not each print a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    get_tokenizer()


class WorkerPool:
    """`map` in input order over a process pool with a bounded number of tasks in flight.

    workers=0 runs everything in this process (tests, tiny inputs). The pool forks where
    the platform can (the tokenizer, built here first, is then shared with the workers).
    """

    def __init__(self, workers: int):
        self.workers = int(workers)
        self.pool = None
        if self.workers > 0:
            get_tokenizer()
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init_worker)

    def map(self, fn: Callable, items: Iterable, max_pending: int | None = None) -> Iterator:
        if self.pool is None:
            for item in items:
                yield fn(item)
            return
        max_pending = max_pending or 2 * self.workers
        pending: deque = deque()
        for item in items:
            pending.append(self.pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------
# writing a shard of unknown length: temp file, header patched at the end, rename

class ShardWriter:
    """Streams uint16 tokens into an llm.c token shard (magic 20240520) whose length is
    known only at the end: a temporary file next to `path`, the header written last, fsync,
    then an atomic rename. `abort()` (or an exception in a `with` block) leaves nothing."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                        dir=self.path.parent)
        self.f = os.fdopen(fd, "wb")
        self.f.write(bytes(HEADER_BYTES))
        self.ntok = 0

    def write(self, tokens) -> None:
        body = np.ascontiguousarray(tokens, dtype="<u2")
        self.f.write(memoryview(body).cast("B"))
        self.ntok += body.size

    def commit(self) -> Path:
        if self.ntok >= 2**31:
            self.abort()
            raise LlmpyError(f"{self.path}: {self.ntok} tokens do not fit llm.c's int32 "
                             f"header field; use a smaller shard size")
        self.f.seek(0)
        self.f.write(make_header(SHARD_MAGIC, SHARD_VERSION, {2: self.ntok}).tobytes())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


# ----------------------------------------------------------------------------------------
# progress file

def read_progress(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("version") != PROGRESS_VERSION or not isinstance(state.get("shards"), list):
            raise ValueError("unknown layout")
        return state
    except (OSError, ValueError, AttributeError) as e:
        raise LlmpyError(f"{path}: unreadable progress file ({e}); delete it or rerun with "
                         f"--fresh to build from scratch") from None


def write_progress(path: Path, state: dict) -> None:
    atomic_write(path, [json.dumps(state, indent=1).encode()])


def check_settings(path: Path, saved: dict, wanted: dict) -> None:
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            raise LlmpyError(f"{path}: the build there used {key}={saved.get(key)!r}, this "
                             f"run has {wanted.get(key)!r}; rerun with the same settings to "
                             f"resume, or add --fresh to start over")


# ----------------------------------------------------------------------------------------
# the sharded build (fineweb, edu_fineweb)

def shard_name(name: str, index: int) -> str:
    return f"{name}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def _owned(state: dict | None) -> set[str]:
    """The shard files a previous build here recorded writing (its progress file)."""
    if not state:
        return set()
    return {s["file"] for s in state["shards"]} | ({state["partial"]} if state.get("partial")
                                                    else set())


def _remove_shards_from(out_dir: Path, name: str, first: int, owned: set[str]) -> None:
    """Delete this dataset's shards with index >= first, which a previous build here wrote
    (`owned`), and the temp files of killed builds. Shards that no progress file records
    (copied in, or llm.c's) are never deleted: the build stops and says so."""
    pat = re.compile(rf"^\.?{re.escape(name)}_(?:(val|train)_(\d{{6}})\.bin|progress\.json)"
                     rf"(\..*\.tmp)?$")
    doomed = [p for p in out_dir.iterdir() if (m := pat.match(p.name)) and (
        p.name.endswith(".tmp") or (m.group(2) and int(m.group(2)) >= first))]
    foreign = [p.name for p in doomed if not p.name.endswith(".tmp") and p.name not in owned]
    if foreign:
        raise LlmpyError(f"{out_dir}: holds {len(foreign)} {name} shards that no progress "
                         f"file there records ({', '.join(sorted(foreign)[:3])}"
                         f"{' ...' if len(foreign) > 3 else ''}); expected an empty dir or "
                         f"one this builder wrote; the build would replace them: move them "
                         f"away or pick another --out")
    for p in doomed:
        p.unlink()


def build_shards(texts_from: Callable[[int], Iterable[str]], out_dir, name: str, *,
                 shard_size: int = SHARD_SIZE, limit_docs: int = 0, limit_tokens: int = 0,
                 workers: int | None = None, settings: dict | None = None,
                 fresh: bool = False, progress: bool = True,
                 total_tokens: int | None = None) -> dict:
    """Tokenize the documents of `texts_from(skip)` (an iterable of texts, the first `skip`
    left out) into `{name}_{val|train}_{index:06d}.bin` shards of `shard_size` tokens in
    `out_dir`, resuming a previous build recorded in `{name}_progress.json`.

    limit_docs / limit_tokens (0 = none) stop the build early, counted from the start of
    the dataset; the last shard is then partial and is rebuilt by the next run.
    Returns {"shards": [(path, ntok)], "tokens", "docs", "complete"}.
    """
    if shard_size < 1:
        raise LlmpyError(f"--shard-size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmpyError(f"cannot create {out_dir}: {e.strerror or e} (pick another --out)")
    settings = {"name": name, "shard_size": shard_size, **(settings or {})}
    prog_path = out_dir / f"{name}_progress.json"
    previous = read_progress(prog_path) if prog_path.exists() else None
    state = None if fresh else previous
    if state is not None:
        check_settings(prog_path, state["settings"], settings)
        state = _keep_valid_shards(out_dir, state)
    else:
        state = {"version": PROGRESS_VERSION, "settings": settings, "shards": [],
                 "complete": False}
    done = state["shards"]
    docs = done[-1]["docs"] if done else 0      # documents fully written so far
    skip = done[-1]["offset"] if done else 0    # tokens of document `docs` already written
    written = sum(s["tokens"] for s in done)
    if state["complete"] or (limit_docs and docs >= limit_docs) or \
            (limit_tokens and written >= limit_tokens):
        # nothing to do (an earlier, larger build may already cover the limit)
        return _summary(out_dir, state["shards"], state["complete"])
    _remove_shards_from(out_dir, name, len(done), _owned(previous))

    index, limited = len(done), False
    bar = tqdm(total=total_tokens or limit_tokens or None, initial=written, unit="tok",
               unit_scale=True, desc=name, disable=not progress, dynamic_ncols=True)
    writer = ShardWriter(out_dir / shard_name(name, index))
    try:
        with WorkerPool(default_workers() if workers is None else workers) as pool:
            texts = iter(texts_from(docs))
            if limit_docs:
                texts = islice(texts, limit_docs - docs)
            first = docs  # index of the first document of the current chunk
            for tokens, lens in pool.map(tokenize_docs, chunked(texts)):
                ends = np.cumsum(lens)  # where each document of the chunk ends
                pos, skip = skip, 0
                if pos and pos >= ends[0]:
                    raise LlmpyError(f"{prog_path}: the input changed since the last run "
                                     f"(document {docs} is shorter than recorded); rerun "
                                     f"with --fresh")
                stop = len(tokens)
                if limit_tokens and written + writer.ntok + stop - pos >= limit_tokens:
                    stop, limited = pos + limit_tokens - written - writer.ntok, True
                while pos < stop:
                    take = min(shard_size - writer.ntok, stop - pos)
                    writer.write(tokens[pos:pos + take])
                    pos += take
                    bar.update(take)
                    if writer.ntok == shard_size:  # full: record where the input stands
                        k = int(np.searchsorted(ends, pos, side="right"))
                        offset = pos - (int(ends[k - 1]) if k else 0)
                        written += writer.ntok
                        _finish_shard(writer, state, first + k, offset, prog_path)
                        index += 1
                        bar.set_postfix(shard=index)
                        writer = ShardWriter(out_dir / shard_name(name, index))
                first += len(lens)
                if limited:
                    break
            else:
                limited = bool(limit_docs) and first >= limit_docs
    except BaseException:
        writer.abort()
        bar.close()
        raise
    bar.close()
    if writer.ntok == 0:
        writer.abort()
    elif limited:
        writer.commit()  # the partial last shard: usable now, redone by the next run
        partial = {"file": writer.path.name, "tokens": writer.ntok}
        write_progress(prog_path, {**state, "partial": writer.path.name})
        return _summary(out_dir, state["shards"] + [partial], False)
    else:
        _finish_shard(writer, state, first, 0, prog_path)
    if not limited:
        if not state["shards"]:
            raise LlmpyError(f"{name}: the input holds no documents")
        state["complete"] = True
        write_progress(prog_path, state)
    return _summary(out_dir, state["shards"], not limited)


def _summary(out_dir: Path, shards: list[dict], complete: bool) -> dict:
    return {"shards": [(out_dir / s["file"], s["tokens"]) for s in shards],
            "tokens": sum(s["tokens"] for s in shards),
            "docs": shards[-1].get("docs") if shards else 0, "complete": complete}


def _finish_shard(writer: ShardWriter, state: dict, docs: int, offset: int, prog_path: Path):
    writer.commit()
    state["shards"].append({"file": writer.path.name, "tokens": writer.ntok, "docs": docs,
                            "offset": offset})
    write_progress(prog_path, state)


def _keep_valid_shards(out_dir: Path, state: dict) -> dict:
    """Keep the recorded shards up to the first one that is missing or damaged."""
    good = []
    for s in state["shards"]:
        try:
            if shard_num_tokens(out_dir / s["file"]) != s["tokens"]:
                break
        except FormatError:
            break
        good.append(s)
    if len(good) < len(state["shards"]):
        state = {**state, "shards": good, "complete": False}
    return state


# ----------------------------------------------------------------------------------------
# small downloads (HellaSwag's jsonl), atomically

def download_url(url: str, path, what: str) -> Path:
    """Fetch `url` to `path` unless it is there already (temp file + rename)."""
    path = Path(path)
    if path.exists():
        return path
    import urllib.error
    import urllib.request
    print(f"{what}: downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            atomic_write(path, iter(lambda: resp.read(1 << 20), b""))
    except (urllib.error.URLError, OSError) as e:
        raise LlmpyError(f"{what}: cannot download {url} ({e}); without a network pass "
                         f"--input with a local copy") from None
    return path
