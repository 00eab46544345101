"""Find a checkpoint's weight files and read them one tensor at a time under canonical names.

Canonical names are the original OpenGVLab layout's names (SPEC §2, docs/architecture.md). The
transformers "-hf" layout, in both its prefix styles, is renamed to them; its split vision q/k/v are
fused back into `attn.qkv` (rows q, k, v). Reading is lazy: safetensors through `safe_open`, pickles
only through `torch.load(weights_only=True, mmap=True)`, one shard at a time.
"""

from __future__ import annotations

import json
import struct
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

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

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1 or self.index is not None


def _files_from_index(index: Path) -> tuple[Path, ...]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read the shard index {index}: {e!r}; the download may be incomplete") from None
    if not names:
        raise CheckpointError(f"the shard index {index} names no files; the download may be incomplete")
    files = tuple(index.parent / n for n in names)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{index.name} names {', '.join(missing)}, which is missing from {index.parent}; "
            "download the remaining shards"
        )
    return files


def find_weight_files(model_dir: str | Path) -> WeightFiles:
    """Locate the weights of a checkpoint folder (or a single weight file).

    Preference: safetensors (index, model.safetensors, any *.safetensors), then PyTorch `.bin`
    (index, pytorch_model.bin), then a TinyChat `.pt`.
    """
    path = Path(model_dir)
    if path.is_file():
        kind = {".safetensors": "safetensors", ".bin": "bin", ".pt": "tinychat"}.get(path.suffix)
        if kind is None:
            raise CheckpointError(f"{path} is not a .safetensors, .bin or .pt weight file; pass the checkpoint folder")
        return WeightFiles(kind, (path,))
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist; pass --model with a checkpoint folder")

    if (path / SAFETENSORS_INDEX).is_file():
        return WeightFiles("safetensors", _files_from_index(path / SAFETENSORS_INDEX), path / SAFETENSORS_INDEX)
    if (path / SAFETENSORS_SINGLE).is_file():
        return WeightFiles("safetensors", (path / SAFETENSORS_SINGLE,))
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return WeightFiles("safetensors", tuple(loose))
    if (path / BIN_INDEX).is_file():
        return WeightFiles("bin", _files_from_index(path / BIN_INDEX), path / BIN_INDEX)
    if (path / BIN_SINGLE).is_file():
        return WeightFiles("bin", (path / BIN_SINGLE,))
    loose = sorted(path.glob("pytorch_model*.bin"))
    if loose:
        return WeightFiles("bin", tuple(loose))
    tinychat = sorted(path.glob("*.pt"))
    if len(tinychat) == 1:
        return WeightFiles("tinychat", tuple(tinychat))
    if len(tinychat) > 1:
        raise CheckpointError(
            f"{path} holds several .pt files ({', '.join(p.name for p in tinychat)}); keep only the one to load"
        )
    raise CheckpointError(
        f"no weights in {path} (no *.safetensors, pytorch_model*.bin or TinyChat *.pt); the download may be incomplete"
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


def _safetensors_header(f, path: Path) -> tuple[dict, int]:
    try:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 << 20:
            raise ValueError(f"header of {length} bytes")
        header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: not a safetensors file ({e}); download it again") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read tensors with plain reads, one at a time, in file order.

    Memory-mapping (what safetensors' own reader does) would keep every touched page of the file
    resident until the file is closed, doubling peak memory when loading to the CPU.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_start = _safetensors_header(f, path)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            try:
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = tuple(info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path} describes tensor {name} in a way this reader does not support") from None
            if data_start + end > file_size:
                raise CheckpointError(f"{path} is truncated (tensor {name} runs past the end); download it again")
            buffer = bytearray(end - begin)
            f.seek(data_start + begin)
            f.readinto(buffer)
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(shape)


def _iter_file(path: Path, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Raw (name, tensor) pairs of one file; at most this one file's tensors are referenced."""
    if kind == "safetensors":
        yield from _iter_safetensors(path)
        return
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # legacy (non-zip) pickles cannot be memory-mapped
            raise CheckpointError(f"cannot read {path}: {_first_line(e)}; the file may be truncated or not a weights file") from None
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, including objects refused by weights_only
        raise CheckpointError(f"cannot read {path} safely: {_first_line(e)}; only plain tensor state dicts are loaded") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; it is not a supported weights file")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap the weights with optimizer/step entries
    names = list(state)
    for name in names:
        tensor = state.pop(name)
        if isinstance(tensor, torch.Tensor):
            yield name, tensor
    del state


def _detect_layout(model_dir: Path) -> str:
    from .config import load_config

    return load_config(model_dir).layout


def iter_tensors(model_dir: str | Path, layout: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(canonical_name, tensor)` one at a time, shard by shard, tensors in their stored dtype.

    `layout` is "original" or "hf" (read from config.json when None). Original names pass through;
    -hf names are renamed, and the vision q/k/v pieces of each layer are held until all three are
    read, then yielded fused. Unknown names pass through unchanged; rotary `inv_freq` is skipped.
    """
    model_dir = Path(model_dir)
    if layout is None:
        layout = _detect_layout(model_dir)
    if layout not in ("original", "hf"):
        raise ValueError(f"layout must be 'original' or 'hf', not {layout!r}")
    weights = find_weight_files(model_dir)
    pending: dict[str, list[torch.Tensor | None]] = {}  # fused qkv name → [q, k, v]
    for path in weights.files:
        for name, tensor in _iter_file(path, weights.kind):
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
            parts[slot] = tensor
            if all(p is not None for p in parts):
                del pending[canonical]
                yield canonical, torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if pending:
        name, parts = next(iter(pending.items()))
        lacking = [s for s, p in zip(_QKV_SLOTS, parts) if p is None]
        raise CheckpointError(
            f"the checkpoint has only part of the vision attention for {name} (no {', '.join(lacking)}); "
            "the download may be incomplete"
        )


def load_state_dict(model_dir: str | Path, layout: str | None = None) -> dict[str, torch.Tensor]:
    """All canonical tensors in one dict (for small models and tests; the engine streams instead)."""
    return dict(iter_tensors(model_dir, layout))
