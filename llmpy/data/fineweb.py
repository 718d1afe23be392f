"""FineWeb and FineWeb-Edu: `llmpy data fineweb|edu_fineweb`.

Mirrors llm.c's dev/data/fineweb.py (-t classic|edu, -v 10B|100B, -s shard size): the
documents of HuggingFaceFW/fineweb or HuggingFaceFW/fineweb-edu (config sample-10BT or
sample-100BT, split train), each EOT + encode_ordinary(doc["text"]), cut into 1e8-token
shards: `fineweb_val_000000.bin`, `fineweb_train_000001.bin`, ... (`edu_fineweb_...` for
FineWeb-Edu) in `fineweb10B/`, `fineweb100B/`, `edu_fineweb10B/`, `edu_fineweb100B/` under
the cache dir, as llm.c names them.

Differences from llm.c, on purpose: the dataset is streamed (llm.c downloads the whole
sample first, 28 GB for 10B), the build is resumable and can be limited, and `--input`
reads local jsonl/parquet files with FineWeb's schema (a `text` field among id, dump, url,
date, file_path, language, language_score, token_count) instead of the hub.
"""

from __future__ import annotations

import argparse
import os

from ..errors import LlmpyError
from . import cache_dir
from .prepare import SHARD_SIZE, build_shards, expand_inputs, iter_texts

# (dataset, version) -> (Hugging Face repo, config, output folder)
SOURCES = {
    ("fineweb", "10B"): ("HuggingFaceFW/fineweb", "sample-10BT", "fineweb10B"),
    ("fineweb", "100B"): ("HuggingFaceFW/fineweb", "sample-100BT", "fineweb100B"),
    ("edu_fineweb", "10B"): ("HuggingFaceFW/fineweb-edu", "sample-10BT", "edu_fineweb10B"),
    ("edu_fineweb", "100B"): ("HuggingFaceFW/fineweb-edu", "sample-100BT", "edu_fineweb100B"),
}
APPROX_TOKENS = {"10B": 10 * 10**9, "100B": 100 * 10**9}  # GPT-2 tokens, for the progress bar


def hub_texts(repo: str, config: str, field: str = "text"):
    """texts_from(skip) over a Hugging Face dataset in streaming mode (nothing downloaded
    up front; skipped documents are streamed past, not tokenized)."""
    def texts_from(skip: int):
        try:
            from datasets import load_dataset
        except ImportError:
            raise LlmpyError("the Hugging Face hub needs the `datasets` package (pip install "
                             "'llmpy[data]'), or build from local files with --input") from None
        ds = load_dataset(repo, name=config, split="train", streaming=True)
        if skip:
            ds = ds.skip(skip)
        for row in ds:
            yield row[field]
    return texts_from


def local_texts(files, field: str = "text"):
    def texts_from(skip: int):
        texts = iter_texts(files, field)
        for _ in range(skip):
            next(texts, None)
        return texts
    return texts_from


def build_fineweb(kind: str = "fineweb", version: str = "10B", out_dir=None, inputs=None, *,
                  field: str = "text", shard_size: int = SHARD_SIZE, limit_docs: int = 0,
                  limit_tokens: int = 0, workers: int | None = None, fresh: bool = False,
                  progress: bool = True) -> dict:
    """Build (or resume) the shards; returns build_shards' summary."""
    if (kind, version) not in SOURCES:
        raise LlmpyError(f"fineweb: unknown dataset {kind!r} version {version!r}; expected "
                         f"fineweb or edu_fineweb, 10B or 100B")
    repo, config, folder = SOURCES[kind, version]
    out_dir = out_dir or cache_dir(folder)
    if inputs:
        files = expand_inputs(inputs)
        texts_from = local_texts(files, field)
        source = {"input": [f"{os.path.abspath(f)} ({f.stat().st_size} bytes)" for f in files]}
        total = None
    else:
        texts_from = hub_texts(repo, config, field)
        source = {"input": f"hf:{repo}/{config}"}
        total = APPROX_TOKENS[version]
    return build_shards(texts_from, out_dir, kind, shard_size=shard_size,
                        limit_docs=limit_docs, limit_tokens=limit_tokens, workers=workers,
                        settings={**source, "field": field}, fresh=fresh, progress=progress,
                        total_tokens=None if (limit_docs or limit_tokens) else total)


# ----------------------------------------------------------------------------------------
# `llmpy data fineweb|edu_fineweb` (see cli.py's DATASETS)

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--version", choices=["10B", "100B"], default="10B",
                   help="sample-10BT or sample-100BT (default 10B)")
    add_build_args(p, default_field="text")


def count(text: str) -> int:
    """A non-negative integer flag that also takes 1e8 or 100_000_000."""
    try:
        value = float(text.replace("_", "")) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer like 1000 or 1e8, got "
                                         f"{text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(value)


def add_build_args(p: argparse.ArgumentParser, default_field: str) -> None:
    """Flags shared by the streaming builders."""
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: under $LLMPY_CACHE or ~/.cache/llmpy)")
    p.add_argument("--input", metavar="FILE_OR_GLOB", nargs="+", default=None,
                   help="local jsonl/json/parquet files in the dataset's schema instead of "
                        "the Hugging Face hub (quote globs)")
    p.add_argument("--field", default=default_field,
                   help=f"the text field of each record (default {default_field!r})")
    p.add_argument("-s", "--shard-size", type=count, default=SHARD_SIZE,
                   help=f"tokens per shard (default {SHARD_SIZE:.0e})")
    p.add_argument("--limit", type=count, default=0, metavar="DOCS",
                   help="stop after this many documents (a partial build; rerun without it "
                        "to continue)")
    p.add_argument("--limit-tokens", type=count, default=0, metavar="TOKENS",
                   help="stop after this many tokens")
    p.add_argument("-w", "--workers", type=int, default=None,
                   help="tokenizer processes (default: one per CPU; 0: in this process)")
    p.add_argument("--fresh", action="store_true",
                   help="ignore a previous build in the output folder and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, kind: str) -> int:
    if args.workers is not None and args.workers < 0:
        raise LlmpyError("--workers must be >= 0")
    res = build_fineweb(kind, args.version, args.out, args.input, field=args.field,
                        shard_size=args.shard_size, limit_docs=args.limit,
                        limit_tokens=args.limit_tokens, workers=args.workers,
                        fresh=args.fresh, progress=not args.no_progress)
    print_summary(kind, res)
    if res["complete"] and len(res["shards"]) < 2:  # shard 0 is val: nothing to train on
        raise LlmpyError(f"{kind}: the input holds {res['tokens']:,} tokens, which fill only "
                         f"the val shard {res['shards'][0][0].name} (shard 0 is val, the rest "
                         f"train; --shard-size {args.shard_size:,}); no train shard was "
                         f"written: give more text or a smaller --shard-size")
    return 0


def print_summary(kind: str, res: dict) -> None:
    for path, ntok in res["shards"]:
        print(f"{kind}: {path} ({ntok:,} tokens)")
    state = "complete" if res["complete"] else "partial (rerun without --limit to continue)"
    print(f"{kind}: {len(res['shards'])} shards, {res['tokens']:,} tokens, {state}")
