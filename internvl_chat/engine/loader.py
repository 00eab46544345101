"""Load a checkpoint folder into an InternVLModel on the target device and dtype.

Weights are streamed tensor by tensor from the checkpoint files straight into preallocated
parameters, so peak memory stays near the size of the weights in the target dtype.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, UsageError
from ..files import brief_repr, expand_home, visible
from ..numbers import counted
from ..settings import INT4_BACKENDS
from .checkpoint import iter_tensors, stored_embeddings, stored_names
from .compiled import MODES as COMPILE_MODES
from .compiled import wanted as compile_wanted
from .config import ModelConfig, QuantConfig, load_config
from .cpu_features import default_cpu_dtype
from .model import SMALL_DECODER_BYTES, InternVLModel
from .out_of_memory import is_out_of_memory
from .tensor_reader import shown_value
from .tinychat import convert_tinychat
from .tokenizer import CHAT_TOKENS, SpecialTokens, Tokenizer, load_tokenizer, special_token_ids
from .weight_files import DeclaredTensor, find_weight_files
from .weight_names import EMBEDDING

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{name} does not exist: {counted(torch.cuda.device_count(), 'GPU')} visible")
    elif device.type != "cpu":
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device, cfg: ModelConfig | None = None) -> torch.dtype:
    """"auto": bf16 on CUDA; on CPU whichever measured faster for this model here (cpu_features)."""
    if name in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        return default_cpu_dtype(cfg) if cfg is not None else torch.float32
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; use float32, bfloat16 or float16 (fp32, bf16, fp16)") from None


# The densest format that loads is 4-bit AWQ: at least half a byte for every weight element.
MIN_BYTES_PER_ELEMENT = 0.5


def check_weights_fit_config(cfg: ModelConfig, file_bytes: int, path: Path) -> None:
    """Refuse a config.json that describes more weights than the weight files hold, before
    anything is allocated: a lying or mismatched config must not size the model. (The size caps
    in config.py bound each field; this bounds their products.)"""
    elements = cfg.weight_elements()
    if elements * MIN_BYTES_PER_ELEMENT > file_bytes:
        raise CheckpointError(
            f"config.json of {visible(str(path))} describes at least {_count(elements)} weights but the weight files hold "
            f"only {file_bytes / 2**20:,.1f} MiB; config.json and the weights disagree (a damaged config or a partial download)"
        )


def check_vocab_on_disk(cfg: ModelConfig, embeddings: list[DeclaredTensor], path: Path) -> None:
    """config.json's vocab_size must be the rows of the embeddings the weight files really hold,
    before it bounds how much tokenizer is parsed (tokenizer.py's entry counts). The byte check
    above cannot see this: it weighs all tensors together against the config's products, so a
    config of the largest vocabulary with a hidden_size of 2 needs only 2 MiB of any tensors, and
    its tokenizer.json of millions of entries took ~23 s and ~2.3 GB to parse before the weights
    were compared. The model is built with exactly these shapes (lm_head too), so anything else
    fails to load later anyway; checkpoints pad the rows past the tokenizer (InternVL3: 151,674)
    and say so in vocab_size."""
    if not embeddings:
        raise CheckpointError(
            f"the weight files of {visible(str(path))} hold no token embeddings ({EMBEDDING}); "
            "the download is incomplete or the folder holds a different model"
        )
    implied = (cfg.text.vocab_size, cfg.text.hidden_size)
    for tensor in embeddings:
        if not tensor.dtype.is_floating_point:  # one byte per element would halve what a row costs on disk
            raise CheckpointError(
                f"{visible(str(tensor.file))} stores {shown_value(tensor.name)} as {str(tensor.dtype).removeprefix('torch.')}, "
                "not as floats; the weight file is damaged or not a 16-bit checkpoint"
            )
        if tensor.shape != implied:
            raise CheckpointError(
                f"{visible(str(tensor.file))} stores {shown_value(tensor.name)} with shape {list(tensor.shape)} but "
                f"config.json's vocab_size and hidden_size imply {list(implied)}; config.json and the weights disagree "
                "(use the config.json shipped with these weights)"
            )


def check_quantized_weights_declared(cfg: ModelConfig, declared: Sequence[tuple[Path, str]], path: Path) -> None:
    """4-bit weights (`.qweight`) under a config.json without a quantization_config, or 16-bit ones
    under one with it: one model's config.json copied over the other's download. They were refused
    only after the model was built, as dozens of "unexpected tensors". `declared`: (file, name) of
    each stored tensor (checkpoint.stored_names)."""
    packed = next(((file, name) for file, name in declared if name.endswith(".qweight")), None)
    if cfg.quant is None and packed is not None:
        raise CheckpointError(
            f"{visible(str(packed[0]))} holds 4-bit AWQ weights ({shown_value(packed[1])}) but config.json of "
            f"{visible(str(path))} has no quantization_config; use the config.json shipped with these weights"
        )
    if cfg.quant is not None and declared and packed is None:
        raise CheckpointError(
            f"config.json of {visible(str(path))} declares 4-bit AWQ weights (quantization_config) but its weight files "
            "hold 16-bit ones (no .qweight tensors); use the config.json shipped with these weights"
        )


def check_tokenizer_fits_vocab(tokenizer: Tokenizer, cfg: ModelConfig, path: Path) -> None:
    """Every id the tokenizer can produce, and every token a prompt is built of, must have an
    embedding row; an id past them would fail inside the first prompt (an index error) instead of
    here. A special token past them is a placeholder no text becomes (drop_placeholders_past_vocab).
    And no two tokens may share an id: tokenizer.json loads such a vocabulary, and one of the two
    then encodes as the other."""
    vocab = tokenizer.get_vocab()
    _refuse_shared_ids(vocab, path)
    rows = cfg.text.vocab_size
    past = [i for token, i in vocab.items()
            if i >= rows and (i not in tokenizer.special_ids or token in CHAT_TOKENS)]  # fmt: skip
    if past:
        raise CheckpointError(
            f"the tokenizer of {visible(str(path))} has token ids up to {max(past)} but config.json's vocab_size is "
            f"{rows}; the tokenizer belongs to another model (use the one shipped with the checkpoint)"
        )


def drop_placeholders_past_vocab(tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    """Special tokens with no embedding row are a processor's placeholders, replaced before a model
    sees them: the -hf InternVL3 tokenizers add `<video>` at 151674, past the 151,674 rows (so the
    published -hf checkpoints were refused as "another model's tokenizer"). Text never encodes to a
    special token (tokenizer.py), and with them out of the special ids no other path makes one
    either (/v1/completions reads special-token text as those tokens): `<video>` stays text, as
    with the original checkpoints' tokenizer, which has no such token. The model never samples
    them (it has no logit for them)."""
    rows = cfg.text.vocab_size
    if any(i >= rows for i in tokenizer.special_ids):
        tokenizer.special_ids = frozenset(i for i in tokenizer.special_ids if i < rows)


def _refuse_shared_ids(vocab: Mapping[str, int], path: Path) -> None:
    if len(set(vocab.values())) == len(vocab):
        return
    # named by the lowest shared id and its words in sorted order: get_vocab()'s order may differ
    # from one start to the next, and the same damaged files should give the same line every time
    words: dict[int, list[str]] = {}
    for token, token_id in vocab.items():
        words.setdefault(token_id, []).append(token)
    token_id = min(i for i, ws in words.items() if len(ws) > 1)
    first, second = sorted(words[token_id])[:2]
    raise CheckpointError(
        f"the tokenizer of {visible(str(path))} gives the id {token_id} to both {brief_repr(first)} and "
        f"{brief_repr(second)}; the tokenizer files are damaged (re-download them)"
    )


def _count(n: float) -> str:
    for unit, size in (("trillion", 1e12), ("billion", 1e9), ("million", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f}"


class OutOfMemoryLoading(CheckpointError):
    """Memory ran out while the weights were loaded: `device` and `dtype` say where (quantize
    replaces the chat's advice, which names flags it does not have)."""

    def __init__(self, message: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(message)
        self.device, self.dtype = device, dtype


@dataclass
class LoadedModel:
    model: InternVLModel
    tokenizer: Tokenizer
    config: ModelConfig
    special: SpecialTokens
    path: Path
    load_s: float

    @property
    def device(self) -> torch.device:
        return self.model.device


def load_model(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    max_context: int = 8192,
    int4_backend: str = "auto",
    cuda_graphs: bool = True,
    compile: str = "off",
    progress=None,
    fit_context: bool = False,
) -> LoadedModel:
    """`compile`: auto | on | off, the compiled decode step (engine/compiled.py); `progress(text)`
    hears about a compile as it happens (a failure is one line on stderr). `fit_context`: the
    max_context is a default nobody asked for, so a model with fewer positions lowers it instead of
    being refused."""
    start = time.perf_counter()
    path = expand_home(path)
    cfg = load_config(path)
    weights = find_weight_files(path)
    payload = weights.payload()
    check_weights_fit_config(cfg, payload.nbytes, path)
    check_vocab_on_disk(cfg, stored_embeddings(weights, payload, cfg.layout), path)
    tinychat = weights.kind == "tinychat"
    if not tinychat:  # its `.qweight`s are 4-bit by the format, whatever config.json says
        check_quantized_weights_declared(cfg, stored_names(weights, payload), path)
    if tinychat and cfg.quant is None:
        cfg = dataclasses.replace(cfg, quant=QuantConfig())  # TinyChat v2 files are W4 g128 by definition
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device, cfg)
    if int4_backend not in INT4_BACKENDS:
        raise UsageError(f"unknown int4 backend {int4_backend!r}; use {', '.join(INT4_BACKENDS[:-1])} or {INT4_BACKENDS[-1]}")
    if compile not in COMPILE_MODES:
        raise UsageError(f"unknown compile mode {compile!r}; use auto, on or off")
    if max_context < 16:
        raise UsageError(f"--max-context {max_context} is too small; use at least a few thousand tokens")
    limit = cfg.text.max_position_embeddings
    if fit_context:
        max_context = min(max_context, limit)
    if max_context > limit:
        raise UsageError(f"a max_context of {max_context} exceeds the model's {limit} positions; "
                         f"use --max-context {limit} or less")  # it may come from a config file or variable
    tokenizer = load_tokenizer(path, cfg.text.vocab_size)
    special = special_token_ids(tokenizer)
    check_tokenizer_fits_vocab(tokenizer, cfg, path)
    drop_placeholders_past_vocab(tokenizer, cfg)
    if device.type == "cuda" and device.index is not None:
        # Triton launches our int4 kernels (and GemLite's) on the current device's stream, not on
        # their tensors' device: with --device cuda:1 they must be one
        torch.cuda.set_device(device)
    try:
        model = InternVLModel.empty(cfg, device, dtype, max_context)
        model.int4_backend = int4_backend
        model.image_token_id = special.img_context
        tensors = iter_tensors(path, cfg.layout, max_elements=model.largest_tensor_elements(), weights=weights)
        model.load_weights(convert_tinychat(tensors, cfg) if tinychat else tensors)
        model.enable_cuda_graphs(cuda_graphs)
        if device.type == "cpu" and model.language_model.decoder_bytes() < SMALL_DECODER_BYTES:
            model.decode_threads = 1
        if compile_wanted(compile, device, model.language_model):
            model.enable_compile(True, progress)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):  # the CPU allocator and CUDA outside torch's allocator raise RuntimeErrors
            raise
        advice = "use a 4-bit checkpoint or a smaller --max-context"
        raise OutOfMemoryLoading(
            f"out of memory loading {visible(path.name)} on {device} in {str(dtype).removeprefix('torch.')}; "
            + (advice + ", or --device cpu" if device.type == "cuda" else advice),
            device, dtype,
        ) from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LoadedModel(model, tokenizer, cfg, special, path, time.perf_counter() - start)
