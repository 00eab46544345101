"""Weight names between the transformers "-hf" layout and the canonical one.

Canonical names are the original OpenGVLab layout's names (SPEC §2, docs/architecture.md). The -hf
layout, in both its prefix styles, is renamed to them; its split vision q/k/v are the row blocks
(q, k, v) of the canonical fused `attn.qkv`.
"""

from __future__ import annotations

import re

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
QKV_SLOTS = ("q_proj", "k_proj", "v_proj")
# canonical names of the token embeddings and the output head: [vocab_size, hidden_size] each
EMBEDDING = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"

# prefixes of the two -hf styles: (vision tower, projector, language model body, lm_head)
_HF_PREFIXES = {
    "new": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head."),
    "legacy": ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head."),
}

_HF_VISION_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_VISION_LAMBDA = re.compile(r"encoder\.layer\.(\d+)\.lambda_([12])$")
_ORIG_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ORIG_VISION_LS = re.compile(r"encoder\.layers\.(\d+)\.ls([12])$")


def is_ignored(name: str) -> bool:
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
        if module in ("attention." + s for s in QKV_SLOTS):
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
    if is_ignored(name):
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
            if m and m[2].startswith("attention.") and m[2][len("attention.") :] in QKV_SLOTS:
                return QKV_SLOTS.index(m[2][len("attention.") :])
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
                return [f"{vision}encoder.layer.{layer}.attention.{s}.{leaf}" for s in QKV_SLOTS]
            if module in _VISION_LAYER_ORIG_TO_HF:
                return [f"{vision}encoder.layer.{layer}.{_VISION_LAYER_ORIG_TO_HF[module]}.{leaf}"]
    return [name]
