"""One ModelConfig parsed from any supported checkpoint layout's config.json, fully validated.

Two layouts exist (SPEC §2): the original OpenGVLab one (`InternVLChatModel`, `llm_config`,
`vision_config`) and transformers' "-hf" one (`InternVLForConditionalGeneration`, `text_config`).
Everything the engine needs is read here, once; nothing downstream looks at raw JSON.

config.json is a file we did not write: every field the engine uses is checked for its JSON type
(a string is never a number, a bool never an integer; checkpoint_json.py's Fields), its range and
the divisibilities the model's shapes rely on, with caps so that an absurd size never reaches an
allocator. Any problem is one CheckpointError line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files import is_web_address, visible
from .checkpoint_json import Fields, read_json_object, shown_json

DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

ORIGINAL_ARCH = "InternVLChatModel"
HF_ARCH = "InternVLForConditionalGeneration"
SUPPORTED_LLMS = ("Qwen2ForCausalLM",)

# Caps far above every published InternVL3 size (72B: hidden 8192, 80 layers, 64 heads, FFN 29568,
# 151,674 rows; ViT-6B: 3200 wide, 45 layers), low enough that a lying config cannot ask for
# exabytes. The weights-versus-files check in the loader bounds the products of these.
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_INTERMEDIATE = 1 << 18
MAX_VOCAB = 1 << 21
MAX_POSITIONS = 1 << 24
MIN_POSITIONS = 16  # the smallest --max-context the app takes: a model with fewer could never be used
MAX_IMAGE_SIZE = 4096
MAX_GRID = 128  # patches per tile side (InternVL: 448 / 14 = 32)
MAX_TILES = 64  # dynamic tiling limit; the candidate search is cubic in it
AWQ_GROUP_MULTIPLE = 32  # the 4-bit kernels take group sizes that are multiples of this (128 is standard)
TEMPLATES = ("internvl2_5",)  # config.json's `template`: the prompt formats chat/template.py builds
# θ where config.json gives none: Qwen2Config's default in transformers 5 (default_theta) and in the
# transformers 4 InternVL's own code builds on. InternVL3's configs all give 1e6 (SPEC §1); the
# engine took 1e6 for a missing one too, and so ran such a config unlike both references.
ROPE_THETA_DEFAULT = 10000.0
ROPE_TYPES = ("default", "dynamic")  # dynamic NTK changes nothing within max_position_embeddings


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
    # tie lm_head to the embeddings where one of the two is absent (transformers' rule, see below)
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
    min_dynamic_patch: int = 1
    dynamic_image_size: bool = True
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

    def tile_limits(self, max_tiles: int | None = None) -> tuple[int, int]:
        """(min, max) tiles per image as the reference preprocessing uses them.

        `max_tiles` is the user's limit; None (or 0) means the checkpoint's `max_dynamic_patch`.
        Without `dynamic_image_size` an image is always one tile. The checkpoint's minimum never
        exceeds the user's maximum (the user's limit wins).
        """
        if not self.dynamic_image_size:
            return 1, 1
        high = max_tiles or self.max_dynamic_patch
        return min(self.min_dynamic_patch, high), high

    def weight_elements(self) -> int:
        """A lower bound on the number of weight elements this config implies (lm_head counted
        once with the embeddings: tied checkpoints store only one of them)."""
        v, t = self.vision, self.text
        c = v.hidden_size
        vision = 3 * v.patch_size**2 * c + (v.grid**2 + 2) * c
        vision += v.num_layers * (4 * c * c + 2 * c * v.intermediate_size)
        projector = 4 * c * t.hidden_size + t.hidden_size * t.hidden_size
        h = t.hidden_size
        layer = h * (t.q_size + 2 * t.kv_size) + t.q_size * h + 3 * h * t.intermediate_size
        return vision + projector + t.vocab_size * h + t.num_layers * layer


# -------------------------------------------------------------------------------- sections


def _quoted(text: str) -> str:
    """A name from the file, quoted for an error message: short, and safe to print."""
    return visible(repr(text if len(text) <= 40 else text[:37] + "…"))


# The LLMs of other InternVL models, by model_type and architecture: named as what the checkpoint
# is (an InternVL3.5 was "unsupported LLM ["Qwen3ForCausalLM"]", an InternVL2.5-8B "InternVL3-9B layout")
OTHER_LLMS = (
    ("internlm2", "InternLM2", "InternLM2 (InternVL3-9B, or an InternLM-based InternVL2/2.5)"),
    ("qwen3", "Qwen3For", "Qwen3 (InternVL3.5)"),
    ("qwen3_moe", "Qwen3Moe", "Qwen3-MoE (InternVL3.5-30B-A3B or -241B-A28B)"),
    ("gpt_oss", "GptOss", "GPT-OSS (InternVL3.5-GPT-OSS)"),
    ("llama", "LlamaFor", "Llama (as in InternVL2-Llama3-76B)"),
    ("phi3", "Phi3For", "Phi-3 (as in InternVL2-4B)"),
)  # fmt: skip


def _check_llm_kind(f: Fields) -> None:
    archs = f.names("architectures")
    model_type = f.text("model_type", "")
    for other_type, arch_prefix, family in OTHER_LLMS:
        if model_type == other_type or any(a.startswith(arch_prefix) for a in archs):
            raise CheckpointError(
                f"the LLM in {f.path} is {family}, which internvl-chat does not support; "
                "use a Qwen2-based InternVL3 checkpoint (1B, 2B, 8B, 14B, 38B, 78B)"
            )
    if archs and not any(a in SUPPORTED_LLMS for a in archs) or (model_type and model_type != "qwen2"):
        raise CheckpointError(
            f"unsupported LLM {shown_json(archs or model_type)} in {f.path}; "
            "internvl-chat supports Qwen2-based InternVL3 checkpoints"
        )


def _rope_theta(f: Fields) -> float:
    """rope_theta, and a refusal for RoPE variants this engine does not compute."""
    params = f.child("rope_parameters", required=False)  # transformers ≥ 5
    scaling = f.child("rope_scaling", required=False)
    for section in (params, scaling):
        if section is None:
            continue
        nested = [key for key, value in section.raw.items() if isinstance(value, dict)]
        if nested:  # transformers' per-layer-type form: read flat, its scaling and θ went unseen
            raise CheckpointError(
                f"{f.source}: {section.path} gives RoPE parameters per layer type ({_quoted(nested[0])}), which Qwen2 "
                "does not take (transformers fails on it); InternVL3 checkpoints give one set for all layers"
            )
        kind = section.text("rope_type", None) or section.text("type", None) or "default"
        if kind not in ROPE_TYPES:
            raise CheckpointError(
                f"{f.source}: {section.path} asks for {_quoted(kind)} RoPE scaling, which internvl-chat does not "
                "compute; InternVL3 checkpoints use default or dynamic RoPE"
            )
    # transformers 5's order (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): a non-empty
    # rope_scaling takes rope_parameters' place, its rope_theta comes first, the top-level
    # rope_theta only where it has none. Taking the top-level one first ran a config that holds
    # both with another θ than transformers does.
    top = f.number("rope_theta", 0.0, 1e12, default=None)  # checked even where a section's wins
    section = scaling if scaling is not None and scaling.raw else params
    if section is not None and section.has("rope_theta"):
        return section.number("rope_theta", 0.0, 1e12)
    return ROPE_THETA_DEFAULT if top is None else top


def _text_config(f: Fields, tie_word_embeddings: bool) -> TextConfig:
    _check_llm_kind(f)
    if f.text("hidden_act", "silu") != "silu":
        raise f.refuse("hidden_act", '"silu" (Qwen2 uses SwiGLU)')
    if f.flag("use_sliding_window", False):
        raise CheckpointError(
            f"{f.source}: {f.path}.use_sliding_window is true; internvl-chat computes full attention only "
            "(InternVL3 checkpoints set it to false)"
        )
    hidden = f.integer("hidden_size", 1, MAX_HIDDEN)
    heads = f.integer("num_attention_heads", 1, MAX_HEADS)
    kv_heads = f.integer("num_key_value_heads", 1, heads, default=heads)
    if heads % kv_heads:
        raise f.refuse("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
    if f.has("head_dim"):
        head_dim = f.integer("head_dim", 2, MAX_HIDDEN)
    else:
        if hidden % heads:
            raise f.refuse("num_attention_heads", f"a divisor of hidden_size ({hidden})")
        head_dim = hidden // heads
    if head_dim % 2:
        raise CheckpointError(
            f"{f.source}: {f.path} gives a head size of {head_dim}, which is odd; rotary embeddings need an even one"
        )
    if heads * head_dim > MAX_HIDDEN:
        raise f.refuse("num_attention_heads", f"at most {MAX_HIDDEN // head_dim:,} heads of size {head_dim}")
    # The KV cache and the rotary tables are sized by this width, not by the weights: a 9 MB
    # checkpoint of hidden_size 8 and 64 heads of 1,024 allocated 16 GiB of cache. Qwen2's
    # attention is exactly as wide as its hidden size; twice that is the most allowed.
    if heads * head_dim > 2 * hidden:
        raise CheckpointError(
            f"{f.source}: {f.path} gives attention of {heads} heads × head_dim {head_dim} = {heads * head_dim:,}, "
            f"over twice its hidden_size ({hidden}); Qwen2's attention is as wide as its hidden size "
            f"(the checkpoint's config.json is damaged or was edited)"
        )
    return TextConfig(
        vocab_size=f.integer("vocab_size", 1, MAX_VOCAB),
        hidden_size=hidden,
        num_layers=f.integer("num_hidden_layers", 1, MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=f.integer("intermediate_size", 1, MAX_INTERMEDIATE),
        rms_norm_eps=f.number("rms_norm_eps", 0.0, 1.0, default=1e-6),
        rope_theta=_rope_theta(f),
        max_position_embeddings=f.integer("max_position_embeddings", MIN_POSITIONS, MAX_POSITIONS, default=32768),
        tie_word_embeddings=tie_word_embeddings,
    )


def _vision_config(f: Fields, layout: str, image_size: int | None) -> VisionConfig:
    if layout == "original":
        qkv_bias = f.flag("qkv_bias", True)
        qk_norm = f.flag("qk_normalization", False)
    else:
        qkv_bias = f.flag("attention_bias", False)
        qk_norm = f.flag("use_qk_norm", False)
    norm_type = f.text("norm_type", "layer_norm")
    if norm_type not in ("layer_norm", "rms_norm"):
        raise f.refuse("norm_type", '"layer_norm" or "rms_norm"')
    if f.text("hidden_act", "gelu") != "gelu":
        raise f.refuse("hidden_act", '"gelu" (InternViT uses exact GELU)')
    f.integer("num_channels", 3, 3, default=3)  # the patch embedding reads RGB
    hidden = f.integer("hidden_size", 1, MAX_HIDDEN)
    heads = f.integer("num_attention_heads", 1, MAX_HEADS)
    if hidden % heads:
        raise f.refuse("num_attention_heads", f"a divisor of hidden_size ({hidden})")
    patch = f.square_size("patch_size", 1, MAX_IMAGE_SIZE, default=14)
    if image_size is None:
        image_size = f.square_size("image_size", 1, MAX_IMAGE_SIZE, default=448)
    if image_size % patch:
        raise CheckpointError(
            f"{f.source}: the image size {image_size} is not a multiple of {f.path}.patch_size ({patch}); "
            "the checkpoint's config.json is damaged or was edited"
        )
    grid = image_size // patch
    if grid > MAX_GRID or grid % 2:
        raise CheckpointError(
            f"{f.source}: {f.path} gives {grid}×{grid} patches per tile ({image_size} / {patch}); "
            f"InternVL needs an even number of at most {MAX_GRID} (448 / 14 = 32)"
        )
    return VisionConfig(
        hidden_size=hidden,
        num_layers=f.integer("num_hidden_layers", 1, MAX_LAYERS),
        num_heads=heads,
        intermediate_size=f.integer("intermediate_size", 1, MAX_INTERMEDIATE),
        norm_type=norm_type,
        norm_eps=f.number("layer_norm_eps", 0.0, 1.0, default=1e-6),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        image_size=image_size,
        patch_size=patch,
    )


def _quant_config(f: Fields | None, text: TextConfig) -> QuantConfig | None:
    if f is None or not f.raw:
        return None
    method = f.text("quant_method", "").lower()
    if method != "awq":
        raise CheckpointError(
            f"quantization method {_quoted(method)} is not supported; internvl-chat loads AWQ 4-bit checkpoints"
        )
    bits = f.integer("bits", 1, 64, default=None)
    bits = f.integer("w_bit", 1, 64, default=4) if bits is None else bits
    group = f.integer("group_size", -1, 1 << 16, default=None)
    group = f.integer("q_group_size", -1, 1 << 16, default=128) if group is None else group
    q = QuantConfig(
        method="awq", bits=bits, group_size=group, zero_point=f.flag("zero_point", True), version=f.text("version", "gemm").lower()
    )
    if q.bits != 4:
        raise CheckpointError(f"AWQ with {q.bits} bits is not supported; only 4-bit AWQ checkpoints load")
    if q.version != "gemm":
        raise CheckpointError(f"AWQ version {_quoted(q.version)} is not supported; only the 'gemm' packing loads")
    if q.group_size <= 0 or q.group_size % AWQ_GROUP_MULTIPLE:
        raise CheckpointError(f"AWQ group size {q.group_size} is not supported; use a multiple of 32 (128 is standard)")
    if not q.zero_point:
        raise CheckpointError("AWQ without zero points is not supported; quantize with zero_point=true")
    # every quantized linear's input width must hold whole groups; output widths pack 8 per int32
    for width, what in ((text.hidden_size, "hidden_size"), (text.q_size, "the attention width"),
                        (text.intermediate_size, "intermediate_size")):  # fmt: skip
        if width % q.group_size:
            raise CheckpointError(
                f"AWQ group size {q.group_size} does not divide {what} ({width}); the checkpoint's config.json is inconsistent"
            )
    for width, what in ((text.kv_size, "the key/value width"), (text.q_size, "the attention width"),
                        (text.hidden_size, "hidden_size"), (text.intermediate_size, "intermediate_size")):  # fmt: skip
        if width % 8:
            raise CheckpointError(f"4-bit packing needs {what} ({width}) to be a multiple of 8; the checkpoint's config.json is inconsistent")
    return q


# -------------------------------------------------------------------------------- files


def read_config_json(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    shown = visible(str(model_dir))
    path = model_dir / "config.json"
    try:
        if not model_dir.exists():
            advice = hub_download_advice(model_dir) or "pass --model with a checkpoint folder"
            raise CheckpointError(f"model folder {shown} does not exist; {advice}")
        if not model_dir.is_dir():
            raise CheckpointError(f"{shown} is not a folder; pass --model with the checkpoint folder, not a file"
                                  + holding_folder_note(model_dir))  # fmt: skip
        if not os.path.lexists(path):  # a broken link is named by the reader
            snapshot = _cached_snapshot(model_dir)
            if snapshot is not None:
                raise CheckpointError(f"{shown} is a Hugging Face cache folder; pass --model {visible(str(snapshot))}, "
                                      "the checkpoint inside it")  # fmt: skip
            raise CheckpointError(f"{shown} has no config.json; point --model at a downloaded InternVL3 "
                                  "checkpoint folder")  # fmt: skip
    except OSError as e:  # not ENOENT: a name too long for the file system, say
        raise CheckpointError(f"cannot use model folder {shown} ({e.strerror or e}); "
                              "pass --model with a checkpoint folder") from None  # fmt: skip
    return read_json_object(path, "the checkpoint's config.json")


def holding_folder_note(path: Path) -> str:
    """The end of a "not a folder" line for a file given in place of its checkpoint folder (its
    config.json, a weight file): `(FOLDER holds it)` where the folder it is in is one, else nothing."""
    return f" ({visible(str(path.parent))} holds it)" if os.path.isfile(path.parent / "config.json") else ""


# A Hugging Face model id (ORG/NAME), or its web address as people paste it for --model (Path has
# already folded the address's "//" into one)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_HUB_ADDRESS = re.compile(r"https?:/+(?:www\.)?(?:huggingface|hf)\.co/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:/.*)?")


def refuse_web_model(typed: str | Path, what: str = "model folder", otherwise: str = "pass --model with a checkpoint folder") -> None:
    """A CheckpointError for a model folder (`what`) typed as a web address, naming it as typed: it
    was shown as the Path it became ("model folder https:/huggingface.co/… does not exist").
    `otherwise` is the advice for an address that is not a Hugging Face model's."""
    text = os.fspath(typed)
    if is_web_address(text):
        advice = hub_download_advice(Path(text)) or otherwise
        raise CheckpointError(f"{what} {visible(text)} does not exist; {advice}")


def hub_download_advice(model_dir: Path) -> str | None:
    """What to do with a missing folder named like a Hugging Face model id or address: use the
    snapshot in the local cache if it holds one, else download it (internvl-chat never does). It
    was told only "does not exist; pass --model with a checkpoint folder". A path whose first
    folder exists here is a local path with a typo, not an id."""
    text = str(model_dir)
    address = _HUB_ADDRESS.fullmatch(text)
    if address is not None:
        model_id = address[1]
    elif _HUB_ID.fullmatch(text) and not os.path.lexists(model_dir.parent):
        model_id = text
    else:
        return None
    org, name = model_id.split("/")
    snapshot = _cached_snapshot(_hub_cache() / f"models--{org}--{name}")
    if snapshot is not None:
        return f"the Hugging Face cache holds {visible(model_id)}: give its folder {visible(str(snapshot))}"
    return (f"internvl-chat does not download models: for the Hugging Face model {visible(model_id)}, download it first "
            f"(hf download {visible(model_id)}) and give the folder it prints")  # fmt: skip


def _hub_cache() -> Path:
    """Where huggingface_hub keeps its downloads: $HF_HUB_CACHE, $HF_HOME/hub, or ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    # expanduser leaves "~" as it is where no home is known (Path.home() raises there)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "huggingface" / "hub"


def _cached_snapshot(model_dir: Path) -> Path | None:
    """The checkpoint in a Hugging Face cache folder (hub/models--ORG--NAME, which `ls` shows, holds
    it in snapshots/REVISION/), the newest revision if several; None for any other folder."""
    found = []
    try:
        for config in (model_dir / "snapshots").glob("*/config.json"):
            try:
                found.append((config.stat().st_mtime, config.parent))
            except OSError:  # a link to a blob an interrupted download never wrote: another revision may be whole
                continue
    except OSError:
        return None
    return max(found)[1] if found else None


def _read_hf_tiling(model_dir: Path) -> dict[str, Any]:
    """The -hf layout keeps its tile limits in preprocessor_config.json (`min_patches`,
    `max_patches`); transformers' InternVL processor always tiles (crop_to_patches)."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not os.path.lexists(path):  # a broken link is named by the reader, not taken for none
        return {}
    f = Fields(read_json_object(path, "the checkpoint's preprocessor_config.json"), "", visible(str(path)), path.name)
    high = f.integer("max_patches", 1, MAX_TILES, default=12)
    low = f.integer("min_patches", 1, high, default=1)
    return {"max_dynamic_patch": high, "min_dynamic_patch": low}


# -------------------------------------------------------------------------------- parsing


def parse_config(raw: Any, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from the parsed config.json; `source` names the file in error messages."""
    top = Fields(raw, "", source)
    archs = top.names("architectures")
    model_type = top.text("model_type", "")
    if ORIGINAL_ARCH in archs or model_type == "internvl_chat":
        layout = "original"
        text_f, vision_f = top.child("llm_config"), top.child("vision_config")
    elif HF_ARCH in archs or model_type == "internvl":
        layout = "hf"
        text_f, vision_f = top.child("text_config"), top.child("vision_config")
        text_f.raw = {"model_type": "qwen2", **text_f.raw}
    elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):  # a plain Qwen2, Llama…: no vision at all
        raise CheckpointError(
            f"{source} describes a text-only language model ({shown_json(archs)}), not a vision-language one; "
            f"internvl-chat loads InternVL3 checkpoints ({ORIGINAL_ARCH} or {HF_ARCH})"
        )
    else:
        raise CheckpointError(
            f"unknown architecture {shown_json(archs or model_type or '(none)')}; internvl-chat loads InternVL3 "
            f"checkpoints ({ORIGINAL_ARCH} or {HF_ARCH})"
        )

    # Which flag ties lm_head to the embeddings follows the reference implementation of each
    # layout: transformers ≥ 5 reads InternVLConfig's own top-level `tie_word_embeddings` (default
    # true; `text_config`'s is not consulted), the original code builds Qwen2ForCausalLM from
    # `llm_config`, whose flag (default false) decides.
    if layout == "hf":
        tie = top.flag("tie_word_embeddings", True)
    else:
        tie = text_f.flag("tie_word_embeddings", False)
    text = _text_config(text_f, tie)
    quant_f = text_f.child("quantization_config", required=False) or top.child("quantization_config", required=False)
    quant = _quant_config(quant_f, text)

    if layout == "original":
        select_layer = top.integer("select_layer", -MAX_LAYERS, MAX_LAYERS, default=-1)
        image_size = top.square_size("force_image_size", 1, MAX_IMAGE_SIZE, default=None)
        if top.text("ps_version", "v2") != "v2":
            raise top.refuse("ps_version", '"v2" (InternVL3 uses pixel shuffle v2)')
        template = top.text("template", "internvl2_5")
        if template not in TEMPLATES:  # the field was read and never used: any prompt format ran as ChatML
            raise CheckpointError(
                f"{source}: template {_quoted(template)} names a chat template internvl-chat does not build; it builds "
                f"{' and '.join(map(repr, TEMPLATES))} (InternVL2.5's and InternVL3's): use an InternVL3 checkpoint "
                "with the config.json published with it"
            )
        high = top.integer("max_dynamic_patch", 1, MAX_TILES, default=12)
        tiling = {
            "max_dynamic_patch": high,
            "min_dynamic_patch": top.integer("min_dynamic_patch", 1, high, default=1),
            "dynamic_image_size": top.flag("dynamic_image_size", True),
            "use_thumbnail": top.flag("use_thumbnail", True),
        }
    else:
        select_layer = top.integer("vision_feature_layer", -MAX_LAYERS, MAX_LAYERS, default=-1)
        # what the engine computes (as the original layout always does); transformers would follow
        # another value here, so a config that names one is a different model, not this one's
        if top.text("projector_hidden_act", "gelu") != "gelu":
            raise top.refuse("projector_hidden_act", '"gelu" (InternVL\'s projector uses exact GELU)')
        if top.text("vision_feature_select_strategy", "default") != "default":
            raise top.refuse("vision_feature_select_strategy", '"default" (InternVL drops the ViT\'s CLS token)')
        image_size = None
        template = "internvl2_5"
        tiling = {}
    if select_layer != -1:
        raise CheckpointError(f"select_layer {select_layer} is not supported; InternVL3 uses the last ViT layer (-1)")
    vision = _vision_config(vision_f, layout, image_size)
    ratio = top.number("downsample_ratio", 0.0, 1.0, default=0.5)
    if ratio != 0.5:
        raise CheckpointError(f"downsample_ratio {ratio:g} is not supported; InternVL3 uses 0.5")
    system_message = top.text("system_message", None)
    if layout == "original" and system_message is None:
        system_message = DEFAULT_SYSTEM_MESSAGE
    dtype = text_f.text("torch_dtype", None) or text_f.text("dtype", None)
    dtype = dtype or top.text("torch_dtype", None) or top.text("dtype", None) or "bfloat16"
    return ModelConfig(
        layout=layout,
        vision=vision,
        text=text,
        downsample_ratio=ratio,
        select_layer=select_layer,
        template=template,
        system_message=system_message,  # the -hf template adds no system prompt (SPEC §2)
        quant=quant,
        torch_dtype=dtype,
        **tiling,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    cfg = parse_config(read_config_json(model_dir), visible(str(model_dir / "config.json")))
    if cfg.layout == "hf":
        tiling = _read_hf_tiling(model_dir)
        if tiling:
            cfg = dataclasses.replace(cfg, **tiling)
    return cfg
