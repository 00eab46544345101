"""A checkpoint's JSON files (config.json, preprocessor_config.json, shard indexes), read safely and
checked field by field.

They are files we did not write: a file is read with a size limit and must hold one JSON object;
a field is checked for its JSON type (a string is never a number, a bool never an integer) and its
range. Any problem is one CheckpointError line naming the file and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files import TEXT_LIMIT, read_text_file, undecodable_byte, visible

_REQUIRED = object()

# How a large file of a Hugging Face repository cloned without Git LFS begins: git leaves a pointer
# of ~130 bytes (this line, the file's hash and size) in place of the weights or tokenizer.json
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def refuse_lfs_pointer(path: Path, head: bytes) -> None:
    """A CheckpointError where the file begins as a Git LFS pointer: "download it again", what a
    damaged file is told, would clone the same pointers."""
    if head.startswith(LFS_POINTER):
        raise CheckpointError(
            f"{visible(str(path))} is a Git LFS pointer, not the file itself: the checkpoint was cloned without Git LFS; "
            "run `git lfs install` and `git lfs pull` in its folder (or download it with `hf download`)"
        )


def shown_json(value: Any) -> str:
    """A JSON value for an error message: short, and safe to print."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    except RecursionError:  # a value nested deeper than the stack left allows (read_json_object caps files' depth)
        text = ("[" if isinstance(value, list) else "{") * 40
    if len(text) > 40:
        text = text[:37] + "…"
    return visible(text)


class Fields:
    """Typed, range-checked access to one JSON object of config.json.

    A null value counts as absent (the documented default applies); a required key that is
    absent is refused by name.
    """

    def __init__(self, raw: Any, path: str, source: str, file: str = "config.json"):
        self.path, self.source, self.file = path, source, file  # `file`: the name advice gives
        if not isinstance(raw, dict):
            raise CheckpointError(
                f"{source}: {path or 'the top level'} must be a JSON object, not {shown_json(raw)}; "
                f"the checkpoint's {file} is damaged or not an InternVL3 config"
            )
        self.raw = raw

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def refuse(self, key: str, expect: str) -> CheckpointError:
        return CheckpointError(
            f"{self.source}: {self._name(key)} must be {expect}, not {shown_json(self.raw.get(key))}; "
            f"the checkpoint's {self.file} is damaged or was edited"
        )

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is _REQUIRED:
                raise CheckpointError(
                    f"{self.source}: {self._name(key)} is missing; the checkpoint's {self.file} is incomplete"
                )
            return None
        return value

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def integer(self, key: str, low: int, high: int, default: Any = _REQUIRED) -> int:
        value = self._get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.refuse(key, f"an integer from {low:,} to {high:,}")
        return value

    def number(self, key: str, low: float, high: float, default: Any = _REQUIRED, low_open: bool = True) -> float:
        value = self._get(key, default)
        if value is None:
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value > high or value < low or (low_open and value == low):
            raise self.refuse(key, f"a number {'above' if low_open else 'from'} {low:g} {'up to' if low_open else 'to'} {high:g}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.refuse(key, "true or false")
        return value

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.refuse(key, "a string")
        if undecodable_byte(value) is not None:  # a JSON "\\ud800" escape: the tokenizer would fail on it later
            raise self.refuse(key, "UTF-8 text (no \\ud800-\\udfff escapes)")
        return value

    def names(self, key: str) -> list[str]:
        value = self._get(key, [])
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.refuse(key, "a list of strings")
        return value

    def square_size(self, key: str, low: int, high: int, default: Any = _REQUIRED) -> int:
        """An image or patch size: an integer, or an [h, w] pair of equal integers (-hf layout)."""
        value = self._get(key, default)
        if value is None:
            return default
        if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.refuse(key, f"an integer from {low} to {high} (or a square [h, w] pair; InternVL uses square tiles)")
        return value

    def child(self, key: str, required: bool = True) -> Fields | None:
        value = self._get(key, _REQUIRED if required else None)
        if value is None:
            return None
        return Fields(value, self._name(key), self.source, self.file)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A checkpoint JSON file (config, shard index, preprocessor config) as a dict; anything else
    (not a regular file, too large, not UTF-8, not JSON, not an object, nested too deep) is one
    CheckpointError line naming the user's path."""
    shown = visible(str(path))
    # 16 MiB, not the tokenizer's 64: a real one is a few KiB (an index of a 78B model ~300 KiB), and
    # Python's parser takes ~25 bytes of memory per byte of `[{}, {}, …]` (64 MiB took 1.6 GB)
    text = read_text_file(path, what, limit=TEXT_LIMIT, error=CheckpointError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {shown} is not valid JSON ({e.msg} at line {e.lineno}); the download may be incomplete") from None
    except (ValueError, RecursionError) as e:  # huge integers, absurd nesting
        reason = "nested too deeply" if isinstance(e, RecursionError) else "a number is too large"
        raise CheckpointError(f"{what} {shown} cannot be read ({reason}); it is not a checkpoint file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {shown} must hold a JSON object, not {shown_json(data)}; it is not a checkpoint file")
    if _nested_deeper_than(data, MAX_JSON_DEPTH):
        raise CheckpointError(f"{what} {shown} cannot be read (nested too deeply); it is not a checkpoint file")
    return data


# A checkpoint's JSON nests a few levels (config.json's rope_parameters under text_config: 3). The
# parser takes what the stack left allows (~990 levels near the top of it); a value nested nearly
# that deep, read fine, was written out again deeper in the stack (an error line quoting it, quantize
# writing the config) and raised RecursionError: a traceback.
MAX_JSON_DEPTH = 64


def _nested_deeper_than(data: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels anywhere in `data` (walked without
    recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False
