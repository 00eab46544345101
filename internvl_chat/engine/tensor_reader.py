"""Read one weight file's tensors safely, one at a time.

Safetensors headers are parsed and validated by the safetensors library (after a size check) and
the bytes read with plain reads; pickles only through `torch.load(weights_only=True)` and only when
they hold a plain dict of dense tensors. Weight files are untrusted: every refusal is one line
naming the user's path.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..files import NotRegularFile, open_regular_file, visible
from .checkpoint_json import LFS_POINTER, refuse_lfs_pointer


def _first_line(error: BaseException) -> str:
    """Library errors can span many lines; our messages are one sentence."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_LOADABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())


def open_regular(path: Path, what: str):
    """`path` opened for binary reading if it is a regular file; a FIFO or a device is refused
    without blocking (opening a FIFO for reading waits for a writer forever)."""
    shown = visible(str(path))
    try:
        return open_regular_file(path)
    except IsADirectoryError:
        raise CheckpointError(f"{what} {shown} is a folder, not a file; point --model at a checkpoint folder") from None
    except NotRegularFile:
        raise CheckpointError(f"{what} {shown} is not a regular file (a pipe or a device?); point --model at a checkpoint folder") from None
    except OSError as e:
        raise CheckpointError(f"cannot open {what} {shown} ({e.strerror or e}); check the file and its permissions") from None


def weight_file_head(path: Path, size: int) -> bytes:
    """The first `size` bytes of a weight file (at least a Git LFS pointer's first line), refused
    where it is such a pointer (refuse_lfs_pointer)."""
    with open_regular(path, "weight file") as f:
        head = f.read(max(size, len(LFS_POINTER)))
    refuse_lfs_pointer(path, head)
    return head[:size]


def shown_value(value: object) -> str:
    """A name or value from a weight file, for a message: escaped and cut to 60 characters."""
    text = value if isinstance(value, str) else repr(value)
    return visible(text if len(text) <= 60 else text[:57] + "…")


# A header lists each tensor in ~100 bytes: InternVL3-78B's ~3,000 tensors take ~300 KiB. The
# library takes up to 100 MB (~1.5 million tensors), which costs ~1.5 GB and ~10 s to parse and
# list, twice per file (sizes first, then the weights): a file we did not write must not.
MAX_HEADER_BYTES = 16 << 20


def _check_header_size(path: Path, shown: str) -> None:
    head = weight_file_head(path, 8)
    if len(head) == 8 and struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:  # a short file: the library says so
        size = struct.unpack("<Q", head)[0]
        raise CheckpointError(
            f"{shown} is not a safetensors file, or a damaged one (its header claims {size / 2**20:,.0f} MiB, "
            f"over the {MAX_HEADER_BYTES >> 20} MiB any checkpoint needs); download it again"
        )


def safetensors_entries(path: Path, shown: str) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """(name, dtype, shape, byte count) of every tensor, in file order, from a header that the
    safetensors library has parsed and validated: a JSON object of sane depth and size, every
    tensor with a known dtype, offsets that are ordered, contiguous, match shape × dtype and
    cover the data exactly. Because they are contiguous, each tensor's offset is the sum of
    the byte counts before it."""
    _check_header_size(path, shown)
    try:
        with safe_open(str(path), framework="pt") as f:
            entries = []
            for name in f.offset_keys():
                piece = f.get_slice(name)
                entries.append((name, piece.get_dtype(), tuple(piece.get_shape())))
    except Exception as e:  # SafetensorError, OSError; the library's reason is one short line
        reason = _first_line(e).removeprefix("Error while deserializing header: ")
        reason = visible(reason if len(reason) <= 120 else reason[:117] + "…")
        damage = "is truncated or damaged" if "not fully covered" in reason else "is not a safetensors file, or a damaged one"
        raise CheckpointError(f"{shown} {damage} ({reason}); download it again") from None
    out = []
    for name, dtype_name, shape in entries:
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(
                f"{shown} stores tensor {shown_value(name)} as {visible(dtype_name)}, which internvl-chat does not load; "
                "use a float16/bfloat16/float32 checkpoint (or AWQ int32)"
            )
        out.append((name, dtype, shape, math.prod(shape) * dtype.itemsize))
    return out


def _iter_safetensors(path: Path, max_elements: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors with plain reads, one at a time, in file order.

    The library validates the header; the bytes are read here because memory-mapping them (what
    the library's reader does) would keep every touched page of the file resident until the file
    is closed, doubling peak memory when loading to the CPU. A tensor of more than `max_elements`
    is refused before anything is read: a buffer is the size its header declares.
    """
    shown = visible(str(path))
    with open_regular(path, "weight file") as f:
        entries = safetensors_entries(path, shown)
        for name, _, shape, _ in entries:
            _refuse_oversized(shown, name, shape, max_elements)
        try:
            (header_len,) = struct.unpack("<Q", f.read(8))
            size = os.fstat(f.fileno()).st_size
        except (struct.error, OSError):
            raise CheckpointError(f"cannot read {shown}; download it again") from None
        data_start = 8 + header_len
        if data_start + sum(n for *_, n in entries) != size:  # replaced since the header was checked
            raise CheckpointError(f"{shown} changed while it was being read; load it again")
        f.seek(data_start)
        for name, dtype, shape, nbytes in entries:
            buffer = bytearray(nbytes)
            try:
                got = f.readinto(buffer) if nbytes else 0
            except OSError as e:
                raise CheckpointError(f"cannot read {shown} ({e.strerror or e}); check the disk and download it again") from None
            if got != nbytes:
                raise CheckpointError(f"{shown} is truncated (tensor {shown_value(name)} runs past the end); download it again")
            tensor = torch.frombuffer(buffer, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(shape)


def _refuse_oversized(shown: str, name: str, shape: tuple[int, ...], max_elements: int | None) -> None:
    if max_elements is not None and math.prod(shape) > max_elements:
        raise CheckpointError(
            f"{shown} holds tensor {shown_value(name)} of shape {list(shape)}, larger than any tensor its config.json "
            "implies; config.json and the weights disagree (a damaged file or another model)"
        )


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _pickle_refusal(path: Path, error: BaseException) -> CheckpointError:
    """One line for a pickle torch.load refused. torch's own text is never passed on: it advises
    loading with weights_only=False, which would run code from the file."""
    shown = visible(str(path))
    text = str(error)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return CheckpointError(
            f"{shown} holds Python objects besides tensors ({shown_value(refused[1])}) and is refused for safety: only plain "
            "state dicts of tensors load; use the checkpoint's safetensors files instead"
        )
    if "Weights only load failed" in text:
        return CheckpointError(
            f"{shown} is not a PyTorch weights file, or holds pickled data other than plain tensors, and is refused "
            "for safety; use the checkpoint's safetensors files instead"
        )
    if isinstance(error, MemoryError) or "allocate" in text:
        return CheckpointError(f"{shown} declares more data than fits in memory; it is damaged or not a weights file")
    return CheckpointError(
        f"cannot read {shown}: it is truncated, damaged or not a PyTorch weights file; download it again"
    )


# A pickle's list of tensors is bounded as a safetensors header is: InternVL3-78B's ~3,000 tensors
# take ~140 bytes each of data.pkl (~400 KiB) and one zip entry per storage. Unbounded, a 56 MB
# .bin of 200,000 one-element tensors took 21 s to load memory-mapped (once for every check), and
# 200,000 views of one storage 1.6 s from a 3.7 MB file (18 bytes each: the pickle memoizes).
MAX_PICKLE_BYTES = 4 << 20
MAX_PICKLE_TENSORS = 1 << 14  # also the most zip entries (storages) taken
_ZIP_END = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP_ENTRY = b"PK\x01\x02"
_STORAGE_RECORD = re.compile(rb"[^/]*/data/[0-9]+")  # a tensor storage's record, lowercased: archive/data/7
_LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, storage keys


def _too_many_tensors(shown: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{shown} {what}, over the {MAX_PICKLE_TENSORS:,} tensors or {MAX_PICKLE_BYTES >> 20} MiB of pickled "
        "names and shapes any checkpoint needs; it is damaged or not a weights file (use its safetensors files)"
    )


def _zip_directory(f, size: int) -> tuple[int, int, int] | None:
    """(entries, directory size, directory offset) from a zip's end records, or None where they
    cannot be found (torch then says the file is damaged)."""
    tail_size = min(size, (1 << 16) + 22 + 20)  # the end record, its comment, a zip64 locator
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(_ZIP_END)
    if at < 0 or len(tail) < at + 22:
        return None
    entries, directory_size, offset = struct.unpack_from("<xxxxxxxxxxHII", tail, at)
    # Where a zip64 locator precedes the end record, torch's reader (miniz) takes the zip64 record's
    # values, whatever the 32-bit ones say (torch writes both in every file): taking them only where
    # the 32-bit ones were 0xFFFF… let a decoy (1 entry, an empty directory) pass what torch loaded.
    # With no locator, or no zip64 record where it points, the 32-bit values are the ones read (a
    # zip of exactly 65,535 entries has none: returning None there skipped every check).
    if at >= 20 and tail[at - 20 : at - 16] == _ZIP64_LOCATOR:
        (record,) = struct.unpack_from("<Q", tail, at - 20 + 8)
        if record > size - 56:  # past the file: torch says it is damaged (seek raised OverflowError from 2**63 on)
            return None
        f.seek(record)
        end64 = f.read(56)
        if end64.startswith(b"PK\x06\x06"):
            entries, directory_size, offset = struct.unpack_from("<QQQ", end64, 32)
    return entries, directory_size, offset


def _check_pickle_size(path: Path) -> None:
    """Refuse, before torch parses it, a pickle whose list of tensors is larger than any
    checkpoint's: a zip pickle by its entries and the size of its data.pkl (read from the zip's
    directory), a legacy one by the bytes its pickles take (walked, not run, in at most
    MAX_PICKLE_BYTES of the file)."""
    shown = visible(str(path))
    with open_regular(path, "weight file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4)
            if head != b"PK\x03\x04":
                f.seek(0)
                _check_legacy_pickle(f.read(MAX_PICKLE_BYTES + 1), shown)
                return
            found = _zip_directory(f, size)
            if found is None:
                return
            entries, directory_size, offset = found
            if entries > MAX_PICKLE_TENSORS + 16:  # + torch's few own entries
                raise _too_many_tensors(shown, f"is a zip of {entries:,} entries")
            if directory_size > MAX_PICKLE_BYTES:  # named as such: "a zip of 3 entries, over the 16,384 tensors" said nothing
                raise _too_many_tensors(shown, f"has a zip directory of {directory_size / 2**20:,.1f} MiB")
            if offset > size:  # past the file: torch says it is damaged (seek raised OverflowError from 2**63 on)
                return
            f.seek(offset)
            directory = f.read(directory_size)
        except OSError as e:
            raise CheckpointError(f"cannot read {shown} ({e.strerror or e}); check the disk and download it again") from None
    at = 0
    while len(directory) >= at + 46 and directory[at : at + 4] == _ZIP_ENTRY:
        (unpacked,) = struct.unpack_from("<I", directory, at + 24)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, at + 28)
        name = directory[at + 46 : at + 46 + name_len]
        lower = name.lower()  # torch finds its records ignoring case (miniz's lookup)
        if unpacked > MAX_PICKLE_BYTES and not _STORAGE_RECORD.fullmatch(lower):  # 0xFFFFFFFF: zip64's, larger
            # data.pkl, and the records torch reads whole (version, byteorder, .format_version): only
            # the storages, memory-mapped, are ever that large (a "DATA.PKL" passed as not data.pkl)
            if lower == b"data.pkl" or lower.endswith(b"/data.pkl"):
                raise _too_many_tensors(shown, f"pickles {unpacked / 2**20:,.1f} MiB of tensor names and shapes")
            record = shown_value(name.decode("utf-8", "replace"))
            raise _too_many_tensors(shown, f"has a record {record} of {unpacked / 2**20:,.1f} MiB that is no tensor's data")
        at += 46 + name_len + extra_len + comment_len


def _check_legacy_pickle(head: bytes, shown: str) -> None:
    """The pickles of torch's legacy format must end within MAX_PICKLE_BYTES (`head` holds one
    byte more). A stream that is no pickle is left to torch.load to name."""
    stream = io.BytesIO(head)
    try:
        for _ in range(_LEGACY_PICKLES):
            for _ in pickletools.genops(stream):
                pass
    except ValueError:  # an unknown opcode, or the bytes ran out before a STOP
        # ran out: the stream is at its end, whatever pickletools said (it has a message for each kind of
        # argument: "exhausted", "only 1 remain", "not enough data … uint4", "no newline found"; the first
        # two alone were taken, so a pickle whose 4 MiB ended inside a 4-byte argument was parsed)
        if len(head) > MAX_PICKLE_BYTES and stream.tell() >= len(head):
            raise _too_many_tensors(shown, f"pickles over {MAX_PICKLE_BYTES >> 20} MiB of tensor names and shapes") from None
    except Exception:  # anything else odd about it: torch.load says the file is damaged
        return


def _torch_load(path: Path):
    """torch.load with weights_only=True (never anything else), memory-mapped where the format
    allows; legacy (non-zip) pickles cannot be mapped and are read whole. A list of tensors larger
    than any checkpoint's is refused before it is parsed (_check_pickle_size)."""
    weight_file_head(path, 0)
    _check_pickle_size(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise for the user
        try:
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, OSError, MemoryError…
            raise _pickle_refusal(path, e) from None


def _plain_state_dict(path: Path, state: object) -> dict[str, torch.Tensor]:
    """The loaded object as a dict of dense CPU tensors by name, or one line saying why it is not."""
    shown = visible(str(path))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap the weights with optimizer/step entries
    if not isinstance(state, dict):
        raise CheckpointError(f"{shown} holds a {type(state).__name__}, not a state dict of tensors; it is not a supported weights file")
    if len(state) > MAX_PICKLE_TENSORS:  # views of one storage take ~18 bytes each of the pickle
        raise _too_many_tensors(shown, f"holds {len(state):,} tensors")
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{shown} has a tensor name that is not a string ({shown_value(name)}); it is not a supported weights file")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{shown} holds {shown_value(name)} = a {type(value).__name__}, not a tensor; only plain state dicts of tensors load"
            )
        if value.layout != torch.strided or value.is_meta or value.is_quantized or value.dtype not in _LOADABLE_DTYPES:
            raise CheckpointError(
                f"{shown} holds {shown_value(name)} as a {str(value.dtype).removeprefix('torch.')} {value.layout} tensor, "
                "which internvl-chat does not load; only dense float/int tensors load"
            )
    return state


def pickle_shapes(path: Path) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of a pickle, without reading their data where the format
    allows: a zip pickle (torch ≥ 1.6) is memory-mapped, so only its pickled list of tensors is
    read; a legacy one cannot be mapped and is read whole. A tensor whose storage the file does not
    hold fails the load (torch checks each tensor against its storage)."""
    state = _plain_state_dict(path, _torch_load(path))
    shapes = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
    del state
    return shapes


def iter_file(path: Path, kind: str, max_elements: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Raw (name, tensor) pairs of one file; at most this one file's tensors are referenced. A
    tensor of more than `max_elements` is refused before any is yielded: a pickle stores shapes and
    strides beside the data, and zero strides make a tensor of any shape from one stored element
    (loaded memory-mapped for nothing, it cost its full size once concatenated or converted)."""
    if kind == "safetensors":
        yield from _iter_safetensors(path, max_elements)
        return
    state = _plain_state_dict(path, _torch_load(path))
    for name, tensor in state.items():
        _refuse_oversized(visible(str(path)), name, tuple(tensor.shape), max_elements)
    names = list(state)
    for name in names:
        yield name, state.pop(name)
    del state
