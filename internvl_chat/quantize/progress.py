"""What a quantize run shows while it works: its phases, each with a real total, as rich bars on a
terminal, a few plain lines elsewhere, or nothing (library use, tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

Step = Callable[..., None]  # step(n=1, detail=""): n more units done; detail says what is running now


def no_step(n: int = 1, detail: str = "") -> None:
    pass


class Progress:
    """The run's phases, each with a real total. This base class shows nothing (library use, tests);
    `BarProgress` draws rich bars on a terminal, `LineProgress` prints a few plain lines elsewhere."""

    @contextmanager
    def phase(self, name: str, total: int, unit: str) -> Iterator[Step]:
        done = 0
        start = time.perf_counter()
        self.begin(name, total, unit)

        def step(n: int = 1, detail: str = "") -> None:
            nonlocal done
            done += n
            self.update(name, done, total, unit, detail)

        yield step
        self.end(name, total, unit, time.perf_counter() - start)

    def begin(self, name: str, total: int, unit: str) -> None:
        pass

    def update(self, name: str, done: int, total: int, unit: str, detail: str) -> None:
        pass

    def end(self, name: str, total: int, unit: str, seconds: float) -> None:
        pass


class LineProgress(Progress):
    """Plain lines for logs and pipes: one per finished phase, and one every `every_s` seconds of a
    long phase."""

    def __init__(self, stream: TextIO, every_s: float = 30.0):
        self.stream, self.every_s, self._last = stream, every_s, 0.0

    def _print(self, line: str) -> None:
        print(f"quantize: {line}", file=self.stream, flush=True)

    def begin(self, name: str, total: int, unit: str) -> None:
        self._last = time.perf_counter()

    def update(self, name: str, done: int, total: int, unit: str, detail: str) -> None:
        if time.perf_counter() - self._last >= self.every_s:
            self._last = time.perf_counter()
            self._print(f"{name}: {done}/{total} {unit}" + (f" ({detail})" if detail else ""))

    def end(self, name: str, total: int, unit: str, seconds: float) -> None:
        self._print(f"{name}: {total} {unit} in {seconds:.1f} s")


class BarProgress(Progress):
    """One rich progress bar per phase (finished ones stay, with their time); use as a context manager."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bars = RichProgress(
            TextColumn("{task.description:<19}"), BarColumn(bar_width=28), TextColumn("{task.fields[count]:>14}"),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("[dim]{task.fields[detail]}"),
            console=console, transient=False,
        )  # fmt: skip
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> BarProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.stop()

    def begin(self, name: str, total: int, unit: str) -> None:
        self._tasks[name] = self._bars.add_task(name, total=total, count=f"0/{total} {unit}", detail="")

    def update(self, name: str, done: int, total: int, unit: str, detail: str) -> None:
        self._bars.update(self._tasks[name], completed=done, count=f"{done}/{total} {unit}", detail=detail)

    def end(self, name: str, total: int, unit: str, seconds: float) -> None:
        self._bars.update(self._tasks[name], completed=total, count=f"{total}/{total} {unit}", detail="")
        self._bars.stop_task(self._tasks[name])
