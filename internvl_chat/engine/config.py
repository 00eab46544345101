"""One ModelConfig parsed from any supported checkpoint layout's config.json.

Two layouts exist (SPEC §2): the original OpenGVLab one (`InternVLChatModel`, `llm_config`,
`vision_config`) and transformers' "-hf" one (`InternVLForConditionalGeneration`, `text_config`).
Everything the engine needs is read here, once; nothing downstream looks at raw JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

ORIGINAL_ARCH = "InternVLChatModel"
HF_ARCH = "InternVLForConditionalGeneration"
SUPPORTED_LLMS = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    norm_type: str  # "layer_norm" (InternViT-300M) or "rms_norm" (InternViT-6B)
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool  # RMSNorm over the full width of q and k (6B style)
    image_size: int = 448
    patch_size: int = 14

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class QuantConfig:
    method: str = "awq"
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"


@dataclass(frozen=True)
class ModelConfig:
    layout: str  # "original" or "hf"
    vision: VisionConfig
    text: TextConfig
    downsample_ratio: float = 0.5
    select_layer: int = -1
    template: str = "internvl2_5"
    system_message: str | None = DEFAULT_SYSTEM_MESSAGE
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    quant: QuantConfig | None = None
    torch_dtype: str = "bfloat16"

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.vision.grid * self.downsample_ratio)
        return side * side


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return default


def _as_int(value: Any) -> int:
    # the -hf layout stores image and patch sizes as [h, w] pairs
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"non-square size {value} is not supported; InternVL uses square tiles")
        value = value[0]
    return int(value)


def _text_config(raw: dict[str, Any], where: str) -> TextConfig:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type", "")
    if any("InternLM2" in a for a in archs) or model_type == "internlm2":
        raise CheckpointError(
            f"the LLM in {where} is InternLM2 (InternVL3-9B layout), which internvl-chat does not support; "
            "use a Qwen2-based InternVL3 checkpoint (1B, 2B, 8B, 14B, 38B, 78B)"
        )
    if archs and not any(a in SUPPORTED_LLMS for a in archs) or (model_type and model_type != "qwen2"):
        raise CheckpointError(
            f"unsupported LLM {archs or model_type} in {where}; internvl-chat supports Qwen2-based InternVL3 checkpoints"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        rope = raw.get("rope_parameters") or {}
        return TextConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_first(raw, "rope_theta", default=rope.get("rope_theta", 1e6))),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks the key {e.args[0]!r}; the checkpoint's config.json is incomplete") from None


def _vision_config(raw: dict[str, Any], layout: str) -> VisionConfig:
    try:
        if layout == "original":
            qkv_bias = bool(raw.get("qkv_bias", True))
            qk_norm = bool(raw.get("qk_normalization", False))
        else:
            qkv_bias = bool(raw.get("attention_bias", False))
            qk_norm = bool(raw.get("use_qk_norm", False))
        norm_type = raw.get("norm_type", "layer_norm")
        if norm_type not in ("layer_norm", "rms_norm"):
            raise CheckpointError(f"unknown vision norm_type {norm_type!r}; expected layer_norm or rms_norm")
        hidden_act = raw.get("hidden_act", "gelu")
        if hidden_act != "gelu":
            raise CheckpointError(f"unsupported vision activation {hidden_act!r}; InternViT uses exact gelu")
        return VisionConfig(
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]),
            norm_type=norm_type,
            norm_eps=float(raw.get("layer_norm_eps", 1e-6)),
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            image_size=_as_int(raw.get("image_size", 448)),
            patch_size=_as_int(raw.get("patch_size", 14)),
        )
    except KeyError as e:
        raise CheckpointError(f"vision_config lacks the key {e.args[0]!r}; the checkpoint's config.json is incomplete") from None


def _quant_config(raw: dict[str, Any] | None) -> QuantConfig | None:
    if not raw:
        return None
    method = str(raw.get("quant_method", "")).lower()
    if method != "awq":
        raise CheckpointError(f"quantization method {method!r} is not supported; internvl-chat loads AWQ 4-bit checkpoints")
    q = QuantConfig(
        method="awq",
        bits=int(raw.get("bits", raw.get("w_bit", 4))),
        group_size=int(raw.get("group_size", raw.get("q_group_size", 128))),
        zero_point=bool(raw.get("zero_point", True)),
        version=str(raw.get("version", "gemm")).lower(),
    )
    if q.bits != 4:
        raise CheckpointError(f"AWQ with {q.bits} bits is not supported; only 4-bit AWQ checkpoints load")
    if q.version != "gemm":
        raise CheckpointError(f"AWQ version {q.version!r} is not supported; only the 'gemm' packing loads")
    if q.group_size <= 0 or q.group_size % 32:
        raise CheckpointError(f"AWQ group size {q.group_size} is not supported; use a multiple of 32 (128 is standard)")
    if not q.zero_point:
        raise CheckpointError("AWQ without zero points is not supported; quantize with zero_point=true")
    return q


def read_config_json(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise CheckpointError(f"model folder {model_dir} does not exist; pass --model with a checkpoint folder")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a folder; pass --model with the checkpoint folder, not a file")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; point --model at a downloaded InternVL3 checkpoint folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; the download may be incomplete") from None


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type", "")
    if ORIGINAL_ARCH in archs or model_type == "internvl_chat":
        layout = "original"
        text_raw, vision_raw = raw.get("llm_config"), raw.get("vision_config")
        if text_raw is None or vision_raw is None:
            raise CheckpointError("config.json of an InternVLChatModel lacks llm_config or vision_config; the checkpoint is incomplete")
    elif HF_ARCH in archs or model_type == "internvl":
        layout = "hf"
        text_raw, vision_raw = raw.get("text_config"), raw.get("vision_config")
        if text_raw is None or vision_raw is None:
            raise CheckpointError("config.json of an InternVLForConditionalGeneration lacks text_config or vision_config")
        text_raw = {"model_type": "qwen2", **text_raw}
    else:
        raise CheckpointError(
            f"unknown architecture {archs or model_type or '(none)'}; internvl-chat loads InternVL3 checkpoints "
            f"({ORIGINAL_ARCH} or {HF_ARCH})"
        )

    text = _text_config(text_raw, "llm_config" if layout == "original" else "text_config")
    vision = _vision_config(vision_raw, layout)
    quant = _quant_config(text_raw.get("quantization_config") or raw.get("quantization_config"))
    if layout == "original":
        select_layer = int(raw.get("select_layer", -1))
        image_size = _as_int(raw.get("force_image_size") or vision.image_size)
        if image_size != vision.image_size:
            vision = VisionConfig(**{**vision.__dict__, "image_size": image_size})
        ps_version = raw.get("ps_version", "v2")
        if ps_version != "v2":
            raise CheckpointError(f"pixel shuffle {ps_version!r} is not supported; InternVL3 uses ps_version v2")
        template = raw.get("template") or "internvl2_5"
    else:
        select_layer = int(raw.get("vision_feature_layer", -1))
        template = "internvl2_5"
    if select_layer != -1:
        raise CheckpointError(f"select_layer {select_layer} is not supported; InternVL3 uses the last ViT layer (-1)")
    system_message = raw.get("system_message")
    if layout == "original" and system_message is None:
        system_message = DEFAULT_SYSTEM_MESSAGE
    dtype = str(_first(text_raw, "torch_dtype", "dtype", default=_first(raw, "torch_dtype", "dtype", default="bfloat16")))
    return ModelConfig(
        layout=layout,
        vision=vision,
        text=text,
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        select_layer=select_layer,
        template=template,
        system_message=system_message,  # the -hf template adds no system prompt (SPEC §2)
        max_dynamic_patch=int(raw.get("max_dynamic_patch", 12)),
        use_thumbnail=bool(raw.get("use_thumbnail", True)),
        quant=quant,
        torch_dtype=dtype,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    return parse_config(read_config_json(Path(model_dir)))
