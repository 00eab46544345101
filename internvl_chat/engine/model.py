"""InternVL: vision encoder + pixel shuffle + projector + Qwen2 decoder, with the static KV cache.

`encode_images(tiles) -> features` and `forward(ids, start_pos, features) -> logits` are the whole
interface the chat layer uses. `load_weights` takes canonical (original-layout) tensor names.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..errors import Cancelled, CheckpointError, ContextOverflowError
from ..files import visible
from ..numbers import counted
from . import cpu_features
from .config import ModelConfig
from .language import Qwen2ForCausalLM, row_chunk_bytes
from .vision import InternViT, Projector, pixel_shuffle

# checkpoint linears that live as row blocks of one fused linear here: name -> (fused, block index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_AWQ_SUFFIXES = ("qweight", "qzeros", "scales")
_EMBED = "language_model.model.embed_tokens.weight"
_LM_HEAD = "language_model.lm_head.weight"
_LAYER_LINEAR = re.compile(r"^(language_model\.model\.layers\.\d+\.(?:self_attn|mlp))\.(\w+)\.(\w+)$")


# A one-token step of a decoder smaller than this is a chain of tiny operations: spreading each over
# several CPU threads only adds a barrier per operation, and one busy core stalls them all (the
# demo model decoded at 35 tok/s with 2 threads next to a busy core, ~800 with one).
SMALL_DECODER_BYTES = 64 * 2**20
# A prompt is prefilled in chunks of at most this many tokens, and a cancel event is looked at
# between them (a client that left, a server that stops). CPU: as much work per chunk as 256
# tokens on a 0.5B decoder (2-3 s on 2 cores), at least 256 and at most 2,048 tokens. Chunks of
# 256 tokens or more prefill as fast as one whole-prompt forward; 128 were 10-20 % slower
# (benchmarks/RESULTS.md, Update 9). CUDA: a 13-tile image prompt (3,368 tokens) stays one forward.
PREFILL_CHUNK_WORK = {"cpu": 256 * 500_000_000, "cuda": None}
PREFILL_CHUNK_TOKENS = {"cpu": (256, 2048), "cuda": (8192, 8192)}


# A scored prefill (PromptScores) turns this many rows of hidden states into logits at a time:
# [rows, V] float32 and its log_softmax, ~40 MB each for Qwen2's 152k vocabulary, whatever the chunk.
SCORE_ROWS = 64


def logprob_rows(logits: torch.Tensor, next_ids: torch.Tensor, k: int) -> torch.Tensor:
    """On the logits' device, float64 [r, 1 + 2k]: for each row of logits [r, V], the log-probability
    (log_softmax) of its `next_ids` [r] entry, then the k largest and their ids (exact in float64), so
    one copy reads them all. Device-side only: a decode step's sampler packs its token with it
    (chat/sampling.py's logprob_pack) and must not synchronise with the host."""
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(1, next_ids[:, None]).double()
    if k == 0:
        return chosen
    top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return torch.cat([chosen, top.values.double(), top.indices.double()], dim=1)


class PromptScores:
    """Asks a prefill for each prompt token's log-probability after the first: the model's
    log_softmax (float32) at the position before it, the token's value and the `k` most likely
    ids there. Opt-in (`forward(..., scores=)`): a prefill without it keeps only the last position's
    logits. Rows are computed SCORE_ROWS at a time and kept on the device, read back in one transfer."""

    def __init__(self, k: int):
        self.k = k
        self._packs: list[torch.Tensor] = []  # [rows, 1 + 2k] float64: value, k values, k ids (exact in float64)

    def add(self, logits: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Score `next_ids` [r] under logits [r, V], the positions before them."""
        self._packs.append(logprob_rows(logits, next_ids, self.k))

    def table(self) -> torch.Tensor:
        """[scored tokens, 1 + 2k] float64 on the CPU: each one's value, k values, k ids, in prompt order."""
        if not self._packs:
            return torch.empty(0, 1 + 2 * self.k, dtype=torch.float64)
        return torch.cat(self._packs).cpu()

    def rows(self) -> list[list[float]]:
        """One [value, k values, k ids] list for each scored token, in prompt order."""
        return self.table().tolist()


@contextmanager
def decode_threads(n: int | None):
    """Run the block with `n` intra-op CPU threads (None: unchanged); ~0.2 µs to switch."""
    if n is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def prefill_chunk_tokens(device: torch.device, decoder_parameters: int) -> int:
    """Tokens per prefill forward on `device` for a decoder of that many parameters (a power of two)."""
    low, high = PREFILL_CHUNK_TOKENS.get(device.type, PREFILL_CHUNK_TOKENS["cuda"])
    work = PREFILL_CHUNK_WORK.get(device.type)
    tokens = high if work is None else work // max(decoder_parameters, 1)
    return max(low, min(high, 1 << max(tokens, 1).bit_length() - 1))


def _stop_if_set(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled before the answer began")


def _some_of(counted_names: str, names: list[str]) -> str:
    """`2 tensors: a, b` for three names or fewer; `5 tensors, e.g. a, b, c` for more."""
    if len(names) <= 3:
        return f"{counted_names}: {', '.join(names)}"
    return f"{counted_names}, e.g. {', '.join(names[:3])}"


def _short_name(name: str) -> str:
    """A tensor name from the file for an error line: escaped, and cut short (a header may hold a
    name of any length)."""
    return visible(name if len(name) <= 80 else name[:77] + "…")


class PendingInt4(nn.Module):
    """Stands where a 4-bit linear will go until its packed tensors have all been read."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, has_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("4-bit weights were not loaded for this linear")


class InternVLModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.downsample_ratio != 0.5:
            raise CheckpointError(f"downsample_ratio {cfg.downsample_ratio} is not supported; InternVL3 uses 0.5")
        self.cfg = cfg
        self.vision_model = InternViT(cfg.vision)
        self.mlp1 = Projector(4 * cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = Qwen2ForCausalLM(cfg.text)
        self.image_token_id: int | None = None
        self.int4_backend = "auto"
        self.vision_batch = 8  # tiles per ViT call: bounds attention memory on long videos
        self.prefill_chunk = 2048  # tokens per prefill forward; empty() sets it per device (prefill_chunk_tokens)
        self.decode_graphs = None  # set by enable_cuda_graphs()
        self.prefill_graph_pool = None  # the CUDA memory pool of every short-prefill graph (cuda_graph.py)
        self._graphs_wanted = False
        self.compiled_step = None  # set by enable_compile()
        self.compile_failure: str | None = None  # its one-line reason when compiling failed
        # CPU threads for a one-token step (None: all of torch's); see decode_threads() below
        self.decode_threads: int | None = None
        if cfg.quant is not None:
            self._make_int4_placeholders()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def empty(cls, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, max_seq_len: int) -> InternVLModel:
        """Allocate the model on `device` without initialising weights (they are loaded next).

        Tensors are allocated with torch.empty rather than `to_empty` (torch.empty_like): on "meta"
        tensors that runs torch's Python reference kernels, whose first use imports sympy and
        torch._dynamo — seconds before the first prompt.
        """
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to(dtype)
        vision_dtype = cpu_features.vision_dtype(device, dtype)
        for tower in (model.vision_model, model.mlp1):
            tower.to(vision_dtype)
        model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
        decoder_weights = cpu_features.decoder_weight_bytes(cfg.text, bytes_per_weight=1)
        kv_dtype = cpu_features.kv_cache_dtype(device, dtype, 2 * decoder_weights)
        model.language_model.allocate_cache(max_seq_len, device, kv_dtype)
        model.prefill_chunk = prefill_chunk_tokens(device, decoder_weights)
        return model.eval()

    def largest_tensor_elements(self) -> int:
        """The most elements a checkpoint tensor of this model may hold (a weight, or a part of a
        4-bit linear, which packs fewer elements than its in × out)."""
        sizes = [t.numel() for t in self.state_dict().values()]
        sizes += [m.in_features * m.out_features for m in self.modules() if isinstance(m, PendingInt4)]
        return max(sizes, default=0)

    def _make_int4_placeholders(self) -> None:
        for layer in self.language_model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, PendingInt4(child.in_features, child.out_features, child.bias is not None))

    def enable_cuda_graphs(self, enabled: bool = True) -> None:
        """Replay one-token decode steps and short prefills from captured CUDA graphs (CUDA only;
        see cuda_graph.py)."""
        self._graphs_wanted = enabled and self.device.type == "cuda"
        step = self.compiled_step
        if step is not None and step.for_graphs != self._graphs_wanted:
            self._compile(step.notify)  # it was compiled for the other entry point
        self._build_graphs()

    def enable_compile(self, enabled: bool = True, notify=None) -> bool:
        """Compile the one-token decode step now (see compiled.py), inside the CUDA graphs when they
        are on. Returns False, after a one-line note, if that fails: decoding then stays eager."""
        self.compiled_step = None
        if enabled:
            self._compile(notify)
        self._build_graphs()
        return self.compiled_step is not None

    def _compile(self, notify) -> None:
        from .compiled import CompiledStep

        step = CompiledStep(self.language_model, self.device, self._graphs_wanted, notify)
        with decode_threads(self.decode_threads):  # its C++ kernels are built for that many threads
            self.compiled_step = step if step.compile() else None
        self.compile_failure = step.failure

    def _build_graphs(self) -> None:
        from .cuda_graph import DecodeGraphs

        step = self.compiled_step
        self.decode_graphs = DecodeGraphs(self, step.masked if step else None) if self._graphs_wanted else None
        # a new set of graphs starts a new prefill pool: capturing into one whose graphs are gone
        # while one of their tensors lives trips an assertion inside torch
        self.prefill_graph_pool = None

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def max_seq_len(self) -> int:
        return self.language_model.max_seq_len

    # ---- weights ----------------------------------------------------------------------------
    def _expected_names(self) -> set[str]:
        """Canonical checkpoint names this model needs, derived from its own parameters."""
        names = set()
        for name, _ in self.named_parameters():
            m = _LAYER_LINEAR.match(name)
            fused = m and _FUSED_PARTS.get(m.group(2))
            if fused:
                names.update(f"{m.group(1)}.{part}.{m.group(3)}" for part in fused)
            else:
                names.add(name)
        for name, module in self.named_modules():
            if isinstance(module, PendingInt4):
                prefix, leaf = name.rsplit(".", 1)
                for part in _FUSED_PARTS.get(leaf, (leaf,)):
                    names.update(f"{prefix}.{part}.{s}" for s in _AWQ_SUFFIXES)
                    if module.has_bias:
                        names.add(f"{prefix}.{part}.bias")
        return names

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into place; raise CheckpointError naming what does not fit."""
        params = dict(self.named_parameters())
        expected = self._expected_names()
        seen: set[str] = set()
        unexpected: list[str] = []
        pending: dict[str, dict[str, torch.Tensor]] = {}  # 4-bit parts waiting for their siblings
        for name, tensor in tensors:
            if name not in expected:
                unexpected.append(name)
                continue
            if name in seen:
                raise CheckpointError(f"the checkpoint holds tensor {visible(name)} twice; its shards overlap or it is damaged")
            seen.add(name)
            m = _LAYER_LINEAR.match(name)
            if m and self.cfg.quant is not None and m.group(2) in _QUANTIZED:
                self._collect_int4_part(m.group(1), m.group(2), m.group(3), tensor, pending)
            elif m and m.group(2) in _FUSED:
                fused, block = _FUSED[m.group(2)]
                target = params[f"{m.group(1)}.{fused}.{m.group(3)}"]
                self._copy_rows(name, target, block, fused, tensor)
            else:
                self._copy(name, params[name], tensor)
        missing = expected - seen
        if self.cfg.text.tie_word_embeddings:
            missing -= self._tie_embeddings(seen)
        if unexpected:
            raise CheckpointError(
                f"the checkpoint has {_some_of(counted(len(unexpected), 'unexpected tensor'), list(map(_short_name, unexpected)))}; "
                "it does not match its config.json (wrong layout or a different model)"
            )
        if missing:
            missing_names = sorted(missing)
            raise CheckpointError(
                f"the checkpoint lacks {_some_of(counted(len(missing_names), 'tensor'), missing_names)}; "
                "the download is incomplete or the folder holds a different model"
            )

    def _tie_embeddings(self, seen: set[str]) -> set[str]:
        """Tie lm_head and the embeddings as transformers does when loading a tied checkpoint: the
        one that was stored stands for both (tied checkpoints usually store only the embeddings);
        when both were stored they are used as stored. Returns the name that needs no tensor."""
        lm = self.language_model
        if _LM_HEAD not in seen and _EMBED in seen:
            lm.lm_head.weight = lm.model.embed_tokens.weight
            return {_LM_HEAD}
        if _EMBED not in seen and _LM_HEAD in seen:
            lm.model.embed_tokens.weight = lm.lm_head.weight
            return {_EMBED}
        return set()

    def _copy(self, name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)} but the config implies {tuple(target.shape)}; "
                "config.json and the weights disagree"
            )
        if target.is_floating_point() and not tensor.is_floating_point():  # copy_ would cast silently
            raise CheckpointError(
                f"tensor {visible(name)} is stored as {str(tensor.dtype).removeprefix('torch.')}, not as floats; "
                "the weight file is damaged or not a 16-bit checkpoint"
            )
        with torch.no_grad():
            target.copy_(tensor)

    def _block_sizes(self, fused: str) -> list[int]:
        t = self.cfg.text
        if fused == "qkv_proj":
            return [t.q_size, t.kv_size, t.kv_size]
        return [t.intermediate_size, t.intermediate_size]

    def _copy_rows(self, name: str, target: torch.Tensor, block: int, fused: str, tensor: torch.Tensor) -> None:
        sizes = self._block_sizes(fused)
        start = sum(sizes[:block])
        self._copy(name, target[start : start + sizes[block]], tensor)

    def _collect_int4_part(self, prefix: str, linear: str, suffix: str, tensor: torch.Tensor, pending: dict) -> None:
        from ..quant.awq_format import concat_awq, validate_awq  # the quant leaf is only needed for W4
        from ..quant.int4_linear import Int4Linear

        fused = _FUSED[linear][0] if linear in _FUSED else linear
        parts = _FUSED_PARTS.get(fused, (fused,))
        key = f"{prefix}.{fused}"
        module: PendingInt4 = self.get_submodule(key)
        bag = pending.setdefault(key, {})
        bag[f"{linear}.{suffix}"] = tensor
        if any(f"{p}.{s}" not in bag for p in parts for s in _AWQ_SUFFIXES):
            return
        if module.has_bias and any(f"{p}.bias" not in bag for p in parts):
            return
        del pending[key]
        group = self.cfg.quant.group_size
        for p in parts:  # each part on its own: concatenating would promote int/bool scales to floats
            _, outputs = validate_awq(*(bag[f"{p}.{s}"] for s in _AWQ_SUFFIXES), group, name=f"{prefix}.{p}")
            bias_part = bag.get(f"{p}.bias")
            if bias_part is not None and not bias_part.is_floating_point():
                raise CheckpointError(
                    f"tensor {prefix}.{p}.bias is stored as {str(bias_part.dtype).removeprefix('torch.')}, not as floats; "
                    "the weight file is damaged"
                )
            if bias_part is not None and tuple(bias_part.shape) != (outputs,):  # else cat or Int4Linear fails unnamed
                raise CheckpointError(
                    f"tensor {prefix}.{p}.bias has shape {tuple(bias_part.shape)} but its 4-bit weight has {outputs} outputs; "
                    "the weight file is damaged"
                )
        qweight, qzeros, scales = concat_awq([tuple(bag[f"{p}.{s}"] for s in _AWQ_SUFFIXES) for p in parts])
        bias = torch.cat([bag[f"{p}.bias"] for p in parts]) if module.has_bias else None
        if qweight.shape[0] != module.in_features or scales.shape[1] != module.out_features:
            raise CheckpointError(
                f"4-bit tensors of {key} give a {qweight.shape[0]}×{scales.shape[1]} linear but the config implies "
                f"{module.in_features}×{module.out_features}; config.json and the weights disagree"
            )
        act_dtype = self.dtype
        linear4 = Int4Linear.from_awq(
            qweight, qzeros, scales, bias=bias, group_size=group, backend=self.int4_backend, dtype=act_dtype, device=self.device
        )
        parent_name, leaf = key.rsplit(".", 1)
        setattr(self.get_submodule(parent_name), leaf, linear4)

    # ---- inference --------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, cancel: threading.Event | None = None) -> torch.Tensor:
        """[n, 3, S, S] normalised tiles → projected features [n, 256, D] in the model dtype.

        `cancel` is looked at before each batch of tiles: raises Cancelled once it is set."""
        vision_dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        outputs = []
        for start in range(0, pixel_values.shape[0], self.vision_batch):
            _stop_if_set(cancel)
            chunk = pixel_values[start : start + self.vision_batch].to(self.device, vision_dtype)
            hidden = self.vision_model(chunk)[:, 1:]  # drop CLS
            outputs.append(self.mlp1(pixel_shuffle(hidden)))
        return torch.cat(outputs).to(self.dtype)

    def forward(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        start_pos: int,
        image_features: torch.Tensor | None = None,
        all_logits: bool = False,
        cancel: threading.Event | None = None,
        scores: PromptScores | None = None,
    ) -> torch.Tensor:
        """Run `input_ids` at positions start_pos…; return float32 logits of the last ([V]) or all ([T, V]).

        A prompt longer than `prefill_chunk` tokens runs in chunks; `cancel` is looked at before each
        one, a one-token prompt's included (/retry feeds one): raises Cancelled once it is set (the KV
        cache past start_pos then holds a partial prompt). `scores`: every input token after the
        first is scored into it too (see PromptScores)."""
        _stop_if_set(cancel)  # decode steps pass no cancel: they are stopped between tokens instead
        ids = input_ids if type(input_ids) is torch.Tensor else torch.as_tensor(input_ids, dtype=torch.long)
        if scores is not None and ids.numel() > 1:
            return self._scored_prefill(ids, start_pos, image_features, scores, cancel)
        step = self.compiled_step
        if step is not None and ids.numel() == 1 and image_features is None and not all_logits and self.decode_graphs is None:
            # One token into the compiled step, without the general path's conversions and checks
            # (`exact` declines what it cannot take: eager, or the overflow error, then)
            with nullcontext() if torch.is_inference_mode_enabled() else torch.inference_mode():
                with decode_threads(self.decode_threads):
                    logits = step.exact(ids, start_pos)
            if logits is not None:
                return logits
        return self._forward(ids, start_pos, image_features, all_logits, cancel)

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, start_pos: int, image_features, all_logits: bool, cancel=None) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        t = ids.shape[0]
        if start_pos < 0 or start_pos + t > self.max_seq_len:
            # a larger --max-context is refused past the model's own positions (loader.py)
            more = ", or a larger --max-context" if self.max_seq_len < self.cfg.text.max_position_embeddings else ""
            raise ContextOverflowError(
                f"{start_pos} cached + {t} new tokens exceed the KV cache of {self.max_seq_len}; "
                f"use fewer tiles or frames{',' if more else ' or'} /clear{more}"
            )
        if t == 1 and not all_logits and image_features is None:
            if self.decode_graphs is not None:
                return self.decode_graphs.step(ids, start_pos)
            with decode_threads(self.decode_threads):
                return self.language_model.forward_embeds(self.embed(ids), start_pos, last_only=True)[-1]
        if t > 1 and self.decode_graphs is not None and image_features is None and not all_logits:
            logits = self.decode_graphs.prefill(ids, start_pos)  # a short text chunk: one graph replay
            if logits is not None:
                return logits
        h = self.embed(ids, image_features)
        if all_logits:
            return self.language_model.forward_embeds(h, start_pos, last_only=False)
        if t == 0:
            raise ValueError("forward needs at least one token")
        for first in range(0, t, self.prefill_chunk):  # the chunk's own image features are in h already
            _stop_if_set(cancel)
            logits = self.language_model.forward_embeds(h[:, first : first + self.prefill_chunk], start_pos + first, last_only=True)
        return logits[-1]

    @torch.inference_mode()
    def _scored_prefill(self, ids: torch.Tensor, start_pos: int, image_features, scores: PromptScores, cancel) -> torch.Tensor:
        """`_forward`'s chunked prefill, each chunk's rows turned into logits SCORE_ROWS at a time
        and scored against the token after them: never a [T, V] tensor. The last row's logits are
        returned, as `_forward` returns them."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(-1)
        t = ids.shape[0]
        if start_pos < 0 or start_pos + t > self.max_seq_len:
            return self._forward(ids, start_pos, image_features, False, cancel)  # its overflow error
        lm = self.language_model
        h = self.embed(ids, image_features)
        for first in range(0, t, self.prefill_chunk):
            _stop_if_set(cancel)
            chunk = h[:, first : first + self.prefill_chunk]
            normed = lm.forward_embeds(chunk, start_pos + first, last_only=False, head=False)
            for row in range(0, normed.shape[1], SCORE_ROWS):
                logits = lm.logits(normed[:, row : row + SCORE_ROWS])
                after = ids[first + row + 1 : first + row + 1 + logits.shape[0]]  # the prompt's last row has none
                if after.numel():
                    scores.add(logits[: after.numel()], after)
        return logits[-1]

    def embed(self, ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [1, T, D] with image features in place of the <IMG_CONTEXT> tokens."""
        h = self.language_model.model.embed_tokens(ids)[None]
        if image_features is None or not image_features.numel():
            return h
        return self._insert_image_features(ids, h, image_features)

    def _insert_image_features(self, ids: torch.Tensor, h: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.image_token_id is None:
            raise CheckpointError("the model has no <IMG_CONTEXT> token id; load it through engine.loader.load_model")
        features = features.reshape(-1, h.shape[-1]).to(h.dtype)
        mask = ids == self.image_token_id
        slots = int(mask.sum())  # a prefill-time sync, never in the decode step
        if slots != features.shape[0]:
            raise ValueError(f"{slots} <IMG_CONTEXT> tokens but {features.shape[0]} image feature rows")
        h = h.clone()
        h[0, mask] = features
        return h

    def memory_bytes(self) -> int:
        """Resident weight bytes (parameters, the packed buffers of 4-bit linears and the compiled
        CPU step's column-block copies of long rows; not the KV cache)."""
        seen, total = {t.data_ptr() for t in self.language_model.k_cache + self.language_model.v_cache}, 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total + row_chunk_bytes(self.language_model)
