"""MMLU: `llmpy data mmlu` writes mmlu_test.bin, a multiple-choice eval file in llm.c's
HellaSwag format (magic 20240522: 4 completions per example fits MMLU's 4 choices).

Mirrors llm.c's dev/data/mmlu.py (render_example): the context is
"Question: {question}\\n\\nAnswer:", choice i's tokens are encode(" " + choice), the label is
the right choice's index; scored like HellaSwag (`llmpy eval mmlu MODEL`: the ending with
the lowest mean loss wins; llm.c's numbers for that, "acc_norm": gpt2 0.2721, gpt2-xl
0.3035 over 14,042 test questions).

Inputs: the cais/mmlu schema (question, subject, choices [4 texts], answer 0..3 or a letter)
as jsonl or parquet, or hendrycks' original csv files (no header: question, A, B, C, D,
answer letter), which llm.c reads. Without --input the hub's cais/mmlu "all" config is used.
llm.c reads the csv files with pandas, which turns numeric-looking choices into numbers
("1.50" -> "1.5") and empty ones into "nan"; here choices stay the exact text.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ..errors import LlmpyError
from ..tokenizer import get_tokenizer
from . import cache_dir
from .hellaswag import parse_label, write_examples
from .prepare import INPUT_SUFFIXES, expand_inputs, iter_records

NUM_TEST = 14_042


def render_example(question: str, choices: list, label: int) -> dict:
    tok = get_tokenizer()
    return {"label": label, "ctx": tok.encode(f"Question: {question}\n\nAnswer:"),
            "endings": [tok.encode(" " + str(c)) for c in choices]}


def _from_record(rec: dict, where: str) -> dict:
    q, choices, answer = rec.get("question"), rec.get("choices"), rec.get("answer")
    if not isinstance(q, str) or not isinstance(choices, list) or len(choices) != 4:
        raise LlmpyError(f"{where}: expected cais/mmlu's question (text), choices (4 texts) "
                         f"and answer, got fields {', '.join(map(str, rec))}")
    if isinstance(answer, str) and answer.strip() in ("A", "B", "C", "D"):
        answer = "ABCD".index(answer.strip())
    return render_example(q, choices, parse_label(answer, 4, where))


def iter_csv(path: Path):
    """hendrycks' test/*.csv: question, A, B, C, D, answer letter; no header."""
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            where = f"{path}:{lineno}"
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise LlmpyError(f"{where}: expected 6 columns (question, A, B, C, D, answer "
                                 f"letter), got {len(row)}")
            yield render_example(row[0], row[1:5], "ABCD".index(row[5].strip()))


def iter_examples(files):
    for f in files:
        if f.name.endswith(".csv"):
            yield from iter_csv(f)
        else:
            for i, rec in enumerate(iter_records(f)):
                yield _from_record(rec, f"{f}: example {i}")


def iter_hub(split: str):
    try:
        from datasets import load_dataset
    except ImportError:
        raise LlmpyError("MMLU from the hub needs the `datasets` package (pip install "
                         "'llmpy[data]'), or pass --input with local files") from None
    try:
        ds = load_dataset("cais/mmlu", "all", split=split)
    except Exception as e:  # network errors come in many types
        raise LlmpyError(f"MMLU: cannot load cais/mmlu ({e}); without a network pass --input "
                         f"with local files") from None
    for i, rec in enumerate(ds):
        yield _from_record(rec, f"cais/mmlu {split} example {i}")


def build_mmlu(out_dir=None, inputs=None, *, split: str = "test",
               limit: int = 0) -> tuple[Path, int]:
    """Write mmlu_{split}.bin; returns (path, number of examples)."""
    out_dir = Path(out_dir) if out_dir else cache_dir("mmlu")
    source = iter_examples(expand_inputs(inputs, INPUT_SUFFIXES + (".csv",))) if inputs \
        else iter_hub(split)
    examples = []
    for ex in source:
        if limit and len(examples) >= limit:
            break
        examples.append(ex)
    path = write_examples(out_dir / f"mmlu_{split}.bin", examples, "mmlu")
    return path, len(examples)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: $LLMPY_CACHE/mmlu or ~/.cache/llmpy/mmlu, "
                        "where `llmpy eval mmlu` looks)")
    p.add_argument("--input", metavar="FILE_OR_GLOB", nargs="+", default=None,
                   help="local cais/mmlu jsonl/parquet or hendrycks csv files")
    p.add_argument("--split", choices=["test", "validation", "dev"], default="test")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="first N examples only")


def run(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise LlmpyError("--limit must be >= 0")
    path, n = build_mmlu(args.out, args.input, split=args.split, limit=args.limit)
    print(f"mmlu: {path} ({n:,} examples)")
    return 0
