"""Find a checkpoint's weight files and read them one tensor at a time under canonical names.

Canonical names are the original OpenGVLab layout's names (SPEC §2, docs/architecture.md). The
transformers "-hf" layout, in both its prefix styles, is renamed to them; its split vision q/k/v are
fused back into `attn.qkv` (rows q, k, v). Reading is lazy, one shard at a time: safetensors headers
are parsed and validated by the safetensors library and the bytes read with plain reads; pickles only
through `torch.load(weights_only=True)` and only when they hold a plain dict of dense tensors.
Weight files and index files are untrusted: every refusal is one line naming the user's path.
"""

from __future__ import annotations

import math
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..files import visible
from .config import read_json_object

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# -------------------------------------------------------------------------------- name mapping

# vision-layer suffixes: -hf → original (q/k/v are handled separately: they fuse into attn.qkv)
_VISION_LAYER_HF_TO_ORIG = {
    "attention.projection_layer": "attn.proj",
    "attention.q_norm": "attn.q_norm",
    "attention.k_norm": "attn.k_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_VISION_LAYER_ORIG_TO_HF = {v: k for k, v in _VISION_LAYER_HF_TO_ORIG.items()}
_VISION_EMBED_HF_TO_ORIG = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.position_embeddings": "embeddings.position_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
}
_VISION_EMBED_ORIG_TO_HF = {v: k for k, v in _VISION_EMBED_HF_TO_ORIG.items()}
_PROJECTOR_HF_TO_ORIG = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
_PROJECTOR_ORIG_TO_HF = {v: k for k, v in _PROJECTOR_HF_TO_ORIG.items()}
_QKV_SLOTS = ("q_proj", "k_proj", "v_proj")

# prefixes of the two -hf styles: (vision tower, projector, language model body, lm_head)
_HF_PREFIXES = {
    "new": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head."),
    "legacy": ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head."),
}

_HF_VISION_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_VISION_LAMBDA = re.compile(r"encoder\.layer\.(\d+)\.lambda_([12])$")
_ORIG_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ORIG_VISION_LS = re.compile(r"encoder\.layers\.(\d+)\.ls([12])$")


def _is_ignored(name: str) -> bool:
    """Non-weight buffers some writers include (rotary tables)."""
    return name.endswith(".inv_freq") or ".rotary_emb." in name


def _hf_vision_to_canonical(rest: str) -> str | None:
    if rest in _VISION_EMBED_HF_TO_ORIG:
        return "vision_model." + _VISION_EMBED_HF_TO_ORIG[rest]
    m = _HF_VISION_LAMBDA.fullmatch(rest)
    if m:
        return f"vision_model.encoder.layers.{m[1]}.ls{m[2]}"
    m = _HF_VISION_LAYER.fullmatch(rest)
    if m:
        layer, module, leaf = m[1], m[2], m[3]
        if module in ("attention." + s for s in _QKV_SLOTS):
            return f"vision_model.encoder.layers.{layer}.attn.qkv.{leaf}"
        if module in _VISION_LAYER_HF_TO_ORIG:
            return f"vision_model.encoder.layers.{layer}.{_VISION_LAYER_HF_TO_ORIG[module]}.{leaf}"
    return None


def hf_to_canonical(name: str) -> str | None:
    """The canonical name of a -hf tensor name (either prefix style).

    A split vision `attention.{q,k,v}_proj` piece maps to the fused `attn.qkv` name it belongs to
    (see `qkv_slot`). Names that are not -hf InternVL names come back unchanged; ignorable buffers
    (rotary `inv_freq`) give None.
    """
    if _is_ignored(name):
        return None
    for vision, projector, language, lm_head in _HF_PREFIXES.values():
        if name == lm_head + "weight":
            return "language_model.lm_head.weight"
        if name.startswith(language):
            return "language_model.model." + name[len(language) :]
        if name.startswith(projector):
            module, _, leaf = name[len(projector) :].partition(".")
            if module in _PROJECTOR_HF_TO_ORIG:
                return f"mlp1.{_PROJECTOR_HF_TO_ORIG[module]}.{leaf}"
            return name
        if name.startswith(vision):
            return _hf_vision_to_canonical(name[len(vision) :]) or name
    return name


def qkv_slot(hf_name: str) -> int | None:
    """0, 1, 2 for a -hf vision q/k/v projection piece (its row block in the fused qkv), else None."""
    for vision, *_ in _HF_PREFIXES.values():
        if hf_name.startswith(vision):
            m = _HF_VISION_LAYER.fullmatch(hf_name[len(vision) :])
            if m and m[2].startswith("attention.") and m[2][len("attention.") :] in _QKV_SLOTS:
                return _QKV_SLOTS.index(m[2][len("attention.") :])
    return None


def canonical_to_hf(name: str, prefix_style: str = "new") -> list[str]:
    """The -hf name(s) of a canonical tensor: three names (q, k, v row blocks) for a fused vision
    `attn.qkv`, one name otherwise. Unknown names come back unchanged (as a one-element list)."""
    if prefix_style not in _HF_PREFIXES:
        raise ValueError(f"prefix_style must be 'new' or 'legacy', not {prefix_style!r}")
    vision, projector, language, lm_head = _HF_PREFIXES[prefix_style]
    if name == "language_model.lm_head.weight":
        return [lm_head + "weight"]
    if name.startswith("language_model.model."):
        return [language + name[len("language_model.model.") :]]
    if name.startswith("mlp1."):
        module, _, leaf = name[len("mlp1.") :].partition(".")
        if module in _PROJECTOR_ORIG_TO_HF:
            return [f"{projector}{_PROJECTOR_ORIG_TO_HF[module]}.{leaf}"]
        return [name]
    if name.startswith("vision_model."):
        rest = name[len("vision_model.") :]
        if rest in _VISION_EMBED_ORIG_TO_HF:
            return [vision + _VISION_EMBED_ORIG_TO_HF[rest]]
        m = _ORIG_VISION_LS.fullmatch(rest)
        if m:
            return [f"{vision}encoder.layer.{m[1]}.lambda_{m[2]}"]
        m = _ORIG_VISION_LAYER.fullmatch(rest)
        if m:
            layer, module, leaf = m[1], m[2], m[3]
            if module == "attn.qkv":
                return [f"{vision}encoder.layer.{layer}.attention.{s}.{leaf}" for s in _QKV_SLOTS]
            if module in _VISION_LAYER_ORIG_TO_HF:
                return [f"{vision}encoder.layer.{layer}.{_VISION_LAYER_ORIG_TO_HF[module]}.{leaf}"]
    return [name]


# -------------------------------------------------------------------------------- weight files


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint, in reading order.

    kind: "safetensors" (single or sharded), "bin" (PyTorch pickle shards) or "tinychat" (one `.pt`
    state dict, llm-awq's TinyChat format). `index` is the shard index file when there is one.
    """

    kind: str
    files: tuple[Path, ...]
    index: Path | None = None

    def payload_bytes(self) -> int:
        """Bytes of weight data, for checking config.json against before anything is allocated.

        Safetensors headers are validated here, every shard's, so a damaged shard is reported
        before the model is built; pickles count their size on disk.
        """
        total = 0
        for path in self.files:
            shown = visible(str(path))
            if self.kind == "safetensors":
                _open_regular(path, "weight file").close()
                total += sum(n for *_, n in _safetensors_entries(path, shown))
                continue
            try:
                total += path.stat().st_size
            except OSError as e:
                raise CheckpointError(f"cannot read {shown} ({e.strerror or e}); check the file") from None
        return total


def _is_plain_file_name(name: str, suffix: str) -> bool:
    """A shard name an index may use: one file in the checkpoint folder, never a path elsewhere."""
    return (
        name.endswith(suffix)
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
        and visible(name) == name
        and len(name.encode("utf-8")) <= 255  # NAME_MAX: a longer one made the existence check raise OSError
    )


def _files_from_index(index: Path, suffix: str) -> tuple[Path, ...]:
    shown = visible(str(index))
    data = read_json_object(index, "the shard index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"the shard index {shown} has no weight_map of tensor names to files; the download may be incomplete")
    names: set[str] = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not _is_plain_file_name(name, suffix):
            raise CheckpointError(
                f"the shard index {shown} maps {_short(tensor)} to {_short(name)}, which is not a {suffix} file name "
                "in the checkpoint folder; the index is damaged"
            )
        names.add(name)
    files = tuple(index.parent / n for n in sorted(names))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{visible(index.name)} names {', '.join(map(_short, missing[:3]))}{' …' if len(missing) > 3 else ''}, which "
            f"{'is' if len(missing) == 1 else 'are'} missing from {visible(str(index.parent))}; download the remaining shards"
        )
    return files


def _short(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return visible(text if len(text) <= 60 else text[:57] + "…")


def _refuse_broken_links(folder: Path, pattern: str) -> None:
    """A weight file that is a link to nothing is what an interrupted download into the Hugging
    Face cache leaves; skipped, it made the folder look like it held no weights (or fewer)."""
    broken = sorted(p for p in folder.glob(pattern) if p.is_symlink() and not p.exists())
    if broken:
        raise CheckpointError(
            f"{visible(str(broken[0]))} is a link to a file that does not exist; the download is incomplete (download it again)"
        )


def find_weight_files(model_dir: str | Path) -> WeightFiles:
    """Locate the weights of a checkpoint folder (or a single weight file).

    Preference: safetensors (index, model.safetensors, any *.safetensors), then PyTorch `.bin`
    (index, pytorch_model.bin), then a TinyChat `.pt`.
    """
    path = Path(model_dir)
    shown = visible(str(path))
    if path.is_file():
        kind = {".safetensors": "safetensors", ".bin": "bin", ".pt": "tinychat"}.get(path.suffix)
        if kind is None:
            raise CheckpointError(f"{shown} is not a .safetensors, .bin or .pt weight file; pass the checkpoint folder")
        return WeightFiles(kind, (path,))
    if not path.is_dir():
        raise CheckpointError(f"model folder {shown} does not exist; pass --model with a checkpoint folder")

    # os.path.lexists: an index that is a broken link (an interrupted download into the Hugging Face
    # cache) is named by the reader, not taken for none
    if os.path.lexists(path / SAFETENSORS_INDEX):
        return WeightFiles("safetensors", _files_from_index(path / SAFETENSORS_INDEX, ".safetensors"), path / SAFETENSORS_INDEX)
    if (path / SAFETENSORS_SINGLE).is_file():
        return WeightFiles("safetensors", (path / SAFETENSORS_SINGLE,))
    loose = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    _refuse_broken_links(path, "*.safetensors")
    if loose:
        return WeightFiles("safetensors", tuple(loose))
    if os.path.lexists(path / BIN_INDEX):
        return WeightFiles("bin", _files_from_index(path / BIN_INDEX, ".bin"), path / BIN_INDEX)
    if (path / BIN_SINGLE).is_file():
        return WeightFiles("bin", (path / BIN_SINGLE,))
    loose = sorted(p for p in path.glob("pytorch_model*.bin") if p.is_file())
    _refuse_broken_links(path, "pytorch_model*.bin")
    if loose:
        return WeightFiles("bin", tuple(loose))
    tinychat = sorted(p for p in path.glob("*.pt") if p.is_file())
    if len(tinychat) == 1:
        return WeightFiles("tinychat", tuple(tinychat))
    if len(tinychat) > 1:
        raise CheckpointError(
            f"{shown} holds several .pt files ({', '.join(visible(p.name) for p in tinychat[:4])}); keep only the one to load"
        )
    raise CheckpointError(
        f"no weights in {shown} (no *.safetensors, pytorch_model*.bin or TinyChat *.pt); the download may be incomplete"
    )


# -------------------------------------------------------------------------------- reading


def _first_line(error: BaseException) -> str:
    """Library errors can span many lines; our messages are one sentence."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_LOADABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())


def _open_regular(path: Path, what: str):
    """`path` opened for binary reading if it is a regular file; a FIFO or a device is refused
    without blocking (opening a FIFO for reading waits for a writer forever)."""
    shown = visible(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise CheckpointError(f"cannot open {what} {shown} ({e.strerror or e}); check the file and its permissions") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{what} {shown} is not a regular file (a pipe or a device?); point --model at a checkpoint folder")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


# A header lists each tensor in ~100 bytes: InternVL3-78B's ~3,000 tensors take ~300 KiB. The
# library takes up to 100 MB (~1.5 million tensors), which costs ~1.5 GB and ~10 s to parse and
# list, twice per file (sizes first, then the weights): a file we did not write must not.
MAX_HEADER_BYTES = 16 << 20


def _check_header_size(path: Path, shown: str) -> None:
    with _open_regular(path, "weight file") as f:
        head = f.read(8)
    if len(head) == 8 and struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:  # a short file: the library says so
        size = struct.unpack("<Q", head)[0]
        raise CheckpointError(
            f"{shown} is not a safetensors file, or a damaged one (its header claims {size / 2**20:,.0f} MiB, "
            f"over the {MAX_HEADER_BYTES >> 20} MiB any checkpoint needs); download it again"
        )


def _safetensors_entries(path: Path, shown: str) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
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
                f"{shown} stores tensor {_short(name)} as {visible(dtype_name)}, which internvl-chat does not load; "
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
    with _open_regular(path, "weight file") as f:
        entries = _safetensors_entries(path, shown)
        for name, _, shape, _ in entries:
            if max_elements is not None and math.prod(shape) > max_elements:
                raise CheckpointError(
                    f"{shown} holds tensor {_short(name)} of shape {list(shape)}, larger than any tensor its config.json "
                    "implies; config.json and the weights disagree (a damaged file or another model)"
                )
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
                raise CheckpointError(f"{shown} is truncated (tensor {_short(name)} runs past the end); download it again")
            tensor = torch.frombuffer(buffer, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(shape)


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _pickle_refusal(path: Path, error: BaseException) -> CheckpointError:
    """One line for a pickle torch.load refused. torch's own text is never passed on: it advises
    loading with weights_only=False, which would run code from the file."""
    shown = visible(str(path))
    text = str(error)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return CheckpointError(
            f"{shown} holds Python objects besides tensors ({_short(refused[1])}) and is refused for safety: only plain "
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


def _torch_load(path: Path):
    """torch.load with weights_only=True (never anything else), memory-mapped where the format
    allows; legacy (non-zip) pickles cannot be mapped and are read whole."""
    _open_regular(path, "weight file").close()
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
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{shown} has a tensor name that is not a string ({_short(name)}); it is not a supported weights file")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{shown} holds {_short(name)} = a {type(value).__name__}, not a tensor; only plain state dicts of tensors load"
            )
        if value.layout != torch.strided or value.is_meta or value.is_quantized or value.dtype not in _LOADABLE_DTYPES:
            raise CheckpointError(
                f"{shown} holds {_short(name)} as a {str(value.dtype).removeprefix('torch.')} {value.layout} tensor, "
                "which internvl-chat does not load; only dense float/int tensors load"
            )
    return state


def _iter_file(path: Path, kind: str, max_elements: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Raw (name, tensor) pairs of one file; at most this one file's tensors are referenced."""
    if kind == "safetensors":
        yield from _iter_safetensors(path, max_elements)
        return
    state = _plain_state_dict(path, _torch_load(path))
    names = list(state)
    for name in names:
        yield name, state.pop(name)
    del state


def _detect_layout(model_dir: Path) -> str:
    from .config import load_config

    return load_config(model_dir).layout


def iter_tensors(model_dir: str | Path, layout: str | None = None,
                 max_elements: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Yield `(canonical_name, tensor)` one at a time, shard by shard, tensors in their stored dtype.

    `layout` is "original" or "hf" (read from config.json when None). Original names pass through;
    -hf names are renamed, and the vision q/k/v pieces of each layer are held until all three are
    read, then yielded fused. Unknown names pass through unchanged; rotary `inv_freq` is skipped.
    A safetensors tensor of more than `max_elements` (the model's largest) is refused unread.
    """
    model_dir = Path(model_dir)
    if layout is None:
        layout = _detect_layout(model_dir)
    if layout not in ("original", "hf"):
        raise ValueError(f"layout must be 'original' or 'hf', not {layout!r}")
    weights = find_weight_files(model_dir)
    pending: dict[str, list[torch.Tensor | None]] = {}  # fused qkv name → [q, k, v]
    fused: set[str] = set()  # those already yielded
    for path in weights.files:
        for name, tensor in _iter_file(path, weights.kind, max_elements):
            if _is_ignored(name):
                continue
            if layout == "original":
                yield name, tensor
                continue
            canonical = hf_to_canonical(name)
            if canonical is None:
                continue
            slot = qkv_slot(name)
            if slot is None:
                yield canonical, tensor
                continue
            parts = pending.setdefault(canonical, [None, None, None])
            if parts[slot] is not None or canonical in fused:  # a second copy would replace the first
                raise CheckpointError(f"the checkpoint holds tensor {_short(name)} twice; its shards overlap or it is damaged")
            parts[slot] = tensor
            if all(p is not None for p in parts):
                del pending[canonical]
                fused.add(canonical)
                yield canonical, _fused_qkv(canonical, parts)  # type: ignore[arg-type]
    if pending:
        name, parts = next(iter(pending.items()))
        lacking = [s for s, p in zip(_QKV_SLOTS, parts) if p is None]
        raise CheckpointError(
            f"the checkpoint has only part of the vision attention for {_short(name)} (no {', '.join(lacking)}); "
            "the download may be incomplete"
        )


def _fused_qkv(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The q, k, v row blocks of a -hf vision attention stacked into one tensor. They must be float
    pieces of one shape past their rows: torch.cat would otherwise fail with its own traceback, or
    promote integer or bool pieces to floats, hiding a damaged file the loader refuses elsewhere."""
    shapes = [tuple(p.shape) for p in parts]
    if any(not p.is_floating_point() for p in parts) or any(len(s) == 0 or s[1:] != shapes[0][1:] for s in shapes):
        pieces = ", ".join(f"{slot[0]} {list(s)} {str(p.dtype).removeprefix('torch.')}"
                           for slot, s, p in zip(_QKV_SLOTS, shapes, parts))  # fmt: skip
        raise CheckpointError(
            f"the vision attention pieces of {_short(name)} do not fit together ({pieces}); "
            "the weight file is damaged or belongs to another model"
        )
    return torch.cat(parts, dim=0)


def load_state_dict(model_dir: str | Path, layout: str | None = None) -> dict[str, torch.Tensor]:
    """All canonical tensors in one dict (for small models and tests; the engine streams instead)."""
    return dict(iter_tensors(model_dir, layout))
