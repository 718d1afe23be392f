"""The `llmpy` command: one entry point, a subcommand per job.

`llmpy <command> [args]` hands the rest of the line to `main(argv) -> int` of the command's
module. Bad input raises LlmpyError anywhere below; it is printed here as one line on
stderr with exit code 2 (no traceback), like llm.c's checked readers.
"""

from __future__ import annotations

import importlib
import sys

from .errors import LlmpyError, Preempted, TrainingStopped

COMMANDS = {
    "train": ("llmpy.train", "train a GPT (default: a small GPT on embedded tinyshakespeare)"),
    "sample": ("llmpy.sample", "generate text from a checkpoint (KV cache, prompt, top-k)"),
    "data": ("llmpy.data.cli", "build token shards and eval files (tinyshakespeare, ...)"),
    "eval": ("llmpy.evals", "evaluate a checkpoint (HellaSwag, val loss)"),
    "export": ("llmpy.export", "write debug states (golden fixtures) and Hugging Face dirs"),
    "plot": ("llmpy.plot", "plot train/val loss and HellaSwag from main.log files"),
}


def usage() -> str:
    lines = ["usage: llmpy <command> [args]   (llmpy <command> --help for its flags)", "",
             "commands:"]
    lines += [f"  {name:8s} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"llmpy: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[cmd][0])
        return int(module.main(rest) or 0)
    except LlmpyError as e:
        print(f"llmpy {cmd}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"llmpy {cmd}: {e}", file=sys.stderr)
        return e.code
    except OSError as e:  # a full disk, a file where a dir should be, no permission, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"llmpy {cmd}: error: {where}{e.strerror or e} (files are written atomically: "
              f"what was there before is intact; fix this and run again, -y 1 to resume)",
              file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"llmpy {cmd}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llmpy {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
