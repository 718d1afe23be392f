"""Run logs (llm.c's llmc/logger.h): main.log in llm.c's line format, metrics.jsonl beside it
with full-precision values, and the start-up table of settings.

    s:%d trl:%.4f lr:%.6f norm:%.2f     train loss (and the lr and grad norm of that step;
                                        with several processes ` comm:%.1f`, ms in collectives)
    s:%d tel:%.4f                       val loss
    s:%d eval:%.4f                      HellaSwag accuracy
"""

from __future__ import annotations

import json
from pathlib import Path


class Logger:
    """main.log and metrics.jsonl in `out_dir` ("" or enabled=False: nothing is written).
    A resumed run (-y 1) appends; a fresh one starts the files anew (llmpy.run_dir has made
    sure that they are not another run's)."""

    def __init__(self, out_dir: str, resume: bool, enabled: bool = True):
        self.enabled = bool(out_dir) and enabled
        if self.enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            mode = "a" if resume else "w"
            self.log = open(Path(out_dir) / "main.log", mode)
            self.jsonl = open(Path(out_dir) / "metrics.jsonl", mode)

    def _write(self, line: str, record: dict) -> None:
        if self.enabled:
            self.log.write(line + "\n")
            self.log.flush()
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def train(self, step, loss, lr, norm, comm_ms=None, **more):
        """comm_ms (several processes only): time blocked in collectives, appended to the
        main.log line as comm:%.1f (ms) and kept in metrics.jsonl as comm_ms."""
        comm = "" if comm_ms is None else f" comm:{comm_ms:.1f}"
        extra = {} if comm_ms is None else {"comm_ms": comm_ms}
        self._write(f"s:{step} trl:{loss:.4f} lr:{lr:.6f} norm:{norm:.2f}{comm}",
                    {"step": step, "train_loss": loss, "lr": lr, "norm": norm, **more, **extra})

    def val(self, step, loss):
        self._write(f"s:{step} tel:{loss:.4f}", {"step": step, "val_loss": loss})

    def hellaswag(self, step, acc):
        self._write(f"s:{step} eval:{acc:.4f}", {"step": step, "hellaswag": acc})

    def close(self):
        if self.enabled:
            self.log.close()
            self.jsonl.close()


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    """A two-column table like llm.c's start-up printout; the value column fits the widest."""
    width = max(len(k) for k, _ in rows)
    vwidth = max([50] + [len(str(v)) for _, v in rows])
    rule = f"+{'-' * (width + 2)}+{'-' * (vwidth + 2)}+"
    print(rule)
    print(f"| {title:<{width}} | {'':<{vwidth}} |")
    print(rule)
    for k, v in rows:
        print(f"| {k:<{width}} | {str(v):<{vwidth}} |")
    print(rule)
