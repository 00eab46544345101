"""The whole one-token decode step in C++ (engine/cpu_step.py, csrc/decode_step.cpp) against the
eager step (language.py) on random decoders of awkward shapes: head dims with and without a vector
tail, q-head groups of 1 to 7, float32 and bfloat16 weights and caches, contexts that end inside a
block of keys or values, and long contexts split across threads. Both steps run on the same model
and caches, each step checked against the other at the same position (the eager step rewrites the
position the C++ step wrote). Session, serve-slot, fuzz and CLI runs of the C++ step are in
test_compiled.py (its `fast` fixture has a C++ instance).

Cost: the kernels' library is built once per machine (shared with test_cpu_gemv.py); every model
here is tiny.
"""

from __future__ import annotations

import pytest
import torch

from internvl_chat.engine import compiled, cpu_gemv, cpu_step
from internvl_chat.engine.config import TextConfig
from internvl_chat.engine.language import Qwen2ForCausalLM
from internvl_chat.engine.loader import load_model

pytestmark = pytest.mark.skipif(cpu_gemv.supported() is not None, reason=f"no C++ step here: {cpu_gemv.supported()}")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    failure = cpu_gemv.ensure_loaded(compiled.use_cache_dir())
    assert failure is None, failure


def random_lm(dtype=torch.float32, cache_dtype=None, *, head_dim=16, heads=4, kv_heads=2, context=256, seed=0):
    cfg = TextConfig(vocab_size=97, hidden_size=48, num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                     intermediate_size=80, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=context,
                     tie_word_embeddings=False)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    lm = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)  # norm weights too: not all ones
    lm.to(dtype)
    lm.allocate_cache(context, torch.device("cpu"), cache_dtype or dtype)
    return lm


def prefill(lm, n: int) -> torch.Tensor:
    """Eager prefill of n tokens; the greedy next token."""
    ids = torch.arange(n) % 90 + 3
    with torch.inference_mode():
        h = lm.model.embed_tokens(ids)[None]
        return lm.forward_embeds(h, 0, True)[-1].argmax().view(1)


def compare(lm, start: int, steps: int, step=None) -> float:
    """The largest logit difference between the C++ and the eager step over `steps` greedy steps
    from `start`, relative to the largest eager logit."""
    step = step or cpu_step.CpuStep(lm)
    token, worst = prefill(lm, start), 0.0
    with torch.inference_mode():
        for pos in range(start, start + steps):
            got = step(token, pos)
            want = lm.decode_exact(token, pos).float()
            assert got.dtype == torch.float32 and got.shape == want.shape
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            token = want.argmax().view(1)
    return worst


@pytest.mark.parametrize(
    "head_dim, heads, kv_heads",
    [(16, 4, 2), (12, 6, 2), (40, 2, 1), (64, 14, 2), (8, 3, 3)],
    ids=["tiny", "tail-of-4-group-3", "32+8-columns", "0.5B-heads", "no-groups"],
)
def test_float32_matches_the_eager_step(head_dim, heads, kv_heads):
    lm = random_lm(head_dim=head_dim, heads=heads, kv_heads=kv_heads)
    assert cpu_step.unsupported(lm) is None
    # from 61: contexts 62..85 end inside and on the edges of the 8-key and 64-value blocks
    assert compare(lm, 61, 24) <= 1e-5


@pytest.mark.parametrize(
    "cache_dtype, tolerance", [(torch.float32, 0.002), (torch.bfloat16, 0.05)], ids=["fp32-cache", "bf16-cache"]
)
def test_bfloat16_rounds_where_the_eager_step_does(cache_dtype, tolerance):
    """With an fp32 cache the two steps round at the same points (~1e-4 apart). With a bf16 cache
    torch's SDPA also rounds the softmax weights to bf16 before multiplying V, which the C++ step
    does not: both are then ~1-2 % from the same model computed in fp32, and ≤ 5 % apart (the
    compiled-step tests' bf16 bound)."""
    lm = random_lm(torch.bfloat16, cache_dtype, head_dim=12, heads=6, kv_heads=2)
    assert compare(lm, 61, 16) <= tolerance


def test_a_long_context_split_across_threads_gives_the_same_logits():
    """From 2,048 positions (this shape) attention splits its kv heads across threads; each head is
    computed the same way whichever thread takes it."""
    lm = random_lm(context=2304)
    step = cpu_step.CpuStep(lm)
    token = prefill(lm, 2100)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = step(token, 2100)
            torch.set_num_threads(2)
            two = step(token, 2100)
            want = lm.decode_exact(token, 2100)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert ((one - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_converted_weights_and_swapped_caches_are_picked_up():
    """`.to()` (weights_version moves) builds the step again from the new tensors; another cache
    list (a serve slot's own KV) is bound before the next step."""
    lm = random_lm()
    step = cpu_step.CpuStep(lm)
    assert compare(lm, 10, 3, step) <= 1e-5
    lm.to(torch.bfloat16)
    assert compare(lm, 10, 3, step) <= 0.05
    lm.k_cache = [torch.zeros_like(t) for t in lm.k_cache]
    lm.v_cache = [torch.zeros_like(t) for t in lm.v_cache]
    assert compare(lm, 12, 3, step) <= 0.05


def test_a_new_cache_allocation_brings_its_own_rope_tables():
    lm = random_lm(context=64)
    step = cpu_step.CpuStep(lm)
    assert compare(lm, 10, 2, step) <= 1e-5
    lm.allocate_cache(400, torch.device("cpu"), torch.float32)  # longer than the tables the step was built with
    assert compare(lm, 300, 3, step) <= 1e-5


def test_bad_tokens_positions_and_caches_are_refused():
    lm = random_lm(context=64)
    step = cpu_step.CpuStep(lm)
    with torch.inference_mode():
        step(torch.tensor([5]), 2)
        with pytest.raises(RuntimeError, match="outside the embedding"):
            step(torch.tensor([97]), 3)
        with pytest.raises(RuntimeError, match="outside the KV cache"):
            step(torch.tensor([5]), 64)
        with pytest.raises(RuntimeError, match="one integer token"):
            step(torch.tensor([1.0]), 3)
    with pytest.raises(RuntimeError, match="another shape"):
        step._step.bind_caches([torch.zeros(1, 2, 64, 8)] * 2, [torch.zeros(1, 2, 64, 8)] * 2)
    with pytest.raises(RuntimeError, match="wrong number of tensors"):
        torch.classes.internvl_chat.DecodeStep([lm.lm_head.weight], [4, 2, 16], 1e-6)


def test_what_the_step_cannot_run_is_named():
    lm = random_lm()
    lm.model.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(48))
    assert "bias" in cpu_step.unsupported(lm)
    lm = random_lm(torch.float16)
    assert "float16" in cpu_step.unsupported(lm)
    lm = random_lm()
    lm.model.layers[0].mlp.down_proj.weight.data = lm.model.layers[0].mlp.down_proj.weight.data.t().contiguous().t()
    assert "contiguous" in cpu_step.unsupported(lm)


def test_a_failing_step_leaves_the_eager_step_with_one_note(tiny_original, capfd):
    loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=128, compile="on")
    step = loaded.model.compiled_step
    assert step.native is not None and step.compile_s is not None

    class Broken:
        def bind_caches(self, keys, values):
            pass

        def step(self, token, pos):
            raise RuntimeError("a broken step")

    step.native._step = Broken()
    ids = list(range(5, 20))
    with torch.inference_mode():
        logits = loaded.model.forward(ids, 0)
        got = loaded.model.forward(logits.argmax().view(1), len(ids))
        want = loaded.model.language_model.decode_exact(logits.argmax().view(1), len(ids))
    assert torch.equal(got, want) and not step.active and step.native is None
    notes = [line for line in capfd.readouterr().err.splitlines() if "decode step" in line]
    assert len(notes) == 1 and "a broken step" in notes[0] and "using the eager step" in notes[0], notes


# ---------------------------------------------------------------------------------------------
# 4-bit models: the int4 kernel (csrc/gemv_int4_avx2.h) and the step over Int4Linear layers


def int4_reference(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W · x in float64 for W[n, k] = q[n, k] · s[n, k/g] + m[n, k/g]."""
    g = q.shape[1] // scales.shape[1]
    w = q.double() * scales.double().repeat_interleave(g, 1) + offsets.double().repeat_interleave(g, 1)
    return w @ x.double()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


@pytest.mark.parametrize("rows", [1, 3, 7, 13, 64])
@pytest.mark.parametrize("cols, group", [(32, 32), (96, 32), (192, 64), (384, 128), (512, 256)])
def test_the_int4_kernel_computes_q_times_s_plus_m(rows, cols, group):
    """Any row count (groups of four a quarter apart, then the last N % 4 one at a time), every
    nibble position of a block, one to several blocks per group."""
    from internvl_chat.engine import cpu_int4

    gen = torch.Generator().manual_seed(rows * cols)
    q = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8)
    scales = torch.rand(rows, cols // group, generator=gen) * 0.02 + 0.001
    offsets = -torch.randint(0, 16, (rows, cols // group), generator=gen) * scales
    x = torch.randn(cols, generator=gen)
    y = torch.ops.internvl_chat.gemv_int4(cpu_int4.layout(q, scales, offsets), group, x)
    assert y.dtype == torch.float32 and relative(y, int4_reference(q, scales, offsets, x)) <= 2e-6


@pytest.mark.parametrize(
    "cols, cols_out, group, backend",
    [(96, 40, 32, "dequant"), (96, 48, 32, "torch"), (192, 152, 64, "dequant"), (192, 144, 64, "torch"),
     (256, 48, 128, "dequant"), (256, 48, 128, "torch"), (896, 136, 128, "dequant"), (896, 144, 128, "torch")],
)  # fmt: skip (PyTorch's kernel takes only multiples of 16 outputs)
def test_the_int4_layout_holds_what_the_layer_holds(cols, cols_out, group, backend):
    """From the AWQ tensors (dequant) or PyTorch's CPU int4 packing (torch, whose nibble order is
    found by probing): the same 4-bit values, and W · x to float32 tolerance of the weight the
    layer computes with (AWQ (q − z)·s; tinygemm (q − 8)·s + zero in bf16)."""
    from awq_helpers import random_awq

    from internvl_chat.engine import cpu_int4
    from internvl_chat.quant import Int4Linear
    from internvl_chat.quant.awq_format import dequantize_awq, unpack_awq

    qweight, qzeros, scales = random_awq(cols, cols_out, group, seed=cols)
    layer = Int4Linear.from_awq(qweight, qzeros, scales, group_size=group, backend=backend, dtype=torch.float32)
    q = cpu_int4.values(layer)[0]
    exact = cpu_int4.values(Int4Linear.from_awq(qweight, qzeros, scales, group_size=group, backend="dequant"))[0]
    assert torch.equal(q, exact) and q.shape == (cols_out, cols)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(1))
    if backend == "dequant":
        want = dequantize_awq(qweight, qzeros, scales, group, torch.float64).t() @ x.double()
    else:
        pairs = layer.scale_and_zero.double().repeat_interleave(group, 0)  # [K, N, 2]
        w = (unpack_awq(qweight).double() - 8) * pairs[..., 0] + pairs[..., 1]
        want = w.t() @ x.double()
    weight = cpu_int4.tensor(layer)
    assert weight.shape == (cols_out, cols // group * (group // 2 + 8))
    assert relative(torch.ops.internvl_chat.gemv_int4(weight, group, x), want) <= 2e-6


def test_the_int4_kernel_gives_the_same_values_on_one_and_two_threads():
    from internvl_chat.engine import cpu_int4

    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (1027, 4864), generator=gen, dtype=torch.uint8)  # split across threads
    scales = torch.rand(1027, 38, generator=gen) * 0.02
    offsets = torch.randn(1027, 38, generator=gen) * 0.1
    x = torch.randn(4864, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.internvl_chat.gemv_int4(cpu_int4.layout(q, scales, offsets), 128, x)
        torch.set_num_threads(2)
        two = torch.ops.internvl_chat.gemv_int4(cpu_int4.layout(q, scales, offsets), 128, x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert relative(one, int4_reference(q, scales, offsets, x)) <= 2e-6


def quantize_(lm, backend: str, group: int):
    """Every decoder linear of `lm` as an RTN-quantized Int4Linear (as a W4 checkpoint has them)."""
    from internvl_chat.quant import Int4Linear, quantize_rtn

    for layer in lm.model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_up_proj"),
                             (layer.mlp, "down_proj")):  # fmt: skip
            child = getattr(parent, name)
            qweight, qzeros, scales = quantize_rtn(child.weight.detach().t().float(), group)
            bias = None if child.bias is None else child.bias.detach()
            setattr(parent, name, Int4Linear.from_awq(qweight, qzeros, scales, bias=bias, group_size=group,
                                                      backend=backend, dtype=child.weight.dtype))  # fmt: skip
    return lm


def w4_lm(dtype=torch.float32, cache_dtype=None, backend="torch", group=32, *, hidden=64, inter=96, context=256):
    cfg = TextConfig(vocab_size=97, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     intermediate_size=inter, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=context,
                     tie_word_embeddings=False)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    lm = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    lm.to(dtype)
    quantize_(lm, backend, group)
    lm.allocate_cache(context, torch.device("cpu"), cache_dtype or dtype)
    return lm


@pytest.mark.parametrize(
    "dtype, cache_dtype, backend, tolerance",
    [(torch.float32, None, "dequant", 2e-5), (torch.float32, None, "torch", 0.01),
     (torch.bfloat16, torch.float32, "torch", 0.01), (torch.bfloat16, None, "torch", 0.05),
     (torch.bfloat16, torch.float32, "dequant", 0.1)],
    ids=["fp32-dequant", "fp32-torch", "bf16-torch-fp32-cache", "bf16-torch", "bf16-dequant-fp32-cache"],
)  # fmt: skip
def test_a_w4_model_matches_the_eager_w4_step(dtype, cache_dtype, backend, tolerance):
    """fp32 over the AWQ tensors: float32 tolerance. PyTorch's int4 kernel rounds its input and
    output to bf16 and the C++ step does too, so a value that lands near a bf16 rounding edge may
    round the other way (~0.2 % here, where the bf16 rounding itself moves the logits ~9 % from the
    exact weights). The dequant backend in bf16 rounds the dense weight to bf16, which the C++ step
    (exact (q − z)·s) does not."""
    lm = w4_lm(dtype, cache_dtype, backend)
    assert cpu_step.unsupported(lm) is None
    assert compare(lm, 61, 24) <= tolerance


def test_a_w4_step_gives_the_same_logits_on_one_and_two_threads():
    lm = w4_lm(hidden=512, inter=1024, context=128)  # gate_up and down split across threads
    step = cpu_step.CpuStep(lm)
    token = prefill(lm, 40)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            one = step(token, 40)
            torch.set_num_threads(2)
            two = step(token, 40)
            want = lm.decode_exact(token, 40)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert relative(one, want) <= 0.01


def test_what_the_step_cannot_run_in_a_w4_model_is_named():
    lm = w4_lm(backend="dequant")
    lm.model.layers[1].mlp.down_proj.backend = "gemlite"
    assert "int4 backend 'gemlite'" in cpu_step.unsupported(lm)
    lm = w4_lm(backend="dequant")
    lm.model.layers[1].mlp.down_proj.group_size = 16
    assert "group size 16" in cpu_step.unsupported(lm)
    lm = w4_lm(backend="dequant")
    lm.model.layers[0].self_attn.o_proj = torch.nn.Linear(64, 64, bias=False)
    assert "mixes float and 4-bit" in cpu_step.unsupported(lm)


@pytest.fixture(scope="module")
def w4_pair(tiny_original):
    """The tiny checkpoint as a W4 model (PyTorch's int4 backend, g = 32) twice: eager, and with
    the C++ step."""
    from bench_lib import quantize_decoder_

    models = []
    for compile_ in ("off", "on"):
        loaded = load_model(tiny_original, device="cpu", dtype="float32", max_context=512)
        assert quantize_decoder_(loaded.model, "torch", group_size=32) == 4 * loaded.config.text.num_layers
        if compile_ == "on":
            assert loaded.model.enable_compile(True)
            assert loaded.model.compiled_step.native is not None, "the C++ step did not take the W4 model"
        models.append(loaded)
    return models


def test_a_w4_checkpoint_decodes_the_eager_greedy_tokens(w4_pair):
    from decode_helpers import greedy_steps

    eager, fast = w4_pair
    ids = list(range(5, 40))
    before = fast.model.compiled_step.steps
    want, want_logits = greedy_steps(eager.model, ids, 40)
    got, got_logits = greedy_steps(fast.model, ids, 40)
    assert got == want and fast.model.compiled_step.steps - before == 40
    assert relative(got_logits, want_logits) <= 0.01
    # the int4 copy the C++ step holds counts in the model's memory: 0.5 B/weight + 8 B per group and row
    lm = eager.model.language_model
    linears = [m for m in lm.modules() if type(m).__name__ == "Int4Linear"]
    copy = sum(m.out_features * (m.in_features // 2 + m.in_features // m.group_size * 8) for m in linears)
    assert fast.model.compiled_step.native.extra_bytes == copy
    assert fast.model.memory_bytes() == eager.model.memory_bytes() + copy


def test_a_w4_session_with_undo_and_retry_matches_eager(w4_pair):
    from internvl_chat.chat.sampling import SamplingParams
    from internvl_chat.chat.session import Session

    params = SamplingParams(max_new_tokens=10)
    sessions = [Session(loaded, params) for loaded in w4_pair]
    for action in ("ask:Hello there!", "ask:Tell me more about it.", "undo", "ask:Something else?", "retry",
                   "ask:And finally?"):  # fmt: skip
        for s in sessions:
            if action == "undo":
                s.undo()
            else:
                for _ in s.retry() if action == "retry" else s.ask(action[4:]):
                    pass
        answers = [[list(t.answer_ids) for t in s.turns] for s in sessions]
        assert answers[1] == answers[0], action
        assert sessions[0].start_pos == sessions[1].start_pos
    assert w4_pair[1].model.compiled_step.active and w4_pair[1].model.compiled_step.failure is None
