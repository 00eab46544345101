"""CUDA-graph decode and short prefills (engine/cuda_graph.py) checked on the CPU:
`DecodeGraphs._record`, the one function that needs a GPU, is replaced by a stand-in that replays
the same step from the same static buffers (or `_capture` / `_capture_prefill` by a fault: they
raise as a capture can on a GPU); the model's forward, the streaming generator and the session
around it are the real code."""

from __future__ import annotations

import pytest
import torch

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.session import Session
from internvl_chat.engine import language
from internvl_chat.engine.cuda_graph import PREFILL_TOKEN_BUCKETS, DecodeGraphs, prefill_buckets
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import GenerationError
from session_helpers import final_event

CONTEXT = 1024
# a question whose answer crosses the first KV bucket (its prompt: ~250 tokens; the bucket: 256)
LONG = "one two three four five six seven eight nine ten " * 3
OOM = "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB of which 3.06 MiB is free."


def _load(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT, compile="off")


@pytest.fixture(scope="module")
def eager(tiny_original):
    return _load(tiny_original)


class _CpuGraph:
    """Stands for a captured graph on the CPU: `replay` runs the captured step again from the
    graphs' static buffers into the same output tensor."""

    def __init__(self, run):
        self.run = run
        self.out = run()

    def replay(self) -> None:
        self.out.copy_(self.run())

    def pool(self):
        return "the CPU stand-in's pool"


def _record_on_cpu(graphs: DecodeGraphs, run, pool, warm_ups: int):
    graph = _CpuGraph(run)
    return graph, graph.out


@pytest.fixture
def graphed(tiny_original, monkeypatch):
    """The tiny model decoding and prefilling short chunks through DecodeGraphs, as
    `enable_cuda_graphs()` sets it up on a GPU, with graphs recorded by the CPU stand-in."""
    loaded = _load(tiny_original)
    loaded.model.decode_graphs = DecodeGraphs(loaded.model)
    monkeypatch.setattr(DecodeGraphs, "_record", _record_on_cpu)
    return loaded


def _answers(loaded, script) -> list[list[int]]:
    """Run `script(session)` on a fresh greedy session; every turn's answer ids."""
    session = Session(loaded, SamplingParams(max_new_tokens=16))
    script(session)
    return [list(t.answer_ids) for t in session.turns]


def _two_turns(session: Session) -> None:
    final_event(session.ask(LONG))
    final_event(session.ask("And again?"))


def test_replayed_steps_follow_the_eager_answers_across_buckets_undo_and_retry(eager, graphed, monkeypatch):
    # static buffers refilled each step, one graph per bucket, positions moving back after /undo
    # and /retry: the graphs' step gives the eager step's tokens
    def script(session: Session) -> None:
        _two_turns(session)
        session.undo()
        final_event(session.retry())
        final_event(session.ask("A third question."))

    got = _answers(graphed, script)
    assert got == _answers(eager, script)
    graphs = graphed.model.decode_graphs
    assert sorted(graphs.graphs) == [256, 512]
    # every turn's prompt is short: each one was a prefill graph's replay (KV bucket: the whole cache)
    assert graphs.prefill_graphs and {kv for _, kv in graphs.prefill_graphs} == {CONTEXT}


@pytest.mark.parametrize(
    "error",
    [lambda: torch.OutOfMemoryError(OOM), lambda: RuntimeError("CUDA error: operation not permitted when stream is capturing")],
    ids=["out of memory", "not capturable"],
)
def test_a_failed_capture_is_one_note_and_the_answers_come_without_graphs(eager, graphed, monkeypatch, capfd, error):
    tries = []

    def failing(graphs, kv_len):
        tries.append(kv_len)
        raise error()

    monkeypatch.setattr(DecodeGraphs, "_capture", failing)
    assert _answers(graphed, _two_turns) == _answers(eager, _two_turns)
    graphs = graphed.model.decode_graphs
    assert tries == [256] and not graphs.graphs and graphs.failure  # tried once, never again
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("internvl-chat:")]
    assert len(notes) == 1 and "decoding without CUDA graphs" in notes[0] and graphs.failure in notes[0]
    assert len(notes[0]) < 200


def test_running_out_of_memory_after_a_failed_capture_is_one_error_and_the_conversation_goes_on(eager, graphed, monkeypatch):
    # the first bucket's graph replays; the second one's capture fails, and its step, launched
    # without graphs, runs out of memory too: the turn fails with the one line, the conversation
    # is as before, and the next turn answers as the eager model does
    graphs = graphed.model.decode_graphs

    def capture(graphs, kv_len):
        if kv_len > 256:
            raise torch.OutOfMemoryError(OOM)
        return _record_on_cpu(graphs, lambda: graphs._step(kv_len), None, 2)

    step, failed_once = graphs.step_fn, []

    def step_fn(token, position, kv_len):
        if kv_len > 256 and not failed_once:
            failed_once.append(kv_len)
            raise torch.OutOfMemoryError(OOM)
        return step(token, position, kv_len)

    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    graphs.step_fn = step_fn
    session = Session(graphed, SamplingParams(max_new_tokens=16))
    final_event(session.ask("First."))
    assert list(graphs.graphs) == [256] and graphs.failure is None
    with pytest.raises(GenerationError, match="^out of memory during generation; ") as failed:
        final_event(session.ask(LONG))
    assert "\n" not in str(failed.value) and failed_once and graphs.failure and not graphs.graphs
    assert [t.user_text for t in session.turns] == ["First."]
    final_event(session.ask(LONG))
    want = Session(eager, SamplingParams(max_new_tokens=16))
    for text in ("First.", LONG):
        final_event(want.ask(text))
    assert [t.answer_ids for t in session.turns] == [t.answer_ids for t in want.turns]


def test_a_compiled_step_that_fails_leaves_the_eager_step_inside_the_graphs(eager, graphed, monkeypatch, capfd):
    # the compiled step DecodeGraphs captures (CompiledStep.masked) raising, as a recompile or a
    # kernel's launch can, in the warm-up before a capture: one note, the eager step is captured
    # instead, and the answers are the eager model's
    from internvl_chat.engine.compiled import CompiledStep

    model = graphed.model
    step = CompiledStep(model.language_model, model.device, for_graphs=True)
    calls = []

    def failing(*args):
        calls.append(args)
        raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")

    step._fn, step.active = failing, True  # as compile() leaves it
    model.compiled_step = step
    model.decode_graphs = DecodeGraphs(model, step.masked)
    assert _answers(graphed, _two_turns) == _answers(eager, _two_turns)
    assert len(calls) == 1 and not step.active and "Detected recompile" in step.failure
    graphs = model.decode_graphs
    assert graphs.failure is None and sorted(graphs.graphs) == [256, 512]
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("internvl-chat:")]
    assert len(notes) == 1 and "using the eager step" in notes[0]


def test_prefill_buckets_pad_a_short_chunk_and_round_its_keys_up_to_a_power_of_two():
    assert prefill_buckets(0, 2, 4096) == (8, 1024)
    assert prefill_buckets(1000, 20, 4096) == (24, 1024)  # keys 0 … 1023
    assert prefill_buckets(1001, 24, 4096) == (24, 2048)
    assert prefill_buckets(5000, 200, 65536) == (256, 8192)
    assert prefill_buckets(3000, 90, 4096) == (96, 4096)  # no further than the cache
    assert prefill_buckets(4001, 90, 4096) is None  # the padding would run past the cache's end
    assert prefill_buckets(0, PREFILL_TOKEN_BUCKETS[-1] + 1, 4096) is None  # a long chunk: prefilled eagerly
    for tokens in range(16, PREFILL_TOKEN_BUCKETS[-1] + 1):  # padding costs at most half again
        assert tokens <= prefill_buckets(0, tokens, 4096)[0] <= 1.5 * tokens


@pytest.mark.parametrize("folded", [False, True], ids=["enable_gqa", "folded heads"])
def test_a_padded_prefill_gives_the_eager_logits_and_cache(eager, monkeypatch, folded):
    # 21 new tokens after 300 cached, padded to 24 and attending over 1,024 keys with the mask
    # built from device positions: the logits of the last real token and the cache of the real
    # positions are the eager chunk's (computed with SDPA's enable_gqa); with the grouped query
    # heads folded into rows of their KV head, as on CUDA, too
    model, lm = eager.model, eager.model.language_model
    assert lm.cfg.num_kv_heads < lm.cfg.num_heads  # grouped: the fold has work to do
    gen = torch.Generator().manual_seed(0)
    vocab = eager.config.text.vocab_size
    past, chunk = torch.randint(0, vocab, (300,), generator=gen), torch.randint(0, vocab, (21,), generator=gen)
    with torch.inference_mode():
        model.forward(past, 0)
        want = model.forward(chunk, 300)
        want_k, want_v = [k[:, :, :321].clone() for k in lm.k_cache], [v[:, :, :321].clone() for v in lm.v_cache]
        model.forward(past, 0)
        if folded:
            monkeypatch.setitem(language.FOLD_MASKED_GQA, "cpu", True)
        ids = torch.cat([chunk, torch.full((3,), 7)])
        got = lm.prefill_masked(ids, torch.arange(300, 324), torch.tensor([20]), 1024)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for k, k0, v, v0 in zip(lm.k_cache, want_k, lm.v_cache, want_v):
        torch.testing.assert_close(k[:, :, :321], k0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v[:, :, :321], v0, rtol=1e-5, atol=1e-6)


def test_a_prompt_over_the_largest_bucket_is_prefilled_eagerly_and_the_next_short_one_replays(eager, graphed):
    def script(session: Session) -> None:
        final_event(session.ask(LONG * 3))  # ~400 tokens
        final_event(session.ask("And again?"))

    assert _answers(graphed, script) == _answers(eager, script)
    keys = list(graphed.model.decode_graphs.prefill_graphs)
    assert len(keys) == 1 and keys[0][0] <= 32  # the follow-up only


def test_a_failed_prefill_capture_is_one_note_and_leaves_the_decode_graphs(eager, graphed, monkeypatch, capfd):
    tries = []

    def failing(graphs, padded, kv_len):
        tries.append((padded, kv_len))
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_capture_prefill", failing)
    assert _answers(graphed, _two_turns) == _answers(eager, _two_turns)
    graphs = graphed.model.decode_graphs
    assert len(tries) == 1 and not graphs.prefill_graphs and "not permitted" in graphs.prefill_failure  # tried once
    assert sorted(graphs.graphs) == [256, 512] and graphs.failure is None
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("internvl-chat:")]
    assert len(notes) == 1 and "prefilling without CUDA graphs" in notes[0] and len(notes[0]) < 200


def test_the_graph_steps_build_their_key_bias_once_not_in_every_layer(eager):
    # a bool mask is converted to an additive one in every layer's SDPA call (aten::where: two
    # more kernels a layer in a CUDA graph); the graphs' steps pass the bias built once
    from torch.profiler import ProfilerActivity, profile

    lm = eager.model.language_model
    assert len(lm.model.layers) >= 2
    steps = {
        "decode_masked": lambda: lm.decode_masked(torch.tensor([5]), torch.tensor([10]), 256),
        "prefill_masked": lambda: lm.prefill_masked(torch.arange(5, 13), torch.arange(10, 18), torch.tensor([7]), 256),
    }
    for name, step in steps.items():
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wheres = [e for e in prof.events() if e.name == "aten::where" and (e.cpu_parent is None or e.cpu_parent.name != "aten::where")]
        assert len(wheres) == 1, name


def test_graphs_over_the_fused_kernels_and_folded_heads_answer_as_the_torch_ops(eager, graphed, monkeypatch):
    # the CUDA path as a whole, on the CPU: decode and short-prefill graphs (the stand-in) over the
    # fused kernels (Triton's interpreter), the split attention from 64 keys, and masked chunks
    # with folded query heads
    from internvl_chat.engine import fused

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(fused.ENABLED, "cpu", True)
    monkeypatch.setattr(fused, "SPLIT_ATTENTION_MIN_KEYS", 64)
    monkeypatch.setitem(language.FOLD_MASKED_GQA, "cpu", True)
    calls = []
    real = fused.decode_attention
    monkeypatch.setattr(fused, "decode_attention", lambda *args: calls.append(args[3]) or real(*args))

    def script(session: Session) -> None:
        _two_turns(session)
        session.undo()
        final_event(session.retry())

    got = _answers(graphed, script)
    monkeypatch.setitem(fused.ENABLED, "cpu", False)
    assert got == _answers(eager, script)
    graphs = graphed.model.decode_graphs
    assert graphs.graphs and graphs.prefill_graphs and calls  # every part took its turn
