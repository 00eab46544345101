"""Seeded mutations of untrusted files, and the check every mutant must pass (tests/test_fuzz_*.py).

A mutant either reads as valid or is refused with the project's error type in one line: any other
exception (a TypeError, a KeyError, a library's own error), a message with a line break or an
escape sequence, is a finding. Mutations are drawn from random.Random(seed), so a failure names
its seed and index and reproduces on every machine. Inputs stay bounded (a few hundred KiB at
most), so no mutant can make a reader hang or allocate without limit on the way.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from internvl_chat.errors import InternVLChatError

# INTERNVL_FUZZ_SCALE=10 draws ten times the mutants of each seed (a longer hunt; the same first ones)
SCALE = int(os.environ.get("INTERNVL_FUZZ_SCALE", "1"))
DEEP = 20_000  # nesting depth of a "deep" value: past Python's recursion limit, far under any size limit
LONG = 200_000  # characters of a "long" string

# values put in place of a JSON or TOML field: wrong types, out-of-range and non-finite numbers,
# hostile text; "<deep>" stands for brackets nested DEEP deep (spliced into the text afterwards)
ODD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**40, 1.5, -0.5, 1e308, float("nan"), float("inf"),
    float("-inf"), "", "1", "nan", "x" * LONG, "\x1b[31mred\x1b[0m\n", "\u202e\u0000", [], [1, "a"], {}, {"a": {}},
    "<deep>",
)  # fmt: skip
DEEP_MARK = "<deep>"


class _Records(logging.Handler):
    """The log records of WARNING and above that the app would print: with no handler on their
    logger's way to the root (the app sets up no logging), Python prints them to stderr itself
    (logging.lastResort), a library's words about a file on the terminal; a library's own
    stream handler prints them too."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        handlers, logger = [], logging.getLogger(record.name)
        while logger is not None and logger is not logging.getLogger():
            handlers += logger.handlers
            logger = logger.parent if logger.propagate else None
        printing = [h for h in handlers if isinstance(h, logging.StreamHandler) and record.levelno >= h.level]
        if not handlers or printing:
            self.records.append(record)


class Findings:
    """Mutants that broke the rule, each with the exception's last frames (reported together).

    With pytest's `capfd`, anything written to stdout meanwhile is a finding too: a library that
    prints a file's text itself (past Python) puts it on the terminal raw and breaks --json output."""

    def __init__(self, reader: str, capfd: Any = None):
        # what earlier tests left for the cyclic collector (a client's socket never closed) would warn
        # when it is collected, in the middle of some mutant's read: collected now, quietly
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gc.collect()
        self.reader = reader
        self.capfd = capfd
        self.found: list[str] = []
        self.counts = {"ok": 0, "refused": 0}

    def check(self, label: str, read: Callable[[], Any], refusals: tuple[type[BaseException], ...] = (InternVLChatError,)) -> None:
        try:
            self._read(label, read)
        except refusals as e:
            message = str(e)
            if not message or "\n" in message or "\r" in message or "\x1b" in message or "Traceback" in message:
                self.found.append(f"{label}: refusal is not one clean line: {message[:300]!r}")
            self.counts["refused"] += 1
            return
        except Exception as e:  # noqa: BLE001 — anything else is what the fuzz looks for
            where = "".join(traceback.format_exception(e)[-4:])[-600:]
            self.found.append(f"{label}: {type(e).__name__}: {str(e)[:200]!r}\n{where}")
            return
        self.counts["ok"] += 1

    def _read(self, label: str, read: Callable[[], Any]) -> None:
        """`read()`, with what it printed and the Python warnings it raised as findings: the app
        sets no warnings filter, so a warning reaches the terminal as two lines of internals; so do log records (_Records)."""
        if self.capfd is not None:
            self.capfd.readouterr()
        logged = _Records()
        logging.getLogger().addHandler(logged)
        try:
            with warnings.catch_warnings(record=True) as raised:
                warnings.simplefilter("always")
                read()
        finally:
            logging.getLogger().removeHandler(logged)
            for record in logged.records:
                self.found.append(f"{label}: logged {record.levelname} by {record.name}: {record.getMessage()[:200]!r}")
            for warning in raised:
                self.found.append(f"{label}: warning {warning.category.__name__}: {str(warning.message)[:200]!r} "
                                  f"({warning.filename}:{warning.lineno})")  # fmt: skip
            printed = self.capfd.readouterr().out if self.capfd is not None else ""
            if printed:
                self.found.append(f"{label}: printed to stdout: {printed[:200]!r}")

    def assert_none(self) -> None:
        print(f"{self.reader}: {self.counts}")  # what the mutants did (pytest -s shows it)
        total = sum(self.counts.values()) + len(self.found)
        assert not self.found, f"{self.reader}: {len(self.found)} of {total} mutants broke the rule:\n" + "\n".join(self.found[:6])


# ------------------------------------------------------------------ bytes


def _pos(rng: random.Random, data: bytes, span: tuple[int, int] | None, room: int = 0) -> int:
    """A place to mutate: anywhere, or inside `span` (the part of a file a reader parses itself)."""
    low, high = span or (0, len(data))
    high = max(min(high, len(data) - room), low + 1)
    return min(rng.randrange(low, high), max(len(data) - 1, 0))


def _flip(rng, data, span):
    at = _pos(rng, data, span)
    return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]


def _delete(rng, data, span):
    at = _pos(rng, data, span)
    return data[:at] + data[at + rng.randint(1, 16) :]


def _insert(rng, data, span):
    at = _pos(rng, data, span)
    junk = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))), b"\x00" * 4, b"\xff" * 4, b"\n", b'"'])
    return data[:at] + junk + data[at:]


def _truncate(rng, data, span):
    return data[: _pos(rng, data, span)]


def _duplicate(rng, data, span):
    start = _pos(rng, data, span)
    piece = data[start : start + rng.randint(1, 64)]
    at = _pos(rng, data, span)
    return data[:at] + piece + data[at:]


def _splice(rng, data, span):
    """A chunk copied over another place (lengths and offsets from elsewhere in the file)."""
    size = rng.randint(1, 32)
    src, dst = _pos(rng, data, span), _pos(rng, data, span)
    piece = data[src : src + size]
    return data[:dst] + piece + data[dst + len(piece) :]


def _number(rng, data, span):
    """A 1-, 2-, 4- or 8-byte field overwritten with an extreme value (sizes, counts, offsets),
    aligned as binary formats align their fields."""
    width = rng.choice([1, 2, 4, 4, 8])
    top = 2 ** (8 * width)
    value = rng.choice([0, 1, top - 1, top // 2, top // 2 - 1, 0x7FFF % top, (top - 1) ^ 0xFF])
    at = _pos(rng, data, span, width) // width * width
    return data[:at] + value.to_bytes(width, rng.choice(["big", "little"])) + data[at + width :]


BYTE_MUTATIONS = (_flip, _delete, _insert, _truncate, _duplicate, _splice, _number, _number)


def spread(places: list[int], count: int) -> list[int]:
    """At most `count` of `places`, evenly over the whole file (not only its start)."""
    step = max(len(places) // count, 1)
    return places[::step][:count]


def byte_mutants(
    seed_data: bytes, seed: int, count: int, boundaries: list[int] = (), rounds: int = 3,
    span: tuple[int, int] | None = None, repair: Callable[[bytes], bytes] | None = None,
) -> Iterator[tuple[str, bytes]]:  # fmt: skip
    """(label, mutant): a cut at each structural boundary, then `count` random stacks of 1..rounds
    mutations, inside `span` where given; `repair` (checksums made right again) on every other one."""
    for at in boundaries:
        yield f"cut at {at}", seed_data[:at]
    rng = random.Random(seed)
    for index in range(count * SCALE):
        data = seed_data
        names = []
        for _ in range(rng.randint(1, rounds)):
            mutate = rng.choice(BYTE_MUTATIONS)
            names.append(mutate.__name__.strip("_"))
            data = mutate(rng, data, span) if data else data
        if repair is not None and index % 2:
            data, names = repair(data), [*names, "repaired"]
        yield f"seed {seed} mutant {index} ({'+'.join(names)})", data


# ------------------------------------------------------------------ JSON-like trees


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _at(node: Any, path: tuple) -> Any:
    for step in path:
        node = node[step]
    return node


def _near(rng: random.Random, value: Any, strings: list[str]) -> Any:
    """A value of the same type that a writer could have put there (gets past type checks)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([0, 1, -1, value + 1, value - 1, value * 1000, 2**31 - 1, 2**32, 2**64, -(2**31)])
    if isinstance(value, float):
        return rng.choice([0.0, -value, value * 1e6, 1e-300, 5e-324, 1e300, float("nan"), float("inf")])
    if isinstance(value, str):
        return rng.choice([*rng.sample(strings, min(len(strings), 3)), "", (value * 50)[:LONG], value + "\x00", "\ud800", "..", "/"])
    if isinstance(value, list) and value:
        return value[::-1] if rng.random() < 0.5 else value[:-1]
    return value


def _mutate_tree(rng: random.Random, tree: Any) -> tuple[Any, str]:
    paths = [p for p in _paths(tree) if p]
    if not paths:
        return rng.choice(ODD_VALUES), "root"
    by_depth: dict[int, list[tuple]] = {}
    for p in paths:
        by_depth.setdefault(len(p), []).append(p)
    path = rng.choice(by_depth[rng.choice(sorted(by_depth))])  # every depth as likely: a big table does not drown the rest
    parent, leaf = _at(tree, path[:-1]), path[-1]
    where = ".".join(map(str, path))
    kind = rng.choice(["odd", "odd", "near", "near", "near", "delete", "unknown key", "wrap", "long list", "empty"])
    if kind == "near":
        strings = [p[-1] for p in paths if isinstance(p[-1], str)][:200] or ["x"]
        value = _near(rng, parent[leaf], strings)
        parent[leaf] = value
        return tree, f"{where}~{value!r:.30}"
    if kind == "odd":
        value = rng.choice(ODD_VALUES)
        parent[leaf] = value
        return tree, f"{where}={value!r:.30}"
    if kind == "delete":
        del parent[leaf]
        return tree, f"del {where}"
    if kind == "unknown key" and isinstance(parent[leaf], dict):
        parent[leaf]["\x1bunknown"] = rng.choice(ODD_VALUES)
        return tree, f"{where} + unknown key"
    if kind == "wrap":
        parent[leaf] = [parent[leaf]] if rng.random() < 0.5 else {"x": parent[leaf]}
        return tree, f"{where} wrapped"
    if kind == "long list" and isinstance(parent[leaf], list) and parent[leaf]:
        parent[leaf] = parent[leaf] * (2000 // len(parent[leaf]) + 1)
        return tree, f"{where} x2000"
    parent[leaf] = type(parent[leaf])() if isinstance(parent[leaf], (dict, list, str)) else None
    return tree, f"{where} emptied"


def tree_mutants(seed_tree: Any, seed: int, count: int, rounds: int = 2) -> Iterator[tuple[str, Any]]:
    """(label, mutated copy of a JSON-like tree); DEEP_MARK strings stand for deep nesting."""
    rng = random.Random(seed)
    text = json.dumps(seed_tree)
    for index in range(count * SCALE):
        tree = json.loads(text)
        names = []
        for _ in range(rng.randint(1, rounds)):
            tree, name = _mutate_tree(rng, tree)
            names.append(name)
        yield f"seed {seed} mutant {index} ({'; '.join(names)})", tree


def json_text(tree: Any) -> str:
    """JSON as Python writes it (NaN and Infinity included), with DEEP_MARK made deep nesting."""
    text = json.dumps(tree, allow_nan=True)
    return text.replace(json.dumps(DEEP_MARK), "[" * DEEP + "]" * DEEP)


def json_boundaries(text: bytes) -> list[int]:
    """Every place a JSON text can be cut between its tokens."""
    return [i for i, byte in enumerate(text) if byte in b'{}[],:"'] + [len(text) - 1]

