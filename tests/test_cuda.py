"""CUDA checks (run by scripts/gpu_check.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from decode_helpers import forced_steps, greedy_steps
from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from reference import reference_model
from test_cuda_int4 import _triton_layer, needs_triton

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 would make fp32 convolutions/matmuls differ from the CPU reference by ~1e-3
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _prompt(loaded, tiles):
    s, tok = loaded.special, loaded.tokenizer
    return ([s.im_start] + tok.encode("user\n") + [s.img_start] + [s.img_context] * (256 * tiles)
            + [s.img_end] + tok.encode("\nWhat is it?") + [s.im_end, s.im_start])  # fmt: skip


def test_fp32_cuda_matches_transformers(tiny_original):
    loaded = load_model(tiny_original, device="cuda", dtype="float32", max_context=2048)
    ref = reference_model(tiny_original)
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    ids = _prompt(loaded, 2)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    got = loaded.model.forward(ids, 0, loaded.model.encode_images(pixels), all_logits=True).cpu()
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cuda_is_close(tiny_original, dtype):
    ref = load_model(tiny_original, device="cpu", dtype="float32", max_context=2048)
    half = load_model(tiny_original, device="cuda", dtype=dtype, max_context=2048)
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    ids = _prompt(ref, 1)
    a = ref.model.forward(ids, 0, ref.model.encode_images(pixels))
    b = half.model.forward(ids, 0, half.model.encode_images(pixels)).cpu()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.99


def test_cuda_graph_decode_equals_eager(tiny_original):
    loaded = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024, cuda_graphs=False)
    ids = loaded.tokenizer.encode("one two three four five six") * 40  # crosses a bucket
    eager_tokens, eager_logits = greedy_steps(loaded.model, ids, 30)
    loaded.model.enable_cuda_graphs()
    graph_tokens, graph_logits = greedy_steps(loaded.model, ids, 30)
    assert loaded.model.decode_graphs.graphs, "no graph was captured"
    assert graph_tokens == eager_tokens
    assert (graph_logits - eager_logits).abs().max().item() <= 1e-4 * eager_logits.abs().max().item()


@pytest.mark.parametrize(("dtype", "w4"), [("float32", False), ("bfloat16", True)], ids=["fp32", "w4"])
def test_short_prefill_graph_equals_eager_and_does_not_sync(tiny_original, dtype, w4):
    """A follow-up chunk of 21 tokens (padded to 24: tinygemm rows) and of 90 (padded to 96: the
    dense path) after 300 cached, replayed from a captured graph: the eager chunk's logits."""
    from bench_lib import quantize_decoder_

    loaded = load_model(tiny_original, device="cuda", dtype=dtype, max_context=2048, cuda_graphs=False)
    model = loaded.model
    if w4:
        quantize_decoder_(model, "torch", group_size=32)
    past = list(range(5, 305))
    for tokens in (21, 90):
        chunk = list(range(400, 400 + tokens))
        with torch.inference_mode():
            model.forward(past, 0)
            want = model.forward(chunk, len(past)).clone()
        model.enable_cuda_graphs()
        for _ in range(2):  # the first call captures, the second replays
            with torch.inference_mode():
                model.forward(past, 0)  # over the largest bucket: eager, as before
                got = model.forward(chunk, len(past)).clone()
            if w4:
                assert torch.nn.functional.cosine_similarity(got, want, dim=0).item() > 0.9999
            else:
                assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        graphs = model.decode_graphs
        assert graphs.prefill_failure is None and len(graphs.prefill_graphs) == 1
        ids = torch.tensor(chunk, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphs.prefill(ids, len(past))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.enable_cuda_graphs(False)


def test_a_chunk_after_cached_tokens_runs_in_the_memory_efficient_kernel(tiny_original, monkeypatch):
    """Grouped query heads folded into rows of their KV head (language.folded_attention): SDPA's
    memory-efficient kernel alone takes the chunk's masked attention (with enable_gqa and a mask,
    only the math kernel would, materialising [heads, T, S] scores), and gives its logits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from internvl_chat.engine import language

    loaded = load_model(tiny_original, device="cuda", dtype="bfloat16", max_context=2048, cuda_graphs=False)
    model, past, chunk = loaded.model, list(range(5, 305)), list(range(400, 700))
    with torch.inference_mode():
        model.forward(past, 0)
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            got = model.forward(chunk, len(past)).clone()
        monkeypatch.setitem(language.FOLD_MASKED_GQA, "cuda", False)
        model.forward(past, 0)
        want = model.forward(chunk, len(past))
    assert torch.nn.functional.cosine_similarity(got, want, dim=0).item() > 0.9999


@pytest.mark.parametrize(("dtype", "w4"), [("float32", False), ("bfloat16", False), ("bfloat16", True)], ids=["fp32", "bf16", "w4"])
def test_fused_kernels_give_the_torch_ops_answer_in_and_out_of_graphs(tiny_original, monkeypatch, dtype, w4):
    """engine/fused.py's kernels (norms with residual adds, RoPE with the cache writes, SiLU·mul)
    against the plain torch ops: the same greedy tokens, eager and replayed from CUDA graphs,
    prefill chunks included (one over the largest prefill graph, one short). In bf16 the runs take
    the plain run's tokens: the graphs' steps from position 768 attend over a 1,024-key bucket, so
    through the split attention, whose rounding is not SDPA's, and the tiny model's bf16 logits
    hold exact ties (two tokens at 4.3125 after 768 tokens, seen in the interpreter)."""
    from bench_lib import quantize_decoder_

    from internvl_chat.engine import fused

    loaded = load_model(tiny_original, device="cuda", dtype=dtype, max_context=1024, cuda_graphs=False)
    model = loaded.model
    if w4:
        quantize_decoder_(model, "torch", group_size=32)
    ids = loaded.tokenizer.encode("one two three four five six") * 40  # 760 tokens: crosses a bucket
    runs = {}
    for name, enabled, graphs in (("plain", False, False), ("fused", True, False), ("fused in graphs", True, True)):
        monkeypatch.setitem(fused.ENABLED, "cuda", enabled)
        model.enable_cuda_graphs(graphs)  # graphs captured afresh: a graph holds the kernels it was captured with
        with torch.inference_mode():
            if dtype == "float32" or name == "plain":
                tokens, logits = greedy_steps(model, ids, 24)
            else:  # the plain run's tokens (see above)
                tokens = runs["plain"][0]
                logits = forced_steps(model, ids, tokens)
            follow = model.forward(list(range(400, 421)), len(ids) + 24).clone()
        runs[name] = tokens, torch.cat([logits.flatten(), follow])
    # the kernels ran: a failed first check (fused._verdict) would leave every run on the torch ops
    checked = fused.verdicts("cuda")
    assert checked and all(checked.values()), f"the fused kernels' check failed here ({checked}): see the note on stderr"
    want_tokens, want = runs["plain"]
    for name, (tokens, got) in runs.items():
        assert tokens == want_tokens, name
        if dtype == "float32":
            assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), name
        else:
            assert torch.nn.functional.cosine_similarity(got, want, dim=0).item() > 0.999, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_decode_attention_on_cuda_is_sdpa_over_the_visible_keys(dtype):
    from internvl_chat.engine import fused

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 1, 28, 128, device="cuda", generator=gen, dtype=dtype)
    k_cache, v_cache = (torch.randn(1, 4, 8192, 128, device="cuda", generator=gen, dtype=dtype) for _ in range(2))
    for kv_len, last in ((4096, 4095), (8192, 5000), (1024, 0)):
        want = torch.nn.functional.scaled_dot_product_attention(
            q.view(1, 4, 7, 128), k_cache[:, :, : last + 1], v_cache[:, :, : last + 1]
        ).view(1, 1, 28 * 128).float()
        for given in (last, torch.tensor([last], device="cuda")):
            got = fused.decode_attention(q, k_cache, v_cache, kv_len, given).float()
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_long_context_decode_with_the_fused_kernels_gives_the_torch_ops_tokens(tiny_original, monkeypatch):
    """Over 2,000 cached tokens the one-token steps attend through the split attention (eager
    and in graphs): the plain torch ops' greedy tokens."""
    from internvl_chat.engine import fused

    loaded = load_model(tiny_original, device="cuda", dtype="float32", max_context=4096, cuda_graphs=False)
    model = loaded.model
    ids = loaded.tokenizer.encode("one two three four five six") * 110  # 19 tokens a phrase: 2,090 of 4,096
    assert 2000 < len(ids) < 4096 - 16
    kv_lens = []  # decode_attention's kv_len, per call (in graphs: the captures' calls)
    real = fused.decode_attention
    monkeypatch.setattr(fused, "decode_attention", lambda *args: kv_lens.append(args[3]) or real(*args))
    runs = {}
    for name, enabled, graphs in (("plain", False, False), ("fused", True, False), ("fused in graphs", True, True)):
        monkeypatch.setitem(fused.ENABLED, "cuda", enabled)
        model.enable_cuda_graphs(graphs)
        kv_lens.clear()
        with torch.inference_mode():
            runs[name] = greedy_steps(model, ids, 16)
        assert any(n > 2000 for n in kv_lens) == enabled, name
    want_tokens, want_logits = runs["plain"]
    for name, (tokens, logits) in runs.items():
        assert tokens == want_tokens, name
        assert (logits - want_logits).abs().max().item() <= 1e-4 * want_logits.abs().max().item(), name


def test_compiled_graph_decode_equals_eager(tiny_original):
    """The compiled step (Triton kernels) replayed from CUDA graphs, across a KV bucket boundary."""
    loaded = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024, cuda_graphs=False)
    ids = loaded.tokenizer.encode("one two three four five six") * 40
    eager_tokens, eager_logits = greedy_steps(loaded.model, ids, 30)
    fast = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024, compile="on")
    step = fast.model.compiled_step
    assert step is not None and step.active and step.for_graphs, "the decode step did not compile for CUDA graphs"
    graph_tokens, graph_logits = greedy_steps(fast.model, ids, 30)
    assert len(fast.model.decode_graphs.graphs) >= 2, "no bucket boundary was crossed"
    assert graph_tokens == eager_tokens
    assert (graph_logits - eager_logits).abs().max().item() <= 1e-4 * eager_logits.abs().max().item()


def test_compiled_w4_decode_equals_eager(tiny_original):
    """4-bit (tinygemm) linears inside the compiled, graph-replayed step."""
    from bench_lib import quantize_decoder_

    models = []
    for mode in ("off", "on"):
        loaded = load_model(tiny_original, device="cuda", dtype="bfloat16", max_context=1024)
        quantize_decoder_(loaded.model, "torch", group_size=32)
        if mode == "on":
            assert loaded.model.enable_compile(True)
        models.append(loaded.model)
    ids = list(range(5, 300))
    want, want_logits = greedy_steps(models[0], ids, 16)
    got, got_logits = greedy_steps(models[1], ids, 16)
    assert got == want
    assert torch.nn.functional.cosine_similarity(got_logits.flatten(), want_logits.flatten(), dim=0).item() > 0.999


def test_serve_slots_on_cuda_with_the_compiled_graphs(tiny_original):
    """Each serve slot owns a KV cache and its own CUDA graphs of the compiled step (captured over
    that cache); interleaved conversations match each one run alone with the eager step."""
    params = SamplingParams(max_new_tokens=8)
    prompts = [["Hello there!", "Tell me more."], ["Something else?", "And finally?"]]
    eager = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024, cuda_graphs=False)
    want = []
    for turns in prompts:
        alone = Session(eager, params)
        for text in turns:
            for _ in alone.ask(text):
                pass
        want.append([list(t.answer_ids) for t in alone.turns])
    fast = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024, compile="on")
    assert fast.model.compiled_step is not None and fast.model.compiled_step.for_graphs
    slots = [Session(fast, params) for _ in prompts]
    for i, s in enumerate(slots):
        s.own_kv_cache(share_model_cache=(i == 0))
    for turn in range(2):
        for s, turns in zip(slots, prompts):
            s.activate_kv_cache()
            for _ in s.ask(turns[turn]):
                pass
    assert [[list(t.answer_ids) for t in s.turns] for s in slots] == want
    # the second slot's graphs: the compiled step, captured over its own cache (activating a slot
    # makes its graphs the model's, so compare with the first slot's, the model's own)
    own, first = slots[1]._kv.graphs, slots[0]._kv.graphs
    assert own is not first and own.step_fn == fast.model.compiled_step.masked and own.graphs
    assert fast.model.compiled_step.active


def _session_logprobs(loaded, params, text):
    return [entry for event in Session(loaded, params).ask(text) for entry, _ in event.get("logprobs") or ()]


@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_logprobs_with_cuda_graphs_are_each_steps_own(tiny_original, compile_mode):
    """A decode graph writes every step's logits into one buffer: the server's logprobs must be
    taken from the step they belong to (computed before the next replay), as on the CPU."""
    params = SamplingParams(max_new_tokens=12, logprobs=3)
    cpu = _session_logprobs(load_model(tiny_original, device="cpu", dtype="float32", max_context=1024), params, "Hello there!")
    graphs = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024, compile=compile_mode)
    gpu = _session_logprobs(graphs, params, "Hello there!")
    assert graphs.model.decode_graphs is not None and graphs.model.decode_graphs.graphs, "no graph was captured"
    assert len(cpu) == 12 and [e.token_id for e in gpu] == [e.token_id for e in cpu]
    for a, b in zip(cpu, gpu):
        assert abs(a.logprob - b.logprob) <= 1e-3
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) <= 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scored_prefill_on_cuda_gives_the_cpu_scores(tiny_original, monkeypatch, dtype):
    """/v1/completions' echo with logprobs: the scored prefill (chunks and score blocks ending mid-way)
    on the GPU, with its graphs and fused kernels enabled, scores each prompt token as the CPU does
    and as one full forward does; it leaves the model's last logits as a plain prefill's."""
    from internvl_chat.engine import model as engine_model
    from internvl_chat.engine.model import PromptScores

    monkeypatch.setattr(engine_model, "SCORE_ROWS", 7)
    cpu = load_model(tiny_original, device="cpu", dtype="float32", max_context=1024)
    gpu = load_model(tiny_original, device="cuda", dtype=dtype, max_context=1024, compile="on")
    gpu.model.prefill_chunk = cpu.model.prefill_chunk = 32
    ids = cpu.tokenizer.encode("one two three four five six seven eight nine ten") * 6
    assert len(ids) > 64
    rows = []
    for loaded in (cpu, gpu):
        scores = PromptScores(3)
        last = loaded.model.forward(ids, 0, scores=scores).cpu()
        rows.append((torch.tensor(scores.rows()), last))
    (want, want_last), (got, got_last) = rows
    full = cpu.model.forward(ids, 0, all_logits=True).log_softmax(-1)
    exact = torch.tensor([float(full[j - 1, ids[j]]) for j in range(1, len(ids))], dtype=torch.float64)
    tol = 1e-4 if dtype == "float32" else 5e-2
    assert got.shape == want.shape == (len(ids) - 1, 7)
    assert (want[:, 0] - exact).abs().max().item() <= 1e-4
    assert (got[:, 0] - want[:, 0]).abs().max().item() <= tol * max(1.0, want[:, 0].abs().max().item())
    if dtype == "float32":
        assert torch.equal(got[:, 4:], want[:, 4:]), "another top-3 on the GPU"
    assert torch.nn.functional.cosine_similarity(got_last, want_last, dim=0).item() > 0.999


def test_decode_step_does_not_sync(tiny_original):
    for graphs, compile_mode in ((False, "off"), (True, "off"), (True, "on")):
        loaded = load_model(tiny_original, device="cuda", dtype="bfloat16", max_context=1024, cuda_graphs=graphs,
                            compile=compile_mode)  # fmt: skip
        ids = loaded.tokenizer.encode("hello there")
        logits = loaded.model.forward(ids, 0)
        token = logits.argmax().view(1)
        loaded.model.forward(token, len(ids))  # first call may capture a graph
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for pos in range(len(ids) + 1, len(ids) + 5):
                token = loaded.model.forward(token, pos).argmax().view(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_session_on_cuda_matches_cpu_tokens(tiny_original):
    cpu = Session(load_model(tiny_original, device="cpu", dtype="float32", max_context=4096), SamplingParams(max_new_tokens=10))
    gpu = Session(load_model(tiny_original, device="cuda", dtype="float32", max_context=4096), SamplingParams(max_new_tokens=10))
    for text in ("Hello!", "Tell me more."):
        for session in (cpu, gpu):
            for _ in session.ask(text):
                pass
        assert gpu.turns[-1].answer_ids == cpu.turns[-1].answer_ids


# ---------------------------------------------------------------------------------------------
# The triton int4 backend inside compiled and graph-replayed steps (its kernels alone:
# tests/test_cuda_int4.py, which scripts/gpu_check.sh runs first)


@needs_triton
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_triton_backend_under_inductor_without_graph_breaks(mode):
    layer, awq, bias = _triton_layer(3584, 4608, seed=7)

    def block(x):
        return torch.nn.functional.silu(layer(x * 2)) + 1

    x = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(block, fullgraph=True, mode=mode)
    want = block(x)
    for _ in range(3):  # reduce-overhead records a CUDA graph on a later call
        got = compiled(x)
    from test_int4_linear import rel_err

    assert rel_err(got, want) < 1e-2
    torch._dynamo.reset()


def _w4_models(tiny_original, backends, compile_last=False):
    from bench_lib import quantize_decoder_

    models = []
    for i, backend in enumerate(backends):
        loaded = load_model(tiny_original, device="cuda", dtype="bfloat16", max_context=1024)
        quantize_decoder_(loaded.model, backend, group_size=32)
        if compile_last and i == len(backends) - 1:
            assert loaded.model.enable_compile(True)
        models.append(loaded.model)
    return models


@needs_triton
def test_w4_triton_logits_close_to_tinygemm(tiny_original):
    """The same tokens fed to a random-weight W4 model on both backends (their roundings differ, so
    greedy paths may part): prefill (dense path) and each decode step's logits agree closely."""
    tinygemm, ours = _w4_models(tiny_original, ("torch", "triton"))
    ids = list(range(5, 300))
    a, b = tinygemm.forward(ids, 0), ours.forward(ids, 0)
    pos = len(ids)
    for _ in range(12):
        assert torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).item() > 0.999
        token = a.argmax().view(1)
        a, b = tinygemm.forward(token, pos), ours.forward(token, pos)
        pos += 1


@needs_triton
def test_compiled_w4_triton_decode_equals_eager(tiny_original):
    """Our Triton GEMV inside the compiled, graph-replayed decode step."""
    eager, fast = _w4_models(tiny_original, ("triton", "triton"), compile_last=True)
    ids = list(range(5, 300))
    want, want_logits = greedy_steps(eager, ids, 16)
    got, got_logits = greedy_steps(fast, ids, 16)
    assert got == want
    assert torch.nn.functional.cosine_similarity(got_logits.flatten(), want_logits.flatten(), dim=0).item() > 0.999


# last in this file: it makes a capture fail on purpose (tests/test_decode_graphs.py covers the
# code around it on the CPU; this checks what only CUDA can: the stream and context afterwards)
def test_a_failed_capture_decodes_without_graphs_on_the_callers_stream(tiny_original, capfd):
    """A host sync inside the capture, which CUDA refuses while a stream captures (capture_end
    then raises too): one note, the caller's stream is current again, and decoding goes on
    without graphs, with the eager tokens."""
    loaded = load_model(tiny_original, device="cuda", dtype="float32", max_context=1024, cuda_graphs=False)
    ids = loaded.tokenizer.encode("one two three four five six") * 40
    want, want_logits = greedy_steps(loaded.model, ids, 12)
    loaded.model.enable_cuda_graphs()
    graphs = loaded.model.decode_graphs
    step = graphs.step_fn

    def syncing(token, position, kv_len):
        logits = step(token, position, kv_len)
        if torch.cuda.is_current_stream_capturing():
            logits.sum().item()
        return logits

    graphs.step_fn = syncing
    caller = torch.cuda.current_stream()
    got, got_logits = greedy_steps(loaded.model, ids, 12)
    assert graphs.failure and not graphs.graphs
    assert torch.cuda.current_stream() == caller and not torch.cuda.is_current_stream_capturing()
    assert got == want
    assert (got_logits - want_logits).abs().max().item() <= 1e-4 * want_logits.abs().max().item()
    assert "decoding without CUDA graphs" in capfd.readouterr().err
    # the failed capture left torch's default CUDA generator usable (torch 2.11 marks it as still
    # capturing: every later random op on it raised)
    torch.cuda.manual_seed(0)
    first = torch.randn(8, device="cuda")
    torch.cuda.manual_seed(0)
    assert torch.equal(torch.randn(8, device="cuda"), first)
