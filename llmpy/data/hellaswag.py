"""HellaSwag: `llmpy data hellaswag` writes llm.c's eval file hellaswag_val.bin.

Mirrors llm.c's dev/data/hellaswag.py (render_example) and data_common.write_evalfile: for
each example of rowanz/hellaswag's jsonl (ind, activity_label, ctx_a, ctx_b, ctx, endings,
label, split, split_type, source_id), the context tokens are encode(ctx) and ending i's
tokens are encode(" " + endings[i]) (GPT-2 BPE glues the space to the next word); the file
(magic 20240522) holds label, context and the 4 endings per example, in file order. The
val split has 10,042 examples. Scoring lives in llmpy/evals.py (`llmpy eval hellaswag`).

`--input` takes the jsonl (or a parquet copy, e.g. the Hugging Face Rowan/hellaswag one,
whose labels are strings) instead of downloading it from GitHub.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LlmpyError
from ..formats import write_eval
from ..tokenizer import get_tokenizer
from . import cache_dir
from .prepare import download_url, expand_inputs, iter_records

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
NUM_VAL = 10_042


def parse_label(value, num_endings: int, where: str) -> int:
    """An int label, or its string form (Hugging Face's copies); the test split has none."""
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise LlmpyError(f"{where}: label should be an integer 0..{num_endings - 1}, got "
                         f"{value!r} (the test split is unlabeled: use val)") from None
    if not 0 <= label < num_endings:
        raise LlmpyError(f"{where}: label {label} out of range 0..{num_endings - 1}")
    return label


def render_example(ex: dict, where: str = "example") -> dict:
    """{label, ctx tokens, 4 lists of ending tokens}: what llm.c's eval file stores."""
    ctx, endings = ex.get("ctx"), ex.get("endings")
    if not isinstance(ctx, str) or not isinstance(endings, list) or len(endings) != 4 or \
            not all(isinstance(e, str) for e in endings):
        raise LlmpyError(f"{where}: expected a text `ctx` and a list of 4 text `endings`, "
                         f"got ctx={type(ctx).__name__}, endings={endings!r:.80}")
    tok = get_tokenizer()
    return {"label": parse_label(ex.get("label"), 4, where), "ctx": tok.encode(ctx),
            "endings": [tok.encode(" " + e) for e in endings]}


def write_examples(path: Path, examples: list[dict], what: str) -> Path:
    if not examples:
        raise LlmpyError(f"{what}: the input holds no examples")
    if len(examples) >= 2**16:
        raise LlmpyError(f"{what}: {len(examples)} examples; llm.c's eval file holds fewer "
                         f"than 65,536 (use --limit)")
    try:
        write_eval(path, examples)
    except ValueError as e:  # an example longer than 65,535 bytes
        raise LlmpyError(f"{what}: {e}") from None
    except OSError as e:
        raise LlmpyError(f"{what}: cannot write {path}: {e.strerror or e} (pick another "
                         f"--out)") from None
    return path


def build_hellaswag(out_dir=None, inputs=None, *, split: str = "val",
                    limit: int = 0) -> tuple[Path, int]:
    """Write hellaswag_{split}.bin; returns (path, number of examples)."""
    out_dir = Path(out_dir) if out_dir else cache_dir("hellaswag")
    if inputs:
        files = expand_inputs(inputs)
    else:
        files = [download_url(URL.format(split=split), out_dir / f"hellaswag_{split}.jsonl",
                              "hellaswag")]
    examples = []
    for f in files:
        for i, ex in enumerate(iter_records(f)):
            if limit and len(examples) >= limit:
                break
            examples.append(render_example(ex, f"{f}: example {i}"))
    path = write_examples(out_dir / f"hellaswag_{split}.bin", examples, "hellaswag")
    return path, len(examples)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: $LLMPY_CACHE/hellaswag or "
                        "~/.cache/llmpy/hellaswag, where training and `llmpy eval` look)")
    p.add_argument("--input", metavar="FILE_OR_GLOB", nargs="+", default=None,
                   help="local hellaswag jsonl/parquet instead of downloading it")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="first N examples only")


def run(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise LlmpyError("--limit must be >= 0")
    path, n = build_hellaswag(args.out, args.input, split=args.split, limit=args.limit)
    print(f"hellaswag: {path} ({n:,} examples)")
    return 0
