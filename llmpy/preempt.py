"""Preemption: SIGTERM (slurm's scancel, a job's time limit, a preempting scheduler) and SIGINT
(Ctrl-C) stop training at the end of the current step, after a checkpoint, so that `-y 1`
loses nothing. llm.c has no handler (a signal kills it, losing the steps since its last
checkpoint); torchtitan and slurm-aware trainers do this.

The handler only records the signal; the loop asks `requested()` after each step (agreed
across ranks) and the exit code is the shell's for that signal: 143 (TERM) or 130 (INT).
A second Ctrl-C stops at once (KeyboardInterrupt; files are written atomically).
"""

from __future__ import annotations

import signal
import threading

from .errors import Preempted

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopOnSignal:
    """Context manager: while active, SIGTERM/SIGINT set `signum` instead of killing."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this step "
              f"(with a checkpoint if -o is set)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in EXIT_CODES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def stopped(self, step: int, checkpoint) -> Preempted:
        """The exception that ends the run, saying how to continue it."""
        how = (f"; checkpoint {checkpoint} written: resume with the same command and -y 1"
               if checkpoint else "; nothing saved (no -o)")
        return Preempted(f"{self.name or 'a signal on another rank'}: stopped after step "
                         f"{step}{how}", self.exit_code)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)
