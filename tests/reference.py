"""transformers' InternVLForConditionalGeneration as the reference implementation for tests.

`reference_model(dir)` loads either checkpoint layout into it (float32, eval, eager attention),
strictly: a missing or unexpected tensor fails loudly instead of leaving random weights behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from internvl_chat.engine.checkpoint import iter_tensors
from internvl_chat.engine.weight_names import canonical_to_hf
from internvl_chat.engine.tokenizer import load_tokenizer, special_token_ids


def reference_config_from_original(model_dir: str | Path):
    """An InternVLConfig equivalent to an original-layout (InternVLChatModel) config.json."""
    from transformers import InternVLConfig

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    v = raw["vision_config"]
    image_size = int(raw.get("force_image_size") or v["image_size"])
    vision = dict(
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_hidden_layers"],
        num_attention_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        norm_type=v.get("norm_type", "layer_norm"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        attention_bias=bool(v.get("qkv_bias", True)),
        use_qk_norm=bool(v.get("qk_normalization", False)),
        image_size=[image_size, image_size],
        patch_size=[v["patch_size"], v["patch_size"]],
        hidden_act=v.get("hidden_act", "gelu"),
        use_mean_pooling=True,  # InternViT has no final norm
    )
    text = {k: val for k, val in raw["llm_config"].items() if not k.startswith("_") and k != "use_bfloat16"}
    text["model_type"] = "qwen2"
    text["tie_word_embeddings"] = False
    special = special_token_ids(load_tokenizer(model_dir))
    side = int(image_size // v["patch_size"] * raw.get("downsample_ratio", 0.5))
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=special.img_context,
        image_seq_length=side * side,
        downsample_ratio=raw.get("downsample_ratio", 0.5),
        projector_hidden_act="gelu",
        vision_feature_layer=int(raw.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _layout(model_dir: Path) -> str:
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return "original" if raw.get("model_type") == "internvl_chat" else "hf"


def _float32() -> dict:
    """The float32 argument by the name the installed transformers takes: `dtype` since 5, `torch_dtype` in 4.x."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}


def reference_model(model_dir: str | Path):
    """The checkpoint in transformers' InternVLForConditionalGeneration, float32, eval, eager attention."""
    from transformers import InternVLForConditionalGeneration

    model_dir = Path(model_dir)
    if _layout(model_dir) == "hf":
        model, info = InternVLForConditionalGeneration.from_pretrained(
            str(model_dir), **_float32(), attn_implementation="eager", output_loading_info=True
        )
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            raise AssertionError(f"reference model did not load cleanly from {model_dir}: {problems}")
        return model.eval()

    config = reference_config_from_original(model_dir)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="eager", **_float32())
    state = {}
    for name, tensor in iter_tensors(model_dir, "original"):
        hf_names = canonical_to_hf(name, "new")
        for hf_name, piece in zip(hf_names, tensor.chunk(len(hf_names), dim=0)):
            state[hf_name] = piece.to(torch.float32)
    model.load_state_dict(state, strict=True)
    return model.float().eval()
