"""Measurement helpers for `scripts/bench.py`: plans, model builders, timed loops, load probes.

Everything here returns plain dicts of numbers so that bench.py can print a table and write JSON,
and tests/test_bench_smoke.py can run the same code on a tiny model. Timings synchronise the
device before reading the host clock; nothing here is compared against itself.

Run as a script it is the load probe (a fresh process, so peak memory is the loader's alone):
    python scripts/bench_lib.py load-probe DIR DEVICE DTYPE MAX_CONTEXT warm|cold
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
for _p in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from make_tiny_checkpoint import TinySizes  # noqa: E402

from internvl_chat.engine.compiled import inductor_options  # noqa: E402
from internvl_chat.engine.config import ModelConfig, QuantConfig, TextConfig, VisionConfig  # noqa: E402

# SPEC §6: measured device-to-device copy bandwidth of an H100 SXM, the decode ceiling.
H100_BANDWIDTH = 3.0e12
AWQ_GROUP = 128
# SPEC §1 table: hidden / layers / q heads / kv heads / FFN of the Qwen2.5 LLMs in InternVL3.
LLM_SHAPES = {  # measured in this order, in case time runs out: the 8B target first, then 1B, 2B
    "InternVL3-8B": (3584, 28, 28, 4, 18944),
    "InternVL3-1B": (896, 24, 14, 2, 4864),
    "InternVL3-2B": (1536, 28, 12, 2, 8960),
}
VOCAB = 151674
IMG_CONTEXT_ID = 151667  # SPEC §3; the random-weight models have no tokenizer, so the id is fixed here
VISION_300M = VisionConfig(
    hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
    norm_type="layer_norm", norm_eps=1e-6, qkv_bias=True, qk_norm=False,
)  # fmt: skip
# The GPU check's CPU dry run: the same code paths at a tiny shape (hidden 128 keeps W4 g128 legal).
DRY_SHAPES = {"tiny": (128, 2, 4, 2, 256)}
VISION_TINY = VisionConfig(
    hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
    norm_type="layer_norm", norm_eps=1e-6, qkv_bias=True, qk_norm=False,
)  # fmt: skip


# The gemv-sweep section's launch configurations of the triton GEMV, (BLOCK_N, BLOCK_K, NUM_WARPS,
# TARGET_PROGRAMS), most promising first; the module's default (64, 256, 4, 528) runs before them
# as the baseline. At M = 1 it streams 18-32 % of an H200's copy bandwidth: more bytes in flight
# per SM (longer steps, more programs) first, then fewer registers a thread (fewer outputs a
# program, more warps), then the rest of {32, 64, 128} × {128, 256, 512} × {2, 4, 8} × {264, 528, 1056}.
GEMV_SWEEP_CONFIGS = (
    (64, 512, 4, 528), (64, 256, 4, 1056), (64, 256, 8, 528), (32, 256, 4, 1056), (32, 512, 4, 528),
    (64, 512, 8, 1056), (128, 256, 8, 528), (32, 256, 2, 1056), (64, 128, 4, 528), (128, 512, 8, 1056),
    (32, 512, 2, 1056), (64, 256, 4, 264), (128, 256, 4, 264), (64, 256, 2, 528), (32, 128, 2, 1056),
)  # fmt: skip

# The dequant-sweep section's launch configurations of the one-pass dequantization kernels
# (quant/triton_dequant.py), (BLOCK_N, BLOCK_W, NUM_WARPS), most promising first; the module's
# default (32, 32, 4) runs before them as the baseline. Both kernels reach ~25 % of an H200's copy
# bandwidth with it, at 40 (tinygemm) / 64 (repacked) registers a thread and no spills (Triton's
# sm_90 build), so registers do not bound the programs per SM. First the same tile over more
# threads, then smaller tiles (more, shorter programs), then larger ones (more bytes a program);
# every tile a power of two (tl.arange), 8-128 rows × 16-64 words, 2-8 warps; all compile for sm_90
# with 128-bit stores (24-64 registers; n32 w32 nw2's repacked kernel 166).
DEQUANT_SWEEP_CONFIGS = (
    (32, 32, 8), (16, 32, 4), (32, 16, 4), (16, 16, 4), (16, 32, 8), (64, 32, 8), (32, 64, 8),
    (8, 64, 4), (64, 16, 8), (32, 32, 2), (16, 64, 8), (128, 16, 8), (8, 32, 2), (16, 16, 2),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Plan:
    """What one benchmark run measures and how long it may take."""

    name: str
    sizes: TinySizes
    vocab_multiple: int  # embedding rows = len(tokenizer) rounded up to this
    decode_tokens: int  # tokens per timed decode run (engine vs transformers, W4 on CPU)
    repeats: int  # timed runs per measurement (median reported)
    engine_image: tuple[int, int]  # (w, h) of the image in the engine-vs-transformers prompt
    chat_image: tuple[int, int]  # (w, h) of the turn-1 image of the chunk-prefill conversation
    chat_turns: int
    answer_tokens: int  # max_new_tokens per conversation turn
    max_context: int
    # --device cuda: the InternVL3 shapes
    cuda_shapes: tuple[str, ...] = tuple(LLM_SHAPES)
    # variants of each shape, in the order they are measured: "w4" (the default int4 backend,
    # tinygemm on CUDA), "w4-<backend>" (that Int4Linear backend; a row is recorded as not
    # available where the backend is not), "bf16"
    cuda_variants: tuple[str, ...] = ("w4", "bf16", "w4-triton", "w4-gemlite")
    cuda_prefill_tokens: int = 512
    cuda_decode_tokens: int = 96
    cuda_repeats: int = 2
    cuda_image_tiles: int = 13
    cuda_followup_history: tuple[int, ...] = (1024, 4096)  # follow-up TTFT after this much history
    cuda_followup_tokens: int = 24  # a short follow-up question
    cuda_long_context: int = 16384  # CUDA decode also after this many cached tokens (0: not)
    cuda_compiled: bool = True  # also time the compiled step (one compile per row)
    # (shape, variant) rows to measure, in order, instead of every shape × variant (--shape-rows:
    # a rerun measures only the rows an earlier call of a short lease did not reach)
    cuda_rows: tuple[tuple[str, str], ...] | None = None
    # the gemv section: rows M of one linear call (1: decode; more: prefill), its own time budget
    gemv_rows: tuple[int, ...] = (1, 4, 16, 32, 64, 128, 512)
    gemv_budget_s: float = 40.0
    # a subset of GEMV_VARIANTS (--gemv-columns; None: all). Not by default: tinygemm's dense path
    # with the torch-ops dequantization (×3.6 the Triton kernel's time on an H200: settled) and
    # GemLite (refused in bf16, the activations this section uses)
    gemv_columns: tuple[str, ...] | None = ("tinygemm", "tinygemm-dense", "triton", "bf16")
    # the gemv-sweep section: the triton GEMV on the decoder linears of `sweep_shape` under the
    # module's default launch configuration, then each of `sweep_configs`, at rows `sweep_rows`;
    # its own time budget (each new configuration compiles a kernel per shape: ~1 s on a GPU)
    sweep_shape: str = "InternVL3-8B"
    sweep_configs: tuple[tuple[int, int, int, int], ...] = GEMV_SWEEP_CONFIGS
    sweep_rows: tuple[int, ...] = (1,)
    sweep_budget_s: float = 100.0
    # the dequant-sweep section: both one-pass dequantization kernels on the decoder linears of
    # `sweep_shape` under the module's default launch configuration, then each of
    # `dqsweep_configs`; its own time budget (each new configuration compiles two kernels)
    dqsweep_configs: tuple[tuple[int, int, int], ...] = DEQUANT_SWEEP_CONFIGS
    dqsweep_budget_s: float = 60.0
    # CPU decode/prefill vs llama.cpp: models ("demo", "qwen0.5b"), dtypes, threads, token counts
    decode_models: tuple[str, ...] = ("demo", "qwen0.5b")
    decode_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    decode_threads: tuple[int, ...] = (1, 2)
    decode_prefill: int = 256
    decode_new: int = 64
    decode_repeats: int = 3
    # decode after a long context too, as (model, dtype or "*", context tokens): the demo after
    # about what a conversation with a picture reaches (`make demo` ends at ~1,900 tokens); the
    # 0.5B after 4k tokens of image-heavy context in its default dtype here only (llama.cpp
    # prefills that context again for every repeat: ~1 min a run in fp32 on one thread)
    decode_depths: tuple[tuple[str, str, int], ...] = (("demo", "*", 2048), ("qwen0.5b", "bfloat16", 4096))
    llama_cpp: bool = True

    def decode_depth(self, model: str, dtype: str) -> int:
        """The context after which `model` in `dtype` is also timed (0: not timed)."""
        return next((n for m, d, n in self.decode_depths if m == model and d in ("*", dtype)), 0)


FULL = Plan(
    name="full",
    sizes=TinySizes(
        vision_hidden=256, vision_layers=4, vision_heads=4, vision_mlp=1024,
        text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=2, text_ffn=1536,
    ),  # fmt: skip
    vocab_multiple=16384,
    decode_tokens=32,
    repeats=3,
    engine_image=(896, 448),  # 2×1 grid + thumbnail: 3 tiles
    chat_image=(800, 600),  # 4×3 grid + thumbnail: 13 tiles (SPEC §4)
    chat_turns=5,
    answer_tokens=12,
    max_context=4096,
)

# Small enough for a unit test; widths stay multiples of 128 so every decoder linear can be W4.
QUICK = Plan(
    name="quick",
    sizes=TinySizes(
        vision_hidden=64, vision_layers=1, vision_heads=4, vision_mlp=128,
        text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2, text_ffn=256,
    ),  # fmt: skip
    vocab_multiple=64,
    decode_tokens=4,
    repeats=1,
    engine_image=(448, 448),  # 1 tile
    chat_image=(896, 448),  # 3 tiles
    chat_turns=3,
    answer_tokens=3,
    max_context=1536,
    cuda_shapes=("tiny",),
    cuda_prefill_tokens=32,
    cuda_decode_tokens=4,
    cuda_repeats=1,
    cuda_image_tiles=1,
    cuda_followup_history=(64,),
    cuda_followup_tokens=8,
    cuda_long_context=1024,
    gemv_rows=(1, 4),
    sweep_shape="tiny",
    sweep_configs=((32, 128, 2, 1056), (128, 512, 8, 264)),  # a K split with its reduction; one step
    dqsweep_configs=((64, 8, 2), (128, 64, 8)),  # fewer words than a group; a tile past N and K
    decode_models=("demo",),
    decode_dtypes=("float32",),
    decode_threads=(1,),
    decode_prefill=32,
    decode_new=8,
    decode_repeats=1,
    decode_depths=(("demo", "*", 48),),
    llama_cpp=False,
)


# ---------------------------------------------------------------------------------------------
# Small utilities


def log(msg: str, start: float | None = None) -> None:
    stamp = f"[{time.perf_counter() - start:6.1f}s] " if start is not None else ""
    print(f"{stamp}{msg}", flush=True)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _git(*args: str) -> str | None:
    try:
        run = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """Where and when the numbers were taken (the git commit from git, else $BENCH_GIT_COMMIT)."""
    import transformers

    commit = _git("rev-parse", "HEAD") or os.environ.get("BENCH_GIT_COMMIT") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return info


def write_test_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A textured RGB image (gradients + noise) so every tile differs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 25, size=base.shape)
    Image.fromarray(noisy.clip(0, 255).astype("uint8")).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Checkpoints and models


def build_checkpoint(out_dir: Path, plan: Plan, seed: int = 0) -> Path:
    """The plan's random-weight model as an -hf checkpoint (bf16 safetensors, as published)."""
    from make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(
        out_dir, layout="hf", seed=seed, dtype="bfloat16", sizes=plan.sizes, vocab_multiple=plan.vocab_multiple
    )


def load_transformers(model_dir: Path, device: torch.device, dtype: torch.dtype):
    """The same checkpoint in transformers' InternVLForConditionalGeneration (default attention: SDPA)."""
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"transformers did not load {model_dir} cleanly: {bad}")
    return model.to(device).eval()


def decoder_linears(model) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every decoder-layer linear (fused qkv, o, fused gate_up, down)."""
    out = []
    for layer in model.language_model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in parent.named_children():
                out.append((parent, name, child))
    return out


def module_bytes(module: nn.Module) -> int:
    """Weight bytes of a module: parameters and buffers, except KV-cache buffers."""
    buffers = [b for name, b in module.named_buffers() if not name.endswith(("k_cache", "v_cache"))]
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + buffers)


def quantize_decoder_(model, backend: str, group_size: int = AWQ_GROUP) -> int:
    """Replace every decoder-layer nn.Linear by an RTN-quantized Int4Linear, in place (as the
    published AWQ checkpoints do: vision, projector, embeddings, norms, lm_head stay 16-bit).
    Returns how many linears were replaced."""
    from internvl_chat.quant import Int4Linear, quantize_rtn

    replaced = 0
    for parent, name, child in decoder_linears(model):
        if not isinstance(child, nn.Linear):
            continue
        with torch.no_grad():
            qweight, qzeros, scales = quantize_rtn(child.weight.detach().t().float().cpu(), group_size)
            bias = child.bias.detach() if child.bias is not None else None
            layer = Int4Linear.from_awq(
                qweight, qzeros, scales, bias=bias, group_size=group_size, backend=backend,
                dtype=child.weight.dtype, device=child.weight.device,
            )  # fmt: skip
        setattr(parent, name, layer)
        replaced += 1
    return replaced


def shape_config(name: str, w4: bool, vision: VisionConfig = VISION_300M, vocab: int = VOCAB) -> ModelConfig:
    """An InternVL3 ModelConfig from the SPEC §1 shapes (LLM) and InternViT-300M (vision); the
    dry-run shape "tiny" gets a tiny vision tower and vocabulary."""
    if name in DRY_SHAPES:
        return text_shape_config(*DRY_SHAPES[name], w4, VISION_TINY, 512)
    hidden, layers, heads, kv_heads, ffn = LLM_SHAPES[name]
    return text_shape_config(hidden, layers, heads, kv_heads, ffn, w4, vision, vocab)


def text_shape_config(
    hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, w4: bool, vision: VisionConfig, vocab: int
) -> ModelConfig:
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=hidden // heads, intermediate_size=ffn, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=32768, tie_word_embeddings=False,
    )  # fmt: skip
    return ModelConfig(layout="original", vision=vision, text=text, quant=QuantConfig() if w4 else None)


def fill_random_(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Small random values in place, on the model's device: norms ≈ 1, layer scales 0.1, the rest N(0, std).
    Never zeros (they can time faster than real data)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ls1", "ls2"):
                p.fill_(0.1)
            elif ("norm" in name or name.startswith("mlp1.0.")) and leaf == "weight":
                p.normal_(1.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)


def random_awq(in_features: int, out_features: int, device, group_size: int = AWQ_GROUP, seed: int = 0):
    """Random AWQ GEMM tensors (qweight, qzeros, scales): random nibbles, scales ≈ 2e-3 (weights ≈ ±0.03)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    words = out_features // 8

    def nibbles(rows: int) -> torch.Tensor:
        raw = torch.randint(0, 256, (rows, words * 4), dtype=torch.uint8, device=device, generator=gen)
        return raw.view(torch.int32)

    qweight = nibbles(in_features)
    qzeros = nibbles(in_features // group_size)
    scales = (torch.rand(in_features // group_size, out_features, device=device, generator=gen) * 2e-3 + 1e-3).half()
    return qweight, qzeros, scales


def build_random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_seq_len: int, backend: str = "auto"):
    """An InternVLModel with random weights built in place on `device` (no checkpoint files).
    With `cfg.quant` the decoder linears become Int4Linear from random AWQ tensors."""
    from internvl_chat.engine.model import InternVLModel, PendingInt4

    model = InternVLModel.empty(cfg, device, dtype, max_seq_len)
    model.image_token_id = IMG_CONTEXT_ID if cfg.text.vocab_size > IMG_CONTEXT_ID else cfg.text.vocab_size - 1
    fill_random_(model)
    if cfg.quant is not None:
        from internvl_chat.quant import Int4Linear

        for k, (parent, name, child) in enumerate(decoder_linears(model)):
            assert isinstance(child, PendingInt4), f"{name} is {type(child).__name__}, expected a 4-bit placeholder"
            qweight, qzeros, scales = random_awq(child.in_features, child.out_features, device, cfg.quant.group_size, seed=k)
            bias = None
            if child.has_bias:
                bias = torch.randn(child.out_features, device=device, dtype=dtype) * 0.02
            layer = Int4Linear.from_awq(
                qweight, qzeros, scales, bias=bias, group_size=cfg.quant.group_size, backend=backend, dtype=dtype, device=device
            )
            setattr(parent, name, layer)
            del qweight, qzeros, scales
    return model


# ---------------------------------------------------------------------------------------------
# Int4Linear backends and single linears (the gemv section)

class GemvVariant(NamedTuple):
    backend: str | None  # Int4Linear backend; None: a bf16 nn.Linear
    dense_threshold: int | None = None  # Int4Linear.dense_threshold for the call (None: the layer's)
    dequant_kernel: bool = True  # Int4Linear.dequant_kernel: the dense path's Triton dequantization


# The gemv section's columns. Tinygemm three times: its kernel at every M, its dense path
# (dequantize on the fly + dense matmul) at every M — the layer's own switch is between those
# two — and that dense path with the torch-ops dequantization it had before the Triton kernel.
GEMV_VARIANTS = {
    "tinygemm": GemvVariant("torch", 1 << 30),
    "tinygemm-dense": GemvVariant("torch", 0),
    "tinygemm-dense-torchops": GemvVariant("torch", 0, dequant_kernel=False),
    "triton": GemvVariant("triton"),
    "gemlite": GemvVariant("gemlite"),
    "bf16": GemvVariant(None),
}
# max |y − ref| / max |ref| above which a backend's output counts as wrong: bf16 activations and
# outputs with bf16-rounded scales stay near 1e-2 at most; a mis-packed weight gives ~1.
GEMV_MAX_REL_ERROR = 2e-2


def int4_backend_unavailable(name: str, device: torch.device | str) -> str | None:
    """Why Int4Linear backend `name` cannot run on `device`; None when it can (shape limits aside:
    those show when a layer is built). A backend beyond tinygemm ("triton", "gemlite", ...) counts
    once the build has it: the name in `internvl_chat.quant.BACKENDS` and its
    `<name>_backend_available(device)` true (looked up in internvl_chat.quant, then in its modules
    <name>_gemv, <name>_backend, <name>)."""
    import importlib

    from internvl_chat import quant

    if name not in quant.BACKENDS:
        return f"not in this build (internvl_chat.quant.BACKENDS has no {name!r})"
    if name in ("auto", "torch", "dequant"):
        return None
    check = f"{name}_backend_available"
    for module in ("internvl_chat.quant", f"internvl_chat.quant.{name}_gemv", f"internvl_chat.quant.{name}_backend",
                   f"internvl_chat.quant.{name}"):  # fmt: skip
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            return f"importing {module} failed: {e!r}"
        except Exception as e:  # e.g. a kernel library that cannot load here
            return f"importing {module} failed: {e!r}"
        if hasattr(mod, check):
            try:
                return None if getattr(mod, check)(torch.device(device)) else f"{check}({device}) is false"
            except Exception as e:
                return f"{check}({device}) failed: {e!r}"
    return f"no {check}() in internvl_chat.quant"


def gemv_variant_unavailable(label: str, device: torch.device | str) -> str | None:
    """Why the gemv section's column `label` cannot be measured on `device` (None: it can)."""
    backend, threshold, _ = GEMV_VARIANTS[label]
    if backend is None:
        return None
    if backend == "torch" and threshold == 0 and torch.device(device).type != "cuda":
        return "CUDA only (on the CPU tinygemm has no dense path)"
    return int4_backend_unavailable(backend, device)


def llm_linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the decoder linears of an LLM shape, fused as the engine
    fuses them: q/k/v into qkv, gate/up into gate_up (from the same config the shapes rows build)."""
    t = shape_config(name, w4=False).text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    return {"qkv": (t.hidden_size, q + 2 * kv), "o": (q, t.hidden_size), "gate_up": (t.hidden_size, 2 * t.intermediate_size),
            "down": (t.intermediate_size, t.hidden_size)}  # fmt: skip


def build_gemv_layer(label: str, awq: tuple[torch.Tensor, torch.Tensor, torch.Tensor], device: torch.device,
                     dtype: torch.dtype = torch.bfloat16, group_size: int = AWQ_GROUP) -> nn.Module:  # fmt: skip
    """One linear (no bias) for the gemv column `label` from AWQ tensors: an Int4Linear of that
    backend, or for "bf16" an nn.Linear holding the dequantized weight in `dtype`."""
    from internvl_chat.quant import Int4Linear, dequantize_awq

    backend, threshold, dequant_kernel = GEMV_VARIANTS[label]
    if backend is None:
        w = dequantize_awq(*awq, group_size, dtype=dtype).t().contiguous()
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
        return layer.requires_grad_(False)
    layer = Int4Linear.from_awq(*awq, group_size=group_size, backend=backend, dtype=dtype, device=device)
    if threshold is not None:
        layer.dense_threshold = threshold  # an instance attribute: only this layer's path changes
    layer.dequant_kernel = dequant_kernel
    return layer


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y − ref| / max |ref| (the reference's scale), in fp32; inf for a non-finite output."""
    err = (y.float() - ref).abs().max()
    scale = ref.abs().max()
    value = float(err / scale) if float(scale) > 0 else float(err)
    return value if math.isfinite(value) else float("inf")


def copies_beyond_cache(nbytes: int, device: torch.device, cache_bytes: int | None = None, max_copies: int = 256) -> int:
    """How many copies of `nbytes` hold ≥ 2× `cache_bytes` (default: the GPU's L2 cache; on the
    CPU none: 1), so that calling them in turn reads from memory, not from a warm cache."""
    if cache_bytes is None:
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        cache_bytes = (getattr(props, "L2_cache_size", 0) or (64 << 20)) if props is not None else 0
    return max(1, min(max_copies, math.ceil(2 * cache_bytes / max(nbytes, 1))))


def rotation_copies(layer: nn.Module, device: torch.device, cache_bytes: int | None = None,
                    max_copies: int = 256) -> list[nn.Module]:  # fmt: skip
    """The layer and enough copies of it that calling them in turn streams the weights from memory,
    as decode does, not from a warm cache: ≥ 2× `cache_bytes` in all (default: the GPU's L2 cache;
    on the CPU none, the layer alone)."""
    n = copies_beyond_cache(module_bytes(layer), device, cache_bytes, max_copies)
    copies = [layer]
    try:
        copies += [copy.deepcopy(layer) for _ in range(n - 1)]
    except Exception:  # a layer that cannot be copied is timed alone (warm cache: flagged by `copies`)
        pass
    return copies


def time_per_call(calls: Sequence[Callable[[], object]], device: torch.device, min_run_s: float = 1e-3,
                  reps: int = 5) -> dict:  # fmt: skip
    """Median seconds per call of `calls`, called in turn (a pass = each once), over `reps` runs of
    enough passes to last ≥ `min_run_s`. CUDA: one pass captured in a CUDA graph and replayed
    between CUDA events, so no Python launch cost is in the number (as in the decode graphs;
    eager passes if the capture fails); CPU: perf_counter."""
    for fn in calls:  # warm-up: kernel compiles, lazy init
        fn()
    sync(device)
    n = len(calls)

    def one_pass() -> None:
        for fn in calls:
            fn()

    if device.type == "cuda":
        method, once = "cuda graph", one_pass
        caller = torch.cuda.current_stream(device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(caller)
            with torch.cuda.stream(side):  # the warm-up PyTorch asks for before a capture
                one_pass()
            caller.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one_pass()
            once = graph.replay
            once()
        except Exception as e:
            # torch.cuda.graph leaves its capture stream current when capture_end raises: the
            # eager passes and their events belong on the caller's stream
            torch.cuda.set_stream(caller)
            method = f"cuda events, eager (graph capture failed: {e!r})"[:300]

        def clock(body: Callable[[], None]) -> float:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            body()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
    else:
        method, once = "perf_counter", one_pass

        def clock(body: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            body()
            return time.perf_counter() - t0

    passes = max(1, min(256, math.ceil(min_run_s / max(clock(once), 1e-9))))

    def run() -> None:
        for _ in range(passes):
            once()

    runs = [clock(run) / (passes * n) for _ in range(reps)]
    return {"s": median(runs), "method": method, "calls_per_run": passes * n}


def random_linear_case(in_features: int, out_features: int, rows: int, device: torch.device,
                       seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random AWQ tensors of a K→N linear (group 128), `rows` rows of bf16 activations, and the
    reference output x·W in fp32 with W dequantized: what the gemv and gemv-sweep sections time."""
    from internvl_chat.quant import dequantize_awq

    awq = random_awq(in_features, out_features, device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(rows, in_features, device=device, generator=gen).to(torch.bfloat16)
    return awq, x, x.float() @ dequantize_awq(*awq, AWQ_GROUP, dtype=torch.float32)


def timed_cell(nbytes: int, seconds: float, bandwidth: float, err: float) -> dict:
    """µs, GB/s and share of `bandwidth` of one timed call moving `nbytes`, and its output check."""
    return {"us": seconds * 1e6, "gb_per_s": nbytes / seconds / 1e9, "bandwidth_share": nbytes / seconds / bandwidth,
            "rel_error": err, "ok": err <= GEMV_MAX_REL_ERROR}  # fmt: skip


@torch.inference_mode()
def measure_linear(in_features: int, out_features: int, rows: Sequence[int], labels: Sequence[str], device: torch.device,
                   bandwidth: float, deadline: float | None = None, seed: int = 0, cache_bytes: int | None = None) -> dict:  # fmt: skip
    """One K→N linear of random AWQ weights (group 128, no bias) in each gemv column `labels`, at
    each row count: µs per call, effective GB/s = (the layer's resident bytes: weights, scales,
    zeros + bf16 activations in and out) ÷ time, its share of `bandwidth`, and the output's error
    against the dequantized weight in fp32 (max |y − ref| / max |ref|). Row counts left when
    `deadline` passes are recorded as skipped."""
    awq, x_all, ref_all = random_linear_case(in_features, out_features, max(rows), device, seed)
    out: dict = {"in_features": in_features, "out_features": out_features, "bytes": {}, "copies": {}, "errors": {},
                 "timing": set(), "rows": {}}  # fmt: skip
    layers: dict[str, list[nn.Module]] = {}
    for label in labels:
        try:
            layer = build_gemv_layer(label, awq, device)
            out["bytes"][label] = module_bytes(layer)
            layers[label] = rotation_copies(layer, device, cache_bytes)
            out["copies"][label] = len(layers[label])
        except Exception as e:  # e.g. a shape the backend does not take
            out["errors"][label] = repr(e)[:300]
    for m in rows:
        if deadline is not None and time.perf_counter() > deadline:
            out["rows"][str(m)] = {"skipped": "time budget spent"}
            continue
        x, ref = x_all[:m], ref_all[:m]
        row: dict = {}
        for label, copies in layers.items():
            try:
                err = relative_error(copies[0](x), ref)
                t = time_per_call([functools.partial(layer, x) for layer in copies], device)
                nbytes = out["bytes"][label] + m * (in_features + out_features) * x.element_size()
                row[label] = timed_cell(nbytes, t["s"], bandwidth, err)
                out["timing"].add(t["method"])
            except Exception as e:
                row[label] = {"error": repr(e)[:300]}
        row["fastest"] = fastest_int4(row)
        if row["fastest"] and "us" in row.get("bf16", {}):
            row["fastest_vs_bf16"] = row["bf16"]["us"] / row[row["fastest"]]["us"]
        out["rows"][str(m)] = row
    out["timing"] = sorted(out["timing"])
    out["check"] = {label: check_summary([r.get(label, {}) for r in out["rows"].values()]) for label in layers}
    del layers
    return out


def fastest_int4(row: dict) -> str | None:
    """The int4 column with the shortest time among those whose output passed the check."""
    timed = [(r["us"], label) for label, r in row.items()
             if isinstance(r, dict) and GEMV_VARIANTS.get(label, (None,))[0] and r.get("ok")]  # fmt: skip
    return min(timed)[1] if timed else None


def check_summary(cells: Sequence[dict]) -> dict:
    """A column's worst error over the row counts measured, and whether every one passed (None:
    nothing was measured)."""
    errors = [c["rel_error"] for c in cells if "rel_error" in c]
    ok = all(c["ok"] for c in cells if "rel_error" in c) if errors else None
    return {"max_rel_error": max(errors, default=None), "ok": ok, "limit": GEMV_MAX_REL_ERROR}


def choice_by_rows(rows: dict[str, dict]) -> list[dict]:
    """Runs of consecutive row counts with the same fastest int4 column: the "choose per shape" line."""
    runs: list[dict] = []
    for m, row in sorted(((int(m), r) for m, r in rows.items()), key=lambda item: item[0]):
        best = row.get("fastest")
        if best is None:
            continue
        if runs and runs[-1]["backend"] == best:
            runs[-1]["to_rows"] = m
        else:
            runs.append({"from_rows": m, "to_rows": m, "backend": best})
    return runs


# ---------------------------------------------------------------------------------------------
# The triton GEMV under other launch configurations (the gemv-sweep section)


def sweep_label(config) -> str:
    """A launch configuration's short name: n<BLOCK_N> k<BLOCK_K> w<NUM_WARPS> p<TARGET_PROGRAMS>."""
    return f"n{config.block_n} k{config.block_k} w{config.num_warps} p{config.target_programs}"


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (a compiler's error
    can run to pages)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}"[:300]


class SweepShape(NamedTuple):
    """One linear's inputs for the sweep: triton-layout copies to rotate through, activations, reference."""

    copies: list[nn.Module]  # Int4Linear (backend "triton") and its copies beyond the L2 cache
    x: torch.Tensor  # [max rows, K] bf16
    ref: torch.Tensor  # x·W in fp32, W dequantized from the AWQ tensors


@torch.inference_mode()
def prepare_sweep_shape(in_features: int, out_features: int, rows: Sequence[int], device: torch.device, bandwidth: float,
                        seed: int = 0, cache_bytes: int | None = None) -> tuple[SweepShape, dict]:  # fmt: skip
    """A K→N linear of random AWQ weights (group 128, no bias) as the triton backend holds it, and
    its record: bytes, copies, and tinygemm's µs at each row count (the bar a configuration must
    clear), timed as the gemv section times it."""
    awq, x, ref = random_linear_case(in_features, out_features, max(rows), device, seed)
    layer = build_gemv_layer("triton", awq, device)
    record: dict = {"in_features": in_features, "out_features": out_features, "bytes": module_bytes(layer),
                    "tinygemm": {}, "configs": {}}  # fmt: skip
    shape = SweepShape(rotation_copies(layer, device, cache_bytes), x, ref)
    record["copies"] = len(shape.copies)
    why = gemv_variant_unavailable("tinygemm", device)
    if why is not None:
        record["tinygemm"] = {"not_measured": why}
        return shape, record
    try:
        tinygemm = build_gemv_layer("tinygemm", awq, device)
        copies = rotation_copies(tinygemm, device, cache_bytes)
        for m in rows:
            nbytes = module_bytes(tinygemm) + m * (in_features + out_features) * x.element_size()
            err = relative_error(tinygemm(x[:m]), ref[:m])
            t = time_per_call([functools.partial(c, x[:m]) for c in copies], device, reps=_sweep_reps(device))
            record["tinygemm"][str(m)] = timed_cell(nbytes, t["s"], bandwidth, err)
        del copies, tinygemm
    except Exception as e:
        record["tinygemm"] = {"error": one_line(e)}
    return shape, record


def _sweep_reps(device: torch.device) -> int:
    """Timed runs per cell: 5 on a GPU; 2 on the CPU, where the interpreter's numbers mean nothing."""
    return 5 if device.type == "cuda" else 2


@torch.inference_mode()
def measure_gemv_config(shape: SweepShape, config, m: int, device: torch.device, bandwidth: float) -> dict:
    """The triton GEMV at `m` rows under launch configuration `config` (a triton_gemv.GemvConfig),
    called directly (not through the registered operator, which takes the module's constants):
    its launch (tiles, K split, programs), µs, share of `bandwidth`, output check; a configuration
    the kernel cannot run (a tile it refuses, too much shared memory) as {"error": one line}."""
    from internvl_chat.quant import triton_gemv

    layer = shape.copies[0]
    k, n = layer.in_features, layer.out_features
    block_n, block_g, per_split, splits = triton_gemv.launch_config(k, n, layer.group_size, config)
    cell: dict = {"launch": {"block_n": block_n, "block_g": block_g, "groups_per_split": per_split, "splits": splits,
                             "programs": m * -(-n // block_n) * splits}}  # fmt: skip
    x, ref = shape.x[:m], shape.ref[:m]

    def call(c: nn.Module) -> torch.Tensor:
        return triton_gemv.gemv_with_config(x, c.qweight, c.scales, c.zeros, None, c.group_size, config)

    try:
        err = relative_error(call(layer), ref)  # the first call compiles this configuration
        t = time_per_call([functools.partial(call, c) for c in shape.copies], device, reps=_sweep_reps(device))
    except Exception as e:
        return {**cell, "error": one_line(e)}
    cell["timing"] = t["method"]
    return {**cell, **timed_cell(module_bytes(layer) + m * (k + n) * x.element_size(), t["s"], bandwidth, err)}


def best_config(record: dict, m: int, default: str) -> dict | None:
    """The fastest configuration at `m` rows whose output passed the check, against the default
    configuration and tinygemm (ratios > 1: the best is faster)."""
    timed = [(cells[str(m)]["us"], label) for label, cells in record["configs"].items() if cells.get(str(m), {}).get("ok")]
    if not timed:
        return None
    us, label = min(timed)
    base = record["configs"].get(default, {}).get(str(m), {})
    tinygemm = record["tinygemm"].get(str(m), {})
    return {"config": label, "us": us, "vs_default": ratio(base["us"], us) if base.get("ok") else None,
            "vs_tinygemm": ratio(tinygemm["us"], us) if "us" in tinygemm else None}  # fmt: skip


def best_overall(shapes: dict, m: int, default: str) -> dict | None:
    """The configuration with the least total µs over every shape at `m` rows (only those that ran
    and passed on all of them): one set of module constants serves every linear."""
    records = [r for r in shapes.values() if "configs" in r]
    totals = {}
    for label in records[0]["configs"] if records else ():
        cells = [r["configs"].get(label, {}).get(str(m), {}) for r in records]
        if all(c.get("ok") for c in cells):
            totals[label] = sum(c["us"] for c in cells)
    if not totals:
        return None
    label = min(totals, key=totals.get)
    return {"config": label, "total_us": totals[label], "default_total_us": totals.get(default),
            "vs_default": ratio(totals[default], totals[label]) if default in totals else None}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The one-pass dequantization under other launch configurations (the dequant-sweep section)

# kernel → its launcher in quant/triton_dequant.py, looked up at each call: the tinygemm layout
# (Int4Linear's torch backend, the app's default on CUDA) and the triton backend's repacked layout
DEQUANT_KERNELS = {"tinygemm": "dequantize_tinygemm_with_config", "repacked": "dequantize_repacked_with_config"}


def dequant_label(config) -> str:
    """A dequantization launch configuration's short name: n<BLOCK_N> w<BLOCK_W> nw<NUM_WARPS>."""
    return f"n{config.block_n} w{config.block_w} nw{config.num_warps}"


def random_dequant_inputs(in_features: int, out_features: int, device: torch.device, seed: int = 0,
                          group_size: int = AWQ_GROUP) -> dict[str, tuple[torch.Tensor, ...]]:  # fmt: skip
    """Random resident tensors of a K→N linear in both layouts the kernels read, as Int4Linear holds
    them on CUDA: tinygemm's int32 [N/8, K/(16t), 32, t/2] with bf16 (scale, zero) [G, N, 2], and
    the triton backend's int32 [N, K/8] with fp16 scales and uint8 zeros [N, G]. Any bits are a
    valid packed weight; scales ≈ 2e-3 as in `random_awq`."""
    from internvl_chat.quant.int4_linear import _cuda_inner_k_tiles

    gen = torch.Generator(device=device).manual_seed(seed)
    groups = in_features // group_size
    tiles = _cuda_inner_k_tiles(group_size)

    def words(*shape: int) -> torch.Tensor:
        raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * 4), dtype=torch.uint8, device=device, generator=gen)
        return raw.view(torch.int32)

    def scales(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=device, generator=gen) * 2e-3 + 1e-3

    zeros = torch.randint(0, 16, (out_features, groups), dtype=torch.uint8, device=device, generator=gen)
    s = scales(groups, out_features)
    scale_and_zero = torch.stack((s, (8.0 - zeros.t().float()) * s), dim=-1).to(torch.bfloat16)
    tinygemm = (words(out_features // 8, in_features // (16 * tiles), 32, tiles // 2), scale_and_zero)
    repacked = (words(out_features, in_features // 8), scales(out_features, groups).half(), zeros)
    return {"tinygemm": tinygemm, "repacked": repacked}


def tensors_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DequantShape(NamedTuple):
    """One linear's inputs for the dequant sweep, per kernel: copies of its packed tensors to
    rotate through, and the default configuration's output (the bits every other one must give)."""

    copies: dict[str, list[tuple[torch.Tensor, ...]]]
    reference: dict[str, torch.Tensor]
    group_size: int
    dtype: torch.dtype


def dequantize_with_config(kernel: str, inputs: tuple[torch.Tensor, ...], group_size: int, dtype: torch.dtype, config) -> torch.Tensor:
    """The dequantization kernel `kernel` (a DEQUANT_KERNELS key) on `inputs` under `config`."""
    from internvl_chat.quant import triton_dequant

    return getattr(triton_dequant, DEQUANT_KERNELS[kernel])(*inputs, group_size, dtype, config)


@torch.inference_mode()
def prepare_dequant_shape(in_features: int, out_features: int, device: torch.device, seed: int = 0,
                          cache_bytes: int | None = None, dtype: torch.dtype = torch.bfloat16,
                          group_size: int = AWQ_GROUP) -> tuple[DequantShape, dict]:  # fmt: skip
    """A K→N linear's random packed tensors in both layouts, copied beyond the L2 cache, with the
    default configuration's outputs, and its record: bytes read (packed weight, scales, zeros) and
    written (the dense weight) per call, copies, and an empty `configs` per kernel."""
    from internvl_chat.quant import triton_dequant

    inputs = random_dequant_inputs(in_features, out_features, device, seed, group_size)
    written = out_features * in_features * torch.finfo(dtype).bits // 8
    record: dict = {"in_features": in_features, "out_features": out_features, "kernels": {}}
    copies, reference = {}, {}
    for kernel, tensors in inputs.items():
        read = tensors_bytes(tensors)
        n = copies_beyond_cache(read, device, cache_bytes, max_copies=64)
        copies[kernel] = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]
        reference[kernel] = dequantize_with_config(kernel, tensors, group_size, dtype, triton_dequant.default_config())
        record["kernels"][kernel] = {"read_bytes": read, "written_bytes": written, "bytes": read + written, "copies": n,
                                     "configs": {}}  # fmt: skip
    return DequantShape(copies, reference, group_size, dtype), record


def dequant_launch(kernel: str, in_features: int, out_features: int, group_size: int, config) -> dict:
    """The tile and number of programs `kernel` launches for a K→N weight under `config`."""
    from internvl_chat.quant import triton_dequant as td

    if kernel == "tinygemm":
        rows, cols = td.tinygemm_grid(out_features, in_features, config.block_n, config.block_w)
        return {"block_n": config.block_n, "block_w": config.block_w, "programs": rows * cols}
    block_g = td.repacked_block_groups(group_size, config.block_w)
    rows, cols = td.repacked_grid(out_features, in_features // group_size, config.block_n, block_g)
    return {"block_n": config.block_n, "block_g": block_g, "programs": rows * cols}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal (NaNs and signed zeros included), not merely equal as numbers."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@torch.inference_mode()
def measure_dequant_config(shape: DequantShape, kernel: str, config, nbytes: int, device: torch.device, bandwidth: float) -> dict:
    """Dequantization kernel `kernel` under launch configuration `config` (a
    triton_dequant.DequantConfig), called directly (not through the registered operator): its
    launch, µs, GB/s (`nbytes`: bytes read + written per call), share of
    `bandwidth`, and whether its output has the default configuration's bits (`exact`; `ok` only
    then); a configuration the kernel cannot run as {"error": one line}."""
    first = shape.copies[kernel][0]
    k, n = shape.reference[kernel].shape[1], shape.reference[kernel].shape[0]
    cell: dict = {"launch": dequant_launch(kernel, k, n, shape.group_size, config)}

    def call(inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return dequantize_with_config(kernel, inputs, shape.group_size, shape.dtype, config)

    try:
        out = call(first)  # the first call compiles this configuration
        exact = same_bits(out, shape.reference[kernel])
        if not exact:
            cell["mismatches"] = int((out != shape.reference[kernel]).sum()) if out.shape == shape.reference[kernel].shape else None
        del out
        t = time_per_call([functools.partial(call, c) for c in shape.copies[kernel]], device, reps=_sweep_reps(device))
    except Exception as e:
        return {**cell, "error": one_line(e)}
    return {**cell, "timing": t["method"], "us": t["s"] * 1e6, "gb_per_s": nbytes / t["s"] / 1e9,
            "bandwidth_share": nbytes / t["s"] / bandwidth, "exact": exact, "ok": exact}  # fmt: skip


def best_dequant_config(cells: dict[str, dict], default: str) -> dict | None:
    """The fastest configuration among `cells` (label → cell) whose output had the default's bits,
    against the default (`vs_default` > 1: the best is faster)."""
    timed = [(c["us"], label) for label, c in cells.items() if c.get("ok")]
    if not timed:
        return None
    us, label = min(timed)
    best, base = cells[label], cells.get(default, {})
    return {"config": label, "us": us, "gb_per_s": best["gb_per_s"], "bandwidth_share": best["bandwidth_share"],
            "vs_default": ratio(base["us"], us) if base.get("ok") else None}  # fmt: skip


def best_dequant_overall(records: Sequence[dict], kernel: str, default: str) -> dict | None:
    """For `kernel`, the configuration with the least total µs over every shape (only those that ran
    with the default's bits on all of them): one set of module constants serves every linear."""
    tables = [r["kernels"][kernel]["configs"] for r in records]
    totals = {label: sum(t[label]["us"] for t in tables) for label in (tables[0] if tables else ())
              if all(t.get(label, {}).get("ok") for t in tables)}  # fmt: skip
    if not totals:
        return None
    label = min(totals, key=totals.get)
    return {"config": label, "total_us": totals[label], "default_total_us": totals.get(default),
            "vs_default": ratio(totals[default], totals[label]) if default in totals else None}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bandwidth accounting (batch-1 decode)


def decode_bytes_per_token(model, context_len: int) -> dict:
    """Bytes one decode step must read: decoder weights (all of them), final norm, lm_head, one
    embedding row, and the K/V of `context_len` cached positions. Vision weights are not read."""
    lm = model.language_model
    cfg = lm.cfg
    layers = sum(module_bytes(layer) for layer in lm.model.layers)
    head = module_bytes(lm.lm_head) + module_bytes(lm.model.norm)
    emb = lm.model.embed_tokens.weight
    embed_row = emb.shape[1] * emb.element_size()
    kv_elem = lm.k_cache[0].element_size() if lm.k_cache else emb.element_size()
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context_len * kv_elem
    weights = layers + head + embed_row
    return {"weights": weights, "kv": kv, "total": weights + kv}


# ---------------------------------------------------------------------------------------------
# Timed loops


def _masked_argmax(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    if banned is not None:
        logits = logits.index_fill(0, banned, float("-inf"))  # as min_new_tokens does in transformers
    return logits.argmax()


@torch.inference_mode()
def engine_greedy(model, prompt: Sequence[int], features: torch.Tensor | None, n: int, banned: Sequence[int] = ()) -> dict:
    """Prefill then n greedy tokens with `forward(token, pos)` per step (no host sync in the loop).
    Stop ids are masked, so exactly n tokens come out (as with transformers' min_new_tokens)."""
    device = model.device
    ban = torch.tensor(list(banned), device=device) if banned else None
    sync(device)
    t0 = time.perf_counter()
    token = _masked_argmax(model.forward(prompt, 0, features), ban)
    sync(device)
    t1 = time.perf_counter()
    tokens = [token]
    pos = len(prompt)
    for _ in range(n - 1):
        token = _masked_argmax(model.forward(token, pos), ban)
        tokens.append(token)
        pos += 1
    sync(device)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens": n - 1, "tokens": torch.stack(tokens).tolist()}


@torch.inference_mode()
def time_vision(model, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
    device = model.device
    sync(device)
    t0 = time.perf_counter()
    features = model.encode_images(pixels)
    sync(device)
    return time.perf_counter() - t0, features


class StepTimer:
    """A transformers streamer that stamps each `put`: the first put is the prompt, then one per token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > 1:
            self.tokens.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


@torch.inference_mode()
def transformers_greedy(hf, prompt: Sequence[int], pixels: torch.Tensor, n: int, stop_ids: Sequence[int]) -> dict:
    """transformers' generate(do_sample=False, max_new_tokens=n, min_new_tokens=n), timed per token."""
    device = hf.device
    ids = torch.tensor([list(prompt)], device=device)
    timer = StepTimer(device)
    sync(device)
    t0 = time.perf_counter()
    hf.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.to(device, hf.dtype),
        max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=list(stop_ids),
        pad_token_id=stop_ids[0], streamer=timer,
    )  # fmt: skip
    first, last = timer.stamps[1], timer.stamps[-1]
    return {"ttft_s": first - t0, "decode_s": last - first, "decode_tokens": len(timer.stamps) - 2, "tokens": timer.tokens}


@torch.inference_mode()
def transformers_vision(hf, pixels: torch.Tensor) -> float:
    device = hf.device
    px = pixels.to(device, hf.dtype)
    sync(device)
    t0 = time.perf_counter()
    cfg = hf.config
    hf.get_image_features(
        pixel_values=px,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def eager_decode_rate(model, first_token: torch.Tensor, start: int, n: int) -> float:
    """Tokens/s of n greedy `forward(token, pos)` steps from position `start` (synchronised)."""
    device = model.device
    token = first_token
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        token = model.forward(token, start + i).argmax()
    sync(device)
    return n / (time.perf_counter() - t0)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (the decode ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def ops_per_step(model, token: torch.Tensor, pos: int) -> dict:
    """What one decode step launches: CUDA kernels (graph replays included) on a GPU; on CPU the
    top-level aten calls (Inductor's own fused C++ kernels do not appear there)."""
    return profiled_ops(lambda: model.forward(token, pos), model.device)


def profiled_ops(call, device: torch.device) -> dict:
    """What `call()` launches (see ops_per_step): the count, the time the ops took as the profiler
    times them (`op_us`; on a GPU, well under the call's wall time when launches, not kernels, set
    the pace) and where it goes (`top`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        call()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        ops, kind = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA], "CUDA kernels"
    else:
        ops, kind = [e for e in events if e.name.startswith(("aten::", "aoti_torch_")) and
                     (e.cpu_parent is None or not e.cpu_parent.name.startswith(("aten::", "aoti_torch_")))], "aten calls"  # fmt: skip
    return {"kind": kind, "per_step": len(ops), "op_us": round(sum(e.time_range.elapsed_us() for e in ops), 1),
            "top": top_ops(ops)}  # fmt: skip


def top_ops(events, keep: int = 12) -> list[dict]:
    """Where one step's time goes: the `keep` op names (kernels on a GPU) with the most time, each
    with its calls and µs (as the profiler times them, so the sum is near, not at, a step's time)."""
    by_name: dict[str, dict] = {}
    for e in events:
        row = by_name.setdefault(e.name[:120], {"name": e.name[:120], "calls": 0, "us": 0.0})
        row["calls"] += 1
        row["us"] += e.time_range.elapsed_us()
    rows = sorted(by_name.values(), key=lambda r: -r["us"])
    for row in rows:
        row["us"] = round(row["us"], 1)
    return rows[:keep]


@contextlib.contextmanager
def fused_kernels(enabled: bool):
    """The eager layers with or without engine/fused.py's kernels (where they run: CUDA)."""
    from internvl_chat.engine import fused

    saved = dict(fused.ENABLED)
    if not enabled:
        fused.ENABLED.update(dict.fromkeys(saved, False))
    try:
        yield
    finally:
        fused.ENABLED.clear()
        fused.ENABLED.update(saved)


def engine_decode(model, first_token: torch.Tensor, start: int, n: int, repeats: int, graphs: bool, compiled: bool) -> dict:
    """Tokens/s through `model.forward(token, pos)` as the streaming generator drives it (each step
    queued, then the previous token read back to the host), with the engine's CUDA graphs and/or
    compiled step switched on for the run; ops per step counted once. Restores the eager engine."""
    device = model.device
    out: dict = {}
    try:
        model.enable_cuda_graphs(graphs)
        if compiled:
            t0 = time.perf_counter()
            ok = model.enable_compile(True)
            out["compile_s"] = time.perf_counter() - t0
            if not ok:
                raise RuntimeError("the decode step did not compile")
            out["inductor_options"] = inductor_options(device)  # e.g. whether PDL was asked for

        def run(steps: int) -> float:
            token = first_token.reshape(1)
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                following = model.forward(token, start + i).argmax().reshape(1)
                int(token)  # the host reads each token, as the generator does
                token = following
            int(token)
            sync(device)
            return steps / (time.perf_counter() - t0)

        with torch.inference_mode():
            run(min(8, n))  # warm-up: captures graphs / first compiled calls
            runs = [run(n) for _ in range(repeats)]
        # a mode that fell back during the runs (with its one-line note) measured the eager step:
        # its number must not stand in the table as that mode's
        step, graph_runner = model.compiled_step, model.decode_graphs
        if compiled and not step.active:
            raise RuntimeError(f"the compiled step fell back to the eager one: {step.failure}")
        if graphs and graph_runner is not None and graph_runner.failure is not None:
            raise RuntimeError(f"the CUDA graphs fell back to launches without graphs: {graph_runner.failure}")
        out.update(tokens_per_s=median(runs), runs=runs)
        out["ops"] = ops_per_step(model, first_token.reshape(1), start + n)
        if compiled:
            out["compiled_steps"] = step.steps
    finally:
        model.enable_compile(False)
        model.enable_cuda_graphs(False)
    return out


# ---------------------------------------------------------------------------------------------
# CPU decode and prefill, ours (eager and compiled) side by side with llama.cpp

DEMO_MODEL = REPO_ROOT / "internvl_chat" / "demo_model"
# The LLM of InternVL3-1B (Qwen2.5-0.5B's shape, SPEC §1) under a token vision tower; random weights.
QWEN05_SIZES = TinySizes(
    vision_hidden=64, vision_layers=2, vision_heads=4, vision_mlp=128,
    text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_ffn=4864,
)  # fmt: skip


def build_shape_checkpoint(out_dir: Path, sizes: TinySizes = QWEN05_SIZES, vocab: int = VOCAB) -> Path:
    """An original-layout bf16 checkpoint with random weights at `sizes` and exactly `vocab` rows
    (the tiny tokenizer's ~1,000 tokens rounded up to `vocab`), as llama.cpp's converter reads it."""
    from make_tiny_checkpoint import make_tiny_checkpoint

    if (out_dir / "config.json").is_file():
        return out_dir
    return make_tiny_checkpoint(out_dir, layout="original", dtype="bfloat16", sizes=sizes, vocab_multiple=vocab)


def llama_cpp_tool() -> Path | None:
    """The shared llama.cpp helper (`llama-cpp build|bin|convert`): $LLAMA_CPP_TOOL, else
    ../shared/tools/llama-cpp next to the repository."""
    for candidate in (os.environ.get("LLAMA_CPP_TOOL"), REPO_ROOT.parent / "shared" / "tools" / "llama-cpp",
                      Path("/work/shared/tools/llama-cpp")):  # fmt: skip
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def llama_cpp_bin(tool: Path | None) -> Path | None:
    """The folder holding llama-bench, if llama.cpp has been built (never builds it)."""
    if tool is None:
        return None
    run = subprocess.run([str(tool), "bin"], capture_output=True, text=True, timeout=30)
    folder = Path(run.stdout.strip()) if run.returncode == 0 and run.stdout.strip() else None
    return folder if folder and (folder / "llama-bench").is_file() else None


def convert_gguf(tool: Path, model_dir: Path, out_dir: Path, kind: str) -> Path:
    """The language model of an original-layout checkpoint as GGUF (`kind`: f32 or bf16), cached in out_dir."""
    gguf = out_dir / "model.gguf"
    if gguf.is_file():
        return gguf
    env = {**os.environ, "LLAMA_CPP_TEXT_ONLY": "1"}
    run = subprocess.run([str(tool), "convert", str(model_dir), str(out_dir), kind], capture_output=True, text=True,
                         timeout=1800, env=env)  # fmt: skip
    if run.returncode != 0 or not gguf.is_file():
        raise RuntimeError(f"llama.cpp conversion failed: {(run.stderr or run.stdout).strip()[-500:]}")
    return gguf


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int, repeats: int, depth: int = 0) -> dict:
    """llama-bench's prefill (pp) and decode (tg) tokens/s for one model and thread count; with
    `depth`, decode only, after a context of that many tokens (`-d`), with and without its flash
    attention (its default "auto" takes the slower one on this CPU): the better of the two counts."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(0 if depth else prompt),
           "-n", str(gen), "-r", str(repeats), "-o", "json"] + (["-d", str(depth), "-fa", "0,1"] if depth else [])  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    out = {"command": " ".join(cmd)}
    for row in json.loads(run.stdout):
        key = "prefill" if row.get("n_prompt", 0) > 0 else "decode"
        if row["avg_ts"] > out.get(f"{key}_tokens_per_s", 0):
            out[f"{key}_tokens_per_s"] = row["avg_ts"]
            out[f"{key}_stddev"] = row.get("stddev_ts")
        if depth:
            out.setdefault("decode_by_flash_attn", {})[str(row.get("flash_attn"))] = row["avg_ts"]
        out.setdefault("build", row.get("build_commit"))
        out.setdefault("type", row.get("model_type"))
    return out


def _decode_rate(model, first: list[int], n: int) -> float:
    """Tokens/s of n greedy steps after the context `first` (llama-bench's tg times a new context;
    ours starts after two tokens, as the compiled step serves positions ≥ 2 and the app never
    decodes earlier)."""
    return _steps_rate(model, model.forward(first, 0).argmax().view(1), len(first), n)


def _steps_rate(model, token: torch.Tensor, start: int, n: int) -> float:
    """Tokens/s of n greedy steps from `token` at position `start`; each step writes its own cache
    entry before any step reads it, so runs from the same start can repeat on one prefill."""
    t0 = time.perf_counter()
    for i in range(n):
        token = model.forward(token, start + i).argmax().view(1)
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def decode_probe(model_dir: str, dtype: str, threads: int, prefill: int, decode: int, repeats: int, compiled: bool,
                 depth: int = 0) -> dict:  # fmt: skip
    """In a fresh process: prefill and decode tokens/s, eager, then compiled (compile time included);
    with `depth`, compiled decode after a context of that many tokens too."""
    from internvl_chat.engine.loader import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model_dir, device="cpu", dtype=dtype, max_context=max(1024, prefill + decode + 64, depth + decode + 64))
    model = loaded.model
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(loaded.config.text.vocab_size, 4096), (prefill,), generator=gen).tolist()
    model.forward(prompt, 0)  # warm-up
    prefill_runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward(prompt, 0)
        prefill_runs.append(prefill / (time.perf_counter() - t0))
    first = prompt[:2]  # steps at positions 2…: each attends over one key more than llama-bench's
    _decode_rate(model, first, min(decode, 8))  # warm-up
    eager = [_decode_rate(model, first, decode) for _ in range(repeats)]
    traffic = decode_bytes_per_token(model, decode // 2)
    layers = loaded.config.text.num_layers
    probe_token = torch.tensor([first[0]])
    out = {
        "dtype": dtype, "threads": threads, "torch_threads": torch.get_num_threads(), "prefill_tokens": prefill,
        "decode_tokens": decode, "prefill_tokens_per_s": median(prefill_runs), "prefill_runs": prefill_runs,
        "eager_tokens_per_s": median(eager), "eager_runs": eager, "bytes_per_token": traffic["total"],
        "layers": layers, "eager_ops_per_layer": ops_per_step(model, probe_token, decode)["per_step"] / layers,
    }  # fmt: skip
    if compiled:
        with torch.inference_mode(False):
            t0 = time.perf_counter()
            ok = model.enable_compile(True)
            out["compile_s"] = time.perf_counter() - t0
        if ok:
            _decode_rate(model, first, min(decode, 8))
            runs = [_decode_rate(model, first, decode) for _ in range(repeats)]
            out.update(compiled_tokens_per_s=median(runs), compiled_runs=runs, compiled_steps=model.compiled_step.steps,
                       compiled_kind="C++ step" if model.compiled_step.native is not None else "Inductor")  # fmt: skip
            # aten calls left around Inductor's fused C++ kernels or the C++ step (neither is listed)
            out["compiled_ops_per_layer"] = ops_per_step(model, probe_token, decode)["per_step"] / layers
            if depth:
                context = torch.randint(0, min(loaded.config.text.vocab_size, 4096), (depth,), generator=gen).tolist()
                token = model.forward(context, 0).argmax().view(1)  # one prefill for every run
                deep = [_steps_rate(model, token, depth, decode) for _ in range(repeats)]
                out.update(depth=depth, depth_compiled_tokens_per_s=median(deep), depth_compiled_runs=deep)
        else:
            out["compile_error"] = model.compile_failure or "compile failed"
    return out


def run_decode_probe(model_dir: Path, dtype: str, threads: int, prefill: int, decode: int, repeats: int,
                     compiled: bool = True, timeout: float = 3600, depth: int = 0) -> dict:  # fmt: skip
    """`decode_probe` in a fresh Python process (its own thread count and compiled kernels)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    args = ["decode-probe", str(model_dir), dtype, str(threads), str(prefill), str(decode), str(repeats), str(int(compiled)),
            str(depth)]  # fmt: skip
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                         timeout=timeout, env=env)  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"decode probe failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Load probe (runs in a fresh process)


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_probe(model_dir: str, device: str, dtype: str, max_context: int, warm: bool = True) -> dict:
    """Load once and report load time and peak memory against the weights' size in the target dtype.

    `warm` first pays the process's one-time costs outside the measurement: the tokenizer's
    imports and torch's meta-device dispatch (the first model built on "meta" imports ~75 MB of
    torch internals), by loading the tokenizer and building the model once on "meta".
    """
    import transformers  # noqa: F401  (imported before the baseline: its import is not the loader's memory)

    from internvl_chat.engine.tokenizer import load_tokenizer
    from internvl_chat.engine.config import load_config
    from internvl_chat.engine.loader import load_model
    from internvl_chat.engine.model import InternVLModel

    if warm:
        load_tokenizer(model_dir)
        with torch.device("meta"):
            InternVLModel(load_config(model_dir))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(dev)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def sample() -> None:  # complements VmHWM with the anonymous/file split
        while not done.is_set():
            for key in peaks:
                peaks[key] = max(peaks[key], _status_kib(key))
            time.sleep(0.002)

    rss0 = _status_kib("VmRSS")
    anon0, file0 = _status_kib("RssAnon"), _status_kib("RssFile")
    hwm_reset = _reset_hwm()
    base_alloc = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    loaded = load_model(model_dir, device=dev, dtype=dtype, max_context=max_context)
    load_s = time.perf_counter() - t0
    done.set()
    sampler.join()
    hwm = _status_kib("VmHWM")
    peak_kib = hwm if hwm_reset else max(hwm, peaks["VmRSS"])
    weights = loaded.model.memory_bytes()
    cache = loaded.model.language_model.cache_bytes()
    files = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    out = {
        "device": device,
        "dtype": dtype,
        "warm_process": warm,
        "load_s": load_s,
        "weights_bytes": weights,
        "kv_cache_bytes": cache,
        "checkpoint_file_bytes": files,
        "hwm_reset": hwm_reset,
        "peak_rss_delta_bytes": (peak_kib - rss0) * 1024,
        "peak_rss_anon_delta_bytes": (peaks["RssAnon"] - anon0) * 1024,
        "peak_rss_file_delta_bytes": (peaks["RssFile"] - file0) * 1024,
        "final_rss_delta_bytes": (_status_kib("VmRSS") - rss0) * 1024,
    }
    out["peak_rss_over_weights"] = ratio(out["peak_rss_delta_bytes"], weights)
    # anonymous memory is what the loader allocates; file-backed is the checkpoint's mmap (page cache)
    out["peak_rss_anon_over_weights"] = ratio(out["peak_rss_anon_delta_bytes"], weights)
    out["peak_rss_minus_cache_over_weights"] = ratio(out["peak_rss_delta_bytes"] - cache, weights)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base_alloc
        out["peak_gpu_alloc_bytes"] = peak
        out["peak_gpu_over_weights"] = ratio(peak, weights)
        out["peak_gpu_minus_cache_over_weights"] = ratio(peak - cache, weights)
    return out


def run_load_probe(
    model_dir: Path, device: str, dtype: str, max_context: int, warm: bool = True, timeout: float = 300
) -> dict:
    """Run `load_probe` in a fresh Python process and return its JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "load-probe", str(model_dir), device, dtype, str(max_context),
         "warm" if warm else "cold"],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"load probe failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def plan_dict(plan: Plan) -> dict:
    d = asdict(plan)
    d["sizes"] = asdict(plan.sizes)
    return d


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "load-probe" and sys.argv[6] in ("warm", "cold"):
        print(json.dumps(load_probe(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6] == "warm")))
    elif len(sys.argv) == 10 and sys.argv[1] == "decode-probe":
        d, dt, thr, p, n, r, c, depth = sys.argv[2:]
        print(json.dumps(decode_probe(d, dt, int(thr), int(p), int(n), int(r), c == "1", int(depth))))
    else:
        sys.exit("usage: bench_lib.py load-probe DIR DEVICE DTYPE MAX_CONTEXT warm|cold\n"
                 "       bench_lib.py decode-probe DIR DTYPE THREADS PREFILL DECODE REPEATS COMPILE(0|1) DEPTH")
