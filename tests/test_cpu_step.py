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
