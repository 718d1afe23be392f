"""TinyStories: `llmpy data tinystories` writes TinyStories_val.bin and TinyStories_train.bin.

Mirrors llm.c's dev/data/tinystories.py: the 50 json files of TinyStories_all_data.tar.gz
(roneneldan/TinyStories on the Hugging Face hub), sorted by name; the first file is the val
split, the other 49 the train split. Each file is a json array of records with a `story`
field (also instruction, summary, source); its records are shuffled with
random.Random(1337 + i), i = the file's index inside its split; each story, stripped of
leading and trailing whitespace, becomes EOT + encode_ordinary(story). llm.c prints
19,043,638 val and 925,653,391 train tokens for the full data.

Differences from llm.c, on purpose: llm.c appends the train files' tokens in the order its
process pool finishes them (not reproducible); here they follow the sorted file order. The
tokens are streamed to disk file by file instead of held in one Python list. `--input`
reads local json/jsonl/parquet files instead of the hub; `--limit N` keeps the first N
stories of each split. A rerun skips a split whose file is already complete.

Whose files: the progress file lists every split file this builder wrote there ("written",
recorded before the file is first written). A split file it does not list (llm.c's, copied
in, another tool's) is never replaced, `--fresh` or not: the build stops in one line.
"""

from __future__ import annotations

import argparse
import os
import random
import tarfile
from pathlib import Path

from tqdm import tqdm

from ..errors import LlmpyError
from . import cache_dir
from .prepare import (PROGRESS_VERSION, ShardWriter, WorkerPool, _keep_valid_shards,
                      check_settings, default_workers, expand_inputs, get_field,
                      iter_records, read_progress, tokenize_docs, write_progress)

REPO, ARCHIVE = "roneneldan/TinyStories", "TinyStories_all_data.tar.gz"
FIELD = "story"
SHUFFLE_SEED = 1337


def output_name(split: str) -> str:
    return f"TinyStories_{split}.bin"


def tokenize_file(task: tuple) -> tuple:
    """One input file -> (tokens, per-story lengths), in llm.c's shuffled order."""
    path, index, field = task
    texts = [get_field(rec, field, path, f"record {i}").strip()
             for i, rec in enumerate(iter_records(path, [field]))]
    random.Random(SHUFFLE_SEED + index).shuffle(texts)
    return tokenize_docs(texts)


def download(dest: Path) -> list[Path]:
    """TinyStories_all_data.tar.gz from the hub, unpacked into dest/TinyStories_all_data."""
    data_dir = dest / "TinyStories_all_data"
    files = sorted(data_dir.glob("*.json")) if data_dir.is_dir() else []
    if files:
        return files
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise LlmpyError("TinyStories: downloading needs huggingface_hub (pip install "
                         "'llmpy[data]'), or pass --input with the json files") from None
    try:
        archive = hf_hub_download(REPO, ARCHIVE, repo_type="dataset", local_dir=dest)
    except Exception as e:  # network errors come in many types
        raise LlmpyError(f"TinyStories: cannot download {ARCHIVE} from {REPO} ({e}); without "
                         f"a network pass --input with the json files") from None
    tmp = dest / "TinyStories_all_data.partial"
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # pragma: no cover (Python < 3.11.4)
            tar.extractall(tmp)
    os.replace(tmp, data_dir)
    return sorted(data_dir.glob("*.json"))


def build_tinystories(out_dir=None, inputs=None, *, field: str = FIELD, limit_docs: int = 0,
                      workers: int | None = None, fresh: bool = False,
                      progress: bool = True) -> dict:
    """Write (or keep, when complete) TinyStories_val.bin and TinyStories_train.bin.
    Returns {"shards": [(path, ntok)], "tokens", "docs", "complete"}."""
    out_dir = Path(out_dir) if out_dir else cache_dir("tinystories")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmpyError(f"cannot create {out_dir}: {e.strerror or e} (pick another --out)")
    files = expand_inputs(inputs) if inputs else download(out_dir)
    if len(files) < 2:
        raise LlmpyError(f"TinyStories: need at least 2 input files (the first is the val "
                         f"split, the rest train), got {len(files)}")
    settings = {"name": "TinyStories", "field": field,
                "input": [f"{os.path.abspath(f)} ({f.stat().st_size} bytes)" for f in files]}
    prog_path = out_dir / "TinyStories_progress.json"
    previous = read_progress(prog_path)
    written = _written(previous)
    state = None if fresh else previous
    if state is not None:
        check_settings(prog_path, state["settings"], settings)
        state = _keep_valid_shards(out_dir, state)
    else:
        state = {"version": PROGRESS_VERSION, "settings": settings, "shards": [],
                 "complete": False}
    done = {s["split"]: s for s in state["shards"]}
    results, complete, ndocs = [], True, 0
    with WorkerPool(default_workers() if workers is None else workers) as pool:
        for split, split_files in (("val", files[:1]), ("train", files[1:])):
            if split in done:
                results.append((out_dir / done[split]["file"], done[split]["tokens"]))
                ndocs += done[split]["docs"]
                continue
            target = out_dir / output_name(split)
            if target.exists() and target.name not in written:
                raise LlmpyError(f"{target}: exists, but no progress file here records "
                                 f"writing it (llm.c's or copied in?); expected a dir without "
                                 f"it or one this builder wrote; the build would replace it: "
                                 f"move it away or pick another --out")
            if target.name not in written:  # recorded before it exists: ours from now on
                written.add(target.name)
                state["written"] = sorted(written)
                write_progress(prog_path, state)
            path, n, docs, limited = _build_split(pool, target,
                                                  split_files, field, limit_docs, progress)
            results.append((path, n))
            ndocs += docs
            if limited:
                complete = False
            else:
                state["shards"] = [s for s in state["shards"] if s["split"] != split]
                state["shards"].append({"split": split, "file": path.name, "tokens": n,
                                        "docs": docs})
                write_progress(prog_path, state)
    state["complete"] = complete
    state["written"] = sorted(written)
    write_progress(prog_path, state)
    return {"shards": results, "tokens": sum(n for _, n in results), "docs": ndocs,
            "complete": complete}


def _written(state: dict | None) -> set[str]:
    """The split files a previous build here wrote: those its progress file records (older
    progress files list only the finished splits)."""
    if not state:
        return set()
    return {s["file"] for s in state["shards"]} | set(state.get("written", []))


def _build_split(pool: WorkerPool, path: Path, files: list[Path], field: str,
                 limit_docs: int, progress: bool) -> tuple[Path, int, int, bool]:
    tasks = [(f, i, field) for i, f in enumerate(files)]
    docs, limited = 0, False
    bar = tqdm(unit="tok", unit_scale=True, desc=path.name, disable=not progress,
               dynamic_ncols=True)
    # a file's tokens are about 4 bytes per story character in flight: keep few in flight
    with ShardWriter(path) as writer:
        for tokens, lens in pool.map(tokenize_file, tasks, max_pending=pool.workers + 1):
            if limit_docs and docs + len(lens) >= limit_docs:
                keep = limit_docs - docs
                tokens, docs, limited = tokens[:int(lens[:keep].sum())], limit_docs, True
                writer.write(tokens)
                break
            writer.write(tokens)
            docs += len(lens)
            bar.update(len(tokens))
        writer.commit()
    bar.close()
    return path, writer.ntok, docs, limited


# ----------------------------------------------------------------------------------------
# `llmpy data tinystories`

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: $LLMPY_CACHE/tinystories or "
                        "~/.cache/llmpy/tinystories)")
    p.add_argument("--input", metavar="FILE_OR_GLOB", nargs="+", default=None,
                   help="local TinyStories files (json arrays like data00.json, or "
                        "jsonl/parquet); the first is the val split. Default: download "
                        f"{ARCHIVE} from the hub")
    p.add_argument("--field", default=FIELD, help=f"the story field (default {FIELD!r})")
    p.add_argument("--limit", type=int, default=0, metavar="STORIES",
                   help="keep the first N stories of each split (a partial build)")
    p.add_argument("-w", "--workers", type=int, default=None,
                   help="tokenizer processes (default: one per CPU; 0: in this process)")
    p.add_argument("--fresh", action="store_true", help="rebuild both splits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.limit < 0 or (args.workers is not None and args.workers < 0):
        raise LlmpyError("--limit and --workers must be >= 0")
    res = build_tinystories(args.out, args.input, field=args.field, limit_docs=args.limit,
                            workers=args.workers, fresh=args.fresh,
                            progress=not args.no_progress)
    for path, n in res["shards"]:
        print(f"tinystories: {path} ({n:,} tokens)")
    if not res["complete"]:
        print("tinystories: partial (--limit): rerun without it for the full splits")
    return 0
