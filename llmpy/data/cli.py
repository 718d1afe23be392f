"""`llmpy data <dataset> ...`: build llm.c token shards (llm.c's dev/data/*.py scripts).

Each dataset is one entry of DATASETS: a help line, a function that adds its arguments to
its own subparser, and a function that runs it from the parsed arguments and returns an
exit code. To add a dataset, write those two functions and add one line to the table.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import OneLineParser


def _tinyshakespeare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: $LLMPY_CACHE/tinyshakespeare or "
                        "~/.cache/llmpy/tinyshakespeare)")


def _tinyshakespeare_run(args: argparse.Namespace) -> int:
    from .tinyshakespeare import NUM_TRAIN, NUM_VAL, ensure_tinyshakespeare
    train, val = ensure_tinyshakespeare(args.out)
    print(f"tinyshakespeare: {val} ({NUM_VAL:,} tokens)")
    print(f"tinyshakespeare: {train} ({NUM_TRAIN:,} tokens)")
    return 0


def _lazy(module: str, fn: str, *bound):
    """module.fn(arg, *bound), imported on use (so `llmpy data -h` imports no builder)."""
    def call(arg):
        import importlib
        return getattr(importlib.import_module(f"llmpy.data.{module}"), fn)(arg, *bound)
    return call


# name -> (help, add_arguments(parser), run(args) -> exit code)
DATASETS = {
    "tinyshakespeare": ("tinyshakespeare (embedded, ~1 MB): val and train shards",
                        _tinyshakespeare_args, _tinyshakespeare_run),
    "tinystories": ("TinyStories: TinyStories_val.bin and TinyStories_train.bin (~944M tokens)",
                    _lazy("tinystories", "add_args"), _lazy("tinystories", "run")),
    "fineweb": ("FineWeb sample-10BT/100BT, streamed: 1e8-token shards, shard 0 is val",
                _lazy("fineweb", "add_args"), _lazy("fineweb", "run", "fineweb")),
    "edu_fineweb": ("FineWeb-Edu sample-10BT/100BT, streamed: 1e8-token shards, shard 0 is val",
                    _lazy("fineweb", "add_args"), _lazy("fineweb", "run", "edu_fineweb")),
    "hellaswag": ("HellaSwag val (10,042 examples): llm.c's eval file hellaswag_val.bin",
                  _lazy("hellaswag", "add_args"), _lazy("hellaswag", "run")),
    "mmlu": ("MMLU test (14,042 questions) as an eval file in the HellaSwag format",
             _lazy("mmlu", "add_args"), _lazy("mmlu", "run")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="llmpy data",
                                     description="Build llm.c token shards for a dataset.")
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name, (help_line, add_args, run) in DATASETS.items():
        p = sub.add_parser(name, help=help_line, description=help_line)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
