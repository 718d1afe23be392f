"""Rolling z-score of the loss and the grad norm (llm.c's llmc/outlier_detector.h): the loop
skips an update whose loss or norm is more than -sl / -sg standard deviations above the mean
of the previous 128 values."""

from __future__ import annotations

import math

OUTLIER_WINDOW = 128


class OutlierDetector:
    """z-score of each new value against the previous `window` values (nan until full)."""

    def __init__(self, window: int = OUTLIER_WINDOW):
        self.window = window
        self.buffer = [0.0] * window
        self.count = 0
        self.index = 0

    def update(self, x: float) -> float:
        if self.count < self.window:
            self.buffer[self.count] = x
            self.count += 1
            return math.nan
        mean = sum(self.buffer) / self.window
        var = sum((b - mean) ** 2 for b in self.buffer) / self.window
        std = math.sqrt(var)
        z = (x - mean) / std if std > 0 else math.nan
        self.buffer[self.index] = x
        self.index = (self.index + 1) % self.window
        return z

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer), "count": self.count, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.buffer, self.count, self.index = list(s["buffer"]), int(s["count"]), int(s["index"])
