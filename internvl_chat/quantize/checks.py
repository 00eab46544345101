"""What is refused before the work, and why: a source already quantized, a group size the model's
widths or the loader do not take, a tokenizer file that cannot be read, weights that are NaN or
inf or beyond float16's range; and, the last word before writing, an output tensor that overflowed."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import torch

from ..engine.checkpoint import stored_names
from ..engine.config import AWQ_GROUP_MULTIPLE, ModelConfig, holding_folder_note, hub_download_advice, load_config, read_config_json
from ..engine.loader import LoadedModel, check_quantized_weights_declared
from ..engine.weight_files import find_weight_files
from ..errors import CheckpointError, UsageError
from ..files import visible
from .tensor_names import is_quantized, weight_file_name
from .writer import MAX_CODE_FILE_BYTES, MAX_CODE_FILES, MAX_SETTINGS_FILE_BYTES, code_files, settings_files

STANDARD_GROUP_SIZES = (32, 64, 128, 256)  # the ones the int4 kernels take; 128 is the published default
FP16_OVERFLOW = 65520.0  # magnitudes from here up round to inf in float16 (its largest value is 65,504)


def check_group_size(cfg: ModelConfig, group_size: int | None) -> int:
    """The group size to use: the one asked for if it divides every quantized linear's input width
    and the loader takes it (a multiple of 32), or by default the largest standard one that does (128
    when it can). Refused in one line otherwise."""
    t = cfg.text
    widths = {"hidden size": t.hidden_size, "attention width (heads × head_dim)": t.q_size, "intermediate size": t.intermediate_size}
    outputs = {"hidden size": t.hidden_size, "query width": t.q_size, "key/value width": t.kv_size, "intermediate size": t.intermediate_size}
    for what, dim in outputs.items():
        if dim % 8:
            raise UsageError(f"the model's {what} {dim} is not a multiple of 8; the AWQ GEMM layout cannot store it")
    fitting = [g for g in STANDARD_GROUP_SIZES if all(dim % g == 0 for dim in widths.values())]
    if not fitting:  # 32 is one: no multiple of 32 divides them either, and the loader takes no other
        raise UsageError(f"the model's widths ({', '.join(str(d) for d in widths.values())}) are not all multiples of "
                         f"{AWQ_GROUP_MULTIPLE}, which every 4-bit group size needs; this model cannot be quantized")  # fmt: skip
    if group_size is None:
        return 128 if 128 in fitting else max(fitting)
    if group_size < 1:
        raise UsageError(f"--group-size must be positive, not {group_size}")
    for what, dim in widths.items():
        if dim % group_size:
            hint = f"use {' or '.join(map(str, sorted(fitting, reverse=True)))}"
            raise UsageError(f"group size {group_size} does not divide the model's {what} {dim}; {hint}")
    if group_size % AWQ_GROUP_MULTIPLE:  # the loader refuses it: the whole run would make an unloadable checkpoint
        hint = f"use {' or '.join(map(str, sorted(fitting, reverse=True)))}"
        raise UsageError(f"group size {group_size} is not a multiple of {AWQ_GROUP_MULTIPLE}, which the 4-bit loader needs; {hint}")
    return group_size


def check_source(src: Path) -> ModelConfig:
    """The source's config; refused in one line: no folder, no config.json, a checkpoint already
    quantized (by its config or its weight files), a tokenizer file that cannot be read."""
    advice = hub_download_advice(src) if not os.path.lexists(src) else None
    if advice is not None:  # a model id: "not a folder; give a 16-bit checkpoint folder" read as a typo
        raise UsageError(f"the source {visible(str(src))} does not exist; {advice}")
    if not src.is_dir():
        raise UsageError(f"the source {visible(str(src))} is not a folder; give a 16-bit checkpoint folder"
                         + holding_folder_note(src))  # fmt: skip
    if not os.path.lexists(src / "config.json"):  # the loader's own words advise --model, the chat's flag
        raise UsageError(f"the source {visible(str(src))} has no config.json; give a downloaded 16-bit InternVL3 checkpoint folder")
    try:
        cfg = load_config(src)
    except CheckpointError:
        declared = _declared_quantization(src)
        if declared is None:
            raise
        # the loader's words ("… not supported; internvl-chat loads AWQ 4-bit checkpoints") are for chatting
        raise UsageError(f"the source checkpoint is already quantized ({visible(declared)}); quantize a 16-bit checkpoint") from None
    if cfg.quant is not None:  # an AWQ config.json over 16-bit weights is no quantized checkpoint
        check_quantized_weights_declared(cfg, _declared_tensors(src), src)
    if cfg.quant is not None or _weights_kind(src) == "tinychat":
        raise UsageError("the source checkpoint is already quantized; quantize a 16-bit checkpoint")
    # the source's .py files go with it only where the output's config names code: its own, in the original layout
    check_copied_files(src, with_code=cfg.layout == "original" and "auto_map" in read_config_json(src))
    return cfg


def _declared_quantization(src: Path) -> str | None:
    """The quant_method (or bits) of a quantization_config where either layout keeps one: a GPTQ,
    FP8 or 8-bit AWQ source is refused by the loader in words meant for chatting with it."""
    try:
        raw = read_config_json(src)
    except CheckpointError:
        return None
    for section in (raw, raw.get("llm_config"), raw.get("text_config")):
        quant = section.get("quantization_config") if isinstance(section, dict) else None
        if isinstance(quant, dict) and quant:
            method = quant.get("quant_method")
            return str(method) if method else "quantization_config"
    return None


def _declared_tensors(src: Path) -> list[tuple[Path, str]]:
    """(file, name) of the tensors the source's weight files hold (checkpoint.stored_names); none
    where the weights cannot be found or read (loading names why)."""
    try:
        weights = find_weight_files(src)
        return stored_names(weights, weights.payload())
    except CheckpointError:
        return []


def _weights_kind(src: Path) -> str | None:
    """safetensors, bin or tinychat (llm-awq's 4-bit .pt: 4-bit whatever config.json says); None
    where there are no weights, which loading reports in its place."""
    try:
        return find_weight_files(src).kind
    except CheckpointError:
        return None


def check_copied_files(src: Path, with_code: bool = True) -> None:
    """The source files copied to the output at the end can be opened: one that could not ended a
    whole run (an hour for a large model) with nothing written. Its Python files are bounded in
    number and size (they are copied where its config names code, writer.code_files), its
    settings files in size. `with_code` False: its .py files are not copied, and not looked at (an
    -hf source in a folder of 65 scripts was refused for files the output would never hold)."""
    code = code_files(src) if with_code else []
    if len(code) > MAX_CODE_FILES:
        raise UsageError(f"the source folder holds {len(code)} .py files, more than a checkpoint's "
                         f"{MAX_CODE_FILES}; quantize a folder that holds only the checkpoint")  # fmt: skip
    for path in settings_files(src) + code:
        _check_link_stays_inside(path, src)
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # before opening: a pipe would block it
                raise UsageError(f"{visible(str(path))} is not a regular file (a pipe or a device?); "
                                 f"remove it from the source folder")  # fmt: skip
            with open(path, "rb"):
                size = path.stat().st_size
        except OSError as e:
            raise UsageError(f"cannot read {visible(str(path))} ({e.strerror or e}); check the file and its permissions") from None
        limit, kind = (MAX_CODE_FILE_BYTES, "code file") if path.suffix == ".py" else (MAX_SETTINGS_FILE_BYTES, "settings file")
        if size > limit:
            raise UsageError(f"{visible(str(path))} is {size:,} bytes, larger than a checkpoint's {kind} "
                             f"({limit:,} at most); remove it from the source folder")  # fmt: skip


def _check_link_stays_inside(path: Path, src: Path) -> None:
    """A copied file that is a link must lead into the checkpoint: into its folder, or into a hub
    cache's store of model files (models--ORG--NAME/blobs/: a snapshot folder links there, and so
    did local-folder downloads of huggingface_hub before 0.23). An untrusted checkpoint's
    `tokenizer_config.json -> ~/.ssh/id_rsa` would otherwise be copied into an output made to be
    shared."""
    if not path.is_symlink():
        return
    target = path.resolve()
    in_hub_store = target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")
    if not (target.is_relative_to(src.resolve()) or in_hub_store):
        raise UsageError(f"{visible(str(path))} is a link to {visible(str(target))}, outside the checkpoint folder, and "
                         "would be copied into the output; put the file itself in the source folder")  # fmt: skip


def check_source_values(loaded: LoadedModel) -> None:
    """Refuse a source whose weights hold NaN or inf (quantizing it wrote a NaN scale and garbage
    4-bit values without a word), or whose tensors that stay 16-bit exceed float16's range, the type
    the AWQ layout stores them in (bf16 reaches 3e38: they were written as inf). Either way the output
    then failed in chat, with advice to re-download it. One pass in slices, so no copy the size of
    the embeddings is made."""
    with torch.inference_mode():
        for name, tensor in loaded.model.named_parameters():
            if not tensor.is_floating_point():
                continue
            largest = 0.0
            for part in tensor.reshape(-1).split(1 << 24):
                part_largest = float(part.abs().amax())
                if not math.isfinite(part_largest):  # amax passes a NaN on (max() would not)
                    raise CheckpointError(
                        f"the source checkpoint's tensor {visible(weight_file_name(name))} holds NaN or inf values: its weight file "
                        "is damaged; download it again before quantizing"
                    )
                largest = max(largest, part_largest)
            if largest >= FP16_OVERFLOW and not is_quantized(name):
                raise CheckpointError(
                    f"the source checkpoint's tensor {visible(weight_file_name(name))} holds values beyond float16's range "
                    "(±65,504), the type the AWQ layout stores it in; keep this model in 16 bits"
                )


def check_written_range(tensors: dict[str, torch.Tensor], method: str) -> None:
    """The last word before writing: no float16 tensor of the output overflowed (a group's scale of
    a huge weight, a norm that AWQ's scales pushed past 65,504)."""
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float16 and not all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(1 << 24)):
            advice = "try --method rtn, which does not rescale the weights" if method == "awq" else "keep this model in 16 bits"
            raise CheckpointError(
                f"the quantized tensor {visible(name)} exceeds float16's range (±65,504), the type the AWQ layout stores it in; {advice}"
            )
