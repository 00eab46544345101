"""The published layout (lmdeploy's InternVL3-*-AWQ) written into a folder: the packed 4-bit
linears and everything that stays 16-bit as fp16 in safetensors files, config.json with
`quantization_config` under `llm_config`, and the source's tokenizer files."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..engine.config import ModelConfig, read_config_json
from ..engine.loader import LoadedModel
from ..errors import UsageError
from ..files import JSON_LIMIT, current_umask, visible
from .progress import Step, no_step
from .tensor_names import fused_parts, is_quantized

SHARD_BYTES = 4 << 30
# the errors only writing gives: a full disk or quota, a file-size limit (`ulimit -f`), a read-only file system
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "preprocessor_config.json",
)  # fmt: skip
# The original layout's own Python files (configuration_internvl_chat.py, modeling_*.py, conversation.py):
# its config's auto_map names them, and the tools that read that layout (InternVL's code, lmdeploy's
# vision loader) import them. Copied as bytes, never run here; bounded, as the source is untrusted.
MAX_CODE_FILES = 64
MAX_CODE_FILE_BYTES = 4 << 20
# The settings files are copied whole too: the limit tokenizer files are read under (a 2 GiB
# generation_config.json of zeros was copied into the output without a word)
MAX_SETTINGS_FILE_BYTES = JSON_LIMIT


def _present(path: Path) -> bool:
    """Whether the source has something at `path` to copy: not a folder and not a broken link. A
    pipe or a device counts, so that checks.check_copied_files names it (skipped, the output went
    without that file and no word said why)."""
    return path.exists() and not path.is_dir()


def code_files(src_dir: Path) -> list[Path]:
    """The source folder's top-level .py files (a link to a regular file counts: a hub cache links them)."""
    return sorted(p for p in src_dir.glob("*.py") if _present(p))


def settings_files(src_dir: Path) -> list[Path]:
    """The source's tokenizer, template, generation and preprocessor files that it has."""
    return [src_dir / name for name in TOKENIZER_FILES if _present(src_dir / name)]


def copied_files(src_dir: Path, config: dict) -> list[Path]:
    """The source files the output keeps as they are: its settings files, and the Python files
    where the output's config names code (auto_map)."""
    return settings_files(src_dir) + (code_files(src_dir) if "auto_map" in config else [])


def head_is_tied(loaded: LoadedModel) -> bool:
    """Whether the model ran with lm_head and the token embeddings as one tensor (the loader ties
    them only where the checkpoint stores one of the two). config.json's flag is not the answer: the
    published -hf configs carry no top-level tie_word_embeddings (transformers 4 leaves a default
    out), which transformers ≥ 5 reads as true, yet store InternVL3's separate lm_head."""
    lm = loaded.model.language_model
    return lm.lm_head.weight is lm.model.embed_tokens.weight


def float_tensors(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Everything that stays 16-bit, under canonical names (fused q/k/v biases split back)."""
    cfg = loaded.config
    tied = head_is_tied(loaded)
    parts = fused_parts(cfg)["self_attn.qkv_proj"]
    out = {}
    for name, tensor in loaded.model.named_parameters():
        if ".self_attn.qkv_proj.bias" in name:
            prefix = name.removesuffix("self_attn.qkv_proj.bias")
            for part, start, end in parts:
                out[f"{prefix}{part}.bias"] = tensor.data[start:end]
        elif is_quantized(name):
            continue
        elif name == "language_model.lm_head.weight" and tied:
            continue
        else:
            out[name] = tensor.data
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in out.items()}


def original_config(src_dir: Path, cfg: ModelConfig, group_size: int, tied: bool | None = None) -> dict:
    """The source config in the original layout, with AWQ's quantization_config under llm_config.
    `tied`: whether the model ran with lm_head tied to the embeddings (head_is_tied; None: as
    config.json says), which the output's llm_config must say, as it holds lm_head only where untied."""
    tied = cfg.text.tie_word_embeddings if tied is None else tied
    raw = read_config_json(src_dir)
    if cfg.layout == "original":
        out = json.loads(json.dumps(raw))
    else:
        v, t = raw["vision_config"], dict(raw["text_config"])
        out = {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "downsample_ratio": cfg.downsample_ratio,
            "ps_version": "v2",
            "select_layer": -1,
            "template": "internvl2_5",
            "force_image_size": cfg.image_size,
            "max_dynamic_patch": cfg.max_dynamic_patch,
            "min_dynamic_patch": cfg.min_dynamic_patch,
            "dynamic_image_size": cfg.dynamic_image_size,
            "use_thumbnail": cfg.use_thumbnail,
            "vision_config": {
                "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                "hidden_size": cfg.vision.hidden_size, "num_hidden_layers": cfg.vision.num_layers,
                "num_attention_heads": cfg.vision.num_heads, "intermediate_size": cfg.vision.intermediate_size,
                "norm_type": cfg.vision.norm_type, "layer_norm_eps": cfg.vision.norm_eps,
                "qkv_bias": cfg.vision.qkv_bias, "qk_normalization": cfg.vision.qk_norm,
                "image_size": cfg.image_size, "patch_size": cfg.vision.patch_size, "hidden_act": v.get("hidden_act", "gelu"),
            },  # fmt: skip
            # transformers ties an -hf head by the top-level flag (text_config's may say otherwise)
            "llm_config": {**t, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                           "tie_word_embeddings": tied},
        }
        # transformers ≥ 5 keeps rope_theta under rope_parameters; the original layout's readers
        # (InternVL's own code, lmdeploy, transformers 4) read it at the top and default to 10,000
        out["llm_config"]["rope_theta"] = cfg.text.rope_theta  # the θ the engine ran: rope_parameters' where both
        if cfg.system_message is None:
            out["system_message"] = ""  # the -hf template has no system prompt; keep it that way
    # one the source carried empty (or null) at the top would be read there first by tools that
    # look for it there; the published layout keeps it under llm_config only (SPEC §2)
    # the original layout ties by llm_config's flag: an -hf source that stored its own lm_head
    # under a tying top-level flag (or none) lost that head, and the output ran another model
    out["llm_config"]["tie_word_embeddings"] = tied
    if "tie_word_embeddings" in out:
        out["tie_word_embeddings"] = tied
    out.pop("quantization_config", None)
    out["llm_config"]["quantization_config"] = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size, "zero_point": True,
    }  # fmt: skip
    for section in (out["llm_config"], out):  # transformers ≥ 5 names it dtype: one left at bfloat16 would contradict
        section["torch_dtype"] = "float16"
        if "dtype" in section:
            section["dtype"] = "float16"
    return out


def checkpoint_files(tensors: dict[str, torch.Tensor]) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) per safetensors file: one file, or shards of about SHARD_BYTES."""
    shards, current, size = [], [], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards, 1)]


def config_text(config: dict) -> str:
    """config.json's text: readable UTF-8, or all-ASCII escapes where the source config holds a
    lone surrogate (a JSON "\\ud800" escape in a key we do not read), which UTF-8 cannot encode;
    writing it failed with a traceback once the whole run was done."""
    text = json.dumps(config, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(config, indent=2)  # the escapes as the source wrote them
    return text


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file with the umask's permissions, its I/O failures as the OSError they are: safetensors
    raises its own SafetensorError ("… No space left on device (os error 28)"), which escaped the
    one-line write error (`write_error`) as a traceback on a full disk."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:  # not the disk's doing: a bug of ours, which a message about the disk would hide
            raise
        raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) from None
    # the library makes the file private (0600) whatever the umask: the rest of the checkpoint was
    # readable by others and the weights not, so a server run as another user could not load it
    os.chmod(path, 0o666 & ~current_umask())


def output_file_count(config: dict, tensors: dict[str, torch.Tensor], src_dir: Path) -> int:
    """How many files `write_checkpoint` writes: the progress total (it said "2 files" for the six of
    the tiny model's output, the weights and one step for all the rest)."""
    weights = len(checkpoint_files(tensors))
    return weights + (weights > 1) + 1 + len(copied_files(src_dir, config))


def write_checkpoint(dst: Path, config: dict, tensors: dict[str, torch.Tensor], src_dir: Path, step: Step = no_step) -> None:
    """The weight file(s), config.json and the copied source files into `dst`; `step()` after each file."""
    dst.mkdir(parents=True, exist_ok=True)
    files = checkpoint_files(tensors)
    for file, names in files:
        _save_weights({n: tensors[n] for n in names}, dst / file)
        step()
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {n: file for file, names in files for n in names}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        step()
    (dst / "config.json").write_text(config_text(config), encoding="utf-8")
    step()
    for path in copied_files(src_dir, config):
        shutil.copy2(path, dst / path.name)
        # the umask's permissions, as the rest of the output's: copy2 kept the source's, and a private
        # (0600) tokenizer.json left a checkpoint that a server run as another user could not load
        os.chmod(dst / path.name, 0o666 & ~current_umask())
        step()


def write_error(e: OSError, src: Path, dst: Path) -> UsageError:
    """One line for a failed write (a full disk, an I/O error) or a source file that could not be
    copied, named by the user's paths, never the staging folder's."""
    reason = e.strerror or str(e)
    # a failed copy names the source file whichever side failed: a full disk was "cannot read SRC/tokenizer.json"
    if e.errno not in WRITE_ERRNOS and isinstance(e.filename, str) and Path(e.filename).parent == src:
        return UsageError(f"cannot read {visible(e.filename)} ({reason}); check the file and its permissions")
    advice = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
    return UsageError(f"cannot write the output {visible(str(dst))} ({reason}); {advice} or choose another output folder")
