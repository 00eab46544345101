"""The fused eager kernels (engine/fused.py) on the CPU, in Triton's interpreter: every entry point
of the decoder gives the plain torch ops' logits and KV cache, the layers launch far fewer ops,
and a compiled step never takes them. (On a GPU: tests/test_cuda.py.)"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from internvl_chat.engine import fused
from internvl_chat.engine.language import apply_rope, rope_tables
from internvl_chat.engine.loader import load_model
from internvl_chat.engine.vision import RMSNorm

pytest.importorskip("triton")


# (q heads, kv heads, head size) of the family's decoders (SPEC §1): 14B and 38B share theirs
FAMILY_HEAD_IDS = ("1B", "2B", "8B", "14B-38B", "78B")
FAMILY_HEADS = [(14, 2, 64), (12, 2, 128), (28, 4, 128), (40, 8, 128), (64, 8, 128)]


@pytest.fixture
def interpreted(monkeypatch):
    """The fused kernels on for CPU tensors, run by Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(fused.ENABLED, "cpu", True)


@pytest.fixture(scope="module")
def tiny(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=1024, compile="off")


@pytest.fixture(scope="module")
def tiny_w4(tiny_original):
    """The tiny model with 4-bit decoder linears (the dequant backend: its qkv leaves its bias)."""
    from bench_lib import quantize_decoder_

    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024, compile="off")
    quantize_decoder_(loaded.model, "dequant", group_size=32)
    return loaded


def _every_entry_point(loaded) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Logits of a prefill from 0, a chunk after it, an exact one-token step, the graphs' masked
    step and padded prefill; then the KV cache they wrote (positions 0 … 89)."""
    model, lm = loaded.model, loaded.model.language_model
    past, chunk = list(range(5, 60)), list(range(100, 113))
    end = len(past) + len(chunk)
    with torch.inference_mode():
        logits = [
            model.forward(past, 0).clone(),
            model.forward(chunk, len(past)).clone(),
            model.forward([7], end).clone(),
            lm.decode_masked(torch.tensor([9]), torch.tensor([end + 1]), 256).clone(),
            lm.prefill_masked(torch.arange(5, 13), torch.arange(end + 2, end + 10), torch.tensor([5]), 256).clone(),
        ]
        cache = [t[:, :, : end + 8].clone() for t in lm.k_cache + lm.v_cache]
    return logits, cache


@pytest.mark.parametrize("weights", ["16-bit", "W4"])
def test_every_entry_point_gives_the_torch_ops_values(tiny, tiny_w4, monkeypatch, weights):
    tiny = tiny if weights == "16-bit" else tiny_w4
    want_logits, want_cache = _every_entry_point(tiny)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(fused.ENABLED, "cpu", True)
    assert fused.active(torch.zeros(1))
    got_logits, got_cache = _every_entry_point(tiny)
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_cache, want_cache):  # float32 sums in another order
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _step_ops(lm, monkeypatch) -> collections.Counter:
    """What one masked decode step launches: top-level aten ops by name (not those the interpreter
    runs inside a fused kernel), and each fused kernel as "fused"."""
    real = fused._launcher

    def launcher(index, t):
        kernel = real(index, t)

        class Counted:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    with torch.profiler.record_function("fused"):
                        return kernel[grid](*args, **kwargs)

                return launch

        return Counted()

    monkeypatch.setattr(fused, "_launcher", launcher)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        lm.decode_masked(torch.tensor([9]), torch.tensor([20]), 256)

    def inside_fused(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name == "fused":
                return True
            parent = parent.cpu_parent
        return False

    def name(event) -> str:  # a cast that copies shows as its copy (a cast to the same dtype is free)
        copies = event.name == "aten::to" and any(c.name == "aten::_to_copy" for c in event.cpu_children)
        return "aten::_to_copy" if copies else event.name

    return collections.Counter(
        name(e) for e in prof.events()
        if (e.name == "fused" or e.name.startswith("aten::")) and not inside_fused(e)
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )  # fmt: skip


# ops that launch no kernel of their own (views, allocations, a cast to the same dtype)
FREE = {"aten::view", "aten::reshape", "aten::slice", "aten::transpose", "aten::select", "aten::unsqueeze",
        "aten::expand", "aten::t", "aten::chunk", "aten::split", "aten::as_strided", "aten::alias", "aten::_unsafe_view",
        "aten::empty", "aten::empty_like", "aten::detach", "aten::detach_", "aten::permute", "aten::contiguous",
        "aten::lift_fresh", "aten::promote_types", "aten::to"}  # fmt: skip


def test_a_layer_launches_its_linears_attention_and_four_fused_kernels(tiny, monkeypatch):
    lm = tiny.model.language_model
    layers = len(lm.model.layers)
    plain = _step_ops(lm, monkeypatch)
    assert plain["aten::pow"] == plain["aten::rsqrt"] == 2 * layers + 1 and plain["aten::cat"] == layers
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(fused.ENABLED, "cpu", True)
    ops = _step_ops(lm, monkeypatch)
    # a layer: two norms with their residual adds, RoPE with the cache writes, SiLU·mul; one norm before them
    assert ops.pop("fused") == 4 * layers + 1
    assert ops.pop("aten::linear") == 4 * layers + 1 and ops.pop("aten::scaled_dot_product_attention") == layers
    # the rest is the step's own: the embedding, the RoPE rows, the key bias
    rest = {name: n for name, n in ops.items() if name not in FREE}
    assert set(rest) <= {"aten::embedding", "aten::index", "aten::arange", "aten::le", "aten::where"}, rest
    assert max(rest.values()) <= 2, rest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_round_where_the_torch_ops_do(interpreted, dtype):
    # bf16 within one unit in the last place: the interpreter truncates where a GPU rounds when
    # it stores bf16 (float32: the same values up to the order of the sum)
    torch.manual_seed(0)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-6, "atol": 2**-6}
    norm = RMSNorm(96, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, residual = torch.randn(1, 3, 96, dtype=dtype), torch.randn(1, 3, 96, dtype=dtype)
    normed, total = fused.add_rms_norm(x, residual, norm)
    torch.testing.assert_close(total, x + residual, **tolerance)
    torch.testing.assert_close(normed, norm(x + residual), **tolerance)
    normed, same = fused.add_rms_norm(x, None, norm)
    assert same is x
    torch.testing.assert_close(normed, norm(x), **tolerance)
    gate_up = torch.randn(1, 3, 2 * 1500, dtype=dtype)  # more than one block of SILU_BLOCK
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), FAMILY_HEADS, ids=list(FAMILY_HEAD_IDS))
def test_rope_and_cache_at_the_decoders_head_shapes_up_to_the_caches_end(interpreted, heads, kv_heads, head_dim, dtype):
    # bf16 within one unit in the last place: the interpreter truncates where a GPU rounds
    tolerance = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}
    size, t = 300, 7
    cos, sin = rope_tables(head_dim, size, 1e6, torch.device("cpu"))
    qkv = torch.randn(1, t, (heads + 2 * kv_heads) * head_dim, generator=torch.Generator().manual_seed(heads)).to(dtype)
    rows = slice(size - t, size)  # the last positions of the cache
    rotated = apply_rope(qkv[..., : (heads + kv_heads) * head_dim].view(1, t, heads + kv_heads, head_dim), cos[rows], sin[rows])
    for positions in (size - t, torch.arange(size - t, size)):
        k_cache, v_cache = (torch.zeros(1, kv_heads, size, head_dim, dtype=dtype) for _ in range(2))
        q = fused.rope_and_cache(qkv, cos[rows], sin[rows], positions, k_cache, v_cache, heads, kv_heads, head_dim)
        torch.testing.assert_close(q, rotated[:, :, :heads], **tolerance)
        torch.testing.assert_close(k_cache[:, :, rows], rotated[:, :, heads:].transpose(1, 2), **tolerance)
        assert torch.equal(v_cache[:, :, rows], qkv[..., (heads + kv_heads) * head_dim :].view(1, t, kv_heads, head_dim).transpose(1, 2))
        assert not k_cache[:, :, : size - t].any() and not v_cache[:, :, : size - t].any()


def test_a_compiled_step_keeps_the_torch_ops_without_graph_breaks(tiny, interpreted):
    lm = tiny.model.language_model
    explained = torch._dynamo.explain(lm.decode_masked)(torch.tensor([5]), torch.tensor([7]), 256, lm.caches())
    assert explained.graph_break_count == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("fault", ["raises", "wrong values"])
def test_kernels_that_cannot_run_here_are_one_note_and_the_torch_ops_answer(tiny, interpreted, monkeypatch, capfd, fault):
    # Triton without a C compiler for its launcher, or a broken build: found by running each kernel
    # once against the torch ops before the first use, never in an answer
    monkeypatch.setattr(fused, "_verdicts", {})
    if fault == "raises":
        def launcher(index, t):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
        monkeypatch.setattr(fused, "_launcher", launcher)
    else:
        real = fused.silu_mul
        monkeypatch.setattr(fused, "silu_mul", lambda gate_up: real(gate_up) * 1.01)
    model = tiny.model
    with torch.inference_mode():
        got = model.forward(list(range(5, 40)), 0).clone()
        again = model.forward([7], 35).clone()
    assert fused.verdicts("cpu") == {"float32": False} and not fused.active(got)
    monkeypatch.setitem(fused.ENABLED, "cpu", False)
    with torch.inference_mode():
        torch.testing.assert_close(got, model.forward(list(range(5, 40)), 0))
        torch.testing.assert_close(again, model.forward([7], 35))
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("internvl-chat:")]
    assert len(notes) == 1 and "using torch's ops" in notes[0] and len(notes[0]) < 200
    assert ("C compiler" if fault == "raises" else "a kernel is off by") in notes[0]


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "kv_len", "last"),
    [(14, 2, 64, 1024, 700), (28, 4, 128, 1536, 1535), (12, 2, 128, 1024, 0), (14, 2, 64, 768, 255), (14, 2, 64, 768, 256)],
    ids=["0.5B mid-split", "8B every key", "2B first key only", "split end", "split start"],
)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "device position"])
def test_split_decode_attention_is_sdpa_over_the_visible_keys(interpreted, heads, kv_heads, head_dim, kv_len, last, as_tensor):
    gen = torch.Generator().manual_seed(kv_len + last)
    q = torch.randn(1, 1, heads, head_dim, generator=gen)
    k_cache, v_cache = (torch.randn(1, kv_heads, 2048, head_dim, generator=gen) for _ in range(2))
    got = fused.decode_attention(q, k_cache, v_cache, kv_len, torch.tensor([last]) if as_tensor else last)
    group = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, kv_heads, group, head_dim), k_cache[:, :, : last + 1], v_cache[:, :, : last + 1]
    ).view(1, 1, heads * head_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), FAMILY_HEADS, ids=list(FAMILY_HEAD_IDS))
def test_split_decode_attention_in_bf16_is_sdpa_within_an_ulp(interpreted, heads, kv_heads, head_dim):
    # the interpreter's tl.dot multiplied bf16's stored bits as integers (scores ~1e9); the kernel
    # gives it float32 operands there, with the weights rounded to bf16 as the compiled dot takes them
    gen = torch.Generator().manual_seed(heads)
    q = torch.randn(1, 1, heads, head_dim, generator=gen).bfloat16()
    k_cache, v_cache = (torch.randn(1, kv_heads, 1152, head_dim, generator=gen).bfloat16() for _ in range(2))
    got = fused.decode_attention(q, k_cache, v_cache, 1100, torch.tensor([1050]))
    group = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float().view(1, kv_heads, group, head_dim), k_cache[:, :, :1051].float(), v_cache[:, :, :1051].float()
    ).view(1, 1, heads * head_dim)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-8)


def test_one_token_steps_over_a_long_cache_take_the_split_attention(tiny, interpreted, monkeypatch):
    # the tiny model's cache is short: from 64 keys here, the exact and the masked one-token
    # steps attend through decode_attention, and give the torch ops' logits
    model, lm = tiny.model, tiny.model.language_model
    past = list(range(5, 100))
    monkeypatch.setitem(fused.ENABLED, "cpu", False)
    with torch.inference_mode():
        model.forward(past, 0)
        want = [model.forward([7], len(past)).clone(), lm.decode_masked(torch.tensor([9]), torch.tensor([len(past) + 1]), 256).clone()]
    monkeypatch.setitem(fused.ENABLED, "cpu", True)
    monkeypatch.setattr(fused, "SPLIT_ATTENTION_MIN_KEYS", 64)
    calls = []
    real = fused.decode_attention
    monkeypatch.setattr(fused, "decode_attention", lambda *args: calls.append(args[3:]) or real(*args))
    with torch.inference_mode():
        model.forward(past, 0)
        got = [model.forward([7], len(past)).clone(), lm.decode_masked(torch.tensor([9]), torch.tensor([len(past) + 1]), 256).clone()]
    layers = len(lm.model.layers)
    assert [c[0] for c in calls] == [len(past) + 1] * layers + [256] * layers  # kv_len: the exact prefix, the bucket
    assert all(isinstance(c[1], torch.Tensor) for c in calls[layers:])  # the masked step's last key: its device position
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_w4_qkv_leaves_its_bias_to_the_rope_kernel(tiny_w4, interpreted, monkeypatch):
    # the 4-bit linear's bias add is a pass of its own; the RoPE kernel adds it while it reads qkv
    # (the values: test_every_entry_point_gives_the_torch_ops_values[W4])
    lm = tiny_w4.model.language_model
    calls = []
    for layer in lm.model.layers:
        qkv = layer.self_attn.qkv_proj
        assert qkv.bias is not None
        real_forward, real_leaving = qkv.forward, qkv.forward_leaving_bias
        monkeypatch.setattr(qkv, "forward", lambda x, f=real_forward: calls.append("forward") or f(x))
        monkeypatch.setattr(qkv, "forward_leaving_bias", lambda x, f=real_leaving: calls.append("leaving") or f(x))
    with torch.inference_mode():
        lm.decode_masked(torch.tensor([9]), torch.tensor([20]), 256)
    assert calls == ["leaving"] * len(lm.model.layers)
    monkeypatch.setitem(fused.ENABLED, "cpu", False)
    calls.clear()
    with torch.inference_mode():
        lm.decode_masked(torch.tensor([9]), torch.tensor([20]), 256)
    assert calls == ["forward", "leaving"] * len(lm.model.layers)  # forward adds what the linear left
