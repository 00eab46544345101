"""CUDA-graph replay of the one-token decode step.

At batch 1 a small model is launch-bound: hundreds of tiny kernels per token cost more host time
than the GPU needs to read the weights. A captured graph replays them with one launch. Shapes
must be static, so the token and its position live in fixed device buffers, and attention reads a
fixed `kv_len` bucket of the cache with a mask built on the device (positions beyond the
valid cache are masked out). One graph per bucket (`kv_bucket`), captured on first use, sharing
one memory pool; with the compiled step (compiled.py) one compile serves every bucket.

A capture that fails (out of memory for the graph's pool, or an operation a graph cannot hold)
costs no answer: a one-line note, and from then on the same step is launched without graphs.

A follow-up turn's prefill (a question of tens of tokens after thousands cached) is launch-bound
the same way: ~30 kernels a layer for little work each. Chunks up to PREFILL_TOKEN_BUCKETS[-1]
tokens replay a graph too, padded to a bucket of token counts and attending over a power-of-two
KV bucket (`prefill_buckets`), so a long conversation passes through a few dozen graphs at most.
Their failures are separate from the decode step's: a prefill capture that fails leaves short
prefills eager and the decode graphs as they are.
"""

from __future__ import annotations

import torch

MIN_BUCKET = 256
# Padded lengths of a short prefill's graph (≤ 1.5× the tokens from 16 on), and its least KV bucket.
PREFILL_TOKEN_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_PREFILL_KV = 1024


def kv_bucket(pos: int, max_len: int) -> int:
    """The attended KV length for a step at `pos`: pos + 1 rounded up to a granule of 1/8 of the
    power of two below it (at least MIN_BUCKET), so a long context reads at most 12.5 % of masked
    tail while a conversation passes through few distinct graphs (32 up to 16k tokens).

    Only the cache's last position attends to all of it (`max_len`): the whole cache is a contiguous
    slice, which the compiled step (compiled with a shorter one) would be compiled again for, so the
    buckets before it stop one short, and that one step takes the eager step (CompiledStep.masked)."""
    need = pos + 1
    if need >= max_len:
        return max_len
    granule = max(MIN_BUCKET, (1 << max((need - 1).bit_length() - 1, 0)) // 8)
    return min(-(-need // granule) * granule, max_len - 1)


def prefill_buckets(start_pos: int, tokens: int, max_len: int) -> tuple[int, int] | None:
    """(padded length, attended KV length) of the graph for `tokens` new tokens after `start_pos`
    cached ones; None when the chunk is longer than the largest bucket or its padding would run
    past the cache's end (the chunk is prefilled without a graph then)."""
    padded = next((b for b in PREFILL_TOKEN_BUCKETS if b >= tokens), None)
    if padded is None or start_pos + padded > max_len:
        return None
    # the next power of two: attention reads at most twice the valid keys (a few percent of a
    # short prefill's weight traffic), and one graph serves every turn of that stretch
    return padded, min(max(MIN_PREFILL_KV, 1 << (start_pos + padded - 1).bit_length()), max_len)


class DecodeGraphs:
    def __init__(self, model, step_fn=None):
        """`step_fn(token, position, kv_len)` → logits [V]: the step to capture, by default the
        eager `decode_masked` (engine/compiled.py passes its compiled one)."""
        self.model = model
        self.step_fn = step_fn or model.language_model.decode_masked
        device = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture_stream = None  # made on the model's device at the first capture
        self.failure: str | None = None  # why a capture failed: the step then runs without graphs
        # short prefills: static chunk buffers (a graph reads a prefix of each), their own pool
        most = PREFILL_TOKEN_BUCKETS[-1]
        self.prefill_fn = model.language_model.prefill_masked
        self.prefill_ids = torch.zeros(most, dtype=torch.long, device=device)  # always valid ids: padding reads them
        self.prefill_offsets = torch.arange(most, device=device)
        self.prefill_positions = torch.zeros(most, dtype=torch.long, device=device)
        self.prefill_last = torch.zeros(1, dtype=torch.long, device=device)
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_failure: str | None = None

    def bucket(self, pos: int) -> int:
        return kv_bucket(pos, self.model.max_seq_len)

    def _step(self, kv_len: int) -> torch.Tensor:
        return self.step_fn(self.token, self.position, kv_len)

    def _prefill_step(self, padded: int, kv_len: int) -> torch.Tensor:
        return self.prefill_fn(self.prefill_ids[:padded], self.prefill_positions[:padded], self.prefill_last, kv_len)

    def _capture(self, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph, logits = self._record(lambda: self._step(kv_len), self.pool, warm_ups=2)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, logits

    def _capture_prefill(self, padded: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # One pool for the model's prefill graphs, serve's KV slots included (they run one at a
        # time): a W4 chunk over 64 rows holds a dequantized weight in it (272 MB for the 8B
        # gate_up). One warm-up: an eager prefill has nothing to autotune (a compiled step has).
        model = self.model
        graph, logits = self._record(lambda: self._prefill_step(padded, kv_len), model.prefill_graph_pool, warm_ups=1)
        if model.prefill_graph_pool is None:
            model.prefill_graph_pool = graph.pool()
        return graph, logits

    def _record(self, run, pool, warm_ups: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture `run()` (→ its output tensor) into a graph using memory `pool` (None: a new one)."""
        # On the model's device whichever is current (--device cuda:1): torch.cuda.graph syncs and
        # empties the current device's cache, and its default capture stream is made once, on the
        # device current then; a capture stream on another device records none of the step's kernels.
        with torch.cuda.device(self.model.device):
            caller = torch.cuda.current_stream()
            if self.capture_stream is None:  # one for every capture: they share the memory pool
                self.capture_stream = torch.cuda.Stream()
            # warm up on a side stream (lazy init, autotuning) before capturing, as PyTorch advises;
            # the warm-up writes K/V at the current positions, which replay rewrites identically
            warm = torch.cuda.Stream()
            warm.wait_stream(caller)
            try:
                with torch.cuda.stream(warm):
                    for _ in range(warm_ups):
                        run()
            finally:  # a failed warm-up's kernels must be ordered before whatever runs next
                caller.wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool, stream=self.capture_stream):
                    out = run()
            except BaseException:
                # torch.cuda.graph leaves its capture stream current when capture_begin or
                # capture_end raises (it restores the stream after capture_end only)
                torch.cuda.set_stream(caller)
                _release_default_generator(self.model.device)
                raise
        return graph, out

    @torch.inference_mode()
    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [V] (float32) for `token` (device LongTensor, 1 element) at position `pos`.

        The returned tensor is the graph's static output: consume it before the next step.
        """
        self.token.copy_(token.view(1), non_blocking=True)
        self.position.fill_(pos)
        kv_len = self.bucket(pos)
        if self.failure is None and kv_len not in self.graphs:
            try:
                self.graphs[kv_len] = self._capture(kv_len)
            except Exception as e:  # noqa: BLE001 — no graph is no reason to lose the answer
                self._give_up(e)
        if self.failure is not None:
            return self._step(kv_len)  # the same step, launched kernel by kernel (or it raises itself)
        graph, logits = self.graphs[kv_len]
        graph.replay()
        return logits

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, start_pos: int) -> torch.Tensor | None:
        """Logits [V] (float32) of the last of `ids` (device LongTensor [T], T > 1, no image
        features) prefilled at positions start_pos…, replayed from a graph; None where this chunk
        takes none (too long, padding past the cache's end, or a capture failed before): the
        caller prefills it eagerly then. The returned tensor is the graph's static output."""
        t = ids.numel()
        key = prefill_buckets(start_pos, t, self.model.max_seq_len) if self.prefill_failure is None else None
        if key is None:
            return None
        padded, kv_len = key
        self.prefill_ids[:t].copy_(ids.view(-1), non_blocking=True)
        torch.add(self.prefill_offsets[:padded], start_pos, out=self.prefill_positions[:padded])
        self.prefill_last.fill_(t - 1)
        if key not in self.prefill_graphs:
            try:
                self.prefill_graphs[key] = self._capture_prefill(padded, kv_len)
            except Exception as e:  # noqa: BLE001 — the eager prefill still answers (or raises itself)
                self._give_up_prefill(e)
                return None
        graph, logits = self.prefill_graphs[key]
        graph.replay()
        return logits

    def _give_up_prefill(self, error: BaseException) -> None:
        from .compiled import _one_line, _stderr_note

        self.prefill_graphs.clear()
        self.model.prefill_graph_pool = None  # the graphs that still use it keep it
        self.prefill_failure = _one_line(error)
        _stderr_note(f"a CUDA graph of a short prefill could not be captured ({self.prefill_failure}); prefilling without CUDA graphs")

    def _give_up(self, error: BaseException) -> None:
        """Stop capturing (and replaying: the graphs' pool is freed) after `error`, with one note."""
        from .compiled import _one_line, _stderr_note

        self.graphs.clear()
        self.pool = None
        self.failure = _one_line(error)
        _stderr_note(f"a CUDA graph of the decode step could not be captured ({self.failure}); decoding without CUDA graphs")


def _release_default_generator(device: torch.device) -> None:
    """Give the device's default CUDA generator a fresh state holding the same seed and offset.

    A capture that fails at its end (capture_end raises, e.g. after a host sync inside it) skips
    the generator's capture epilogue, and torch (2.11 seen on an H200) then refuses every later
    random op on that generator ("Offset increment outside graph capture encountered
    unexpectedly"): any code of the process using torch's default CUDA randomness would fail.
    The sampler has a generator of its own, so this is about the rest of the process."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        default = torch.cuda.default_generators[index]
        fresh = torch.Generator(device=torch.device("cuda", index))
        fresh.set_state(default.get_state())
        default.graphsafe_set_state(fresh)
    except Exception:  # noqa: BLE001 — best effort: the capture's own error is what gets reported
        pass
