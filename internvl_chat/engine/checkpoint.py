"""Read a checkpoint one tensor at a time under canonical names.

Canonical names are the original OpenGVLab layout's names (SPEC §2, docs/architecture.md): an
original checkpoint's pass through; a -hf one's are renamed (weight_names.py), its split vision
q/k/v fused back into `attn.qkv` (rows q, k, v). Reading is lazy, one shard at a time
(weight_files.py finds the shards, tensor_reader.py reads them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointError
from .tensor_reader import iter_file, shown_value
from .weight_files import DeclaredTensor, Payload, WeightFiles, find_weight_files
from .weight_names import EMBEDDING, LM_HEAD, QKV_SLOTS, hf_to_canonical, is_ignored, qkv_slot


def _detect_layout(model_dir: Path) -> str:
    from .config import load_config

    return load_config(model_dir).layout


def iter_tensors(model_dir: str | Path, layout: str | None = None, max_elements: int | None = None,
                 weights: WeightFiles | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Yield `(canonical_name, tensor)` one at a time, shard by shard, tensors in their stored dtype.

    `layout` is "original" or "hf" (read from config.json when None). Original names pass through;
    -hf names are renamed, and the vision q/k/v pieces of each layer are held until all three are
    read, then yielded fused. Unknown names pass through unchanged; rotary `inv_freq` is skipped.
    A tensor of more than `max_elements` (the model's largest) is refused unread (a pickle's before use).
    `weights`: the files to read, as the loader found and checked them (found again when None: a
    file added to the folder meanwhile, a model.safetensors beside checked .bin files, was read
    in their place).
    """
    model_dir = Path(model_dir)
    if layout is None:
        layout = _detect_layout(model_dir)
    if layout not in ("original", "hf"):
        raise ValueError(f"layout must be 'original' or 'hf', not {layout!r}")
    if weights is None:
        weights = find_weight_files(model_dir)
    pending: dict[str, list[torch.Tensor | None]] = {}  # fused qkv name → [q, k, v]
    fused: set[str] = set()  # those already yielded
    for path in weights.files:
        for name, tensor in iter_file(path, weights.kind, max_elements):
            if is_ignored(name):
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
                raise CheckpointError(f"the checkpoint holds tensor {shown_value(name)} twice; its shards overlap or it is damaged")
            parts[slot] = tensor
            if all(p is not None for p in parts):
                del pending[canonical]
                fused.add(canonical)
                yield canonical, _fused_qkv(canonical, parts)  # type: ignore[arg-type]
    if pending:
        name, parts = next(iter(pending.items()))
        lacking = [s for s, p in zip(QKV_SLOTS, parts) if p is None]
        raise CheckpointError(
            f"the checkpoint has only part of the vision attention for {shown_value(name)} (no {', '.join(lacking)}); "
            "the download may be incomplete"
        )


def stored_embeddings(weights: WeightFiles, payload: Payload, layout: str) -> list[DeclaredTensor]:
    """The token embeddings and lm_head the weight files store (either may be absent: a tied
    checkpoint stores one), as their files declare them, without reading their data: from what
    `payload` already read (safetensors headers, pickles' memory-mapped loads). The embeddings
    come first."""
    wanted = (EMBEDDING, LM_HEAD)

    def canonical(name: str) -> str | None:
        return name if layout == "original" else hf_to_canonical(name)

    found = [t for t in payload.declared if canonical(t.name) in wanted]
    return sorted(found, key=lambda t: wanted.index(canonical(t.name)))  # the embeddings first: they are the vocabulary


def stored_names(weights: WeightFiles, payload: Payload) -> list[tuple[Path, str]]:
    """(file, name as stored) of every tensor the weight files hold, data unread, from what
    `payload` already read (safetensors headers, pickles' memory-mapped loads); none for a
    TinyChat file, 4-bit by its format. A pickle shard index's weight_map is not taken for them:
    loading reads the shards, never its names, so an index that disagrees with its shards passed
    4-bit shards as 16-bit, or refused 16-bit ones."""
    if weights.kind == "tinychat":
        return []
    return [(t.file, t.name) for t in payload.declared]


def _fused_qkv(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The q, k, v row blocks of a -hf vision attention stacked into one tensor. They must be float
    pieces of one shape, rows included: torch.cat would otherwise fail with its own traceback, or
    promote integer or bool pieces to floats, hiding a damaged file the loader refuses elsewhere;
    and InternViT's q, k and v are each hidden_size rows (transformers refuses anything else), so
    pieces of unequal rows that only add up to the fused size are no -hf file either."""
    shapes = [tuple(p.shape) for p in parts]
    if any(not p.is_floating_point() for p in parts) or any(len(s) == 0 or s != shapes[0] for s in shapes):
        pieces = ", ".join(f"{slot[0]} {list(s)} {str(p.dtype).removeprefix('torch.')}"
                           for slot, s, p in zip(QKV_SLOTS, shapes, parts))  # fmt: skip
        raise CheckpointError(
            f"the vision attention pieces of {shown_value(name)} do not fit together ({pieces}); "
            "the weight file is damaged or belongs to another model"
        )
    return torch.cat(parts, dim=0)


def load_state_dict(model_dir: str | Path, layout: str | None = None) -> dict[str, torch.Tensor]:
    """All canonical tensors in one dict (for small models and tests; the engine streams instead)."""
    return dict(iter_tensors(model_dir, layout))
