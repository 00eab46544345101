"""Stop strings over streamed text: hold back what could still become a stop string, cut at one."""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Add streamed text; return the part that is safe to send (never any of a stop string)."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        self._buffer += text
        cut = min((i for i in (self._buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self._buffer = self._buffer[:cut], ""
            return out
        # keep the longest tail that is a prefix of some stop string
        keep = 0
        for n in range(min(self._hold, len(self._buffer)), 0, -1):
            tail = self._buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        out = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return out

    def flush(self) -> str:
        """At the end of the answer: the held-back text (it never completed a stop string)."""
        out, self._buffer = ("" if self.hit else self._buffer), ""
        return out
