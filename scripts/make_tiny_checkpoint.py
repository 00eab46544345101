"""Build tiny InternVL3-shaped checkpoints (random weights) and a tiny byte-level BPE tokenizer.

Tests, the benchmarks and the training script use these so that every loader path (original layout,
-hf layout in both prefix styles, single / sharded safetensors, `.bin` shards) is exercised without
downloading anything. The model is built as transformers' `InternVLForConditionalGeneration`
(the reference implementation), randomised with a seeded generator, then written either as
`save_pretrained` writes it or converted to the original OpenGVLab layout (SPEC §2).

    python scripts/make_tiny_checkpoint.py --layout original --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from internvl_chat.engine.weight_names import canonical_to_hf, hf_to_canonical  # noqa: E402
from internvl_chat.files import current_umask  # noqa: E402
from script_args import positive_int  # noqa: E402

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)

# ChatML, as Qwen2.5 / InternVL3 use it; list contents (the -hf processor's style) are flattened.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.",
    "This image shows a red apple on a wooden table next to a glass of water.",
    "Describe the image in detail. What is in the picture? How many people are there?",
    "There are two cats sitting on the sofa, and a small dog is sleeping on the floor.",
    "The chart shows that sales increased from 120 units in 2021 to 345 units in 2023.",
    "Please answer the question briefly. The answer is yes. The answer is no.",
    "In the video, a man walks along the beach while the sun sets behind the mountains.",
    "Frame 1 shows a car at the crossing; frame 2 shows the car turning left at the light.",
    "Hello! How can I help you today? I am an assistant that can read images and videos.",
    "The text in the sign says: Welcome to the city library, open from 9:00 to 17:30.",
    "A bowl of soup, some bread, and a cup of coffee are on the breakfast table.",
    "The blue sky, green trees and white clouds make this landscape photo very calm.",
    "Mathematics: 3 + 4 = 7, 12 * 12 = 144, and the square root of 81 is 9.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "The document is a receipt with the total amount of $42.50 paid by credit card.",
    "Once upon a time, there was a little robot who wanted to learn how to paint.",
    "The weather today is sunny with a high of 25 degrees and a light breeze.",
    "Tell me a story about a brave knight and a friendly dragon who became friends.",
    "The object in the top left corner is a clock; the one in the bottom right is a lamp.",
    "Thank you for your question. Let me look at the image again and explain step by step.",
    "这是一只猫。图片中有一个红色的苹果。",
    "你好，我是一个多模态大语言模型，可以理解图片和视频。",
    "请描述这张图片。天空是蓝色的，树是绿色的。",
]

DEFAULT_VOCAB_SIZE = 1000


@dataclass(frozen=True)
class TinySizes:
    """Widths of the tiny model; all divisible so 4-bit packing (group 32/64) works on every linear."""

    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_ffn: int = 128
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5


# ---------------------------------------------------------------- tokenizer


def fast_tokenizer_class() -> type:
    """transformers' wrapper of a `tokenizers.Tokenizer`: `TokenizersBackend` since transformers 5,
    `PreTrainedTokenizerFast` before (our floor, 4.52, has only that name)."""
    try:
        from transformers import TokenizersBackend
    except ImportError:
        from transformers import PreTrainedTokenizerFast as TokenizersBackend
    return TokenizersBackend


def build_tokenizer(out_dir: str | Path, corpus: list[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> None:
    """Train a byte-level BPE and save it so `AutoTokenizer.from_pretrained(out_dir)` loads it offline.

    The special tokens come after the learned vocabulary, as in Qwen2.5; eos `<|im_end|>`,
    pad `<|endoftext|>`, no BOS, a ChatML chat template.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # no normalizer: any UTF-8 text must round-trip byte for byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else DEFAULT_CORPUS), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    wrapped = fast_tokenizer_class()(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )
    wrapped.save_pretrained(str(out_dir))


def _token_ids(tokenizer_dir: Path) -> tuple[int, dict[str, int]]:
    """Number of tokens and the special-token ids, read back from tokenizer.json."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = dict(data["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return max(ids.values()) + 1, {t: ids[t] for t in SPECIAL_TOKENS}


# ---------------------------------------------------------------- model


def _internvl_config(sizes: TinySizes, vit: str, vocab_size: int, special: dict[str, int], tie_word_embeddings: bool = False):
    from transformers import InternVLConfig

    six_b = vit == "6b"
    vision = dict(
        hidden_size=sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        intermediate_size=sizes.vision_mlp,
        norm_type="rms_norm" if six_b else "layer_norm",
        layer_norm_eps=1e-6,
        attention_bias=not six_b,
        use_qk_norm=six_b,
        image_size=[sizes.image_size, sizes.image_size],
        patch_size=[sizes.patch_size, sizes.patch_size],
        hidden_act="gelu",
        use_mean_pooling=True,  # no final norm, as in InternViT
    )
    text = dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        intermediate_size=sizes.text_ffn,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
        architectures=["Qwen2ForCausalLM"],
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=special["<IMG_CONTEXT>"],
        image_seq_length=int((sizes.image_size // sizes.patch_size * sizes.downsample_ratio) ** 2),
        downsample_ratio=sizes.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        # top level only, as transformers ≥ 5 writes it: text_config keeps saying false
        tie_word_embeddings=tie_word_embeddings,
    )


def _random_value(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A value for one parameter, by role, so that any wrong mapping changes the outputs."""

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(k in name for k in ("norm", "layernorm_before", "layernorm_after", "layer_norm"))
    if leaf.startswith("lambda_"):  # layer scales: far from 0 and from 1, different per channel
        return torch.rand(shape, generator=gen) * 0.6 + 0.3
    if "cls_token" in name:
        return normal(0.5)
    if "position_embeddings" in name:
        return normal(0.5)
    if is_norm and leaf == "weight":
        return normal(0.2, 1.0)
    if leaf == "bias":
        return normal(0.1)
    if "embed_tokens" in name:
        return normal(1.0)
    if "patch_embeddings" in name:  # conv over 3*14*14 inputs
        return normal(1.0 / math.sqrt(shape[1] * shape[2] * shape[3]))
    if leaf == "weight" and len(shape) == 2:
        # ~unit-variance outputs for unit inputs, a little hotter so logits are far from flat
        return normal(1.5 / math.sqrt(shape[1]))
    return normal(0.1)


def build_reference_model(
    vocab_size: int,
    special: dict[str, int],
    seed: int = 0,
    vit: str = "300m",
    sizes: TinySizes = TinySizes(),
    tie_word_embeddings: bool = False,
):
    """transformers' InternVLForConditionalGeneration (float32) with seeded random weights.

    With `tie_word_embeddings` transformers shares lm_head with the embeddings (one parameter,
    randomised once) and `save_pretrained` stores only the embeddings.
    """
    from transformers import InternVLForConditionalGeneration

    if vit not in ("300m", "6b"):
        raise ValueError(f"vit must be '300m' or '6b', not {vit!r}")
    config = _internvl_config(sizes, vit, vocab_size, special, tie_word_embeddings)
    torch.manual_seed(seed)  # the constructor's own init; everything is overwritten below anyway
    model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(_random_value(name, param.shape, gen))
    model.generation_config.eos_token_id = [special["<|im_end|>"], special["<|endoftext|>"]]
    model.generation_config.pad_token_id = special["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    return model


def _canonical_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under canonical (original InternVLChatModel) names, vision q/k/v fused (rows q, k, v)."""
    hf = {n: t for n, t in model.state_dict().items() if not n.endswith("inv_freq")}
    out: dict[str, torch.Tensor] = {}
    for name in hf:
        canonical = hf_to_canonical(name)
        if canonical is None or canonical in out:
            continue
        parts = canonical_to_hf(canonical, "new")  # transformers' in-memory names use the new prefixes
        tensor = torch.cat([hf[p] for p in parts], dim=0) if len(parts) > 1 else hf[name]
        out[canonical] = tensor.detach().to(dtype).contiguous().clone()
    return out


def _hf_state_dict(canonical: dict[str, torch.Tensor], prefix_style: str) -> dict[str, torch.Tensor]:
    """Canonical tensors under -hf names of the requested prefix style (fused q/k/v split by rows)."""
    out = {}
    for name, tensor in canonical.items():
        hf_names = canonical_to_hf(name, prefix_style)
        for hf_name, piece in zip(hf_names, tensor.chunk(len(hf_names), dim=0)):
            out[hf_name] = piece.contiguous().clone()
    return out


def _original_config(model, sizes: TinySizes, dtype_name: str) -> dict:
    """config.json as OpenGVLab's InternVLChatModel checkpoints write it."""
    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    llm = {
        "_name_or_path": "tiny-qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        # published checkpoints carry this; it changes nothing below 32768 tokens (SPEC §1)
        "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "use_bfloat16": dtype_name == "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": t.vocab_size,
    }
    vision = {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": v.hidden_size,
        "image_size": sizes.image_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": v.intermediate_size,
        "layer_norm_eps": v.layer_norm_eps,
        "model_type": "intern_vit_6b",
        "norm_type": v.norm_type,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": 3,
        "num_hidden_layers": v.num_hidden_layers,
        "patch_size": sizes.patch_size,
        "qk_normalization": bool(v.use_qk_norm),
        "qkv_bias": bool(v.attention_bias),
        "torch_dtype": dtype_name,
        "use_bfloat16": dtype_name == "bfloat16",
        "use_flash_attn": False,
    }
    return {
        "architectures": ["InternVLChatModel"],
        "downsample_ratio": sizes.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": sizes.image_size,
        "hidden_size": t.hidden_size,
        "llm_config": llm,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": vision,
    }


# ---------------------------------------------------------------- writers


def _split_shards(state: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split in name order into up to `num_shards` non-empty pieces of roughly equal byte size."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    target = total / max(1, num_shards)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size >= target and len(shards) < num_shards:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * tensor.element_size()
    return shards


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    # the library makes the file 0600 whatever the umask; the rest of the folder follows it
    path.chmod(0o666 & ~current_umask())


def write_state_dict(
    state: dict[str, torch.Tensor], out_dir: Path, file_format: str = "safetensors", num_shards: int = 2
) -> list[Path]:
    """Write tensors as transformers names them: model.safetensors, model-0000k-of-0000n.safetensors
    + model.safetensors.index.json, or pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json."""
    out_dir = Path(out_dir)
    if file_format == "safetensors":
        path = out_dir / "model.safetensors"
        _save_safetensors(state, path)
        return [path]
    if file_format not in ("sharded", "bin"):
        raise ValueError(f"file_format must be safetensors, sharded or bin, not {file_format!r}")
    shards = _split_shards(state, num_shards)
    n = len(shards)
    stem, ext, index_name = (
        ("model", "safetensors", "model.safetensors.index.json")
        if file_format == "sharded"
        else ("pytorch_model", "bin", "pytorch_model.bin.index.json")
    )
    weight_map, paths = {}, []
    for k, shard in enumerate(shards, start=1):
        path = out_dir / f"{stem}-{k:05d}-of-{n:05d}.{ext}"
        if file_format == "sharded":
            _save_safetensors(shard, path)
        else:
            torch.save(shard, str(path))
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def make_tiny_checkpoint(
    out_dir: str | Path,
    layout: str = "original",
    seed: int = 0,
    vit: str = "300m",
    dtype: str | torch.dtype = "bfloat16",
    file_format: str = "safetensors",
    prefix_style: str = "new",
    num_shards: int = 2,
    tokenizer_dir: str | Path | None = None,
    sizes: TinySizes = TinySizes(),
    vocab_multiple: int = 64,
) -> Path:
    """Write a tiny InternVL3-shaped checkpoint folder (config, weights, tokenizer) and return its path.

    layout "original" writes OpenGVLab's InternVLChatModel layout; "hf" writes transformers'
    InternVLForConditionalGeneration layout with `prefix_style` "new" (model.language_model.*, the
    in-memory names) or "legacy" (language_model.model.*, what `save_pretrained` writes in
    transformers 5.24). The same seed gives the same weights in every layout and format.
    `tokenizer_dir` reuses an already built tokenizer instead of training one. The embedding and
    lm_head get `len(tokenizer)` rounded up to `vocab_multiple` rows (spare rows like Qwen2.5's;
    1 for none).
    """
    if layout not in ("original", "hf"):
        raise ValueError(f"layout must be 'original' or 'hf', not {layout!r}")
    if prefix_style not in ("new", "legacy"):
        raise ValueError(f"prefix_style must be 'new' or 'legacy', not {prefix_style!r}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype_name = str(torch_dtype).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.safetensors")) + list(out.glob("*.bin")) + list(out.glob("*.index.json")):
        stale.unlink()

    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out)
    else:
        build_tokenizer(out)
    num_tokens, special = _token_ids(out)
    vocab_size = -(-num_tokens // vocab_multiple) * vocab_multiple
    model = build_reference_model(vocab_size, special, seed=seed, vit=vit, sizes=sizes)

    state = _canonical_state_dict(model, torch_dtype)
    if layout == "original":
        config = _original_config(model, sizes, dtype_name)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        model.generation_config.save_pretrained(str(out))
    else:
        # transformers 5 names the field `dtype`; 4.x `torch_dtype`, and writes only that one as a string
        dtype_field = "dtype" if hasattr(model.config, "dtype") else "torch_dtype"
        setattr(model.config, dtype_field, torch_dtype)
        model.config.architectures = ["InternVLForConditionalGeneration"]
        model.config.save_pretrained(str(out))
        model.generation_config.save_pretrained(str(out))
        state = _hf_state_dict(state, prefix_style)
    write_state_dict(state, out, file_format, num_shards)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=["original", "hf"], default="original")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vit", choices=["300m", "6b"], default="300m")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument("--format", dest="file_format", choices=["safetensors", "sharded", "bin"], default="safetensors")
    p.add_argument("--prefix-style", choices=["new", "legacy"], default="new", help="-hf tensor name prefixes")
    p.add_argument("--shards", type=positive_int, default=2, help="number of shards for --format sharded/bin")
    args = p.parse_args(argv)
    out = make_tiny_checkpoint(
        args.out,
        layout=args.layout,
        seed=args.seed,
        vit=args.vit,
        dtype=args.dtype,
        file_format=args.file_format,
        prefix_style=args.prefix_style,
        num_shards=args.shards,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- hooks for scripts/train_demo_model.py
# (defined after the __main__ guard on purpose: appended without touching the code above)


def internvl_config(sizes: TinySizes, vocab_size: int, special: dict[str, int], vit: str = "300m"):
    """The InternVLConfig of a tiny model of `sizes` (as `make_tiny_checkpoint` builds it)."""
    return _internvl_config(sizes, vit, vocab_size, special)


def token_ids(tokenizer_dir: str | Path) -> tuple[int, dict[str, int]]:
    """(number of tokens, {special token: id}) of a tokenizer folder written by `build_tokenizer`."""
    return _token_ids(Path(tokenizer_dir))


def write_original_layout(
    model,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    sizes: TinySizes,
    dtype: str = "bfloat16",
    extra_config: dict | None = None,
) -> Path:
    """Write a (trained) InternVLForConditionalGeneration as an original-layout checkpoint folder:
    config.json (+ `extra_config` keys, e.g. system_message), generation_config.json,
    model.safetensors in `dtype`, and the tokenizer files copied from `tokenizer_dir`."""
    torch_dtype = getattr(torch, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.safetensors")) + list(out.glob("*.bin")) + list(out.glob("*.index.json")):
        stale.unlink()
    _copy_tokenizer(Path(tokenizer_dir), out)
    config = _original_config(model, sizes, dtype)
    config.update(extra_config or {})
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    model.generation_config.save_pretrained(str(out))
    write_state_dict(_canonical_state_dict(model, torch_dtype), out, "safetensors")
    return out
