"""Tiny replicas of the file sets OpenGVLab publishes for InternVL3, key for key where public
sources show them, so that loading is tested against what users download, not only against what
our own writer (make_tiny_checkpoint) writes.

Sources (read, not copied): transformers' convert_internvl_weights_to_hf.py (how the -hf repos were
made: Qwen2.5-VL's tokenizer + extra_special_tokens, config built from llm_config / vision_config,
GotOcr2ImageProcessorFast, the chat template), the tokenizers printed in hiyouga/LlamaFactory #7897 and
#8342 (added_tokens_decoder 151643-151674 with `<video>` at 151674, flags per token, the
additional_special_tokens list, the -hf preprocessor_config.json and file list), lmdeploy's
lite/apis/auto_awq.py (AWQ: quantization_config on the LLM's config, `.bin` shards). Where the real
content is not public, the replica says so in a comment.

The ids keep Qwen's shape at a tiny size: a BPE of B entries, then Qwen2.5's 22 added tokens
(`<tool_call>` … `<|file_sep|>` not special), InternVL's 9, and on -hf `<video>` at B + 31, one past
the embedding rows (B + 31 = 151,674 for the real B = 151,643).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import make_tiny_checkpoint as tiny  # noqa: E402

QWEN_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
NOT_SPECIAL = frozenset(QWEN_ADDED[14:])
INTERNVL_ADDED = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
ADDITIONAL_SPECIAL = list(QWEN_ADDED[1:14] + INTERNVL_ADDED)  # as #7897 prints the tokenizer's
# Qwen2's pre-tokenizer pattern (a Split before a ByteLevel that uses no regex of its own)
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HF_EXTRA_SPECIAL = {"context_image_token": "<IMG_CONTEXT>", "end_image_token": "</img>",
                    "start_image_token": "<img>", "video_token": "<video>"}  # fmt: skip
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": content not in NOT_SPECIAL}  # fmt: skip


def _tokenizer_json(out: Path, added: tuple[str, ...]) -> dict[str, int]:
    """A Qwen2-shaped tokenizer.json; {added token: id}."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])  # fmt: skip
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(tiny.DEFAULT_CORPUS, trainer=trainer)
    base = tok.get_vocab_size()
    for content in added:  # one at a time: each takes the next id
        token = AddedToken(content, special=content not in NOT_SPECIAL, normalized=False)
        tok.add_tokens([token]) if content in NOT_SPECIAL else tok.add_special_tokens([token])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return {content: base + i for i, content in enumerate(added)}


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokenizer_files(out: Path, ids: dict[str, int], hf: bool) -> None:
    config = {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _entry(t) for t, i in ids.items()},
        "additional_special_tokens": ADDITIONAL_SPECIAL, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 8192, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }  # fmt: skip
    special_map = {"additional_special_tokens": ADDITIONAL_SPECIAL,
                   "eos_token": {k: v for k, v in _entry("<|im_end|>").items() if k != "special"},
                   "pad_token": {k: v for k, v in _entry("<|endoftext|>").items() if k != "special"}}  # fmt: skip
    if hf:  # transformers 4.52's save of the converted tokenizer (the top-level copies: unconfirmed)
        config.update(extra_special_tokens=HF_EXTRA_SPECIAL, processor_class="InternVLProcessor",
                      return_token_type_ids=False, **HF_EXTRA_SPECIAL)  # fmt: skip
        special_map.update(HF_EXTRA_SPECIAL)
        (out / "chat_template.jinja").write_text(tiny.CHAT_TEMPLATE, encoding="utf-8")
    else:  # the original repos keep their template in tokenizer_config.json (its text: not checked here)
        config["chat_template"] = tiny.CHAT_TEMPLATE
    _write(out / "tokenizer_config.json", config)
    _write(out / "special_tokens_map.json", special_map)
    _write(out / "added_tokens.json", dict(sorted(ids.items())))


def _original_extras(out: Path) -> None:
    """config.json keys the published original repos carry beyond what make_tiny_checkpoint writes."""
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.update(_commit_hash=None, transformers_version=None, image_fold=None, auto_map={
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"})  # fmt: skip
    generic = {"add_cross_attention": False, "bad_words_ids": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
               "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "max_length": 20, "do_sample": False, "pad_token_id": None,
               "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "return_dict": True,
               "task_specific_params": None, "tokenizer_class": None}  # transformers 4's PretrainedConfig dump
    config["llm_config"].update(generic, _attn_implementation_autoset=True)
    config["vision_config"].update(generic)
    _write(out / "config.json", config)
    _write(out / "preprocessor_config.json", {
        "crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        "resample": 3, "size": 448})  # fmt: skip


def _hf_extras(out: Path) -> None:
    """config.json as transformers 4.52 wrote the converted one (text_config from llm_config with
    rope_scaling and a top-level rope_theta; no top-level tie_word_embeddings: a default it left
    out), and the processor files."""
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    text = config["text_config"]
    text.pop("layer_types", None)
    theta = text.pop("rope_parameters", {}).get("rope_theta", 1e6)
    text.update(rope_scaling={"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"}, rope_theta=theta,
                torch_dtype="bfloat16", max_window_layers=70, tie_word_embeddings=False, use_sliding_window=False)  # fmt: skip
    config["vision_config"].update(architectures=["InternVisionModel"], initializer_factor=0.1, torch_dtype="bfloat16")
    for key in ("tie_word_embeddings", "dtype"):
        config.pop(key, None)
    config.update(torch_dtype="bfloat16", transformers_version="4.52.0.dev0")
    _write(out / "config.json", config)
    _write(out / "preprocessor_config.json", {
        "crop_size": None, "crop_to_patches": False, "data_format": "channels_first", "default_to_square": True,
        "device": None, "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_pad": None,
        "do_rescale": True, "do_resize": True, "image_mean": IMAGE_MEAN, "image_processor_type": "GotOcr2ImageProcessorFast",
        "image_std": IMAGE_STD, "input_data_format": None, "max_patches": 12, "min_patches": 1,
        "processor_class": "InternVLProcessor", "resample": 3, "rescale_factor": 1 / 255, "return_tensors": None,
        "size": {"height": 448, "width": 448}, "size_divisor": None, "video_processor_type": "InternVLVideoProcessor"})  # fmt: skip
    _write(out / "processor_config.json", {"image_seq_length": 256, "processor_class": "InternVLProcessor"})
    # its keys beyond the processor's class: unconfirmed (none of them is read by the app)
    _write(out / "video_preprocessor_config.json", {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD, "processor_class": "InternVLProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": 448, "width": 448}, "video_processor_type": "InternVLVideoProcessor"})  # fmt: skip


def published_replica(out: Path, kind: str) -> Path:
    """kind: "original" (tokenizer.json), "original-slow" (vocab.json + merges.txt, no tokenizer.json),
    "hf" (`<video>` in tokenizer.json), "hf-config-video" (`<video>` only in tokenizer_config.json)."""
    layout = "hf" if kind.startswith("hf") else "original"
    scratch = out.parent / f"{out.name}.tokenizer"
    ids = _tokenizer_json(scratch, QWEN_ADDED + INTERNVL_ADDED)
    tiny.make_tiny_checkpoint(out, layout=layout, tokenizer_dir=scratch, vocab_multiple=1)  # rows = the tokens
    if layout == "hf":
        with_video = _tokenizer_json(scratch, QWEN_ADDED + INTERNVL_ADDED + ("<video>",))
        if kind == "hf":
            shutil.copy(scratch / "tokenizer.json", out / "tokenizer.json")
        ids["<video>"] = with_video["<video>"]
        _hf_extras(out)
    else:
        _original_extras(out)
    _tokenizer_files(out, ids, layout == "hf")
    if kind == "original-slow":
        data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        _write(out / "vocab.json", data["model"]["vocab"])
        merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (out / "tokenizer.json").unlink()
    shutil.rmtree(scratch)
    return out


def as_lmdeploy_bin_shards(folder: Path) -> Path:
    """The safetensors of a checkpoint rewritten as lmdeploy saves its AWQ output
    (save_pretrained(safe_serialization=False)): pytorch_model-0000k-of-00002.bin + index."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), 1):
        name = f"pytorch_model-{k:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write(folder / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return folder
