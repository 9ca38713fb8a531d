"""A one-line progress bar for training loops: step, loss, tokens/s, time left (no dependency).

>>> import io
>>> out = io.StringIO()
>>> bar = Progress(total=4, stream=out, every=2)
>>> for step in range(1, 5): bar.update(step, loss=1.0 / step, tokens=256)
>>> out.getvalue().splitlines()[-1].split("|")[0].strip()
'step 4/4'
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Prints ``step k/N | loss ... | tok/s ... | eta m:ss``: rewritten in place on a terminal, one line every
    ``every`` steps (and at the last) otherwise (logs, CI). tokens/s is over the steps of this run (a resumed
    run counts from where it resumed)."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, every: int = 10, start_step: int = 0):
        self.total, self.every, self.start_step = total, max(1, every), start_step
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, loss: float, tokens: int, **extra: float) -> None:
        """Record step ``step`` (1-based, ``tokens`` trained on in it) and print the line when it is due."""
        self.tokens += tokens
        if not self.tty and step % self.every and step != self.total:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        done = step - self.start_step
        eta = elapsed / max(done, 1) * (self.total - step)
        fields = [f"step {step}/{self.total}", f"loss {loss:.4f}"]
        fields += [f"{k} {v:.4g}" for k, v in extra.items()]
        fields += [f"tok/s {self.tokens / elapsed:.0f}", f"eta {int(eta // 60)}:{int(eta % 60):02d}"]
        line = " | ".join(fields)
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and step == self.total:
            self.stream.write("\n")
        self.stream.flush()
