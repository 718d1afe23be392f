"""Token shards from local text files (by default this Python's own standard library, .py
files), for loss runs that must not repeat their data: tinyshakespeare's 338K training
tokens repeat every 41 steps at 8192 tokens per step, so a 200-step run is 4.8 passes and
two runs can differ by how soon they memorize. No network needed.

    python bench/code_shards.py OUT_DIR [--root DIR ...] [--max-tokens 20000000]

Writes OUT_DIR/code_val.bin (the first --val-tokens tokens' worth of whole files, after a
seeded shuffle of the file list) and OUT_DIR/code_train.bin (the files after those, up to the
first that would pass --max-tokens), llm.c's shard format, each file whole and followed by
<|endoftext|>. Refuses an OUT_DIR that already has either file (it writes new files only).
"""

from __future__ import annotations

import argparse
import random
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmpy.formats import write_shard  # noqa: E402
from llmpy.tokenizer import get_tokenizer  # noqa: E402


def default_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(roots: list[Path]) -> list[Path]:
    """.py files under roots, site-packages left out (the standard library only)."""
    files = []
    for root in roots:
        files += [p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(set(files))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--root", type=Path, action="append", default=None,
                    help="folders to read .py files from (this Python's stdlib)")
    ap.add_argument("--max-tokens", type=int, default=20_000_000)
    ap.add_argument("--val-tokens", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    for name in ("max_tokens", "val_tokens"):
        if getattr(args, name) < 1:
            print(f"code_shards: --{name.replace('_', '-')} {getattr(args, name)}: expected a "
                  f"positive number of tokens", file=sys.stderr)
            return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"code_shards: OUT_DIR {args.out} is a file; expected a folder (new or "
              f"without code_*.bin)", file=sys.stderr)
        return 2
    roots = args.root or [default_root()]
    for r in roots:
        if not r.is_dir():
            print(f"code_shards: --root {r}: expected a folder, it is not one", file=sys.stderr)
            return 2
    train_path, val_path = args.out / "code_train.bin", args.out / "code_val.bin"
    for p in (train_path, val_path):
        if p.exists():
            print(f"code_shards: {p} exists; expected a folder without code_*.bin (this "
                  f"writes new files only): pick another OUT_DIR", file=sys.stderr)
            return 2
    files = source_files(roots)
    if not files:
        print(f"code_shards: --root {', '.join(map(str, roots))}: expected .py files, found "
              f"none: pass a folder of Python sources", file=sys.stderr)
        return 2
    random.Random(args.seed).shuffle(files)
    tok = get_tokenizer()
    val, train, used = [], [], 0
    for f in files:
        ids = tok.encode(f.read_text(encoding="utf-8", errors="replace")) + [tok.eot]
        if len(val) < args.val_tokens:
            val += ids
        elif len(train) + len(ids) <= args.max_tokens:  # whole files only
            train += ids
        else:
            break
        used += 1
    args.out.mkdir(parents=True, exist_ok=True)
    write_shard(val_path, val)
    write_shard(train_path, train)
    print(f"{used} of {len(files)} files under {', '.join(map(str, roots))}: {val_path} "
          f"{len(val):,} tokens, {train_path} {len(train):,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
