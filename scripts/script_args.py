"""argparse types the scripts share, so that a bad number or device given to a benchmark is one line
(argparse's usage and `error: argument --threads: …`, status 2) before any work, never a traceback
from torch.set_num_threads, a ZeroDivisionError or an empty median minutes later. Numbers are read
as the app reads them (internvl_chat/numbers.py: the digits 0-9 only, never nan or inf)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # a script run without PYTHONPATH (fuzz_parsers.py sets none itself)
    sys.path.insert(0, str(REPO_ROOT))

from internvl_chat.errors import InternVLChatError  # noqa: E402
from internvl_chat.files import visible  # noqa: E402
from internvl_chat.numbers import ascii_shown, parse_float, parse_int  # noqa: E402


def _number(parse: Callable[[str], float], low: float, what: str, above: bool = False) -> Callable[[str], float]:
    def read(text: str):
        try:
            value = parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not value >= low or (above and value == low) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {what}, not {ascii_shown(text)}")
        return value

    read.__name__ = what
    return read


positive_int = _number(parse_int, 1, "a whole number ≥ 1")
nonnegative_int = _number(parse_int, 0, "a whole number ≥ 0")
seconds = _number(parse_float, 0.0, "a number of seconds ≥ 0")
positive_float = _number(parse_float, 0.0, "a number > 0", above=True)


def positive_ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers ≥ 1 (`1,16,128`), at least one."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must be whole numbers ≥ 1 separated by commas, not {ascii_shown(text)}")
    return tuple(positive_int(item) for item in items)


def output_file(text: str) -> Path:
    """A file a script writes its results to when done: its folder must be there (checked first: a
    missing one was a FileNotFoundError traceback after the whole run, its numbers lost)."""
    path = Path(text)
    if not text.strip() or path.is_dir():
        raise argparse.ArgumentTypeError(f"must be the path of a file, not {ascii_shown(text)}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {ascii_shown(text)} does not exist; create it first")
    return path


def torch_device(text: str) -> str:
    """cpu, cuda or cuda:N, as torch.device reads it."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, not {ascii_shown(text)}") from None
    return text


def one_line_errors(main: Callable[[], int | None]) -> int:
    """Run a script's main; the app's own errors (a missing checkpoint, a bad group size) as one
    line `error: …` and status 1, not a traceback. Shown inert, as the CLI shows them (cli.py's
    _print_error): a message may carry what it was given as is (a file name, a library's reason)."""
    try:
        return main() or 0
    except InternVLChatError as e:
        print(f"error: {visible(str(e))}", file=sys.stderr)
        return 1
