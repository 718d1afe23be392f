"""The one error type for bad input: files, flags, descriptors.

The CLI turns an LlmpyError into one line on stderr and exit code 2 (llm.c prints the file,
the field and a hint, then exits; so do we, without a traceback).
"""

import argparse


class LlmpyError(Exception):
    """Bad input from the user: a file, a flag or a descriptor. The message says what, where,
    expected, actual and (when there is one) what to do."""


class FormatError(LlmpyError):
    """A file that is not what llm.c's format says it should be."""

    def __init__(self, path, field, expected, actual, hint=""):
        self.path, self.field, self.expected, self.actual = str(path), field, expected, actual
        msg = f"{path}: {field}: expected {expected}, got {actual}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class BadToken(FormatError):
    """A token id >= V in a shard, found by the loader when it reads the batch (so possibly
    mid-run: the loop saves the last completed step before it stops)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are an LlmpyError (one line and exit 2 through the CLI), not
    the usage block; subparsers inherit it."""

    def error(self, message):
        raise LlmpyError(message)


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss with --nan-policy stop): exit code 1."""


class Preempted(Exception):
    """Training stopped by SIGTERM or SIGINT after writing a checkpoint; `code` is the exit
    code (143 or 130) and the message says how to resume."""

    def __init__(self, msg: str, code: int):
        self.code = code
        super().__init__(msg)
