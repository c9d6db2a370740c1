"""A denoising progress bar on stderr: one line redrawn in place on a terminal, plain
lines (at every tenth of the way) when stderr is a file or a pipe."""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressBar:
    """Shows `step/total`, a bar, elapsed time and the server's estimate of what is left."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth = -1
        self._drawn = False

    def update(self, step: int, total: int, elapsed: float, eta: float) -> None:
        total = max(total, 1)
        text = (f"step {step}/{total} {self._bar(step, total)} {100 * step // total:3d}% "
                f"{elapsed:.1f}s elapsed, ~{eta:.1f}s left")
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self._drawn = True
        elif (tenth := 10 * step // total) != self._last_tenth or step == total:
            self._last_tenth = tenth
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, above the bar."""
        self.finish()
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False

    def _bar(self, step: int, total: int) -> str:
        done = self.width * step // total
        return "[" + "#" * done + "-" * (self.width - done) + "]"
